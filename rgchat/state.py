"""State: the whole conversation as a fixed-size set of tensors (the recurrent snapshot)."""

from __future__ import annotations

import dataclasses

import torch

from rgchat.config import RECURRENT, GriffinConfig


@dataclasses.dataclass
class RecurrentLayerState:
    h: torch.Tensor  # [L] float32: the RG-LRU carry
    conv: torch.Tensor  # [conv_width - 1, L]: the last inputs of the causal conv


@dataclasses.dataclass
class AttentionLayerState:
    k: torch.Tensor  # [window, kv_heads, head_dim]: ring buffer of keys (RoPE applied), slot = position % window
    v: torch.Tensor  # [window, kv_heads, head_dim]


LayerState = RecurrentLayerState | AttentionLayerState


def _fields(layer: LayerState) -> list[torch.Tensor]:
    # not dataclasses.astuple: it deep-copies, and in-place updates must reach the real buffers
    return [getattr(layer, f.name) for f in dataclasses.fields(layer)]


def _map(layer: LayerState, fn) -> LayerState:
    return type(layer)(*(fn(t) for t in _fields(layer)))


@dataclasses.dataclass
class State:
    """Per-layer tensors plus `pos`, the number of tokens seen. Its size never depends on `pos`."""

    layers: list[LayerState]
    pos: int = 0

    @classmethod
    def empty(cls, config: GriffinConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> State:
        layers: list[LayerState] = []
        for kind in config.block_types:
            if kind == RECURRENT:
                layers.append(RecurrentLayerState(
                    h=torch.zeros(config.lru_width, dtype=torch.float32, device=device),
                    conv=torch.zeros(config.conv_width - 1, config.lru_width, dtype=dtype, device=device),
                ))
            else:
                shape = (config.window, config.num_kv_heads, config.head_dim)
                layers.append(AttentionLayerState(
                    k=torch.zeros(shape, dtype=dtype, device=device),
                    v=torch.zeros(shape, dtype=dtype, device=device),
                ))
        return cls(layers)

    @classmethod
    def pool(cls, config: GriffinConfig, dtype: torch.dtype, device: torch.device | str, count: int) -> State:
        """A pool of `count` empty conversations: a State whose tensors are [count, ...] buffers, one
        conversation per row, laid out side by side for batched kernels. `row(i)` is each a State of its own;
        `rows(start, stop)` consecutive rows together, for the batched step (`Griffin.decode_rows`). A
        pool's own `pos` means nothing: each row's State keeps its own."""
        return cls([_map(layer, lambda t: torch.zeros((count, *t.shape), dtype=t.dtype, device=device))
                    for layer in cls.empty(config, dtype, "meta").layers])

    @classmethod
    def stack(cls, states: list[State]) -> State:
        """Conversations as a pool: a view of the only one, or a copy of several (`row(i)` to copy back)."""
        if len(states) == 1:
            return cls([_map(layer, lambda t: t[None]) for layer in states[0].layers])
        columns = zip(*(s.tensors() for s in states), strict=True)
        stacked = iter(torch.stack(column) for column in columns)
        return cls([_map(layer, lambda t: next(stacked)) for layer in states[0].layers])

    def row(self, i: int) -> State:
        """Row i of a pool: a State viewing the pool's buffers (so updates of either reach both)."""
        return State([_map(layer, lambda t: t[i]) for layer in self.layers])

    def rows(self, start: int, stop: int) -> State:
        """Rows start..stop-1 of a pool, as a pool viewing its buffers."""
        return State([_map(layer, lambda t: t[start:stop]) for layer in self.layers])

    @staticmethod
    def size_for(config: GriffinConfig, dtype: torch.dtype) -> int:
        """The bytes `empty(config, dtype)` allocates, computed without allocating."""
        item = torch.empty(0, dtype=dtype).element_size()
        recurrent = config.lru_width * (4 + (config.conv_width - 1) * item)
        attention = 2 * config.window * config.num_kv_heads * config.head_dim * item
        return sum(recurrent if kind == RECURRENT else attention for kind in config.block_types)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in _fields(layer)]

    def clone(self) -> State:
        """An independent copy (for undo, regenerate, or branching a conversation)."""
        return State([_map(layer, torch.clone) for layer in self.layers], self.pos)

    def copy_(self, other: State) -> None:
        """Overwrite this state in place with `other`, keeping its buffers; ValueError (and nothing written)
        if `other` has other shapes or dtypes (torch's copy_ would broadcast and cast)."""
        ours, theirs = self.tensors(), other.tensors()
        if len(ours) != len(theirs) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(ours, theirs)):
            raise ValueError("the state does not fit (other shape or dtype)")
        for dst, src in zip(ours, theirs):
            dst.copy_(src)
        self.pos = other.pos

    def zero_(self) -> None:
        """Empty again, in the same buffers (so a CUDA graph recorded for them stays valid)."""
        for t in self.tensors():
            t.zero_()
        self.pos = 0

    def to(self, device: torch.device | str) -> State:
        return State([_map(layer, lambda t: t.to(device)) for layer in self.layers], self.pos)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
