"""The RG-LRU backends against the PyTorch scan computed in float64, on fresh random inputs every run."""

import random

import pytest
import torch

from rgchat import scan
from rgchat.errors import RGChatError
from rgchat.kernels.metal_scan import metal_arguments
from rgchat.scan import TORCH_BACKEND, backend_for, rglru_torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_inputs(T: int, L: int, seed: int, with_resets: bool, with_state: bool):
    """float32 values (held in float64): the kernels and the float64 reference see exactly the same inputs."""
    g = torch.Generator().manual_seed(seed)
    x, gate_x, gate_a = (torch.randn(T, L, generator=g) * 2 for _ in range(3))
    a_scale = -8 * torch.nn.functional.softplus(torch.randn(L, generator=g) * 2 - 2)
    h0 = torch.randn(L, generator=g) if with_state else torch.zeros(L)
    x, gate_x, gate_a, a_scale, h0 = (t.double() for t in (x, gate_x, gate_a, a_scale, h0))
    reset = None
    if with_resets:
        reset = torch.rand(T, generator=g) < 0.01
        reset[random.Random(seed).randrange(T)] = True  # at least one document start
    return x, gate_x, gate_a, a_scale, h0, reset


def exact(x, gate_x, gate_a, a_scale, h0, reset):
    h = h0.clone()
    return rglru_torch(x, gate_x, gate_a, a_scale, h, reset), h


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 7, 2048, 5000])
@pytest.mark.parametrize("with_resets,with_state", [(False, True), (True, True), (True, False)])
def test_native_matches_float64_reference(device, T, with_resets, with_state):
    seed = random.randrange(2**31)
    inputs = random_inputs(T, 2560 if T <= 2048 else 640, seed, with_resets, with_state)
    want_y, want_h = exact(*inputs)
    x, gate_x, gate_a, a_scale, h0, reset = inputs
    h = h0.float().to(device)
    native = backend_for(device, "native")
    y = native.fn(*(t.float().to(device) for t in (x, gate_x, gate_a, a_scale)), h,
                  reset.to(device) if reset is not None else None)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert relative_error(y, want_y) < 1e-5, f"seed {seed}"
    assert relative_error(h, want_h) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_native_bf16_inputs_keep_a_float32_carry(device):
    seed = random.randrange(2**31)
    x, gate_x, gate_a, a_scale, h0, reset = random_inputs(300, 512, seed, True, True)
    bf = [t.to(device, torch.bfloat16) for t in (x, gate_x, gate_a)]
    h_native, h_torch = h0.float().to(device), h0.float().to(device)
    reset = reset.to(device)
    y_torch = rglru_torch(*[t.clone() for t in bf], a_scale.float().to(device), h_torch, reset)
    y_native = backend_for(device, "native").fn(*bf, a_scale.float().to(device), h_native, reset)
    assert y_native.dtype == torch.bfloat16 and h_native.dtype == torch.float32
    assert relative_error(h_native, h_torch.double().cpu()) < 1e-5, f"seed {seed}"
    assert relative_error(y_native, y_torch.double().cpu()) < 1e-2, f"seed {seed}"  # bf16 output rounding


@pytest.mark.parametrize("device", DEVICES)
def test_model_greedy_output_is_the_same_with_either_scan(monkeypatch, device):
    from conftest import BLOCKS, greedy_tokens, tiny_model

    model = tiny_model(BLOCKS, seed=41).to(device)
    prompt = torch.randint(0, BLOCKS.vocab_size, (300,), generator=torch.Generator().manual_seed(42)).tolist()
    outputs = {}
    for choice in ("native", "torch"):
        monkeypatch.setenv(scan.ENV_VAR, choice)
        outputs[choice] = greedy_tokens(model, prompt, 40)
    assert outputs["native"] == outputs["torch"]
    assert len(set(outputs["native"])) > 5


def test_missing_native_library_falls_back_with_one_notice(monkeypatch, capsys):
    def missing():
        raise OSError("the compiled kernel is missing (simulated)")

    monkeypatch.setattr(scan, "_find_cpu_library", missing)
    backend_for.cache_clear()
    try:
        assert backend_for("cpu", "auto") is TORCH_BACKEND
        assert backend_for("cpu", "auto") is TORCH_BACKEND
        err = capsys.readouterr().err
        assert err.count("native scan unavailable on cpu") == 1 and "simulated" in err
        with pytest.raises(RGChatError, match="RGCHAT_SCAN=native"):
            backend_for("cpu", "native")
        assert backend_for("cpu", "torch") is TORCH_BACKEND
    finally:
        backend_for.cache_clear()


def test_unknown_device_and_bad_choice():
    assert backend_for("xla", "auto") is TORCH_BACKEND
    with pytest.raises(RGChatError):
        backend_for("cpu", "fast")


def test_metal_arguments_follow_the_shader_signature():
    """The Metal kernel cannot run here; its argument list (buffers 0-9 of rglru_float) can be checked."""
    x, gate_x, gate_a, a_scale, h0, reset = random_inputs(5, 8, 0, True, True)
    h = h0.float()
    args, y = metal_arguments(x.bfloat16(), gate_x, gate_a, a_scale, h, reset)
    assert [a.dtype for a in args[:7]] == [torch.float32] * 4 + [torch.uint8, torch.float32, torch.float32]
    assert all(a.is_contiguous() for a in args[:7]) and args[5] is h and args[6] is y
    assert args[7:] == [5, 8, 1]
    args, _ = metal_arguments(x, gate_x, gate_a, a_scale, h, None)
    assert args[9] == 0 and args[4].numel() == 1
    with pytest.raises(ValueError):
        metal_arguments(x, gate_x, gate_a, a_scale, h.double(), None)
