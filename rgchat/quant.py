"""Weight formats behind one interface: every large matrix is a `Linear` or the tied `Embedding`.

This first cut holds plain float32 / bfloat16 weights; quantized formats plug in as further classes
with the same methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def dtype_of(precision: str) -> torch.dtype:
    from rgchat.errors import RGChatError

    try:
        return DTYPES[precision]
    except KeyError:
        raise RGChatError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}") from None


class Linear(nn.Module):
    """y = x W^T (+ b), W stored [out, in] as in PyTorch and both checkpoint formats."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """The tied [vocab, width] matrix: rows are token embeddings, and x E^T gives the logits."""

    def __init__(self, vocab_size: int, width: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, width, dtype=dtype, device=device), False)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
