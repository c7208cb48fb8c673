"""Memory and speed along a long generation: where to record them, one record, and how far they drift."""

from __future__ import annotations

import torch

from rgchat.device import rss_bytes


def checkpoints(n: int) -> list[int]:
    """Where a long generation of n tokens records memory and speed: 1k, n/4, n/2, n."""
    return sorted({min(1024, n), n // 4, n // 2, n} - {0})


def memory_record(tokens: int, tok_s: float, device: torch.device) -> dict:
    """One checkpoint of a long generation: tokens so far, speed since the last one, memory now."""
    record = {"tokens": tokens, "tok_s": round(tok_s, 3), "rss_bytes": rss_bytes()}
    if device.type == "cuda":
        record["device_bytes"] = torch.cuda.memory_allocated(device)
    return record


def drift(records: list[dict], key: str) -> float:
    """Largest relative change of `key` from its value at 1k tokens to any later checkpoint."""
    later = [r for r in records if r["tokens"] >= min(1024, records[-1]["tokens"])]
    base = later[0][key]
    return round(max(abs(r[key] - base) / base for r in later), 4)
