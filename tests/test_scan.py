import torch

from rgchat.scan import rglru_scan_torch


def test_torch_scan_matches_float64_recurrence():
    g = torch.Generator().manual_seed(0)
    T, L = 37, 16
    x = torch.randn(T, L, generator=g)
    a = torch.rand(T, L, generator=g)
    h0 = torch.randn(L, generator=g)
    h = h0.clone()
    y = rglru_scan_torch(x, a, h)
    ref, expected = h0.double(), []
    for t in range(T):
        ref = a[t].double() * ref + x[t].double()
        expected.append(ref)
    assert torch.allclose(y.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-6)


def test_single_step_returns_a_copy_of_the_carry():
    h = torch.ones(4)
    y = rglru_scan_torch(torch.full((1, 4), 2.0), torch.full((1, 4), 0.5), h)
    assert torch.equal(h, torch.full((4,), 2.5)) and torch.equal(y[0], h)
    h.zero_()
    assert y[0, 0] == 2.5


def test_bf16_inputs_keep_a_float32_carry():
    h = torch.zeros(8)
    x = torch.full((300, 8), 1e-3, dtype=torch.bfloat16)
    y = rglru_scan_torch(x, torch.ones(300, 8, dtype=torch.bfloat16), h)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert abs(float(h[0]) - 300 * float(x[0, 0])) < 1e-4  # a bf16 carry would stall long before 0.3
