"""`rgchat bench --kernels`: each native CPU product at the 2B model's matrix shapes, in GB/s of weights read,
against a plain read of the same bytes with the same threads and against torch's product.

Decode reads every matrix once per token from memory, never from a cache, so each matrix is timed over
enough copies of it that no cache holds them, as the model's matrices follow each other in a step."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rgchat import gemv
from rgchat.errors import RGChatError

SHAPES = ((2560, 2560), (7680, 2560), (2560, 7680), (256000, 2560))  # [out, in] of the 2B model's products
FORMATS = ("int8", "int4", "bf16")
COPIES_BYTES = 768 << 20  # per shape and format: far beyond any cache


def _weights(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    if fmt == "int8":
        return (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
                (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16))
    if fmt == "int4":
        groups = k // 32
        return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
                (torch.rand(n, groups, generator=gen) * 0.1).to(torch.bfloat16),
                (torch.randn(n, groups, generator=gen) * 0.1).to(torch.bfloat16))
    return (torch.randn(n, k, generator=gen, dtype=torch.bfloat16),)


def _seconds_per_call(fn, copies: list, repeats: int = 3) -> float:
    """The best over a few passes of the time per call, each call on the next copy."""
    fn(copies[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in copies:
            fn(c)
        best = min(best, (time.perf_counter() - t0) / len(copies))
    return best


def _torch_product(fmt: str):
    """torch's product for the format, as rgchat ran it before the native kernels (None for int4, whose
    torch kernel wants its own packing)."""
    if fmt == "int8":
        return lambda x, w: torch._weight_int8pack_mm(x, *w)
    if fmt == "bf16":
        return lambda x, w: F.linear(x, w[0])
    return None


def kernel_table(rows: tuple[int, ...] = (1, 8), formats: tuple[str, ...] = FORMATS,
                 shapes: tuple[tuple[int, int], ...] = SHAPES, seed: int = 0) -> list[dict]:
    kernels = gemv.cpu_kernels()
    if kernels is None:
        raise RGChatError("the native CPU products are not built (rgchat doctor says why)")
    products = {"int8": kernels.int8, "int4": kernels.int4, "bf16": kernels.bf16}
    gen = torch.Generator().manual_seed(seed)
    results = []
    for n, k in shapes:
        for fmt in formats:
            first = _weights(fmt, n, k, gen)
            nbytes = sum(t.numel() * t.element_size() for t in first)
            copies = [first] + [_weights(fmt, n, k, gen) for _ in range(COPIES_BYTES // nbytes - 1)]
            flat = [torch.ones(nbytes, dtype=torch.uint8) for _ in copies]  # the same bytes, as one buffer each
            read = nbytes / _seconds_per_call(kernels.read, flat) / 1e9
            del flat
            packs = fmt == "int8" and kernels.packs_int8(first[0])  # the layout int8 models run from here
            native_copies = [(gemv.pack_int8(q), scale) for q, scale in copies] if packs else copies
            product = kernels.int8_packed if packs else products[fmt]
            for r in rows:
                x = torch.randn(r, k, generator=gen).to(torch.bfloat16)
                native = nbytes / _seconds_per_call(lambda w: product(x, *w), native_copies) / 1e9
                baseline = _torch_product(fmt)
                torch_gb_s = nbytes / _seconds_per_call(lambda w: baseline(x, w), copies) / 1e9 if baseline else None
                results.append({
                    "shape": f"{n}x{k}", "format": fmt, "rows": r,
                    "path": gemv.PATH_NAMES[kernels.paths[fmt]] + (" (packed)" if packs else ""),
                    "threads": kernels.threads(), "weight_mb": round(nbytes / 1e6, 1),
                    "native_gb_s": round(native, 2), "read_gb_s": round(read, 2),
                    "fraction_of_read": round(native / read, 3),
                    "torch_gb_s": round(torch_gb_s, 2) if torch_gb_s else None,
                })
            del copies, native_copies, first
    return results
