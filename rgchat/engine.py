"""The engine: a model and a pool of slots, one conversation's State per slot, decoded together.

Decoding is memory-bound: a step reads every weight once whether it computes one row or eight, so one step
for all active slots gives each conversation its next token for little more than the price of one. A
conversation enters a free slot (empty, or copied from a saved State) and leaves it as a State at any time,
without disturbing the others; its prompt is prefilled chunk by chunk, which a scheduler (rgchat/generate.py)
interleaves with the other slots' decode steps.
"""

from __future__ import annotations

import torch

from rgchat import gemv
from rgchat.cuda_graph import CapturedStep, GraphStep, bucket
from rgchat.errors import RGChatError
from rgchat.model import Griffin
from rgchat.state import State


class EngineFull(RGChatError):
    """Every slot holds a conversation."""


class Engine:
    """`model` with `slots` conversation slots. The slots' States are the rows of one pool (`State.pool`);
    `state(slot)` is that row as a State of its own, which prefill, the chat session and state files use."""

    def __init__(self, model: Griffin, slots: int = 1):
        if slots < 1:
            raise ValueError("an engine needs at least one slot")
        self.model = model
        self.pool = State.pool(model.config, model.dtype, model.device, slots)
        self.states = [self.pool.row(i) for i in range(slots)]
        self.free = list(range(slots))
        self.captured = None  # the CUDA decode graphs, one per bucket of rows (rgchat/cuda_graph.py), made on use
        if model.device.type == "cuda":
            self.captured = CapturedStep()

    @property
    def slots(self) -> int:
        return len(self.states)

    def admit(self, state: State | None = None) -> int:
        """Take the lowest free slot for a conversation: empty, or continuing `state` (copied in)."""
        if not self.free:
            raise EngineFull(f"all {self.slots} slots are busy")
        slot = self.free[0]
        if state is None:
            self.states[slot].zero_()
        else:
            self.states[slot].copy_(state)  # checks the state fits before the slot is taken
        self.free.pop(0)
        return slot

    def release(self, slot: int) -> State:
        """Free `slot`; returns its conversation as an independent State."""
        self._check(slot)
        state = self.states[slot].clone()
        self.free.append(slot)
        self.free.sort()
        return state

    def state(self, slot: int) -> State:
        """The slot's State itself (updated in place by every step)."""
        self._check(slot)
        return self.states[slot]

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self.free:
            raise ValueError(f"slot {slot} holds no conversation")

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Feed `ids` (at most `model.prefill_chunk` of them, for bounded memory) into the slot's
        conversation; returns the last token's logits [vocab]."""
        if not ids or len(ids) > self.model.prefill_chunk:
            raise ValueError(f"prefill takes 1 to {self.model.prefill_chunk} tokens at a time")
        return self.model.forward(torch.tensor(ids, dtype=torch.long), self.state(slot))

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One step for several slots: feed each its token, return the next logits [n, vocab]. On CUDA a
        captured graph of the pool's first rows runs (rgchat/cuda_graph.py); elsewhere one batched step of
        just these slots, on the pool's rows."""
        if len(set(slots)) != len(slots):
            raise ValueError("decode takes each slot once")
        states = [self.state(slot) for slot in slots]
        if self.captured is not None and all(s.pos > 0 for s in states):
            graph = self.captured.runner(self.model, self.pool, bucket(max(slots) + 1, self.slots))
            if graph is not None:
                return self._replay(graph, slots, tokens)
        tokens = torch.tensor(tokens, dtype=torch.long)
        if self.model.device.type != "cpu":
            return self.model.decode(tokens, states, self.pool, slots)
        with gemv.owning_the_cores():
            return self.model.decode(tokens, states, self.pool, slots)

    def _replay(self, graph: GraphStep, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Decode `slots` through a graph of the pool's first rows. The graph steps every row it covers, so
        rows that hold a conversation but are not decoding now (a prompt being prefilled, a turn not yet
        asked) are put back afterwards; free rows' contents do not matter (admit overwrites them)."""
        row_tokens, positions = [0] * graph.rows, [1] * graph.rows
        for slot, token in zip(slots, tokens, strict=True):
            row_tokens[slot], positions[slot] = token, self.states[slot].pos
        decoding = set(slots)
        waiting = [i for i in range(graph.rows) if i not in decoding and i not in self.free]
        saved = [self.states[i].clone() for i in waiting]
        logits = graph(row_tokens, positions)[slots]  # a copy: the next replay overwrites the graph's output
        for i, state in zip(waiting, saved, strict=True):
            self.states[i].copy_(state)
        for slot in slots:
            self.states[slot].pos += 1
        return logits
