"""Quantized weights times one bfloat16 activation row on CUDA (decode), one Triton kernel per format.

torch has no CUDA kernel for weight-only int8 or int4 at batch 1; dequantizing the matrix on every call reads
and writes it three times over. Here each program reads BLOCK_N rows of quantized weights once, converts them
in registers and scales the dot products: int8 y = (q * scale) x with one scale per row; int4 (two values per
byte, low nibble first) y = ((q - 8) * scale + zero) x with a scale and zero per group of inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 512
NUM_WARPS = 4


def block_rows(n: int) -> int:
    """Rows per program: few, so that even a 2560-row matrix spreads over all 132 multiprocessors of an H200,
    and more as matrices grow; chosen by a sweep of block shapes there (docs/performance.md)."""
    return 2 if n <= 4096 else 4 if n <= 6144 else 8


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, scale_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed across once, after the loop
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * scale).to(y_ptr.dtype.element_ty), mask=row_ok)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [1, K] (any float dtype) @ (q [N, K] int8 * scale [N])^T -> [1, N] in x's dtype."""
    N, K = q.shape
    assert x.shape == (1, K) and q.is_contiguous(), "one contiguous activation row and row-major weights"
    x = x.contiguous()
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    block_n = block_rows(N)
    _int8_gemv_kernel[(triton.cdiv(N, block_n),)](x, q, scale, y, N, K, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                                                   num_warps=NUM_WARPS)
    return y


@triton.jit
def _int4_gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, N, K, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    half, groups = K // 2, K // GROUP
    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds inputs 2j (low nibble) and 2j+1 (high)
        j_ok = j < half
        ok = row_ok[:, None] & j_ok[None, :]
        b = tl.load(packed_ptr + rows[:, None] * half + j[None, :], mask=ok, other=0).to(tl.int32)
        low, high = (b & 0xF).to(tl.float32) - 8.0, (b >> 4).to(tl.float32) - 8.0
        g = rows[:, None] * groups + (2 * j[None, :]) // GROUP  # both nibbles of a byte share a group
        s = tl.load(scale_ptr + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=ok, other=0.0).to(tl.float32)
        x_even = tl.load(x_ptr + 2 * j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        x_odd = tl.load(x_ptr + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        acc += s * (low * x_even + high * x_odd) + z * (x_even + x_odd)
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ W^T for the int4 matrix W [N, K] stored as packed [N, K/2] uint8 with scale and zero
    [N, K/group] (rgchat/quant.py's layout) -> [1, N] in x's dtype."""
    N, half = packed.shape
    K, group = 2 * half, 2 * half // scale.shape[1]
    assert x.shape == (1, K) and packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    x = x.contiguous()
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    block_n = block_rows(N)
    _int4_gemv_kernel[(triton.cdiv(N, block_n),)](x, packed, scale, zero, y, N, K, GROUP=group, BLOCK_N=block_n,
                                                   BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return y
