"""CUDA decode through the engine's captured graphs (compiled by default): the same numbers as the eager step,
greedy output that matches the CPU, and batched decoding against decoding alone, where CUDA is present
(skipped elsewhere); the buckets and the compile cache everywhere."""

import os

import pytest
import torch

from conftest import CYCLES, tiny_model
from rgchat import cuda_graph
from rgchat.config import GriffinConfig
from rgchat.engine import Engine
from rgchat.model import fuse_projections_
from rgchat.quant import QUANTIZED, quantize_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CYCLES.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens for each prompt, decoded together in one engine."""
    slots = [engine.admit() for _ in prompts]
    out = [[int(torch.argmax(engine.prefill(slot, p)))] for slot, p in zip(slots, prompts)]
    for _ in range(n - 1):
        logits = engine.decode(slots, [t[-1] for t in out])
        for t, row in zip(out, logits):
            t.append(int(torch.argmax(row)))
    for slot in slots:
        engine.release(slot)
    return out


@needs_cuda
@pytest.mark.parametrize("compile", ["1", "0"], ids=["compiled", "plain"])
def test_graph_step_equals_the_eager_step_across_the_window(monkeypatch, compile):
    """Slot 1 decodes through the graph of the pool's first two rows while slot 0 waits (its state must come
    back untouched) and then through the same graph beside slot 0; each against the eager step."""
    monkeypatch.setenv(cuda_graph.COMPILE_ENV_VAR, compile)
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": 8})
    model = fuse_projections_(tiny_model(config, seed=5).to("cuda"))  # as the loaders build it on CUDA
    engine = Engine(model, slots=3)
    waiting, graphed, eager = engine.admit(), engine.admit(), engine.admit()
    tokens = prompt(40, seed=1)
    for slot in (waiting, graphed, eager):
        engine.prefill(slot, tokens[:3])
    before = engine.state(waiting).clone()

    def check(got: torch.Tensor, t: int) -> None:
        monkeypatch.setenv(cuda_graph.ENV_VAR, "0")
        expected = engine.decode([eager], [t])[0]
        monkeypatch.delenv(cuda_graph.ENV_VAR)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())

    for t in tokens[3:20]:
        check(engine.decode([graphed], [t])[0], t)
    assert all(torch.equal(a, b) for a, b in zip(engine.state(waiting).tensors(), before.tensors()))
    assert engine.state(waiting).pos == 3
    for t in tokens[3:20]:  # the waiting slot catches up, alone through the one-row graph
        engine.decode([waiting], [t])
    for t in tokens[20:]:
        both = engine.decode([graphed, waiting], [t, t])
        check(both[0], t)
        torch.testing.assert_close(both[1], both[0], rtol=0, atol=1e-4 * both[0].abs().max().item())
    assert sorted(engine.captured.graphs) == [1, 2]
    assert all(g.compiled == (compile == "1") for g in engine.captured.graphs.values())
    assert engine.state(graphed).pos == engine.state(eager).pos == engine.state(waiting).pos == 40


def test_buckets_cover_the_rows_asked_for():
    assert [cuda_graph.bucket(n, 32) for n in (1, 2, 3, 4, 5, 9, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]
    assert [cuda_graph.bucket(n, 6) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


@needs_cuda
def test_a_failed_compile_records_the_plain_step(monkeypatch, capsys, tmp_path):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv(cuda_graph.CACHE_ENV_VAR, str(tmp_path))  # a folder of the test's, never cleared
    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(tiny_model(CYCLES, seed=6).to("cuda"))
    slot = engine.admit()
    engine.prefill(slot, prompt(5, seed=3))
    engine.decode([slot], [1])
    [graph] = engine.captured.graphs.values()
    assert isinstance(graph, cuda_graph.GraphStep) and not graph.compiled and graph.rows == 1
    assert "torch.compile failed, recording the plain step (no compiler here)" in capsys.readouterr().err


@needs_cuda
def test_greedy_bf16_on_cuda_matches_the_cpu():
    """64 greedy tokens, bf16, the compiled CUDA graph against the CPU: equal, or (where bf16 rounding differs between the
    devices' kernels) the CUDA choices agree with the float32 reference's top-1 at least 99% of the time."""
    cpu = tiny_model(CYCLES, seed=11, dtype=torch.bfloat16, out_gain=1.0)
    cuda = fuse_projections_(tiny_model(CYCLES, seed=11, dtype=torch.bfloat16, out_gain=1.0).to("cuda"))
    ids = prompt(20, seed=2)
    on_cuda_engine = Engine(cuda)
    (on_cpu,), (on_cuda,) = greedy(Engine(cpu), [ids], 64), greedy(on_cuda_engine, [ids], 64)
    [graph] = on_cuda_engine.captured.graphs.values()
    assert isinstance(graph, cuda_graph.GraphStep) and graph.compiled
    same = next((i for i, (a, b) in enumerate(zip(on_cpu, on_cuda)) if a != b), 64)
    print(f"CUDA bf16 (compiled graph) and CPU bf16 greedy agree on the first {same} of 64 tokens")
    if same < 64:
        reference = tiny_model(CYCLES, seed=11, out_gain=1.0)  # float32, teacher-forced on the CUDA sequence
        logits = reference.forward(torch.tensor(ids + on_cuda), reference.new_state(), all_logits=True)
        top1 = logits[len(ids) - 1:-1].argmax(-1).tolist()
        agreement = sum(a == b for a, b in zip(top1, on_cuda)) / len(on_cuda)
        print(f"top-1 agreement of the CUDA tokens with float32: {agreement:.3f}")
        assert agreement >= 0.99


@needs_cuda
@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("graphs", ["1", "0"], ids=["graph", "eager"])
def test_batched_decoding_on_cuda_against_decoding_alone(dtype, graphs, monkeypatch):
    """cuBLAS and the compiler pick their kernels by row count, so on CUDA a row of a batched step need not
    equal the row alone: this measures how often the greedy tokens of 8 conversations decoded together
    (through the captured graph of 8 rows, and through the eager step) agree with each decoded alone."""
    monkeypatch.setenv(cuda_graph.ENV_VAR, graphs)
    float_dtype = torch.float32 if dtype == "f32" else torch.bfloat16
    model = tiny_model(CYCLES, seed=12, dtype=float_dtype, out_gain=1.0).to("cuda")
    if dtype in QUANTIZED:
        model = quantize_model(model, dtype)
    model = fuse_projections_(model)
    prompts = [prompt(3 + 5 * i, seed=20 + i) for i in range(8)]
    alone = [greedy(Engine(model), [p], 48)[0] for p in prompts]
    engine = Engine(model, slots=8)
    together = greedy(engine, prompts, 48)
    agree = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), 48) for x, y in zip(alone, together)]
    tokens_same = sum(a == b for x, y in zip(alone, together) for a, b in zip(x, y)) / (8 * 48)
    print(f"CUDA {dtype} ({'graph' if graphs == '1' else 'eager'}): batched greedy agrees with alone on the "
          f"first {agree} of 48 tokens ({tokens_same:.3f} of all tokens equal)")
    assert min(agree) >= 1  # the first token comes from each conversation's own prefill
    if graphs == "1":
        assert sorted(engine.captured.graphs) == [8]


class FakeStep:
    """A stand-in for GraphStep: records what was asked, fails compiling while `failures` lasts."""

    failures = 0
    made: list[bool] = []

    def __init__(self, model, pool, compile: bool):
        if compile and FakeStep.failures:
            FakeStep.failures -= 1
            raise RuntimeError("cannot load a cached kernel")
        self.compiled = compile
        FakeStep.made.append(compile)


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """rgchat's compile cache folder under a temporary user cache, holding one file; the variable unset."""
    monkeypatch.setattr(cuda_graph.platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache" / app))
    monkeypatch.setenv(cuda_graph.CACHE_ENV_VAR, "recorded, so that the test's change is undone")
    monkeypatch.delenv(cuda_graph.CACHE_ENV_VAR)
    monkeypatch.setattr(cuda_graph, "GraphStep", FakeStep)
    FakeStep.made = []
    folder = cuda_graph.own_compile_cache_dir()
    (folder / "fx").mkdir(parents=True)
    (folder / "fx" / "entry").write_bytes(b"damaged")
    return folder


def test_the_compile_cache_is_rgchats_own_folder_unless_torch_is_told_otherwise(own_cache, monkeypatch, tmp_path):
    assert own_cache.parent == tmp_path / "cache" / "rgchat" / "compile"
    assert own_cache.name.startswith(f"torch-{torch.__version__}-triton-".replace(" ", "-"))
    assert all(c.isalnum() or c in "._+-" for c in own_cache.name)
    assert cuda_graph.compile_cache_dir() == own_cache
    assert cuda_graph.describe_compile_cache(own_cache) == f"{own_cache} (1 files, 0.0 MB)"
    assert cuda_graph.describe_compile_cache(tmp_path / "nothing") == f"{tmp_path / 'nothing'} (empty)"
    monkeypatch.setenv(cuda_graph.CACHE_ENV_VAR, str(tmp_path / "mine"))
    assert cuda_graph.compile_cache_dir() == tmp_path / "mine"


def test_a_compile_failing_beside_the_cache_clears_it_and_compiles_again(own_cache, capsys):
    FakeStep.failures = 1
    step = cuda_graph._capture(None, None, compile=True)
    assert step.compiled and FakeStep.made == [True]
    assert not own_cache.exists()
    assert "clearing it, compiling again" in capsys.readouterr().err
    assert os.environ[cuda_graph.CACHE_ENV_VAR] == str(own_cache)  # where torch.compile looks


def test_a_compile_failing_again_records_the_plain_step_once(own_cache, capsys):
    FakeStep.failures = 2
    step = cuda_graph._capture(None, None, compile=True)
    assert not step.compiled and FakeStep.made == [False]
    err = capsys.readouterr().err
    assert err.count("clearing it") == 1 and "recording the plain step (cannot load a cached kernel)" in err


def test_a_cache_folder_the_user_chose_is_never_cleared(own_cache, monkeypatch, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "kept").mkdir(parents=True)
    monkeypatch.setenv(cuda_graph.CACHE_ENV_VAR, str(mine))
    FakeStep.failures = 1
    step = cuda_graph._capture(None, None, compile=True)
    assert not step.compiled and (mine / "kept").is_dir() and own_cache.exists()
    assert "clearing" not in capsys.readouterr().err
