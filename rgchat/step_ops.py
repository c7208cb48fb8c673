"""The element-wise work of a CPU decode step in native calls (kernels/step.c): norms, the MLP's gelu, the
recurrent block's conv and RG-LRU, attention over the ring buffers, the logits' soft cap.

Between its matrix products a decode step would otherwise run a few hundred small torch operations per
layer, each costing more to dispatch than to compute. Each function here computes in float32 and rounds
once, row by row: a row's result never depends on the other rows. The library is optional: `step_ops()` is
None without it (with one notice on stderr), with RGCHAT_STEP=torch, or while torch.compile traces, and the
model then runs torch's operations.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from rgchat.errors import RGChatError
from rgchat.native import library_path

ENV_VAR = "RGCHAT_STEP"
DTYPES = (torch.float32, torch.bfloat16)


def _load_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path("_step")))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "step_rms_norm": [p, p, p, i64, i64, f32, i32],
        "step_gelu_mul": [p, p, p, i64, i32],
        "step_conv": [p, p, p, p, p, i64, i64, i64, i32],
        "step_rglru_gelu": [p, p, p, p, p, p, p, i64, i64, i32],
        "step_attention": [p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32],
        "step_soft_cap": [p, i64, f32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} failed: {'bad arguments' if status == 1 else 'out of memory'}")


def _shapes(what: str, *pairs: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """The kernels see only pointers and sizes: every tensor must have exactly the shape they assume."""
    for t, shape in pairs:
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: a tensor of shape {tuple(t.shape)} where {shape} was expected")


def _within(indices: torch.Tensor, end: int) -> bool:
    values = indices.tolist()
    return 0 <= min(values) and max(values) < end


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    """The data of a tensor the kernels read as given: contiguous, on the CPU, of the step's dtype."""
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"the native step takes contiguous CPU {dtype} tensors, not {t.dtype} {tuple(t.stride())}")
    return t.data_ptr()


class StepOps:
    """The loaded library. Activations are [n, ...] rows (n conversations, one token each) of one dtype,
    float32 or bfloat16; outputs are new tensors, states are updated in place."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    @staticmethod
    def detail() -> str:
        """What runs, for `rgchat doctor`."""
        return "C, one thread"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        width = x.shape[-1]
        _shapes("norm", (weight, (width,)))
        _check(self.lib.step_rms_norm(_ptr(x, x.dtype), _ptr(weight, x.dtype), out.data_ptr(), x.numel() // width,
                                      width, eps, x.dtype == torch.bfloat16), "norm")
        return out

    def gelu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        _shapes("gelu", (up, tuple(gate.shape)))
        out = torch.empty_like(gate)
        _check(self.lib.step_gelu_mul(_ptr(gate, gate.dtype), _ptr(up, gate.dtype), out.data_ptr(), gate.numel(),
                                      gate.dtype == torch.bfloat16), "gelu")
        return out

    def conv(self, u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The causal conv of one token u [n, 1, L] after the rows' earlier inputs state [n, width - 1, L]
        (moved on in place), with weight [L, width] and bias [L]."""
        u = u.contiguous()
        n, L, width, dtype = u.shape[0], u.shape[-1], weight.shape[-1], u.dtype
        _shapes("conv", (u, (n, 1, L)), (state, (n, width - 1, L)), (weight, (L, width)), (bias, (L,)))
        out = torch.empty_like(u)
        _check(self.lib.step_conv(_ptr(u, dtype), _ptr(state, dtype), _ptr(weight, dtype), _ptr(bias, dtype),
                                  out.data_ptr(), n, L, width, dtype == torch.bfloat16), "conv")
        return out

    def rglru_gelu(self, x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, a_scale: torch.Tensor,
                   h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One RG-LRU step of x [n, 1, L] from the carries h [n, L] (float32, updated in place), times
        gelu(y): the recurrent block's output before its last product. The gates are before their sigmoid
        ([n, L] or [n, 1, L]); a_scale [L] float32."""
        x, y, gate_x, gate_a = x.contiguous(), y.contiguous(), gate_x.contiguous(), gate_a.contiguous()
        n, L, dtype = x.shape[0], x.shape[-1], x.dtype
        _shapes("RG-LRU", (x, (n, 1, L)), (y, (n, 1, L)), (gate_x.reshape(-1), (n * L,)),
                (gate_a.reshape(-1), (n * L,)), (a_scale, (L,)), (h, (n, L)))
        out = torch.empty_like(x)
        _check(self.lib.step_rglru_gelu(_ptr(x, dtype), _ptr(gate_x, dtype),
                                        _ptr(gate_a, dtype), _ptr(a_scale, torch.float32),
                                        _ptr(h, torch.float32), _ptr(y, dtype), out.data_ptr(), n, L,
                                        dtype == torch.bfloat16), "RG-LRU")
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor,
                  ring_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
                  filled: torch.Tensor, slot: torch.Tensor, heads: int) -> torch.Tensor:
        """One token of each of n rows: q [n, 1, heads * hd], k and v [n, 1, kv * hd] before RoPE (tables
        cos, sin [n, hd / 4]), against pool rows `rows` of the ring buffers [pool, window, kv, hd], whose
        first `filled` slots hold keys; then k (rotated) and v are stored at `slot`. All three [n] int64.
        Returns [n, 1, heads * hd]."""
        q, k, v, cos, sin = q.contiguous(), k.contiguous(), v.contiguous(), cos.contiguous(), sin.contiguous()
        n, dtype = q.shape[0], q.dtype
        pool, window, kv_heads, head_dim = ring_k.shape
        _shapes("attention", (q, (n, 1, heads * head_dim)), (k, (n, 1, kv_heads * head_dim)), (v, tuple(k.shape)),
                (ring_v, tuple(ring_k.shape)), (cos, (n, head_dim // 4)), (sin, (n, head_dim // 4)),
                (rows, (n,)), (filled, (n,)), (slot, (n,)))
        if (heads % kv_heads or head_dim % 4 or not _within(rows, pool) or not _within(filled, window + 1)
                or not _within(slot, window)):
            raise ValueError("attention: heads, rows, filled slots or ring slots out of range")
        out = torch.empty_like(q)
        _check(self.lib.step_attention(
            _ptr(q, dtype), _ptr(k, dtype), _ptr(v, dtype), _ptr(ring_k, dtype), _ptr(ring_v, dtype),
            _ptr(cos, dtype), _ptr(sin, dtype), _ptr(rows, torch.int64),
            _ptr(filled, torch.int64), _ptr(slot, torch.int64), out.data_ptr(), n, heads, kv_heads, head_dim,
            window, dtype == torch.bfloat16), "attention")
        return out

    def soft_cap_(self, logits: torch.Tensor, cap: float) -> torch.Tensor:
        """cap * tanh(logits / cap), in place over float32 logits."""
        _check(self.lib.step_soft_cap(_ptr(logits, torch.float32), logits.numel(), cap), "soft cap")
        return logits


@functools.cache
def _ops_for(choice: str) -> StepOps | None:
    if choice not in ("auto", "native", "torch"):
        raise RGChatError(f"{ENV_VAR}={choice!r}: use native or torch")
    if choice == "torch":
        return None
    try:
        return StepOps(_load_library())
    except (OSError, AttributeError) as e:
        if choice == "native":
            raise RGChatError(f"{ENV_VAR}=native, but the native decode step is unavailable: "
                              f"{str(e).splitlines()[0]}")
        print(f"rgchat: native decode-step operations unavailable ({str(e).splitlines()[0]}); using torch's",
              file=sys.stderr)
        return None


def step_ops() -> StepOps | None:
    """The native step operations as RGCHAT_STEP chooses (read at each call, loaded once per choice); None
    while torch.compile traces (it fuses torch's operations itself)."""
    if torch.compiler.is_compiling():
        return None
    return _ops_for(os.environ.get(ENV_VAR, "auto"))
