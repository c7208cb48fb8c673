"""Quantized weights times few bfloat16 activation rows on CUDA (decode), Triton kernels per format.

torch has no CUDA kernel for weight-only int8 or int4 at small batch; dequantizing the matrix on every call
reads and writes it three times over. Here each program reads a block of quantized weights once, converts it
in registers and scales the dot products: int8 y = (q * scale) x with one scale per row; int4 (two values per
byte, low nibble first) y = ((q - 8) * scale + zero) x with a scale and zero per group of inputs.

int8 runs one kernel for 1 to MAX_ROWS activation rows (a decode step of one or several conversations): it
multiplies weight tiles with tensor-core dot products, the rows padded to 16 or 32, so the weights are read
once for all rows and a row's sums run in the same order whatever rows come with it. int4 runs a plain
matrix-vector kernel for one row, which its unpacking makes faster there, and such a tile kernel for more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
BLOCK_GROUPS = 16  # int4 groups of inputs per step of the matrix-vector kernel (a sweep on an H200)
GEMV_NUM_WARPS = 4


def block_rows(n: int) -> int:
    """Rows per program of the matrix-vector kernel: few, so that even a 2560-row matrix spreads over all
    132 multiprocessors of an H200, and more as matrices grow; chosen by a sweep of block shapes there."""
    return 4 if n <= 4096 else 8


@triton.jit
def _int4_gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, N, groups, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # A group of GROUP inputs is GROUP / 2 bytes (byte j: input 2j in its low nibble, 2j + 1 in its high),
    # with one scale s and zero z: its part of the sum is s * (sum q x - 8 sum x) + z * sum x. Each step
    # takes BLOCK_G groups of BLOCK_N rows, as [rows, groups, bytes], and loads each scale and zero once.
    HALF_GROUP: tl.constexpr = GROUP // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    half = groups * HALF_GROUP
    byte = tl.arange(0, HALF_GROUP)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in range(0, groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < groups
        j = g[:, None] * HALF_GROUP + byte[None, :]  # [groups, bytes]
        x_even = tl.load(x_ptr + 2 * j, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + 2 * j + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x_sum = tl.sum(x_even + x_odd, axis=1)  # [groups]
        ok = row_ok[:, None] & g_ok[None, :]
        b = tl.load(packed_ptr + rows[:, None, None] * half + j[None, :, :], mask=ok[:, :, None], other=0)
        b = b.to(tl.int32)
        dot = tl.sum((b & 0xF).to(tl.float32) * x_even[None, :, :] + (b >> 4).to(tl.float32) * x_odd[None, :, :],
                     axis=2)  # [rows, groups]
        s = tl.load(scale_ptr + rows[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + rows[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += s * (dot - 8.0 * x_sum[None, :]) + z * x_sum[None, :]
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
    _int4_gemv_kernel[(triton.cdiv(N, block_n),)](x, packed, scale, zero, y, N, K // group, GROUP=group,
                                                   BLOCK_N=block_n, BLOCK_G=BLOCK_GROUPS, num_warps=GEMV_NUM_WARPS)
    return y


# Rows a decode step may have; beyond this (prefill) the callers dequantize and multiply.
MAX_ROWS = 32
INT8_BLOCK_K = 256  # fixed: a row's sum runs in this order whatever the row count (batch invariance)
INT4_ROWS_BLOCK_K = 128
ROWS_NUM_STAGES = 4


def rows_block_n(n: int, m: int) -> int:
    """Output columns per program of the tile kernels, by a sweep of block shapes on an H200
    (docs/performance.md): narrow blocks spread small matrices over all the multiprocessors."""
    return 64 if n > 8192 else 16 if m > 16 and n <= 5120 else 32


def int4_rows_shape(n: int, m: int) -> tuple[int, int]:
    """(output columns per program, warps) of the int4 tile kernel, by a sweep on an H200: dequantizing
    sets its pace, so it takes wider blocks than int8's, and more warps from 17 rows on."""
    if m > 16:
        return (64 if n <= 5120 else 128), 8
    return (128 if n > 65536 else rows_block_n(n, m)), NUM_WARPS


def _rows_block_m(m: int) -> int:
    # tensor-core dot products take 16 rows at least
    return 16 if m <= 16 else 32


@triton.jit
def _int8_rows_kernel(x_ptr, q_ptr, scale_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(q_ptr + n[None, :] * K + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)  # [K, N]
        acc = tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16), acc)  # int8 values are exact in bfloat16
    scale = tl.load(scale_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m[:, None] * N + n[None, :], (acc * scale[None, :]).to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, 1 <= M <= MAX_ROWS, @ (q [N, K] int8 * scale [N])^T -> [M, N] bfloat16. A row's
    result does not depend on the rows computed with it."""
    (M, K), N = x.shape, q.shape[0]
    assert 1 <= M <= MAX_ROWS and x.dtype == torch.bfloat16 and q.shape[1] == K and q.is_contiguous()
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n = rows_block_n(N, M)
    _int8_rows_kernel[(triton.cdiv(N, block_n),)](x, q, scale, y, M, N, K, BLOCK_M=_rows_block_m(M),
                                                   BLOCK_N=block_n, BLOCK_K=INT8_BLOCK_K,
                                                   num_warps=NUM_WARPS, num_stages=ROWS_NUM_STAGES)
    return y


@triton.jit
def _int4_rows_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, GROUP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    half, groups = K // 2, K // GROUP
    GROUPS: tl.constexpr = BLOCK_K // GROUP  # per step, each GROUP / 2 bytes with one scale and zero
    HALF_GROUP: tl.constexpr = GROUP // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP + tl.arange(0, GROUPS)
        g_ok = g < groups
        ok = g_ok[:, None] & n_ok[None, :]
        j = g[:, None, None] * HALF_GROUP + tl.arange(0, HALF_GROUP)[None, :, None]  # byte j: inputs 2j, 2j + 1
        b = tl.load(packed_ptr + n[None, None, :] * half + j, mask=ok[:, None, :], other=0).to(tl.int32)
        s = tl.load(scale_ptr + n[None, :] * groups + g[:, None], mask=ok, other=0.0).to(tl.float32)[:, None, :]
        z = tl.load(zero_ptr + n[None, :] * groups + g[:, None], mask=ok, other=0.0).to(tl.float32)[:, None, :]
        low = tl.reshape((((b & 0xF).to(tl.float32) - 8.0) * s + z).to(tl.bfloat16), (BLOCK_K // 2, BLOCK_N))
        high = tl.reshape((((b >> 4).to(tl.float32) - 8.0) * s + z).to(tl.bfloat16), (BLOCK_K // 2, BLOCK_N))
        i = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        x_ok = m_ok[:, None] & (i < half)[None, :]
        x_even = tl.load(x_ptr + m[:, None] * K + 2 * i[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_ptr + m[:, None] * K + 2 * i[None, :] + 1, mask=x_ok, other=0.0)
        acc = tl.dot(x_even, low, tl.dot(x_odd, high, acc))
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16, 1 <= M <= MAX_ROWS, @ W^T for int4_gemv's layout of W -> [M, N] bfloat16."""
    M, K = x.shape
    N, half = packed.shape
    group = 2 * half // scale.shape[1]
    assert 1 <= M <= MAX_ROWS and x.dtype == torch.bfloat16 and K == 2 * half and INT4_ROWS_BLOCK_K % group == 0
    assert packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n, warps = int4_rows_shape(N, M)
    _int4_rows_kernel[(triton.cdiv(N, block_n),)](x, packed, scale, zero, y, M, N, K, GROUP=group,
                                                   BLOCK_M=_rows_block_m(M), BLOCK_N=block_n,
                                                   BLOCK_K=INT4_ROWS_BLOCK_K, num_warps=warps,
                                                   num_stages=ROWS_NUM_STAGES)
    return y
