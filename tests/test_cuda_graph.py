"""CUDA decode through the engine's captured graphs (compiled by default): the same numbers as the eager step,
greedy output that matches the CPU, and batched decoding against decoding alone. Runs where CUDA is present;
skipped elsewhere."""

import pytest
import torch

from conftest import CYCLES, tiny_model
from rgchat import cuda_graph
from rgchat.config import GriffinConfig
from rgchat.engine import Engine
from rgchat.model import fuse_projections_
from rgchat.quant import QUANTIZED, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


def test_a_failed_compile_records_the_plain_step(monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(tiny_model(CYCLES, seed=6).to("cuda"))
    slot = engine.admit()
    engine.prefill(slot, prompt(5, seed=3))
    engine.decode([slot], [1])
    [graph] = engine.captured.graphs.values()
    assert isinstance(graph, cuda_graph.GraphStep) and not graph.compiled and graph.rows == 1
    assert "torch.compile failed, recording the plain step (no compiler here)" in capsys.readouterr().err


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
