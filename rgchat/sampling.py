"""Choosing the next token from logits: repetition penalty, then greedy, or temperature with top-k, top-p
and min-p filters, drawn from a seeded generator. The settings themselves live in rgchat/settings.py."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rgchat.settings import Settings


class Sampler:
    """`settings` plus the random stream they draw from. `Sampler(temperature=0)` is shorthand for
    `Sampler(Settings(temperature=0))`."""

    def __init__(self, settings: Settings | None = None, **changes):
        self.settings = (settings or Settings()).replace(**changes)
        self.generator = torch.Generator()
        self.reseed(self.settings.seed)

    def reseed(self, seed: int | None) -> None:
        """Start the random stream again: from `seed`, or from fresh entropy when None."""
        self.settings = self.settings.replace(seed=seed)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def candidates(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids) of the tokens that can be drawn (temperature > 0), likeliest first.

        Only the top-k survive the first filter, so the softmax and the nucleus' cumulative sum run over k
        values, not the whole vocabulary (256k for Gemma)."""
        s = self.settings
        logits = self.penalized(logits, recent)
        if 0 < s.top_k < logits.numel():
            values, ids = torch.topk(logits, s.top_k)  # sorted, likeliest first
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax((values - values[0]) / s.temperature, dim=-1)  # likeliest at 0: no overflow
        if s.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = torch.cumsum(probs, 0) - probs >= s.top_p
            drop[0] = False  # top_p = 0 keeps the likeliest token
            probs = probs.masked_fill(drop, 0)
        if s.min_p > 0:
            probs = probs.masked_fill(probs < s.min_p * probs[0], 0)
        return probs / probs.sum(), ids

    def probabilities(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> torch.Tensor:
        """The whole distribution the next token is drawn from, after every filter."""
        probs, ids = self.candidates(logits, recent)
        return torch.zeros(logits.numel(), dtype=torch.float64).scatter_(0, ids, probs).float()

    def penalized(self, logits: torch.Tensor, recent: Iterable[int]) -> torch.Tensor:
        """CTRL's repetition penalty: a recent token's logit is divided by the penalty when positive and
        multiplied by it when negative, so it always becomes less likely."""
        logits = logits.double().cpu()  # float64: any accepted penalty keeps every logit finite
        penalty = self.settings.repeat_penalty
        seen = torch.tensor(sorted(set(recent)), dtype=torch.long)
        if penalty == 1.0 or seen.numel() == 0:
            return logits
        logits = logits.clone()
        picked = logits[seen]
        penalized = torch.where(picked > 0, picked / penalty, picked * penalty)
        logits[seen] = penalized.clamp(min=torch.finfo(torch.float64).min)
        return logits

    def __call__(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> int:
        if self.settings.temperature <= 0:
            return int(torch.argmax(self.penalized(logits, recent)))
        probs, ids = self.candidates(logits, recent)
        return int(ids[torch.multinomial(probs, 1, generator=self.generator)])
