"""The RG-LRU on MPS through a Metal kernel (kernels/rglru_scan.metal) compiled at first use."""

from __future__ import annotations

from importlib import resources

import torch


def metal_arguments(x, gate_x, gate_a, a_scale, h, reset=None) -> tuple[list, torch.Tensor]:
    """The kernel's argument list (float32, contiguous, in buffer order) and the float32 output to fill."""
    if h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError("the carry must be a contiguous float32 vector")
    T, L = x.shape
    x32, gx32, ga32 = (t.float().contiguous() for t in (x, gate_x, gate_a))
    starts = (reset if reset is not None else torch.zeros(1, dtype=torch.bool, device=x.device))
    y = torch.empty_like(x32)
    args = [x32, gx32, ga32, a_scale.float().contiguous(), starts.to(torch.uint8).contiguous(), h, y,
            T, L, int(reset is not None)]
    return args, y


def make_metal_scan():
    """Compile the shader (raises where torch.mps.compile_shader or MPS is missing)."""
    if not hasattr(torch.mps, "compile_shader"):
        raise ImportError("this torch has no torch.mps.compile_shader (needs torch >= 2.7)")
    source = resources.files("rgchat.kernels").joinpath("rglru_scan.metal").read_text()
    library = torch.mps.compile_shader(source)

    def rglru_mps(x, gate_x, gate_a, a_scale, h, reset=None):
        args, y = metal_arguments(x, gate_x, gate_a, a_scale, h, reset)
        library.rglru_float(*args, threads=x.shape[1])
        return y.to(x.dtype)

    return rglru_mps
