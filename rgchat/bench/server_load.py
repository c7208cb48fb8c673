"""Load on a running `rgchat serve`: how fast a long conversation's next turn starts from its snapshot
against from nothing, and how many tokens per second several streaming clients get together."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx

WORDS = ("the quick brown fox jumps over lazy dog state window tokens recurrence attention linear local "
         "marker answer model chat turn plain words numbers mix keeps fixed size").split()


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 3600):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})

    def stream(self, messages: list[dict], max_tokens: int) -> dict:
        """One streamed chat answer: its text, time to first token, total time, and usage."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, text, usage = None, [], None
        with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the server answered {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the server failed: {chunk['error']['message']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(choice["delta"]["content"])
        end = time.perf_counter()
        return {"text": "".join(text), "ttft_s": (first or end) - start, "total_s": end - start, "usage": usage}


def resumed_turn(client: Client, turns: int = 10, history_tokens: int = 4000, answer_tokens: int = 32,
                 last_words: int = 20, seed: int = 0) -> dict:
    """Grow one conversation over turns-1 exchanges to about `history_tokens`, then time its next turn's first
    token twice: following the conversation as the server returned it (resumed from the snapshot), and the
    same conversation with its first message changed by one word (nothing cached: read from the start)."""
    rng = random.Random(seed)
    messages: list[dict] = []
    per_turn = history_tokens / (turns - 1)
    tokens_per_word = 2.0  # a first guess, corrected after every turn
    size = 0
    for turn in range(turns - 1):
        want = max(8, int((per_turn - answer_tokens) / tokens_per_word))
        messages.append({"role": "user", "content": words(want, rng)})
        reply = client.stream(messages, answer_tokens)
        messages.append({"role": "assistant", "content": reply["text"]})
        used = reply["usage"]
        tokens_per_word = max(0.5, (used["prompt_tokens"] - size) / want)  # this tokenizer's, measured
        size = used["prompt_tokens"] + used["completion_tokens"]
    question = {"role": "user", "content": words(last_words, rng)}
    warm = client.stream(messages + [question], answer_tokens)
    cold_messages = [{"role": "user", "content": "cold " + messages[0]["content"]}] + messages[1:]
    cold = client.stream(cold_messages + [question], answer_tokens)
    return {"turn": turns, "conversation_tokens": size,
            "resumed": {"ttft_s": round(warm["ttft_s"], 3), **_tokens(warm["usage"])},
            "cold": {"ttft_s": round(cold["ttft_s"], 3), **_tokens(cold["usage"])},
            "speedup": round(cold["ttft_s"] / warm["ttft_s"], 1)}


def _tokens(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def concurrent(client: Client, clients: int, max_tokens: int = 64, prompt_words: int = 16, seed: int = 0) -> dict:
    """`clients` streaming conversations at once, each its own short prompt: total generated tokens per
    second of wall time, and the slowest client's time."""
    rng = random.Random(seed + clients)
    prompts = [f"{i} {words(prompt_words, rng)}" for i in range(clients)]  # distinct: no snapshot is shared
    results: list[dict | Exception] = [None] * clients  # type: ignore[list-item]

    def one(i: int) -> None:
        try:
            results[i] = client.stream([{"role": "user", "content": prompts[i]}], max_tokens)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    return {"clients": clients, "generated_tokens": generated, "wall_s": round(wall, 2),
            "tok_s": round(generated / wall, 2), "slowest_ttft_s": round(max(r["ttft_s"] for r in results), 2)}
