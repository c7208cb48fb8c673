"""The RG-LRU: gate math plus the linear recurrence h_t = a_t * h_{t-1} + b_t, with a float32 carry.

`rglru` runs it through a native kernel chosen once per device (C on CPU, Triton on CUDA, Metal on
MPS), or through `rglru_torch`, the pure-PyTorch version that is both the fallback and the oracle the
kernels are tested against. RGCHAT_SCAN=native|torch forces either path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rgchat.errors import RGChatError
from rgchat.native import library_path

ENV_VAR = "RGCHAT_SCAN"


def rglru_torch(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, a_scale: torch.Tensor,
                h: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
    """The RG-LRU over one chunk, in plain PyTorch.

    x, gate_x, gate_a: [T, L] (the gates before their sigmoid); a_scale: [L] float32, -8 * softplus(a_param);
    h: [L] float32 carry, updated in place; reset: [T] bool, True where a document starts.
    Returns y [T, L] in x's dtype; x is consumed (a backend may write y into its buffer). All element-wise
    math is float32 like the carry (float64 for a float64 carry: how the tests compute the exact reference).
    """
    acc = h.dtype
    log_a = a_scale.to(acc) * torch.sigmoid(gate_a.to(acc))
    a = torch.exp(log_a)
    multiplier = torch.sqrt(-torch.expm1(2 * log_a))  # sqrt(1 - a^2), accurate for a near 1
    if reset is not None:  # at a document start: no history, and the input is not normalised
        starts = reset[:, None]
        a = a.masked_fill(starts, 0.0)
        multiplier = multiplier.masked_fill(starts, 1.0)
    b = x.to(acc) * torch.sigmoid(gate_x.to(acc)) * multiplier
    y = torch.empty_like(b)
    for t in range(b.shape[0]):
        h.mul_(a[t]).add_(b[t])
        y[t] = h
    return y.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class ScanBackend:
    name: str  # "native" or "torch"
    detail: str  # what runs, for `rgchat doctor`
    fn: Callable[..., torch.Tensor]


TORCH_BACKEND = ScanBackend("torch", "PyTorch loop", rglru_torch)


# --- CPU: the C kernel in kernels/rglru_scan.c, built at install, called through ctypes -------------------

def _find_cpu_library() -> Path:
    return library_path("_rglru")


def _load_cpu_library(path: Path | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path or _find_cpu_library()))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.rglru_f32, lib.rglru_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def make_cpu_scan(lib: ctypes.CDLL) -> Callable[..., torch.Tensor]:
    kernels = {torch.float32: lib.rglru_f32, torch.bfloat16: lib.rglru_bf16}

    def rglru_cpu(x, gate_x, gate_a, a_scale, h, reset=None):
        kernel = kernels.get(x.dtype)
        if kernel is None or not h.is_contiguous() or h.dtype != torch.float32:
            return rglru_torch(x, gate_x, gate_a, a_scale, h, reset)
        x, gate_x, gate_a = x.contiguous(), gate_x.to(x.dtype).contiguous(), gate_a.to(x.dtype).contiguous()
        a_scale = a_scale.float().contiguous()
        reset_u8 = reset.to(torch.uint8).contiguous() if reset is not None else None
        # Each y[t, c] is written after x[t, c] is read, so the result can take x's place: a fresh output
        # buffer would cost as much in page faults as the whole scan.
        y = x
        T, L = x.shape
        status = kernel(x.data_ptr(), gate_x.data_ptr(), gate_a.data_ptr(), a_scale.data_ptr(),
                        reset_u8.data_ptr() if reset_u8 is not None else None, h.data_ptr(), y.data_ptr(),
                        T, L, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"native RG-LRU kernel failed with status {status}")
        return y

    return rglru_cpu


def _native_cpu() -> ScanBackend:
    fn = make_cpu_scan(_load_cpu_library())
    return ScanBackend("native", f"C, {torch.get_num_threads()} threads", fn)


def _native_cuda() -> ScanBackend:
    from rgchat.kernels.triton_scan import rglru_triton  # raises ImportError without Triton

    return ScanBackend("native", "Triton, chunked scan", rglru_triton)


def _native_mps() -> ScanBackend:
    from rgchat.kernels.metal_scan import make_metal_scan  # raises without torch.mps.compile_shader

    return ScanBackend("native", "Metal, one thread per channel", make_metal_scan())


NATIVE = {"cpu": _native_cpu, "cuda": _native_cuda, "mps": _native_mps}


@functools.cache
def backend_for(device_type: str, choice: str = "auto") -> ScanBackend:
    """The scan for a device: native where it loads, else PyTorch (with one notice on stderr)."""
    if choice not in ("auto", "native", "torch"):
        raise RGChatError(f"{ENV_VAR}={choice!r}: use native or torch")
    if choice == "torch":
        return TORCH_BACKEND
    try:
        loader = NATIVE[device_type]
        return loader()
    except (KeyError, ImportError, OSError, AttributeError, RuntimeError) as e:
        reason = f"no native kernel for {device_type}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        if choice == "native":
            raise RGChatError(f"{ENV_VAR}=native, but the native scan is unavailable on {device_type}: {reason}")
        print(f"rgchat: native scan unavailable on {device_type} ({reason}); using the PyTorch scan",
              file=sys.stderr)
        return TORCH_BACKEND


def rglru(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor, a_scale: torch.Tensor, h: torch.Tensor,
          reset: torch.Tensor | None = None) -> torch.Tensor:
    """The RG-LRU on x's device through its chosen backend; arguments as for `rglru_torch`.

    While torch.compile traces (the CUDA decode step), the PyTorch version is used: the compiler fuses its
    element-wise math with the neighbouring operations, where a kernel call would stay a launch of its own."""
    if torch.compiler.is_compiling():
        return rglru_torch(x, gate_x, gate_a, a_scale, h, reset)
    backend = backend_for(x.device.type, os.environ.get(ENV_VAR, "auto"))
    return backend.fn(x, gate_x, gate_a, a_scale, h, reset)
