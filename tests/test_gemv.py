"""The native CPU products (kernels/gemv.c through rgchat.gemv): every path this CPU runs, forced in turn,
against exact references, for 1 to 8 rows (and more, taken 8 at a time) and 1 to 4 threads."""

import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import BLOCKS, greedy_tokens, tiny_model
from rgchat import gemv, quant
from rgchat.cli import app
from rgchat.errors import RGChatError
from rgchat.model import RGLRU, ready_for_device_

# odd sizes and sizes that are not multiples of any vector width, beside the 2B model's width
SHAPES = [(1, 1), (7, 31), (33, 100), (64, 256), (9, 130), (17, 2560), (40, 3000)]
INT4_SHAPES = [(1, 32), (7, 96), (33, 160), (17, 2560), (12, 4096)]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 11]
THREADS = [1, 2, 3, 4]


def kernels_on(path: str, kind: str | None = None) -> gemv.CpuKernels:
    """The kernels forced onto `path`; skips where this CPU cannot run it (or, given, its `kind` of product:
    an AVX-512 CPU without BF16 runs the AVX-512 int8 and int4 products but not its bf16 one)."""
    try:
        kernels = gemv._kernels_for(path)
    except RGChatError as e:
        pytest.skip(str(e))
    if kernels is None:
        pytest.skip("the native library is not built")
    if kind is not None and kind not in kernels.paths:
        pytest.skip(f"this CPU does not run the {path} {kind} product")
    return kernels


@pytest.fixture(params=list(gemv.PATHS))
def path(request) -> str:
    return request.param


@pytest.fixture(params=["torch's OpenMP", "own pool"])
def threads(request):
    """The thread counts to run the test body's products under, on torch's OpenMP threads and on the
    library's own pool in turn; restores torch's setting and the sharing."""
    before = torch.get_num_threads()
    kernels = gemv.cpu_kernels()
    if kernels and request.param == "own pool":
        kernels.share_torch_threads(False)
    yield THREADS
    torch.set_num_threads(before)
    if kernels:
        kernels.share_torch_threads(True)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def int8_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, : min(k, 40)] = -128  # the extremes: -128 has no positive twin, and 127 * 127 pairs add up fastest
    q[-1, : min(k, 40)] = 127
    return q, (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16)


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to int8 with one scale, as both the kernels and `quant.int8_reference` do."""
    xs = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x.float() / xs).to(torch.int64), xs


def int8_expected(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int32 sums computed exactly (int64 matmul), then scaled in float32 as the kernel does."""
    xq, xs = quantized_rows(x)
    sums = xq @ q.to(torch.int64).T
    assert sums.abs().max() < 2**31
    return ((sums.to(torch.int32).float() * xs) * scale.float()).to(x.dtype)


def test_int8_is_exact_on_every_path(path, threads):
    kernels = kernels_on(path, "int8")
    for i, (n, k) in enumerate(SHAPES):
        q, scale = int8_weights(n, k, seed=i)
        for rows in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                x = randn(rows, k, seed=100 * i + rows, scale=3.0).to(dtype)
                want = int8_expected(x, q, scale)
                for t in threads:
                    torch.set_num_threads(t)
                    got = kernels.int8(x, q, scale)
                    assert got.dtype == dtype and torch.equal(got, want), (path, n, k, rows, dtype, t)
        assert torch.equal(quant.int8_reference(x, q, scale).to(x.dtype), want)  # torch's path: same numbers


PACKED_SHAPES = [(32, 4), (64, 100), (96, 2560), (32, 3000), (160, 7680)]  # N: blocks of 32; K: groups of 4
PACKED_ROWS = [1, 2, 5, 8, 9, 17, 40]  # more than 8: taken 8 at a time within each block


@pytest.mark.parametrize("path", ["portable", "avx512"])
def test_packed_int8_is_exact(path, threads):
    kernels = kernels_on(path, "int8")
    for i, (n, k) in enumerate(PACKED_SHAPES):
        q, scale = int8_weights(n, k, seed=50 + i)
        packed = gemv.pack_int8(q)
        for rows in PACKED_ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                x = randn(rows, k, seed=200 * i + rows, scale=3.0).to(dtype)
                want = int8_expected(x, q, scale)
                for t in threads[:2]:
                    torch.set_num_threads(t)
                    got = kernels.int8_packed(x, packed, scale)
                    assert got.dtype == dtype and torch.equal(got, want), (path, n, k, rows, dtype, t)


def test_packing_int8_keeps_every_value_and_row():
    q, _ = int8_weights(96, 36, seed=7)
    packed = gemv.pack_int8(q)
    assert packed.shape == q.shape and not torch.equal(packed, q)
    assert torch.equal(gemv.unpack_int8(packed), q)
    # a block holds four inputs of each of its 32 rows, then the next four
    assert packed[0, :8].tolist() == [*q[0, :4].tolist(), *q[1, :4].tolist()]
    assert packed[32, 4:8].tolist() == q[33, :4].tolist()
    rows = torch.tensor([[0, 95], [33, 31]])
    assert torch.equal(gemv.packed_int8_rows(packed, rows), q[rows])
    assert torch.equal(gemv.packed_int8_rows(packed, torch.tensor(40)), q[40])


def test_packed_int8_refuses_shapes_it_does_not_take():
    kernels = kernels_on("portable", "int8")
    q, scale = int8_weights(40, 64, seed=8)  # 40 rows: not whole blocks
    assert not kernels_on("native").packs_int8(q)
    with pytest.raises(RuntimeError, match="bad arguments"):
        kernels.int8_packed(randn(1, 64, seed=9), q, scale)
    assert kernels.int8_packed(randn(1, 64, seed=9, scale=1.0).to(torch.float16), q, scale) is None


def packing_kernels() -> gemv.CpuKernels:
    kernels = kernels_on("native")
    q, _ = int8_weights(32, 64, seed=1)
    if not kernels.packs_int8(q):
        pytest.skip("int8 runs from the stored layout on this CPU (no AVX-512 VNNI)")
    return kernels


def test_an_int8_model_runs_from_packed_weights_as_from_the_stored_ones(monkeypatch):
    """Where the kernel packs, int8 modules of whole blocks drop their stored weights and read packed
    copies: the same greedy tokens (a prompt short enough for the stored layout's integer path), and a row
    of a prefill chunk gets the same logits as alone."""
    packing_kernels()
    packed = quant.quantize_model(tiny_model(BLOCKS, seed=24), "int8")
    modules = [m for m in packed.modules() if isinstance(m, quant._Int8Weight)]
    assert any(m.packed is not None and m.weight.numel() == 0 for m in modules)
    assert isinstance(packed.embed_tokens, quant.Int8Embedding) and packed.embed_tokens.packed is not None
    monkeypatch.setattr(gemv.CpuKernels, "packs_int8", lambda *args: False)
    stored = quant.quantize_model(tiny_model(BLOCKS, seed=24), "int8")
    assert all(m.packed is None for m in stored.modules() if isinstance(m, quant._Int8Weight))
    monkeypatch.undo()
    tokens = greedy_tokens(packed, PROMPT[:60], 30)
    assert tokens == greedy_tokens(stored, PROMPT[:60], 30) and len(set(tokens)) > 5
    layer = packed.layers[0].mlp_block.down_proj
    x = randn(1, 100, layer.packed.shape[1], seed=4).bfloat16()
    assert torch.equal(layer(x)[0, 37], layer(x[:, 37:38])[0, 0])


def test_packed_int8_projections_are_joined_on_the_cpu(monkeypatch):
    """Readied for the CPU, int8 weights that pack are joined (packed straight into the joined matrices)."""
    packing_kernels()
    model = quant.quantize_model(tiny_model(BLOCKS, seed=25), "int8")
    want = greedy_tokens(model, PROMPT[:60], 20)
    with monkeypatch.context() as m:
        m.setattr(gemv.CpuKernels, "packs_int8", lambda *args: False)
        stored = quant.quantize_model(tiny_model(BLOCKS, seed=25), "int8")
    ready = ready_for_device_(stored)
    mlp = ready.layers[0].mlp_block
    assert mlp.gate_proj is None and mlp.gate_up_proj.packed is not None and mlp.gate_up_proj.weight.numel() == 0
    assert greedy_tokens(ready, PROMPT[:60], 20) == want


def int4_expected(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """xs * sum_g (s_g D_g + z_g S_g) with D_g = sum (q - 8) xq and S_g = sum xq exact, the rest in float64."""
    xq, xs = quantized_rows(x)
    q = quant.unpack_int4(packed).to(torch.int64) - 8
    groups = scale.shape[1]
    xg = xq.reshape(x.shape[0], groups, -1)
    d = torch.einsum("bgi,ngi->bng", xg, q.reshape(q.shape[0], groups, -1)).double()
    s = xg.sum(-1).double()
    total = (d * scale.double()).sum(-1) + s @ zero.double().T
    return total * xs.double(), ((d.abs() * scale.double().abs()).sum(-1) + s.abs() @ zero.double().abs().T) * xs.double()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_matches_its_exact_formula_on_every_path(path, group, threads, monkeypatch):
    kernels = kernels_on(path, "int4")
    monkeypatch.setattr(quant, "INT4_GROUP", group)
    for i, (n, k) in enumerate(INT4_SHAPES):
        if k % group:
            continue
        packed, scale, zero = quant.quantize_int4(randn(n, k, seed=i))
        assert kernels.takes_int4(packed, scale, zero)
        for rows in ROWS:
            x = randn(rows, k, seed=7 * i + rows, scale=2.0)
            want, size = int4_expected(x, packed, scale, zero)
            alone = torch.cat([kernels.int4(x[r:r + 1], packed, scale, zero) for r in range(rows)])
            for t in threads:
                torch.set_num_threads(t)
                got = kernels.int4(x, packed, scale, zero)
                assert torch.equal(got, alone), (path, n, k, rows, t)  # a row's result ignores its neighbours
            assert torch.all((got.double() - want).abs() <= 1e-5 * size + 1e-30), (path, n, k, rows)
            assert torch.equal(kernels.int4(x.bfloat16(), packed, scale, zero),
                               kernels.int4(x.bfloat16().float(), packed, scale, zero).bfloat16())


def test_bf16_matches_float64_on_every_path(path, threads):
    kernels = kernels_on(path, "bf16")
    for i, (n, k) in enumerate(SHAPES):
        w = randn(n, k, seed=i).bfloat16()
        for rows in ROWS:
            x = randn(rows, k, seed=50 + rows).bfloat16()
            exact = x.double() @ w.double().T
            size = x.double().abs() @ w.double().abs().T
            alone = torch.cat([kernels.bf16(x[r:r + 1], w) for r in range(rows)])
            for t in threads:
                torch.set_num_threads(t)
                got = kernels.bf16(x, w)
                assert got.dtype == torch.bfloat16 and torch.equal(got, alone), (path, n, k, rows, t)
            assert torch.all((got.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * size), (path, n, k, rows)


def test_block_diagonal_bf16_multiplies_each_head_by_its_own_inputs(path):
    """heads > 1 (the RG-LRU gates): head h's rows read inputs h*K..(h+1)*K; heads of an odd number of rows
    keep output rows computed together from straddling two heads."""
    kernels = kernels_on(path, "bf16")
    for heads, rows_per_head, k in ((3, 3, 40), (4, 8, 64), (5, 1, 33)):
        w = randn(heads * rows_per_head, k, seed=heads).bfloat16()
        for rows in ROWS:
            x = randn(rows, heads * k, seed=rows).bfloat16()
            got = kernels.bf16(x, w, heads=heads)
            per_head = torch.cat([kernels.bf16(x[:, h * k:(h + 1) * k].contiguous(),
                                               w[h * rows_per_head:(h + 1) * rows_per_head]) for h in range(heads)], 1)
            alone = torch.cat([kernels.bf16(x[r:r + 1], w, heads=heads) for r in range(rows)])
            assert torch.equal(got, per_head) and torch.equal(got, alone), (path, heads, rows_per_head, rows)


def test_paths_agree_where_their_arithmetic_is_the_same():
    """int8 is exact everywhere, so every path gives the same bits."""
    kernels = [kernels_on("portable")]
    for path in ("avx2", "avx512"):
        try:
            kernels.append(gemv._kernels_for(path))
        except RGChatError:  # not on this CPU
            pass
    q, scale = int8_weights(300, 1000, seed=3)
    x = randn(4, 1000, seed=4).bfloat16()
    outs = [k.int8(x, q, scale) for k in kernels if "int8" in k.paths]
    assert len(outs) > 1 and all(torch.equal(o, outs[0]) for o in outs)
    # rows the vector quantization treats as the plain loop does: non-finite values (the maximum skips NaN),
    # signed zeros, values that round to the clamps, a zero row; the vector parts and the tails
    special = randn(6, 1000, seed=5)
    special[0, [3, 500, 999]] = float("nan")
    special[1, [7, 640]] = float("inf")
    special[2, 10] = float("-inf")
    special[3] = 0.0
    special[3, 1::2] = -0.0
    special[4, 998] = 1e30
    special[5] = 1e-40
    outs = [k.int8(special, q, scale) for k in kernels if "int8" in k.paths]  # int4 quantizes the same way
    assert all(torch.equal(o.view(torch.int32), outs[0].view(torch.int32)) for o in outs)


def test_products_from_several_threads_at_once_are_each_right():
    kernels = kernels_on("native")
    q, scale = int8_weights(512, 2560, seed=5)
    xs = [randn(3, 2560, seed=s).bfloat16() for s in range(4)]
    want = [int8_expected(x, q, scale) for x in xs]
    failures = []

    def work(i):
        for _ in range(20):
            if not torch.equal(kernels.int8(xs[i], q, scale), want[i]):
                failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


def test_tensors_the_kernel_does_not_take_go_to_torch():
    kernels = kernels_on("native")
    q, scale = int8_weights(8, 64, seed=1)
    assert kernels.int8(randn(1, 64, seed=1).half(), q, scale) is None  # float16 activations
    assert kernels.int8(randn(1, 64, seed=1), q.t().contiguous().t(), scale) is None  # not row-major
    wide = torch.zeros(2, gemv.MAX_K + 32, dtype=torch.int8)
    assert kernels.int8(torch.ones(1, gemv.MAX_K + 32), wide, scale[:2]) is None  # sums could overflow
    packed, s, z = quant.quantize_int4(randn(4, 96, seed=2))
    assert not kernels.takes_int4(packed, s[:, :1].contiguous(), z[:, :1].contiguous())  # group of 96
    assert not kernels.takes_int4(packed, s[:, :2].contiguous(), z[:, :2].contiguous())  # group of 48
    assert not kernels.takes_int4(packed, s[:3], z[:3])  # fewer scale rows than weight rows
    assert kernels.int8(randn(1, 64, seed=1), q, scale[:4]) is None  # a scale per output row, or nothing
    x = torch.ones(1, gemv.MAX_K + 32)
    out = quant.int8_matmul(x, wide, scale[:2])  # quant falls back to torch's product
    assert out.shape == (1, 2) and torch.all(out == 0)


def test_plain_read_reads_every_line():
    kernels = kernels_on("native")
    words = torch.zeros(4096, dtype=torch.int64)  # 512 lines of 64 bytes
    assert kernels.read(words) == 0
    for at in (0, 1234, 4095):
        words.zero_()
        words[at] = 1 << 40
        assert kernels.read(words) != 0, at


PROMPT = torch.randint(0, BLOCKS.vocab_size, (70,), generator=torch.Generator().manual_seed(9)).tolist()


def test_int8_model_gives_the_same_logits_with_the_kernel_on_and_off(monkeypatch):
    """Off, a VNNI CPU runs torch._int_mm on the same quantized rows: the very same logits and greedy
    tokens (the bfloat16 gates left to torch in both runs: their float sums differ, see below)."""
    kernels = kernels_on("native")
    monkeypatch.setattr(type(kernels), "bf16", lambda *args, **kwargs: None)
    model = quant.quantize_model(tiny_model(BLOCKS, seed=21), "int8")
    tokens_on = greedy_tokens(model, PROMPT, 40)
    on = model.prefill(torch.tensor(PROMPT[:40]), model.new_state())  # 40 rows: five calls of 8
    monkeypatch.setenv(gemv.ENV_VAR, "torch")
    monkeypatch.setattr(quant, "cpu_has_vnni", lambda: True)
    assert torch.equal(on, model.prefill(torch.tensor(PROMPT[:40]), model.new_state()))
    assert greedy_tokens(model, PROMPT, 40) == tokens_on and len(set(tokens_on)) > 5


def decode_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    state = model.new_state()
    model.prefill(torch.tensor(prompt), state)
    return torch.stack([model.step(t, state) for t in tokens])


def test_bf16_model_is_the_same_with_the_kernel_on_and_off(monkeypatch):
    """Float sums in another order: the greedy tokens agree (on this model, everywhere measured) and the
    logits nearly so, along the same tokens."""
    kernels_on("native")
    model = tiny_model(BLOCKS, seed=22, dtype=torch.bfloat16)
    tokens = greedy_tokens(model, PROMPT, 40)
    on = decode_logits(model, PROMPT, tokens)
    assert all(m.gate_rows is not None for m in model.modules() if isinstance(m, RGLRU))  # the gates went native
    monkeypatch.setenv(gemv.ENV_VAR, "torch")
    off = decode_logits(model, PROMPT, tokens)
    assert torch.nn.functional.cosine_similarity(on, off, dim=-1).min() > 0.999
    assert (on.argmax(-1) == off.argmax(-1)).float().mean() >= 0.95 and len(set(tokens)) > 5


class Int4Formula:
    """The int4 kernel's arithmetic written in torch (float64): what the native int4 model must follow."""

    def int4(self, x, packed, scale, zero):
        return int4_expected(x.float(), packed, scale, zero)[0].to(x.dtype)


def test_int4_greedy_output_follows_the_kernels_formula():
    """Off, torch's int4 kernel multiplies bfloat16 activations, not int8 ones: a different rounding, so
    the model is checked against the kernel's formula computed in torch instead."""
    kernels_on("native")
    model = quant.quantize_model(tiny_model(BLOCKS, seed=22), "int4")
    tokens_on = greedy_tokens(model, PROMPT, 40)
    for m in model.modules():
        if isinstance(m, (quant.Int4Linear, quant.Int4Embedding)):
            assert m.runtime[0] == "native"
            m.runtime = (*m.runtime[:4], Int4Formula())
    assert greedy_tokens(model, PROMPT, 40) == tokens_on and len(set(tokens_on)) > 5


def test_int4_runs_from_the_stored_layout_with_the_kernel():
    kernels_on("native")
    model = quant.quantize_model(tiny_model(BLOCKS, seed=23), "int4")
    layers = [m for m in model.modules() if isinstance(m, quant.Int4Linear)]
    assert layers and all(m.runtime[0] == "native" and m.weight.numel() > 0 for m in layers)
    assert quant.packed_tensors(model) == {}  # nothing to cache beside the model file


def test_a_missing_library_falls_back_with_one_notice(monkeypatch, capsys):
    def missing():
        raise OSError("the compiled kernel _gemv is missing (simulated)")

    monkeypatch.setattr(gemv, "_find_library", missing)
    gemv._kernels_for.cache_clear()
    try:
        assert gemv.cpu_kernels() is None and gemv.cpu_kernels() is None
        err = capsys.readouterr().err
        assert err.count("native CPU products unavailable") == 1 and "simulated" in err
        with pytest.raises(RGChatError, match="RGCHAT_GEMV=avx2"):
            gemv._kernels_for("avx2")
        q, scale = int8_weights(16, 64, seed=2)
        x = randn(2, 64, seed=3).bfloat16()
        assert quant.int8_matmul(x, q, scale).shape == (2, 16)  # torch's products take over
    finally:
        gemv._kernels_for.cache_clear()


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: torch's products")
def test_the_install_builds_the_native_products():
    """Where a C compiler exists, the README's install command compiles kernels/gemv.c."""
    assert gemv._kernels_for("auto") is not None


def test_a_bad_choice_is_refused(monkeypatch):
    monkeypatch.setenv(gemv.ENV_VAR, "fastest")
    with pytest.raises(RGChatError, match="RGCHAT_GEMV='fastest'"):
        gemv.cpu_kernels()


def test_doctor_names_the_paths(monkeypatch):
    kernels_on("native")
    out = CliRunner().invoke(app, ["doctor"]).stdout
    assert "matrix products (cpu): native (C, int8 " in out
    monkeypatch.setenv(gemv.ENV_VAR, "torch")
    assert "matrix products (cpu): torch" in CliRunner().invoke(app, ["doctor"]).stdout


CROSS_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(not (CROSS_CC and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                                  "(Debian: gcc-aarch64-linux-gnu, qemu-user)")
def test_the_portable_path_builds_and_passes_on_arm(tmp_path):
    """No Arm path yet: Arm CPUs run the portable C, checked here (cross-built, under emulation) against
    references written out in tests/gemv_check.c."""
    root, exe = Path(__file__).parent.parent, tmp_path / "gemv_check"
    subprocess.run([CROSS_CC, "-O2", "-static", "-DGEMV_NO_PYTHON", str(root / "tests" / "gemv_check.c"),
                    str(root / "kernels" / "gemv.c"), "-o", str(exe), "-lpthread", "-lm"], check=True)
    run = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
