"""Decode on CUDA as one captured graph. A 2B step is about a thousand small kernels; launched one by one
from Python they cost more than the step's memory traffic. So the step is first fused by torch.compile
(to a few hundred kernels: element-wise chains become single Triton kernels) and then recorded as a CUDA
graph, which launches them all at once. A graph is recorded for the first n rows of an engine's slot pool
(n a bucket: 1, 2, 4, ... up to the pool's size) and replayed with the rows' tokens and positions written
into static device tensors; one replay decodes every conversation in those rows, reading the weights once.

Compiling is slow on a first start and quicker once torch's on-disk cache holds the result (the times are
in docs/performance.md); each bucket is compiled on its first use. That cache lives in rgchat's user cache
folder, one folder per torch, Triton and GPU (`own_compile_cache_dir`; $TORCHINDUCTOR_CACHE_DIR, torch's
own setting, overrides it), rather than under /tmp, which many systems empty at every boot.
RGCHAT_COMPILE=0 skips compiling (a graph of the plain step: slower per token, quick to start);
RGCHAT_CUDA_GRAPHS=0 turns graphs off altogether (eager steps)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import platformdirs
import torch

from rgchat.model import Griffin
from rgchat.state import State

ENV_VAR = "RGCHAT_CUDA_GRAPHS"
COMPILE_ENV_VAR = "RGCHAT_COMPILE"
CACHE_ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"  # torch's own setting; the Triton kernels it builds go under it
WARMUP_STEPS = 3


def _notice(message: str) -> None:
    print(f"rgchat: {message}", file=sys.stderr, flush=True)


def own_compile_cache_dir() -> Path:
    """rgchat's folder for torch.compile's cache: one per torch, Triton and GPU under the user cache folder,
    so that an upgrade starts afresh rather than beside stale files."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
    name = re.sub(r"[^A-Za-z0-9._+]+", "-", f"torch-{torch.__version__}-triton-{triton_version}-{gpu}")
    return Path(platformdirs.user_cache_dir("rgchat")) / "compile" / name


def compile_cache_dir() -> Path:
    """Where torch.compile keeps what it builds: $TORCHINDUCTOR_CACHE_DIR where set, else rgchat's folder."""
    return Path(os.environ.get(CACHE_ENV_VAR) or own_compile_cache_dir())


def describe_compile_cache(folder: Path) -> str:
    """The cache folder and what it holds, for `rgchat doctor`."""
    files = [f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()] if folder.is_dir() else []
    if not files:
        return f"{folder} (empty)"
    return f"{folder} ({len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB)"


def bucket(rows: int, slots: int) -> int:
    """The rows a graph covers to decode the first `rows` rows of a pool of `slots`: the next power of two,
    or the whole pool, so that few graphs serve every batch."""
    return min(1 << (rows - 1).bit_length(), slots)


class GraphStep:
    """Griffin.decode_rows for the rows of `pool` (the first rows of an engine's pool), compiled (unless
    `compile` is False) and captured."""

    def __init__(self, model: Griffin, pool: State, compile: bool):
        device, rows = model.device, pool.tensors()[0].shape[0]
        self.compiled = compile
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.ones(rows, dtype=torch.long, device=device)
        step = torch.compile(model.decode_rows, dynamic=False) if compile else model.decode_rows
        saved = pool.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side), warnings.catch_warnings():  # warm-up off the main stream, as capture
                # requires; it compiles. The kernel lookups it meets are functools.cache'd imports, constant
                # for the process, which torch.compile warns about needlessly.
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools")
                for _ in range(WARMUP_STEPS):
                    step(self.tokens, self.positions, pool)
            torch.cuda.current_stream(device).wait_stream(side)
        finally:
            pool.copy_(saved)  # the warm-up steps were not real
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = step(self.tokens, self.positions, pool)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Decode one token for every row (each at its position); returns the logits [rows, vocab], which
        the next replay overwrites."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long))
        self.positions.copy_(torch.tensor(positions, dtype=torch.long))
        self.graph.replay()
        return self.logits


def _capture(model: Griffin, pool: State, compile: bool) -> GraphStep | bool:
    """A GraphStep, compiled if asked and possible, else plain; False if no graph could be recorded."""
    if compile:
        cache = compile_cache_dir()
        os.environ[CACHE_ENV_VAR] = str(cache)  # torch reads it at every lookup
        # A failure beside files of rgchat's own cache may come from those files (damaged, or stale in a
        # way torch's keys miss): they are cleared and the step compiled once more from nothing.
        retry = cache == own_compile_cache_dir() and cache.is_dir() and any(cache.iterdir())
        while True:
            try:
                return GraphStep(model, pool, compile=True)
            except Exception as e:  # the compiler's failures have many types (missing toolchain, unsupported op)
                reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            if not retry:
                break
            _notice(f"torch.compile failed beside its cache in {cache} ({reason}); clearing it, compiling again")
            shutil.rmtree(cache, ignore_errors=True)
            retry = False
        _notice(f"torch.compile failed, recording the plain step ({reason})")
    try:
        return GraphStep(model, pool, compile=False)
    except RuntimeError as e:
        _notice(f"CUDA graph capture failed, decoding eagerly ({str(e).splitlines()[0]})")
        return False


class CapturedStep:
    """An engine's captured decode steps, one per bucket of pool rows: recorded on first use, the first
    capture's choice of compiling kept for the others."""

    def __init__(self) -> None:
        self.graphs: dict[int, GraphStep] = {}  # by the rows they cover
        self.compiled: bool | None = None  # the choice made at the first capture
        self.failed = False  # graphs could not be recorded: decode eagerly

    def runner(self, model: Griffin, pool: State, rows: int) -> GraphStep | None:
        """The captured step for the first `rows` rows of `pool`, capturing it first if needed; None where
        graphs are off or failed (then the eager step runs)."""
        if os.environ.get(ENV_VAR, "1") == "0" or self.failed:
            return None
        if rows not in self.graphs:
            compile = self.compiled
            if compile is None:
                compile = os.environ.get(COMPILE_ENV_VAR, "1") != "0"
            if compile:
                _notice(f"compiling the CUDA decode step for {rows} conversation{'s' if rows > 1 else ''} "
                        "(a minute or more on a first start, less once cached; RGCHAT_COMPILE=0 skips it)")
            graph = _capture(model, pool.rows(0, rows), compile)
            if graph is False:
                self.failed = True
                return None
            self.compiled = graph.compiled
            self.graphs[rows] = graph
        return self.graphs[rows]
