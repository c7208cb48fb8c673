"""`rgchat bench`: prefill and decode speed on a random-weight model of a real shape, next to the
memory-bandwidth limit measured in the same run. Needs no download."""

from __future__ import annotations

import time

import torch

from rgchat import config as config_lib
from rgchat.device import peak_rss_bytes, synchronize
from rgchat.model import Griffin, init_random_
from rgchat.quant import dtype_of


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few full reductions over a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        buf.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes / best / 1e9


def random_model(shape: str, precision: str, device: torch.device, seed: int = 0) -> Griffin:
    with torch.device("meta"):
        model = Griffin(config_lib.preset(shape), dtype_of(precision))
    return init_random_(model, seed).to(device).eval()


def run_bench(shape: str, precision: str, device: torch.device, prompt_tokens: int, gen_tokens: int,
              seed: int = 0) -> dict:
    bandwidth = measure_bandwidth(device)
    model = random_model(shape, precision, device, seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))

    model.prefill(prompt[:16], model.new_state())  # warm-up: first-call allocations and kernel selection
    state = model.new_state()
    synchronize(device)
    t0 = time.perf_counter()
    logits = model.prefill(prompt, state)
    token = int(torch.argmax(logits))
    synchronize(device)
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(torch.argmax(model.step(token, state)))  # int() waits for the device
    decode_s = time.perf_counter() - t0

    weight_bytes = model.weight_bytes()  # each decoded token reads every weight once (tied embedding: logits)
    decode_tok_s = gen_tokens / decode_s if gen_tokens else 0.0
    limit_tok_s = bandwidth * 1e9 / weight_bytes
    result = {
        "shape": shape,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
        "decode_tok_s": round(decode_tok_s, 3),
        "ttft_s": round(prefill_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes_per_token": weight_bytes,
        "state_bytes": state.nbytes,
        "bandwidth_gb_s": round(bandwidth, 2),
        "limit_tok_s": round(limit_tok_s, 3),
        "fraction_of_limit": round(decode_tok_s / limit_tok_s, 4),
    }
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return result
