"""The RG-LRU linear recurrence h_t = a_t * h_{t-1} + x_t with a float32 carry.

This is the pure-PyTorch scan: the fallback on every device and the oracle for native kernels.
"""

from __future__ import annotations

import torch


def rglru_scan_torch(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Scan x, a [T, L] from the carry h [L] (float32, updated in place); returns y [T, L] in x's dtype."""
    if x.shape[0] == 1:  # decode: one fused step, no loop
        h.mul_(a[0]).add_(x[0])
        return h.to(x.dtype, copy=True)[None]
    y = torch.empty_like(x)
    a32, x32 = a.float(), x.float()
    for t in range(x.shape[0]):
        h.mul_(a32[t]).add_(x32[t])
        y[t] = h
    return y


def rglru_scan(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return rglru_scan_torch(x, a, h)
