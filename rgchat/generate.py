"""The generation loop: prefill a prompt onto a state, then decode token by token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rgchat.model import Griffin
from rgchat.state import State


def generate(
    model: Griffin,
    state: State,
    prompt: list[int],
    max_tokens: int,
    sample: Callable[[torch.Tensor], int],
    stop_ids: set[int] = frozenset(),
) -> Iterator[int]:
    """Yield up to `max_tokens` new tokens after `prompt`, continuing `state` (updated in place).

    Generation ends after a token in `stop_ids` (yielded, but not fed to the state) or `max_tokens`.
    """
    if max_tokens <= 0:
        return
    logits = model.prefill(torch.tensor(prompt, dtype=torch.long), state)
    for i in range(max_tokens):
        token = sample(logits)
        yield token
        if token in stop_ids or i == max_tokens - 1:
            return
        logits = model.step(token, state)
