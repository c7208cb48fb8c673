import pytest
import torch
import torch.nn.functional as F

from conftest import BLOCKS, tiny_model
from rgchat import gemv
from rgchat.quant import (
    INT4_GROUP, KERNEL_MAX_ROWS, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, dequantize_int4,
    dequantize_int8, int8_matmul, prepare_model_, quantize_int4, quantize_int8, quantize_model, unpack_int4,
)


def random_matrix(rows=96, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[3] *= 50  # rows of very different scale: each gets its own
    return w


def as_decode_rounds(x: torch.Tensor) -> torch.Tensor:
    """A single activation row as the int8 decode path sees it: rounded to int8 with one scale."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True) / 127
    return torch.round(xf / x_scale) * x_scale


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = random_matrix()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (w.shape[0],)
    err = (dequantize_int8(q, scale) - w).abs()
    step = scale.float()[:, None]
    assert torch.all(err <= step * 0.5 + 1e-6)
    assert q.abs().max() == 127  # the largest entry of some row uses the full range


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, 33])  # the int8 kernel and the dequantizing path
def test_int8_linear_equals_dequantized_matmul(rows):
    w, bias = random_matrix(seed=1), torch.randn(96, generator=torch.Generator().manual_seed(9))
    q, scale = quantize_int8(w)
    layer = Int8Linear(160, 96, True, torch.bfloat16)
    layer.weight.copy_(q), layer.scale.copy_(scale)
    layer.bias = torch.nn.Parameter(bias.bfloat16(), requires_grad=False)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)).bfloat16()
    xf = as_decode_rounds(x) if rows == 1 else x.float()
    want = F.linear(xf, dequantize_int8(q, scale), bias.bfloat16().float())
    got = layer(x).float()
    assert (got - want).abs().max() / want.abs().max() < 2e-2  # bf16 output rounding


def test_int8_embedding_reads_rows_and_gives_logits():
    w = random_matrix(rows=300, cols=64, seed=2)
    q, scale = quantize_int8(w)
    emb = Int8Embedding(300, 64, torch.bfloat16)
    emb.weight.copy_(q), emb.scale.copy_(scale)
    tokens = torch.tensor([0, 3, 299, 3])
    deq = dequantize_int8(q, scale)
    assert torch.allclose(emb.lookup(tokens).float(), deq[tokens], rtol=1e-2, atol=1e-2)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    want = as_decode_rounds(x) @ deq.T  # one row: the integer path
    assert (emb.logits(x).float() - want).abs().max() / want.abs().max() < 2e-2


def test_int8_model_logits_stay_close_to_f32():
    """Calm weights (out_gain=1), as in a trained model: int8 weights with bf16 activations vs f32."""
    tokens = torch.randint(0, BLOCKS.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    reference = tiny_model(BLOCKS, seed=5, out_gain=1.0)
    want = reference.forward(tokens, reference.new_state(), all_logits=True)
    model = quantize_model(tiny_model(BLOCKS, seed=5, dtype=torch.bfloat16, out_gain=1.0), "int8")
    assert isinstance(model.layers[0].mlp_block.up_proj, Int8Linear)
    assert isinstance(model.embed_tokens, Int8Embedding)
    got = model.forward(tokens, model.new_state(), all_logits=True)
    cosine = F.cosine_similarity(got, want, dim=-1)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert cosine.mean() > 0.999, (float(cosine.mean()), float(top1))
    assert top1 >= 0.9  # measured 1.0 on this fixture
    assert model.weight_bytes() < reference.weight_bytes() / 3
    # decoding token by token takes the all-integer path (int8 activations too)
    state = model.new_state()
    stepped = torch.stack([model.step(t, state) for t in tokens])
    cosine = F.cosine_similarity(stepped, want, dim=-1)
    assert cosine.mean() > 0.999, float(cosine.mean())  # measured 0.99939
    assert (stepped.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_int8_matvec_rounds_the_activations_within_a_few_percent():
    w = torch.randn(64, 2560, generator=torch.Generator().manual_seed(6))
    q, scale = quantize_int8(w)
    layer = Int8Linear(2560, 64, False, torch.bfloat16)
    layer.weight.copy_(q), layer.scale.copy_(scale)
    x = torch.randn(1, 2560, generator=torch.Generator().manual_seed(7)).bfloat16()
    want = x.float() @ dequantize_int8(q, scale).T
    got = layer(x).float()
    error = float((got - want).norm() / want.norm())
    assert 0 < error < 2e-2, error  # not bit-equal to the float product: the activations were rounded


def test_int4_round_trip_error_is_at_most_half_a_step():
    w = random_matrix(rows=48, cols=96, seed=4)
    q, scale, zero = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (48, 48) and scale.shape == zero.shape == (48, 96 // INT4_GROUP)
    err = (dequantize_int4(q, scale, zero) - w).abs()
    assert torch.all(err <= scale.float().repeat_interleave(INT4_GROUP, 1) * 0.5 + 1e-5)
    assert torch.equal(unpack_int4(q).amax(), torch.tensor(15))


@pytest.mark.parametrize("choice", ["auto", "torch"])  # the native kernel where built, and torch's
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_linear_and_embedding_equal_dequantized_math(monkeypatch, rows, choice):
    monkeypatch.setenv(gemv.ENV_VAR, choice)
    w, bias = random_matrix(rows=96, cols=160, seed=5), torch.randn(96, generator=torch.Generator().manual_seed(10))
    q, scale, zero = quantize_int4(w)
    deq = dequantize_int4(q, scale, zero)
    layer = Int4Linear(160, 96, True, torch.bfloat16)
    layer.weight, layer.scale, layer.zero = q, scale, zero
    layer.bias = torch.nn.Parameter(bias.bfloat16(), requires_grad=False)
    emb = Int4Embedding(96, 160, torch.bfloat16)
    emb.weight, emb.scale, emb.zero = q, scale, zero
    prepare_model_(layer), prepare_model_(emb)
    if gemv.cpu_kernels():
        assert layer.runtime[0] == "native" and layer.weight.numel() > 0  # read as stored
    else:
        assert layer.runtime[0] == "cpu" and layer.weight.numel() == 0  # repacked for torch's CPU kernel
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = F.linear(x.float(), deq, bias.bfloat16().float())
    assert (layer(x).float() - want).abs().max() / want.abs().max() < 2e-2
    tokens = torch.tensor([0, 95, 7])
    assert (emb.lookup(tokens).float() - deq[tokens]).abs().max() < 2e-2 * deq.abs().max()


def test_int4_model_logits_stay_near_f32():
    tokens = torch.randint(0, BLOCKS.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    reference = tiny_model(BLOCKS, seed=5, out_gain=1.0)
    want = reference.forward(tokens, reference.new_state(), all_logits=True)
    model = quantize_model(tiny_model(BLOCKS, seed=5, dtype=torch.bfloat16, out_gain=1.0), "int4")
    got = model.forward(tokens, model.new_state(), all_logits=True)
    cosine = F.cosine_similarity(got, want, dim=-1)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert cosine.mean() > 0.95, (float(cosine.mean()), float(top1))  # measured 0.966, top-1 0.98
    assert top1 >= 0.8
    assert model.weight_bytes() < reference.weight_bytes() / 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,cols", [(7680, 2560), (256, 2560), (2560, 7680), (100, 96)])
def test_cuda_int8_matvec_equals_the_dequantized_product(rows, cols):
    from rgchat.kernels.triton_gemv import int8_rows

    gen = torch.Generator().manual_seed(rows + cols)
    q, scale = quantize_int8(torch.randn(rows, cols, generator=gen))
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16)
    expected = x.float() @ dequantize_int8(q, scale).t()
    got = int8_rows(x.cuda(), q.cuda(), scale.cuda())
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    # and through the module path a decode step takes
    assert torch.equal(int8_matmul(x.cuda(), q.cuda(), scale.cuda()), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,cols", [(7680, 2560), (2560, 7680), (100, 96)])
def test_cuda_int4_matvec_equals_the_dequantized_product(rows, cols):
    from rgchat.kernels.triton_gemv import int4_gemv

    gen = torch.Generator().manual_seed(rows + cols)
    packed, scale, zero = quantize_int4(torch.randn(rows, cols, generator=gen))
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16)
    expected = x.float() @ dequantize_int4(packed, scale, zero).t()
    got = int4_gemv(x.cuda(), packed.cuda(), scale.cuda(), zero.cuda())
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows,cols", [(7680, 2560), (2560, 7680), (100, 96)])
def test_cuda_several_rows_equal_the_dequantized_product_and_each_row_alone(fmt, rows, cols):
    """The kernels for a decode step of several conversations: 2 to 32 activation rows against the
    dequantized product, and each row's result the same whatever rows are computed with it."""
    from rgchat.kernels import triton_gemv

    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(triton_gemv.MAX_ROWS, cols, generator=gen).to(torch.bfloat16)
    if fmt == "int8":
        weights = quantize_int8(w)
        dense, kernel = dequantize_int8(*weights), triton_gemv.int8_rows
    else:
        weights = quantize_int4(w)
        dense, kernel = dequantize_int4(*weights), triton_gemv.int4_rows
    weights = [t.cuda() for t in weights]
    alone = torch.cat([kernel(x[i:i + 1].cuda(), *weights) for i in range(len(x))])
    for m in (2, 3, 8, 16, 17, 32):
        expected = x[:m].float() @ dense.t()
        got = kernel(x[:m].cuda(), *weights)
        assert got.dtype == torch.bfloat16 and got.shape == (m, rows)
        torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
        assert torch.equal(got, alone[:m]), m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_model_on_cuda_runs_from_its_int4_weights():
    """On CUDA int4 stays int4 in GPU memory: decode steps through the Triton kernel, prefill dequantizes."""
    tokens = torch.randint(0, BLOCKS.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    reference = tiny_model(BLOCKS, seed=5, out_gain=1.0)
    want = reference.forward(tokens, reference.new_state(), all_logits=True)
    model = quantize_model(tiny_model(BLOCKS, seed=5, dtype=torch.bfloat16, out_gain=1.0).to("cuda"), "int4")
    assert {m.runtime[0] for m in model.modules() if isinstance(m, (Int4Linear, Int4Embedding))} == {"cuda"}
    state = model.new_state()
    got = [model.forward(tokens[:30], state, all_logits=True).cpu()]  # many rows: dequantized
    got += [model.step(int(t), state).cpu()[None] for t in tokens[30:]]  # one row: the kernel
    cosine = F.cosine_similarity(torch.cat(got), want, dim=-1)
    assert cosine.mean() > 0.95, float(cosine.mean())
    assert model.weight_bytes() < reference.weight_bytes() / 4


def test_only_rows_of_several_conversations_need_the_batch_invariant_path(monkeypatch):
    """A chunk of one conversation's tokens (x [1, T, in]) may take torch's faster product; rows of several
    conversations (x [n, 1, in]) stay on the path whose result for a row ignores the others."""
    from rgchat import quant

    kernels = gemv.cpu_kernels()
    if kernels is None or "bf16" not in kernels.paths:
        pytest.skip("no native bf16 product here")
    native_calls = []
    bf16 = type(kernels).bf16
    monkeypatch.setattr(type(kernels), "bf16", lambda self, x, *a: native_calls.append(x.shape[0]) or bf16(self, x, *a))
    w = torch.randn(64, 256).bfloat16()
    chunk = torch.randn(1, 20, 256).bfloat16()
    for has_bf16, expected in ((True, []), (False, [20])):  # torch's bfloat16 product is fast only with BF16
        monkeypatch.setattr(quant, "cpu_has_bf16", lambda has=has_bf16: has)
        native_calls.clear()
        out = quant.linear(chunk, w)
        assert native_calls == expected and out.shape == (1, 20, 64)
        native_calls.clear()
        rows = chunk.view(20, 1, 256)  # twenty conversations, one token each
        batch = quant.linear(rows, w)
        assert native_calls == [20]
        assert all(torch.equal(batch[i], quant.linear(rows[i:i + 1], w)[0]) for i in range(20))  # as alone

    rows_seen = []
    product = lambda r: rows_seen.append(r.reshape(-1, r.shape[-1]).shape[0]) or r @ torch.ones(256, 3)  # noqa: E731
    quant.row_by_row(product, torch.randn(1, 12, 256))
    assert rows_seen == [12]  # float32 rows of one conversation: one product
    rows_seen.clear()
    quant.row_by_row(product, torch.randn(12, 1, 256))
    assert rows_seen == [1] * 12  # of twelve conversations: one row at a time
