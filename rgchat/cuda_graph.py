"""Decode on CUDA as one captured graph. A 2B step is a few hundred small kernels, and launching them one by
one from Python costs more than their memory traffic; a CUDA graph launches them all at once. The graph is
recorded for one State's buffers (a new State, e.g. after /clear, records a new one) and replayed with the
token and position written into static device tensors. RGCHAT_CUDA_GRAPHS=0 turns it off; RGCHAT_COMPILE=1
first fuses the step's small kernels with torch.compile (slow to start, faster per token)."""

from __future__ import annotations

import os
import sys

import torch

from rgchat.model import Griffin
from rgchat.state import State

ENV_VAR = "RGCHAT_CUDA_GRAPHS"
COMPILE_ENV_VAR = "RGCHAT_COMPILE"
WARMUP_STEPS = 3


class GraphStep:
    """Model.step_static for one State, captured."""

    def __init__(self, model: Griffin, state: State):
        device = model.device
        self.buffers = [t.data_ptr() for t in state.tensors()]
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.full((), state.pos, dtype=torch.long, device=device)
        step = model.step_static
        if os.environ.get(COMPILE_ENV_VAR) == "1":
            step = torch.compile(step, dynamic=False)
        saved = state.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the main stream, as capture requires: compiles kernels
            for _ in range(WARMUP_STEPS):
                step(self.token, self.pos, state)
        torch.cuda.current_stream(device).wait_stream(side)
        state.copy_(saved)  # the warm-up steps were not real
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = step(self.token, self.pos, state)

    def serves(self, state: State) -> bool:
        return self.buffers == [t.data_ptr() for t in state.tensors()]

    def __call__(self, token: int | torch.Tensor, state: State) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(state.pos)
        self.graph.replay()
        state.pos += 1
        return self.logits


def runner(model: Griffin, state: State) -> GraphStep | None:
    """The captured step for `state`, capturing it first if needed; None where graphs are off or failed
    (then the eager step runs)."""
    if os.environ.get(ENV_VAR, "1") == "0" or model.graph_step is False:
        return None
    if model.graph_step is None or not model.graph_step.serves(state):
        model.graph_step = None  # release the old graph's memory first
        try:
            model.graph_step = GraphStep(model, state)
        except RuntimeError as e:
            print(f"rgchat: CUDA graph capture failed, decoding eagerly ({str(e).splitlines()[0]})",
                  file=sys.stderr)
            model.graph_step = False
            return None
    return model.graph_step
