"""CUDA decode through a captured graph (compiled by default): the same numbers as the eager step, and greedy
output that matches the CPU. Runs where CUDA is present (the H200 through the device tool); skipped elsewhere."""

import pytest
import torch

from conftest import CYCLES, greedy_tokens, tiny_model
from rgchat import cuda_graph
from rgchat.config import GriffinConfig
from rgchat.model import fuse_projections_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, CYCLES.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("compile", ["1", "0"], ids=["compiled", "plain"])
def test_graph_step_equals_the_eager_step_across_the_window(monkeypatch, compile):
    monkeypatch.setenv(cuda_graph.COMPILE_ENV_VAR, compile)
    config = GriffinConfig(**{**CYCLES.to_dict(), "window": 8})
    model = fuse_projections_(tiny_model(config, seed=5).to("cuda"))  # as the loaders build it on CUDA
    graphed, eager = model.new_state(), model.new_state()
    tokens = prompt(40, seed=1)
    model.prefill(torch.tensor(tokens[:3]), graphed)
    model.prefill(torch.tensor(tokens[:3]), eager)
    for t in tokens[3:]:
        got = model.step(t, graphed).clone()  # the graph's output buffer is reused by the next step
        monkeypatch.setenv(cuda_graph.ENV_VAR, "0")
        expected = model.step(t, eager)
        monkeypatch.delenv(cuda_graph.ENV_VAR)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert isinstance(model.graph_step, cuda_graph.GraphStep) and model.graph_step.serves(graphed)
    assert model.graph_step.compiled == (compile == "1")
    assert graphed.pos == eager.pos == 40
    fresh = model.new_state()  # another state's buffers: captured anew
    model.prefill(torch.tensor(tokens[:3]), fresh)
    model.step(tokens[3], fresh)
    assert model.graph_step.serves(fresh) and not model.graph_step.serves(graphed)
    assert model.graph_step.compiled == (compile == "1")


def test_a_failed_compile_records_the_plain_step(monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny_model(CYCLES, seed=6).to("cuda")
    state = model.new_state()
    model.prefill(torch.tensor(prompt(5, seed=3)), state)
    model.step(1, state)
    assert isinstance(model.graph_step, cuda_graph.GraphStep) and not model.graph_step.compiled
    assert "torch.compile failed, recording the plain step (no compiler here)" in capsys.readouterr().err


def test_greedy_bf16_on_cuda_matches_the_cpu():
    """64 greedy tokens, bf16, the compiled CUDA graph against the CPU: equal, or (where bf16 rounding differs between the
    devices' kernels) the CUDA choices agree with the float32 reference's top-1 at least 99% of the time."""
    cpu = tiny_model(CYCLES, seed=11, dtype=torch.bfloat16, out_gain=1.0)
    cuda = fuse_projections_(tiny_model(CYCLES, seed=11, dtype=torch.bfloat16, out_gain=1.0).to("cuda"))
    ids = prompt(20, seed=2)
    on_cpu, on_cuda = greedy_tokens(cpu, ids, 64), greedy_tokens(cuda, ids, 64)
    assert isinstance(cuda.graph_step, cuda_graph.GraphStep) and cuda.graph_step.compiled
    same = next((i for i, (a, b) in enumerate(zip(on_cpu, on_cuda)) if a != b), 64)
    print(f"CUDA bf16 (compiled graph) and CPU bf16 greedy agree on the first {same} of 64 tokens")
    if same < 64:
        reference = tiny_model(CYCLES, seed=11, out_gain=1.0)  # float32, teacher-forced on the CUDA sequence
        logits = reference.forward(torch.tensor(ids + on_cuda), reference.new_state(), all_logits=True)
        top1 = logits[len(ids) - 1:-1].argmax(-1).tolist()
        agreement = sum(a == b for a, b in zip(top1, on_cuda)) / len(on_cuda)
        print(f"top-1 agreement of the CUDA tokens with float32: {agreement:.3f}")
        assert agreement >= 0.99
