"""Decode on CUDA as one captured graph. A 2B step is about a thousand small kernels; launched one by one
from Python they cost more than the step's memory traffic. So the step is first fused by torch.compile
(to a few hundred kernels: element-wise chains become single Triton kernels) and then recorded as a CUDA
graph, which launches them all at once. A graph is recorded for one State's buffers (each slot of an
engine gets its own) and replayed with the token and position written into static device tensors.

Compiling is slow on a first start and quicker once torch's on-disk cache holds the result (the times are
in docs/performance.md). RGCHAT_COMPILE=0 skips it (a graph of the plain step: slower per token, quick to
start); RGCHAT_CUDA_GRAPHS=0 turns graphs off altogether (eager steps)."""

from __future__ import annotations

import os
import sys
import warnings

import torch

from rgchat.model import Griffin
from rgchat.state import State

ENV_VAR = "RGCHAT_CUDA_GRAPHS"
COMPILE_ENV_VAR = "RGCHAT_COMPILE"
WARMUP_STEPS = 3


def _notice(message: str) -> None:
    print(f"rgchat: {message}", file=sys.stderr, flush=True)


def buffers_of(state: State) -> tuple[int, ...]:
    """What a graph recorded for `state` depends on: the addresses of its tensors."""
    return tuple(t.data_ptr() for t in state.tensors())


class GraphStep:
    """Model.step_static for one State, compiled (unless `compile` is False) and captured."""

    def __init__(self, model: Griffin, state: State, compile: bool):
        device = model.device
        self.compiled = compile
        self.buffers = buffers_of(state)
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.full((), state.pos, dtype=torch.long, device=device)
        step = torch.compile(model.step_static, dynamic=False) if compile else model.step_static
        saved = state.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side), warnings.catch_warnings():  # warm-up off the main stream, as capture
                # requires; it compiles. The kernel lookups it meets are functools.cache'd imports, constant
                # for the process, which torch.compile warns about needlessly.
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools")
                for _ in range(WARMUP_STEPS):
                    step(self.token, self.pos, state)
            torch.cuda.current_stream(device).wait_stream(side)
        finally:
            state.copy_(saved)  # the warm-up steps were not real
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = step(self.token, self.pos, state)

    def serves(self, state: State) -> bool:
        return self.buffers == buffers_of(state)

    def __call__(self, token: int | torch.Tensor, state: State) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(state.pos)
        self.graph.replay()
        state.pos += 1
        return self.logits


def _capture(model: Griffin, state: State, compile: bool) -> GraphStep | bool:
    """A GraphStep, compiled if asked and possible, else plain; False if no graph could be recorded."""
    if compile:
        try:
            return GraphStep(model, state, compile=True)
        except Exception as e:  # the compiler's failures have many types (missing toolchain, unsupported op)
            _notice(f"torch.compile failed, recording the plain step ({str(e).splitlines()[0][:200]})")
    try:
        return GraphStep(model, state, compile=False)
    except RuntimeError as e:
        _notice(f"CUDA graph capture failed, decoding eagerly ({str(e).splitlines()[0]})")
        return False


class CapturedStep:
    """An engine's captured decode steps, one per slot State (a graph replays for the buffers it was
    recorded with): recorded on first use, the first capture's choice of compiling kept for the others
    (a later capture reuses the compiled code). Several slots decode one after another, each through its
    own graph, which on CUDA is far faster than an eager batched step."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, ...], GraphStep] = {}
        self.compiled: bool | None = None  # the choice made at the first capture
        self.failed = False  # graphs could not be recorded: decode eagerly

    def runner(self, model: Griffin, state: State) -> GraphStep | None:
        """The captured step for `state`, capturing it first if needed; None where graphs are off or failed
        (then the eager step runs)."""
        if os.environ.get(ENV_VAR, "1") == "0" or self.failed:
            return None
        key = buffers_of(state)
        if key not in self.graphs:
            compile = self.compiled
            if compile is None:
                compile = os.environ.get(COMPILE_ENV_VAR, "1") != "0"
                if compile:
                    _notice("compiling the CUDA decode step (a minute or more on a first start, less once "
                            "cached; RGCHAT_COMPILE=0 skips it)")
            graph = _capture(model, state, compile)
            if graph is False:
                self.failed = True
                return None
            self.compiled = graph.compiled
            self.graphs[key] = graph
        return self.graphs[key]
