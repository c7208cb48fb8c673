"""`rgchat bench`: prefill and decode speed on a random-weight model of a real shape, next to the
memory-bandwidth limit measured in the same run. Needs no download."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rgchat import config as config_lib
from rgchat.bench.compare import bench_hf
from rgchat.bench.memory import checkpoints, drift, memory_record
from rgchat.bench.random_weights import random_model
from rgchat.device import peak_rss_bytes, process_age_s, reset_peak_rss, synchronize
from rgchat.engine import Engine
from rgchat.errors import RGChatError
from rgchat.model import Griffin
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


PREFILL_SWEEP = (128, 2048, 16384)


def long_run(engine: Engine, device: torch.device, n: int, seed: int = 0) -> list[dict]:
    """Greedy-decode n tokens from a short prompt, recording resident (and device) memory and the decode
    speed since the previous checkpoint: both must stay flat, since the state never grows."""
    slot = engine.admit()
    token = int(torch.argmax(engine.prefill(slot, (torch.arange(1, 17) * 7 + seed).tolist())))
    marks, records = checkpoints(n), []
    t0, done_before = time.perf_counter(), 0
    for done in range(1, n + 1):
        token = int(torch.argmax(engine.decode([slot], [token])[0]))
        if done == marks[0]:
            now = time.perf_counter()
            records.append(memory_record(done, (done - done_before) / (now - t0), device))
            t0, done_before = now, done
            marks.pop(0)
    engine.release(slot)
    return records


def prefill_sweep(model: Griffin, device: torch.device, lengths: tuple[int, ...] | None = None,
                  seed: int = 0) -> list[dict]:
    """Prefill speed at several prompt lengths (each from an empty state), to show the cost per token of
    chunked prefill staying flat."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths or PREFILL_SWEEP:
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
        state = model.new_state()
        synchronize(device)
        t0 = time.perf_counter()
        model.prefill(prompt, state)
        synchronize(device)
        rows.append({"tokens": n, "tok_s": round(n / (time.perf_counter() - t0), 2)})
    return rows


def run_bench(shape: str, precision: str, device: torch.device, prompt_tokens: int, gen_tokens: int,
              seed: int = 0, model_file: Path | None = None, compare_hf: bool = False, long_tokens: int = 0,
              sweep: bool = False, batch: int = 1) -> dict:
    """Prefill and decode timings on random weights of `shape`, or on the weights of `model_file`; optionally
    a long generation, a prefill sweep, and the same measurements on transformers. With `batch` B, B
    conversations with distinct prompts are prefilled one after another and then decoded together, one
    engine step for all of them per token."""
    if batch < 1:
        raise RGChatError("--batch must be at least 1")
    if batch > 1 and (compare_hf or long_tokens or sweep):
        raise RGChatError("--compare, --long and --prefill-sweep measure one conversation: leave out --batch")
    t0 = time.perf_counter()
    if model_file is not None:
        from rgchat.loader import load_file

        model, mf = load_file(model_file, str(device))
        shape, precision = mf.metadata.get("name", str(model_file)), mf.precision
    else:
        model = random_model(shape, precision, device, seed)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed + i)).tolist()
               for i in range(batch)]
    engine = Engine(model, slots=batch)
    slots = [engine.admit() for _ in range(batch)]

    # Warm-up: first-call allocations and kernel selection, and every variant a JIT compiles (a chunk that
    # starts the document, one that continues it, a decode step of every slot, on CUDA its graph capture),
    # in the slots that are timed next. Its first token marks start-up.
    for slot, prompt in zip(slots, prompts, strict=True):
        first = int(torch.argmax(engine.prefill(slot, prompt[:16])))
        engine.prefill(slot, prompt[:16])
    startup_s = process_age_s()
    t0 = time.perf_counter()
    engine.decode(slots, [first] * batch)  # on CUDA: compiles the step, records each slot's graph
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    build_peak_rss = peak_rss_bytes()
    reset_peak_rss()  # from here on: the memory that prefill and decode need
    tokens, prefill_s, ttft_s = [], 0.0, 0.0
    for slot, prompt in zip(slots, prompts, strict=True):
        state = engine.state(slot)
        state.zero_()
        synchronize(device)
        t0 = time.perf_counter()
        tokens.append(int(torch.argmax(model.prefill(torch.tensor(prompt), state))))
        synchronize(device)
        prefill_s += time.perf_counter() - t0
        ttft_s = ttft_s or prefill_s

    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        tokens = torch.argmax(engine.decode(slots, tokens), dim=-1).tolist()  # tolist() waits for the device
    decode_s = time.perf_counter() - t0
    peak_rss = peak_rss_bytes()
    state = engine.state(slots[0])

    bandwidth = measure_bandwidth(device)
    weight_bytes = model.weight_bytes()  # each decoded token reads every weight once (tied embedding: logits)
    per_conversation_tok_s = gen_tokens / decode_s if gen_tokens else 0.0
    limit_tok_s = bandwidth * 1e9 / weight_bytes  # decode steps per second that reading the weights allows
    result = {
        "shape": shape,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": round(batch * prompt_tokens / prefill_s, 2),
        "decode_tok_s": round(batch * per_conversation_tok_s, 3),  # all conversations together
        "per_conversation_decode_tok_s": round(per_conversation_tok_s, 3),
        "ttft_s": round(ttft_s, 3),
        "load_s": round(load_s, 3),
        "startup_s": round(startup_s, 3) if startup_s is not None else None,
        "first_step_s": round(first_step_s, 3),
        "peak_rss_bytes": peak_rss,  # during prefill and decode (whole run where not resettable)
        "build_peak_rss_bytes": build_peak_rss,
        "weight_bytes_per_token": weight_bytes,
        "state_bytes": state.nbytes,
        "bandwidth_gb_s": round(bandwidth, 2),
        "limit_tok_s": round(limit_tok_s, 3),
        "fraction_of_limit": round(per_conversation_tok_s / limit_tok_s, 4),  # of the steps per second
    }
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    if sweep:
        result["prefill_sweep"] = prefill_sweep(model, device, seed=seed)
    if long_tokens:
        engine.release(slots[0])
        result["long"] = long_run(engine, device, long_tokens, seed)
        result["long_memory_drift"] = drift(result["long"], "device_bytes" if device.type == "cuda" else "rss_bytes")
        result["long_speed_drift"] = drift(result["long"], "tok_s")
    if compare_hf:
        if model_file is not None:
            raise RGChatError("--compare hf works on random weights: leave out --model")
        config = model.config
        del model, state, engine
        hf_dtype = torch.float32 if precision == "f32" else torch.bfloat16  # quantized rgchat vs transformers bf16
        hf = result["hf"] = bench_hf(config, hf_dtype, device, torch.tensor(prompts[0]), gen_tokens, seed, long_tokens)
        hf["dtype"] = str(hf_dtype).removeprefix("torch.")
        result["speedup_prefill"] = round(result["prefill_tok_s"] / hf["prefill_tok_s"], 2)
        result["speedup_decode"] = round(result["decode_tok_s"] / hf["decode_tok_s"], 2)
    return result


def time_scan(device: torch.device, precision: str, lengths: tuple[int, ...] = (1, 2048, 32768),
              width: int = 2560, seed: int = 0) -> list[dict]:
    """Time one RG-LRU call of each length at the 2B width: the native kernel against the PyTorch loop."""
    from rgchat.scan import TORCH_BACKEND, backend_for

    native = backend_for(device.type, "auto")
    dtype = dtype_of(precision)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for T in lengths:
        x, gate_x, gate_a = (torch.randn(T, width, generator=gen).to(device, dtype) for _ in range(3))
        a_scale = (-8 * torch.nn.functional.softplus(torch.randn(width, generator=gen))).to(device)
        timings = {}
        for backend in (TORCH_BACKEND, native):
            h = torch.zeros(width, device=device)
            backend.fn(x, gate_x, gate_a, a_scale, h)  # warm-up (compiles the kernel on first use)
            repeats = max(1, min(100, 20_000 // T))
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                backend.fn(x, gate_x, gate_a, a_scale, h)
            synchronize(device)
            timings[backend.name] = (time.perf_counter() - t0) / repeats
        rows.append({
            "device": str(device), "precision": precision, "tokens": T, "width": width,
            "native": native.detail if native.name == "native" else "unavailable",
            "torch_ms": round(timings["torch"] * 1e3, 3),
            "native_ms": round(timings.get("native", float("nan")) * 1e3, 3),
            "speedup": round(timings["torch"] / timings["native"], 1) if "native" in timings else None,
        })
    return rows


def time_state_file(shape: str, precision: str, folder: Path, repeats: int = 3) -> dict:
    """Save and load a conversation whose attention windows are full (the largest a state file gets) for
    a model of `shape`: the file's size and the best of a few save and load (+ restore) times."""
    from rgchat import statefile
    from rgchat.chat import ChatSession, Turn
    from rgchat.state import State

    config = config_lib.preset(shape)
    with torch.device("meta"):
        model = Griffin(config, dtype_of(precision))
    session = ChatSession(model, None, template=False)  # no tokenizer needed: nothing is generated
    gen = torch.Generator().manual_seed(0)
    state = State.empty(config, dtype_of(precision))
    for t in state.tensors():
        t.copy_(torch.randn(t.shape, generator=gen))
    state.pos = config.window + 1000
    session.state = state
    session.transcript = [Turn("user", "x" * state.pos, [5] * state.pos)]
    identity = {"name": f"random-{shape}", "config": config.to_dict(), "precision": precision,
                "weights_sha256": "random", "tokenizer_sha256": "none"}
    path = folder / f"{shape}-{precision}.state"
    save_s = load_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        statefile.save(path, session, identity)
        save_s = min(save_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        statefile.restore(session, statefile.load(path, identity))
        load_s = min(load_s, time.perf_counter() - t0)
    size = path.stat().st_size
    path.unlink()
    return {"shape": shape, "precision": precision, "tokens": state.pos, "state_bytes": state.nbytes,
            "file_bytes": size, "file_mib": round(size / 2**20, 2), "save_ms": round(save_s * 1e3, 1),
            "load_ms": round(load_s * 1e3, 1)}
