import pytest
import torch

from conftest import BLOCKS, CYCLES, greedy_tokens, tiny_model, transformers_model
from rgchat.config import ATTENTION, PRESETS, RECURRENT, GriffinConfig
from rgchat import model as model_module
from rgchat.model import Griffin, attend, fuse_projections_
from rgchat.state import State


def random_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [CYCLES, BLOCKS], ids=["cycles", "blocks"])
def test_logits_match_transformers(config):
    model = tiny_model(config, seed=1)
    hf = transformers_model(model)
    tokens = random_tokens(48, config.vocab_size, seed=2)
    ours = model.forward(tokens, model.new_state(), all_logits=True)
    with torch.no_grad():
        theirs = hf(tokens[None], use_cache=False).logits[0]
    scale = theirs.abs().max()
    assert scale > 5  # logits of a real spread, not a flat random model
    assert (ours - theirs).abs().max() / scale < 1e-4


@pytest.mark.parametrize("config", [CYCLES, BLOCKS], ids=["cycles", "blocks"])
def test_greedy_generation_matches_transformers(config):
    model = tiny_model(config, seed=3)
    hf = transformers_model(model)
    prompt = random_tokens(7, config.vocab_size, seed=4)
    ours = greedy_tokens(model, prompt.tolist(), 40)
    with torch.no_grad():
        theirs = hf.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, 7:].tolist()
    assert ours == theirs
    assert len(set(ours)) > 10  # greedy output varies: the weights are not degenerate


def test_window_follows_official_mask():
    """Each token sees itself and the `window` tokens before it (window + 1 keys), beyond the window too.

    transformers' full-sequence mask admits `sliding_window` keys including the query, so its model with
    window + 1 computes the official mask directly over the whole sequence.
    """
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": 8})
    model = tiny_model(config, seed=5)
    tokens = random_tokens(44, config.vocab_size, seed=6)
    with torch.no_grad():
        official = transformers_model(model, window=config.window + 1)(tokens[None], use_cache=False).logits[0]
        one_shorter = transformers_model(model, window=config.window)(tokens[None], use_cache=False).logits[0]
    assert (official - one_shorter).abs().max() > 1e-2  # the two windows really differ on this input

    full = model.forward(tokens, model.new_state(), all_logits=True)
    assert (full - official).abs().max() < 1e-4
    state = model.new_state()  # and token by token through the ring buffer
    stepped = torch.stack([model.step(t, state) for t in tokens])
    assert (stepped - official).abs().max() < 1e-4


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "torch.compile"])
def test_static_step_equals_the_step_for_rows_at_their_own_positions(traced):
    """The graph-capturable step (the rows of a slot pool, each at its own device position, whole ring
    buffers) computes what the eager step does for each conversation alone, before and after the window
    fills, also as torch.compile traces it for CUDA (here with the aot_eager backend, which needs no
    compiler: it checks the tracing, in-place state updates included; the CUDA tests run the real
    compiler)."""
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": 8})
    model = fuse_projections_(tiny_model(config, seed=5)) if traced else tiny_model(config, seed=5)
    static_step = torch.compile(model.decode_rows, dynamic=False, backend="aot_eager") if traced else model.decode_rows
    tokens = [random_tokens(30, config.vocab_size, seed=9 + i) for i in range(3)]
    prompts = [3, 1, 11]  # ragged: the third row starts beyond the window
    pool = State.pool(config, model.dtype, "cpu", 3)
    rows = [pool.row(i) for i in range(3)]
    alone = [model.new_state() for _ in range(3)]
    for row, state, ids, n in zip(rows, alone, tokens, prompts):
        model.prefill(ids[:n], row)
        model.prefill(ids[:n], state)
    for i in range(15):  # positions cross the window (8) at different steps
        step_tokens = torch.stack([ids[n + i] for ids, n in zip(tokens, prompts)])
        got = static_step(step_tokens, torch.tensor([r.pos for r in rows]), pool)
        for j, (row, state) in enumerate(zip(rows, alone)):
            row.pos += 1
            expected = model.step(int(step_tokens[j]), state)
            torch.testing.assert_close(got[j], expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    for row, state in zip(rows, alone):
        for a, b in zip(row.tensors(), state.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,chunk", [(8, 5), (8, 16), (64, 7)])
def test_incremental_equals_one_pass(window, chunk):
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": window})
    model = tiny_model(config, seed=7)
    tokens = random_tokens(60, config.vocab_size, seed=8)
    full = model.forward(tokens, model.new_state(), all_logits=True)
    tolerance = 1e-5 * full.abs().max()  # float32 rounding, relative to the logit scale

    state = model.new_state()
    model.prefill(tokens[:13], state, chunk_size=chunk)
    for i in range(13, 21):
        logits = model.step(int(tokens[i]), state)
        assert (logits - full[i]).abs().max() < tolerance
    logits = model.prefill(tokens[21:], state, chunk_size=chunk)
    assert state.pos == 60
    assert (logits - full[-1]).abs().max() < tolerance


def test_decoding_states_of_no_pool_together_equals_each_alone():
    """States that are not rows of one pool are stacked for the step and written back: the same logits and
    states, bit for bit, as each decoded alone."""
    model = tiny_model(CYCLES, seed=9)
    together, alone = [model.new_state() for _ in range(3)], [model.new_state() for _ in range(3)]
    for i, (a, b) in enumerate(zip(together, alone)):
        prompt = random_tokens(2 + 7 * i, CYCLES.vocab_size, seed=20 + i)
        model.prefill(prompt, a)
        model.prefill(prompt, b)
    for t in random_tokens(5, CYCLES.vocab_size, seed=30):
        logits = model.decode(torch.full((3,), int(t)), together)
        for row, state in zip(logits, alone):
            assert torch.equal(row, model.step(int(t), state))
    for a, b in zip(together, alone):
        assert a.pos == b.pos and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_state_copy_restores_the_conversation():
    model = tiny_model(CYCLES, seed=9)
    tokens = random_tokens(30, CYCLES.vocab_size, seed=10)
    state = model.new_state()
    model.prefill(tokens[:20], state)
    saved = state.clone()
    a = model.prefill(tokens[20:], state)
    state.copy_(saved)
    b = model.prefill(tokens[20:], state)
    assert torch.equal(a, b)


def test_state_size_is_constant():
    model = tiny_model(CYCLES, seed=11)
    state = model.new_state()
    before = [(t.shape, t.dtype) for t in state.tensors()]
    model.prefill(random_tokens(200, CYCLES.vocab_size, seed=12), state, chunk_size=32)
    assert [(t.shape, t.dtype) for t in state.tensors()] == before
    assert all(layer.h.dtype == torch.float32 for layer in state.layers if hasattr(layer, "h"))


def test_presets_match_published_sizes():
    """Parameter counts from the reference page; the 2B state at full window in bf16 is 16.4 MiB."""
    counts = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in Griffin(config).parameters())
    assert counts == {"2b": 2_682_862_080, "9b": 8_579_977_216}
    state = State.empty(PRESETS["2b"], torch.bfloat16)
    # The reference's 17,238,048 bytes also count an int32 token counter per attention layer (8 x 4 bytes);
    # here the position is one Python int.
    assert state.nbytes == 17_238_048 - 8 * 4
    assert PRESETS["2b"].block_types.count(ATTENTION) == 8 and PRESETS["2b"].block_types[2] == ATTENTION
    assert PRESETS["9b"].block_types.count(RECURRENT) == 26


def test_bf16_stays_close_to_f32():
    model32 = tiny_model(CYCLES, seed=13)
    model16 = tiny_model(CYCLES, seed=13, dtype=torch.bfloat16)
    tokens = random_tokens(40, CYCLES.vocab_size, seed=14)
    a = model32.forward(tokens, model32.new_state(), all_logits=True)
    b = model16.forward(tokens, model16.new_state(), all_logits=True)
    assert all(layer.h.dtype == torch.float32 for layer in model16.new_state().layers if hasattr(layer, "h"))
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agreement > 0.8


@pytest.mark.parametrize("T", [1, 5])
def test_bf16_attention_in_float32_on_a_cpu_without_bf16_products(monkeypatch, T):
    """Without native bfloat16 products attention runs in float32 and rounds its output to bfloat16: the
    native bfloat16 path's result within bfloat16 rounding."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(T, 4, 32, generator=gen).to(torch.bfloat16)
    keys, values = (torch.randn(9, 2, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = torch.rand(T, 9, generator=gen) > 0.3
    mask[:, 0] = True
    results = {}
    for native in (True, False):
        monkeypatch.setattr(model_module, "cpu_has_bf16", lambda native=native: native)
        results[native] = attend(q, keys, values, mask)
    assert results[False].dtype == torch.bfloat16
    expected = attend(q.float(), keys.float(), values.float(), mask)
    assert torch.equal(results[False], expected.to(torch.bfloat16))
    torch.testing.assert_close(results[True].float(), expected, atol=0.05, rtol=0.05)


def test_long_prompts_are_processed_in_bounded_chunks(monkeypatch):
    """A prompt of any length runs as chunks of at most `chunk_size` tokens: no T x T scores, no T-sized
    activations for all layers at once."""
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": 64})
    model = tiny_model(config, seed=15)
    seen = []
    forward = Griffin.forward

    def recording(self, tokens, state, all_logits=False):
        seen.append((tokens.shape[0], state.pos))
        return forward(self, tokens, state, all_logits)

    monkeypatch.setattr(Griffin, "forward", recording)
    state = model.new_state()
    model.prefill(random_tokens(3000, config.vocab_size, seed=16), state, chunk_size=256)
    assert max(n for n, _ in seen) == 256 and sum(n for n, _ in seen) == 3000 and state.pos == 3000
    assert [pos for _, pos in seen] == list(range(0, 3000, 256))
    assert state.layers[2].k.shape[0] == 64  # the attention memory is the window, whatever the length


@pytest.mark.parametrize("precision", ["f32", "int8"])
def test_fused_projections_compute_the_same(precision):
    """fuse_projections_ (used off the CPU) joins q/k/v, gate/up and linear_y/linear_x into single matrices:
    same logits for a prompt and for decode steps, same weight bytes, the separate matrices gone."""
    from rgchat.quant import quantize_model

    plain = quantize_model(tiny_model(CYCLES, seed=21), precision)
    fused = fuse_projections_(quantize_model(tiny_model(CYCLES, seed=21), precision))
    assert fused.weight_bytes() == plain.weight_bytes()
    names = {name.rsplit(".", 2)[-2] for name, _ in fused.named_parameters()} | {
        name.rsplit(".", 2)[-2] for name, _ in fused.named_buffers()}
    assert {"qkv_proj", "gate_up_proj", "linear_yx"} <= names
    assert not {"q_proj", "gate_proj", "linear_x"} & names
    tokens = random_tokens(30, CYCLES.vocab_size, seed=22)
    states = plain.new_state(), fused.new_state()
    a, b = plain.prefill(tokens, states[0]), fused.prefill(tokens, states[1])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for token in random_tokens(5, CYCLES.vocab_size, seed=23):
        torch.testing.assert_close(fused.step(token, states[1]), plain.step(token, states[0]), rtol=1e-4, atol=1e-4)
