"""Fixtures: tiny random Griffin models, a tiny SentencePiece tokenizer, and checkpoints on disk in both
published formats (Hugging Face folder, official .pt), all built fresh: nothing is downloaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rgchat.config import ATTENTION, RECURRENT, GriffinConfig
from rgchat.bench.random_weights import init_random_, train_tokenizer
from rgchat.model import Griffin

# Several R,R,A cycles, 4 RG-LRU gate blocks.
CYCLES = GriffinConfig(vocab_size=512, width=64, mlp_width=96, lru_width=64, num_heads=4, num_kv_heads=1,
                       block_types=(RECURRENT, RECURRENT, ATTENTION) * 3)
# Many RG-LRU blocks, an LRU wider than the model.
BLOCKS = GriffinConfig(vocab_size=512, width=128, mlp_width=160, lru_width=192, num_heads=8, num_kv_heads=1,
                       block_types=(RECURRENT, RECURRENT, ATTENTION, RECURRENT))

def greedy_tokens(model: Griffin, prompt: list[int], n: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """The reference decode loop: prefill, then argmax and step; ends after a stop id (included) or n tokens."""
    state = model.new_state()
    logits = model.prefill(torch.tensor(prompt, dtype=torch.long), state)
    out: list[int] = []
    while len(out) < n:
        out.append(int(torch.argmax(logits)))
        if out[-1] in stop_ids:
            break
        logits = model.step(out[-1], state)
    return out


def leave_after(events, k: int, how: str, cancel) -> None:
    """Read an answer's events as a consumer that leaves after k tokens: by breaking out of its loop
    ("close"), by failing inside it ("exception"), or by setting the answer's `cancel` flag ("cancel")."""
    import contextlib

    from rgchat.generate import Token

    tokens = 0
    with contextlib.suppress(RuntimeError), contextlib.closing(events):
        for event in events:
            tokens += isinstance(event, Token)
            if tokens == k:
                if how == "close":
                    break
                if how == "exception":
                    raise RuntimeError("the consumer failed")
                cancel.set()


def run_cli(*args: str, stdin: str | bytes = "") -> subprocess.CompletedProcess:
    """`rgchat ARGS` in a subprocess as users run it (stdin a pipe), with text or bytes in and out."""
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "rgchat", *args], input=stdin, capture_output=True,
                          text=isinstance(stdin, str), env=env, timeout=120)


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch) -> Path:
    """Every test gets an empty model store and HF cache of its own (subprocesses inherit them through the
    environment)."""
    store = tmp_path / "rgchat-store"
    monkeypatch.setenv("RGCHAT_HOME", str(store))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return store


def tiny_model(config: GriffinConfig = CYCLES, seed: int = 0, dtype: torch.dtype = torch.float32,
               out_gain: float = 4.0) -> Griffin:
    with torch.device("meta"):
        model = Griffin(config, dtype)
    return init_random_(model, seed, out_gain).eval()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece model with Gemma's special ids, chat markers and byte fallback."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def hf_config_json(config: GriffinConfig) -> dict:
    """config.json as transformers writes it for RecurrentGemma (intermediate_size is 2*M)."""
    period = 3
    return {
        "model_type": "recurrent_gemma",
        "architectures": ["RecurrentGemmaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": 2 * config.mlp_width,
        "lru_width": config.lru_width,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "num_hidden_layers": config.num_layers,
        "_block_types": list(config.block_types[:period]),
        "attention_window_size": config.window,
        "conv1d_width": config.conv_width,
        "logits_soft_cap": config.logit_cap,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_base,
        "partial_rotary_factor": 0.5,
        "embeddings_scale_by_sqrt_dim": True,
        "torch_dtype": "float32",
    }


def hf_state_dict(model: Griffin) -> dict[str, torch.Tensor]:
    sd = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def write_hf_folder(model: Griffin, folder: Path, tokenizer: Path, shards: int = 2) -> Path:
    """Save like the Hub does: config.json, sharded safetensors with an index, tokenizer.model."""
    assert model.config.block_types == tuple(
        (RECURRENT, RECURRENT, ATTENTION)[i % 3] for i in range(model.config.num_layers)
    ), "config.json can only express the R,R,A pattern"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_json(model.config)))
    sd = hf_state_dict(model)
    names = sorted(sd)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: sd[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(sd[n].numel() * sd[n].element_size() for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def official_state_dict(model: Griffin) -> dict[str, torch.Tensor]:
    """The same weights under the official (Kaggle .pt) names and layouts; inverse of the loader's mapping."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for name, t in sd.items():
        if name == "embed_tokens.weight":
            out["embedder.input_embedding"] = t
            continue
        if name == "final_norm.weight":
            out["final_norm.scale"] = t
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        b = f"blocks.{layer}"
        if rest.startswith("mlp_block.gate_proj"):
            up = rest.replace("gate_proj", "up_proj")
            if rest.endswith("weight"):
                out[f"{b}.mlp_block.ffw_up.w"] = torch.stack([t.T, sd[f"layers.{layer}.{up}"].T])
            else:
                out[f"{b}.mlp_block.ffw_up.b"] = torch.stack([t, sd[f"layers.{layer}.{up}"]])[:, None, None, :]
        elif rest.startswith("mlp_block.up_proj"):
            continue
        elif rest == "temporal_block.conv_1d.weight":
            out[f"{b}.recurrent_block.conv_1d.w"] = t[:, 0, :].T.contiguous()
        else:
            kind = "recurrent_block" if f"layers.{layer}.temporal_block.linear_x.weight" in sd else "attention_block"
            for pattern, repl in [
                (r"(temporal_pre_norm|channel_pre_norm)\.weight", r"\1.scale"),
                (r"mlp_block\.down_proj\.", "mlp_block.ffw_down."),
                (r"temporal_block\.conv_1d\.bias", "recurrent_block.conv_1d.b"),
                (r"temporal_block\.rg_lru\.recurrent_param", "recurrent_block.rg_lru.a_param"),
                (r"temporal_block\.rg_lru\.input_gate_(weight|bias)", r"recurrent_block.rg_lru.input_gate.\1"),
                (r"temporal_block\.rg_lru\.recurrent_gate_(weight|bias)", r"recurrent_block.rg_lru.a_gate.\1"),
                (r"temporal_block\.o_proj\.", "attention_block.proj_final."),
                (r"temporal_block\.([qkv])_proj\.", r"attention_block.proj_\1."),
                (r"temporal_block\.", f"{kind}."),
            ]:
                new, n = re.subn(f"^{pattern}", repl, rest)
                if n:
                    new = re.sub(r"gate\.weight$", "gate.w", re.sub(r"gate\.bias$", "gate.b", new))
                    out[f"{b}.{new}"] = t
                    break
            else:
                raise AssertionError(name)
    return {k: v.contiguous() for k, v in out.items()}


def write_official(model: Griffin, folder: Path, tokenizer: Path, name: str = "2b.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(official_state_dict(model), folder / name)
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder / name


def transformers_model(model: Griffin, window: int | None = None):
    """transformers' RecurrentGemmaForCausalLM holding the same weights (float32), for comparisons."""
    pytest.importorskip("transformers")
    from rgchat.bench.compare import hf_model

    return hf_model(model.state_dict(), model.config, torch.float32, "cpu", window)
