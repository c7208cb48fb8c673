"""The native decode-step operations (kernels/step.c) against torch written out in float64, and the model's
decode with them on and off."""

import dataclasses

import pytest
import torch

from conftest import BLOCKS, CYCLES, greedy_tokens, tiny_model
from rgchat import model as model_module
from rgchat import step_ops
from rgchat.errors import RGChatError
from rgchat.engine import Engine
from rgchat.model import attend
from rgchat.scan import rglru_torch
from rgchat.state import State

needs_library = pytest.mark.skipif(step_ops._ops_for("auto") is None, reason="native step library not built")
DTYPES = [torch.float32, torch.bfloat16]


def ops() -> step_ops.StepOps:
    return step_ops._ops_for("native")


def randn(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within one rounding of the result (bfloat16) or float32 arithmetic."""
    rtol, atol = (1e-2, 1e-2) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol * expected.abs().max().item())


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 2560), (3, 37), (8, 100)])
def test_rms_norm(dtype, rows, width):
    x, w = randn(rows, 1, width, seed=1, dtype=dtype), randn(width, seed=2, dtype=dtype, scale=0.2)
    xd = x.double()
    expected = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * (1 + w.double())
    got = ops().rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    close(got, expected, dtype)


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1023, 3000])  # a part block, one short of a block, several blocks
def test_gelu_mul(dtype, n):
    gate, up = randn(n, seed=3, dtype=dtype, scale=3.0), randn(n, seed=4, dtype=dtype)
    expected = torch.nn.functional.gelu(gate.double(), approximate="tanh") * up.double()
    close(ops().gelu_mul(gate, up), expected, dtype)


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 4])
def test_conv_step_and_its_state(dtype, width):
    n, L = 3, 19
    u, state = randn(n, 1, L, seed=5, dtype=dtype), randn(n, width - 1, L, seed=6, dtype=dtype)
    w, b = randn(L, width, seed=7, dtype=dtype), randn(L, seed=8, dtype=dtype)
    window = torch.cat([state, u], dim=1).double()
    expected = b.double() + (window * w.double().t()).sum(1, keepdim=True)
    new_state = window[:, 1:].to(dtype)
    got = ops().conv(u, state, w, b)
    close(got, expected, dtype)
    assert torch.equal(state, new_state)  # moved on by u, exactly


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
def test_rglru_step_times_gelu(dtype):
    n, L = 4, 45
    x, y = randn(n, 1, L, seed=9, dtype=dtype), randn(n, 1, L, seed=10, dtype=dtype, scale=2.0)
    gate_x, gate_a = randn(n, L, seed=11, dtype=dtype), randn(n, L, seed=12, dtype=dtype)
    a_scale = -8.0 * torch.nn.functional.softplus(randn(L, seed=13, scale=3.0) - 3)
    h = randn(n, L, seed=14)
    h_expected = h.double().clone()
    expected = torch.stack([rglru_torch(x[i].double(), gate_x[i:i + 1].double(), gate_a[i:i + 1].double(),
                                        a_scale, h_expected[i]) for i in range(n)])
    expected = expected * torch.nn.functional.gelu(y.double(), approximate="tanh")
    got = ops().rglru_gelu(x, gate_x, gate_a, a_scale, h, y)
    close(got, expected, dtype)
    torch.testing.assert_close(h.double(), h_expected, rtol=1e-5, atol=1e-6)


def rope(x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    inv = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * inv
    return angles.cos(), angles.sin()


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2)])
def test_attention_over_ring_rows_then_stores_the_new_key(dtype, heads, kv_heads):
    """Rows of a pool picked out of order, one with a part-filled ring and one with a full one: each attends
    over its filled slots and its own new key (the official window + 1 keys), then keeps that key."""
    window, hd, pool_rows = 8, 12, 5
    rows, filled, slot = torch.tensor([3, 0, 4]), torch.tensor([0, 5, 8]), torch.tensor([0, 5, 2])
    n = rows.shape[0]
    ring_k = randn(pool_rows, window, kv_heads, hd, seed=15, dtype=dtype)
    ring_v = randn(pool_rows, window, kv_heads, hd, seed=16, dtype=dtype)
    q, k = randn(n, 1, heads * hd, seed=17, dtype=dtype), randn(n, 1, kv_heads * hd, seed=18, dtype=dtype)
    v = randn(n, 1, kv_heads * hd, seed=19, dtype=dtype)
    cos, sin = rope(q, torch.tensor([0, 5, 30]), hd)
    before_k, before_v = ring_k.clone(), ring_v.clone()
    got = ops().attention(q, k, v, ring_k, ring_v, cos.to(dtype), sin.to(dtype), rows, filled, slot, heads)

    c, s = cos.to(dtype).double(), sin.to(dtype).double()
    rotated_q = model_module.apply_rope(q.double().view(n, heads, hd), c, s).to(dtype)
    rotated_k = model_module.apply_rope(k.double().view(n, kv_heads, hd), c, s).to(dtype)
    for i in range(n):
        r, f = int(rows[i]), int(filled[i])
        keys = torch.cat([before_k[r, :f], rotated_k[i:i + 1]]).double()
        values = torch.cat([before_v[r, :f], v[i].view(1, kv_heads, hd)]).double()
        expected = attend(rotated_q[i:i + 1].double(), keys, values).reshape(-1)
        close(got[i, 0], expected, dtype)
        close(ring_k[r, int(slot[i])], rotated_k[i], dtype)  # the key as rotated, the value as it came
        assert torch.equal(ring_v[r, int(slot[i])], v[i].view(kv_heads, hd))
    untouched = torch.ones(pool_rows, window, dtype=torch.bool)
    untouched[rows, slot] = False
    assert torch.equal(ring_k[untouched], before_k[untouched]) and torch.equal(ring_v[untouched], before_v[untouched])


@needs_library
def test_soft_cap_in_place():
    logits = randn(3, 1000, seed=20, scale=60.0)
    expected = 30.0 * torch.tanh(logits.double() / 30.0)
    got = ops().soft_cap_(logits, 30.0)
    assert got is logits
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


@needs_library
def test_bad_tensors_are_refused_not_read():
    """The kernels see only pointers and sizes: a tensor of another dtype, layout or size, or an index out of
    range, is refused before any is read."""
    x = randn(2, 1, 16, seed=21)
    with pytest.raises(ValueError):
        ops().rms_norm(x, randn(16, seed=22, dtype=torch.bfloat16), 1e-6)  # another dtype
    with pytest.raises(ValueError):
        ops().rms_norm(x, randn(8, seed=22), 1e-6)  # a short weight
    with pytest.raises(ValueError):
        ops().conv(x, randn(2, 16, 3, seed=23).transpose(1, 2), randn(16, 4, seed=24), randn(16, seed=25))
    with pytest.raises(ValueError):  # a short bias
        ops().conv(x, randn(2, 3, 16, seed=23), randn(16, 4, seed=24), randn(15, seed=25))
    with pytest.raises(ValueError):  # a short a_scale
        ops().rglru_gelu(x, x, x, randn(8, seed=29), randn(2, 16, seed=30), x)
    ring = torch.zeros(2, 8, 1, 4)

    def attention(rows=1, filled=0, slot=0, k=None):
        q = randn(1, 1, 4, seed=26)
        return ops().attention(q, randn(1, 1, 4, seed=27) if k is None else k, randn(1, 1, 4, seed=28), ring,
                               ring.clone(), torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([rows]),
                               torch.tensor([filled]), torch.tensor([slot]), 1)
    attention(filled=8, slot=7)  # a full window: fine
    for bad in (dict(rows=2), dict(filled=9), dict(slot=8), dict(slot=-1), dict(k=randn(1, 1, 8, seed=27))):
        with pytest.raises(ValueError):  # a pool row beyond the pool, more keys than the window, ...
            attention(**bad)


def decode_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    state = model.new_state()
    model.prefill(torch.tensor(prompt), state)
    return torch.stack([model.step(t, state) for t in tokens])


PROMPT = list(range(3, 40))


@needs_library
@pytest.mark.parametrize("config", [CYCLES, BLOCKS], ids=["cycles", "blocks"])
def test_float32_model_decodes_the_same_with_native_operations_on_and_off(monkeypatch, config):
    """Beyond the window too (the rings full): the same greedy tokens, and logits within float32 sums."""
    model = tiny_model(dataclasses.replace(config, window=16), seed=31)
    monkeypatch.setenv(step_ops.ENV_VAR, "native")
    tokens = greedy_tokens(model, PROMPT, 50)
    on = decode_logits(model, PROMPT, tokens)
    monkeypatch.setenv(step_ops.ENV_VAR, "torch")
    assert greedy_tokens(model, PROMPT, 50) == tokens and len(set(tokens)) > 10
    off = decode_logits(model, PROMPT, tokens)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5 * off.abs().max().item())


@needs_library
def test_bf16_model_decodes_nearly_the_same_with_native_operations_on_and_off(monkeypatch):
    """One rounding where torch rounds after every operation: the logits along the same tokens agree closely."""
    model = tiny_model(BLOCKS, seed=32, dtype=torch.bfloat16)
    monkeypatch.setenv(step_ops.ENV_VAR, "native")
    tokens = greedy_tokens(model, PROMPT, 30)
    on = decode_logits(model, PROMPT, tokens)
    monkeypatch.setenv(step_ops.ENV_VAR, "torch")
    off = decode_logits(model, PROMPT, tokens)
    assert torch.nn.functional.cosine_similarity(on, off, dim=-1).min() > 0.99
    assert (on.argmax(-1) == off.argmax(-1)).float().mean() >= 0.9 and len(set(tokens)) > 5


OPERATIONS = ("rms_norm", "gelu_mul", "conv", "rglru_gelu", "attention", "soft_cap_")


def count_calls(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys(OPERATIONS, 0)
    for name in OPERATIONS:
        def counted(self, *args, _name=name, _original=getattr(step_ops.StepOps, name)):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(step_ops.StepOps, name, counted)
    return calls


@needs_library
@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_the_decode_step_runs_every_native_operation_unless_told_not_to(monkeypatch, choice):
    calls = count_calls(monkeypatch)
    monkeypatch.setenv(step_ops.ENV_VAR, choice)
    model = tiny_model(CYCLES, seed=33)
    greedy_tokens(model, PROMPT[:5], 3)  # a prefill (torch's operations), then decode steps
    if choice == "torch":
        assert not any(calls.values()), calls
    else:
        assert all(calls.values()), calls


@needs_library
def test_slots_decoded_through_their_index_match_torch(monkeypatch):
    """Some rows of an engine's pool, not consecutive ones (gathered and written back): the same logits and
    states as torch's operations give, and the rows not decoded untouched."""
    model = tiny_model(dataclasses.replace(CYCLES, window=16), seed=35)
    results = []
    for choice in ("native", "torch"):
        monkeypatch.setenv(step_ops.ENV_VAR, choice)
        engine = Engine(model, slots=4)
        slots = [engine.admit() for _ in range(4)]
        for slot in slots:
            engine.prefill(slot, PROMPT[:5 + 6 * slot])  # slot 3 beyond the window
        idle = engine.state(1).clone()
        logits = torch.cat([engine.decode([0, 3, 2], [7, 8, 9]), engine.decode([3, 0], [10, 11])])
        assert all(torch.equal(a, b) for a, b in zip(engine.state(1).tensors(), idle.tensors()))
        results.append((logits, engine.pool.tensors()))
    (on, on_state), (off, off_state) = results
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5 * off.abs().max().item())
    for a, b in zip(on_state, off_state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(b.abs().max().item(), 1.0))


@needs_library
def test_a_pool_the_native_operations_cannot_update_takes_torchs(monkeypatch):
    """A pool with a non-contiguous tensor runs torch's operations for the whole step, not some layers of it."""
    calls = count_calls(monkeypatch)
    model = tiny_model(CYCLES, seed=36)
    states = [model.new_state() for _ in range(2)]
    for i, state in enumerate(states):
        model.prefill(torch.tensor(PROMPT[:4 + i]), state)
    pool = State.stack(states)
    layer = pool.layers[2]  # an attention layer
    layer.k = layer.k.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, another layout
    rows = [pool.row(0), pool.row(1)]
    for row, state in zip(rows, states):
        row.pos = state.pos
    want = model.decode(torch.tensor([5, 6]), [s.clone() for s in states])  # native
    assert all(calls.values())
    calls.update(dict.fromkeys(calls, 0))
    got = model.decode(torch.tensor([5, 6]), rows, pool, [0, 1])
    assert not any(calls.values()), calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_scale_follows_the_parameter():
    model = tiny_model(CYCLES, seed=37)
    lru = model.layers[0].temporal_block.rg_lru
    first = lru.a_scale()
    assert lru.a_scale() is first  # kept
    with torch.no_grad():
        lru.recurrent_param.add_(1.0)  # in place: a new version of the same tensor
    torch.testing.assert_close(lru.a_scale(), -8.0 * torch.nn.functional.softplus(lru.recurrent_param.float()))
    assert not torch.equal(lru.a_scale(), first)


def test_a_missing_library_falls_back_with_one_notice(monkeypatch, capsys):
    def missing():
        raise OSError("the compiled kernel _step is missing (simulated)")
    monkeypatch.setattr(step_ops, "_load_library", missing)
    step_ops._ops_for.cache_clear()
    try:
        assert step_ops._ops_for("auto") is None and step_ops._ops_for("auto") is None
        assert capsys.readouterr().err.count("native decode-step operations unavailable") == 1
        with pytest.raises(RGChatError, match="RGCHAT_STEP=native"):
            step_ops._ops_for("native")
        model = tiny_model(CYCLES, seed=34)
        assert len(greedy_tokens(model, PROMPT[:5], 3)) == 3  # torch's operations instead
    finally:
        step_ops._ops_for.cache_clear()


def test_a_bad_choice_is_refused(monkeypatch):
    monkeypatch.setenv(step_ops.ENV_VAR, "fast")
    with pytest.raises(RGChatError, match="RGCHAT_STEP"):
        step_ops.step_ops()

