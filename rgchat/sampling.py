"""Choosing the next token from logits: repetition penalty, then greedy, or temperature with top-k, top-p
and min-p filters, drawn from a seeded generator."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

# Defaults for chat, close to what llama.cpp and ollama ship; `rgchat run --help` shows them.
TEMPERATURE = 0.8
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05
REPEAT_PENALTY = 1.0  # off: Gemma needs none
REPEAT_WINDOW = 64  # the penalty looks at this many recent tokens (bounded memory, as llama.cpp's last_n)
SEED_MAX = 2**64 - 1  # what torch's generator takes
# (lowest, highest or None) of every number a user can set; `validate` is the one check, for flags, /set and
# state files alike.
RANGES: dict[str, tuple[float, float | None]] = {
    "temperature": (0.0, None), "top_k": (0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
    "repeat_penalty": (0.01, None), "seed": (0, SEED_MAX),
}


def validate(name: str, value):
    """`value` if the setting `name` can take it, else ValueError saying why (NaN and infinities too)."""
    if name == "seed" and value is None:
        return None
    kind = int if name in ("top_k", "seed") else float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    low, high = RANGES[name]
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high}" if high is not None else
                         f"{name} must be at least {low}")
    return kind(value)


@dataclasses.dataclass
class Sampler:
    temperature: float = TEMPERATURE  # 0 means greedy
    top_k: int = TOP_K  # 0 means no limit
    top_p: float = TOP_P  # 1 means no limit
    min_p: float = MIN_P  # drop tokens less likely than min_p times the likeliest; 0 means no limit
    repeat_penalty: float = REPEAT_PENALTY  # > 1 makes recently seen tokens less likely; 1 means off
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in RANGES:
            setattr(self, name, validate(name, getattr(self, name)))
        self.generator = torch.Generator()
        self.reseed(self.seed)

    def reseed(self, seed: int | None) -> None:
        """Start the random stream again: from `seed`, or from fresh entropy when None."""
        self.seed = seed = validate("seed", seed)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def probabilities(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> torch.Tensor:
        """The distribution the next token is drawn from (temperature > 0), after every filter."""
        logits = self.penalized(logits, recent)
        logits = (logits - logits.max()) / self.temperature  # the likeliest at 0: no overflow at any temperature
        if 0 < self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= self.top_p
            drop[0] = False  # top_p = 0 keeps the likeliest token
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.max(), 0)
        return (probs / probs.sum()).float()

    def penalized(self, logits: torch.Tensor, recent: Iterable[int]) -> torch.Tensor:
        """CTRL's repetition penalty: a recent token's logit is divided by the penalty when positive and
        multiplied by it when negative, so it always becomes less likely."""
        logits = logits.double().cpu()  # float64: any accepted penalty keeps every logit finite
        seen = torch.tensor(sorted(set(recent)), dtype=torch.long)
        if self.repeat_penalty == 1.0 or seen.numel() == 0:
            return logits
        logits = logits.clone()
        picked = logits[seen]
        penalized = torch.where(picked > 0, picked / self.repeat_penalty, picked * self.repeat_penalty)
        logits[seen] = penalized.clamp(min=torch.finfo(torch.float64).min)
        return logits

    def __call__(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(self.penalized(logits, recent)))
        return int(torch.multinomial(self.probabilities(logits, recent), 1, generator=self.generator))
