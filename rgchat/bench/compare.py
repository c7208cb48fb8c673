"""transformers' RecurrentGemma on the same random weights, prompt and device as `rgchat bench`, measured the
same way, for side-by-side figures (`rgchat bench --compare hf`). transformers is optional: it comes with
the `test` extra."""

from __future__ import annotations

import gc
import time

import torch

from rgchat.config import GriffinConfig
from rgchat.device import peak_rss_bytes, reset_peak_rss, synchronize
from rgchat.errors import RGChatError
from rgchat.bench.memory import checkpoints, memory_record
from rgchat.bench.random_weights import random_tensors
from rgchat.model import Griffin


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RGChatError("--compare hf needs transformers: pip install transformers (or rgchat[test])") from None
    return transformers


def hf_config(config: GriffinConfig, window: int | None = None):
    """The transformers config of a Griffin shape."""
    c = config
    return _transformers().RecurrentGemmaConfig(
        num_hidden_layers=c.num_layers, vocab_size=c.vocab_size, hidden_size=c.width,
        intermediate_size=2 * c.mlp_width, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        lru_width=c.lru_width, attention_window_size=window or c.window, conv1d_width=c.conv_width,
        logits_soft_cap=c.logit_cap, rms_norm_eps=c.rms_eps,
        block_types=list(c.block_types[:3]),
    )


def hf_model(weights: dict[str, torch.Tensor], config: GriffinConfig, dtype: torch.dtype,
             device: torch.device | str = "cpu", window: int | None = None):
    """RecurrentGemmaForCausalLM holding `weights` (named as rgchat names them) in `dtype` on `device`."""
    transformers = _transformers()
    from transformers.initialization import no_init_weights

    with no_init_weights():  # allocated, not initialised: the weights come next
        hf = transformers.RecurrentGemmaForCausalLM._from_config(hf_config(config, window), dtype=dtype)
    state = {f"model.{name}": t.to(dtype) for name, t in weights.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as in the checkpoints
    hf.load_state_dict(state, assign=True, strict=True)
    return hf.to(device).eval()


def random_hf_model(shape_config: GriffinConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The same random weights `rgchat bench` uses (random_tensors with the same seed), in transformers."""
    with torch.device("meta"):
        names = Griffin(shape_config)
    weights = {name: value.to(dtype) for name, value in random_tensors(names, seed)}
    return hf_model(weights, shape_config, dtype, device)


@torch.inference_mode()
def bench_hf(config: GriffinConfig, dtype: torch.dtype, device: torch.device, prompt: torch.Tensor,
             gen_tokens: int, seed: int = 0, long_tokens: int = 0) -> dict:
    """Prefill and greedy decode timings of transformers (generate with its cache), and optionally memory and
    speed along a long generation."""
    gc.collect()
    hf = random_hf_model(config, dtype, device, seed)
    ids = prompt[None].to(device)
    hf.generate(ids[:, :16], max_new_tokens=2, do_sample=False)  # warm-up
    reset_peak_rss()

    def timed(new_tokens: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        synchronize(device)
        return time.perf_counter() - t0

    first = timed(1)  # prefill and one token
    total = timed(1 + gen_tokens)
    result = {
        "prefill_tok_s": round(prompt.numel() / first, 2),
        "decode_tok_s": round(gen_tokens / max(total - first, 1e-9), 3),
        "ttft_s": round(first, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    if long_tokens:
        result["long"] = _long_hf(hf, ids, long_tokens, device)
    del hf
    gc.collect()
    return result


def _long_hf(hf, ids: torch.Tensor, n: int, device: torch.device) -> list[dict]:
    from transformers import StoppingCriteria, StoppingCriteriaList


    marks = checkpoints(n)
    records: list[dict] = []
    start = ids.shape[1]
    clock = {"t": time.perf_counter(), "tokens": 0}

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.shape[1] - start
            if marks and done >= marks[0]:
                synchronize(device)
                now = time.perf_counter()
                records.append(memory_record(done, (done - clock["tokens"]) / (now - clock["t"]), device))
                clock.update(t=now, tokens=done)
                marks.pop(0)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                stopping_criteria=StoppingCriteriaList([Record()]))
    return records
