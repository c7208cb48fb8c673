"""Random weights of realistic scale, for models of any shape: the benchmark's 2B/9B models (no download
needed) and the tests' tiny ones; and a small tokenizer to serve them with."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from rgchat import __version__, modelfile
from rgchat import config as config_lib
from rgchat.model import Griffin, ready_for_device_
from rgchat.quant import convert_tensor, dtype_of, quantizable_weights, swap_modules_
from rgchat.store import TOKENIZER_FILE


def random_tensors(model: Griffin, seed: int = 0, out_gain: float = 4.0):
    """Random weights of realistic scale for every parameter of `model` (tests, bench), one at a time.

    The residual stream starts as a scaled copy of the token's embedding, and the logits are that
    embedding matrix again, so with timid block outputs a random model just repeats its last token.
    Output projections are therefore `out_gain` (4) times the usual scale, and the final norm is boosted so
    the logits have clear margins: greedy output then varies with the input. (At 4x the network is also
    chaotic, amplifying any rounding; out_gain=1 gives the calmer dynamics of a trained model.)
    Yields (name, float32 tensor).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("recurrent_param"):
            # softplus(param) such that a = exp(-8 * gate * softplus) spans roughly 0.3 .. 0.999
            value = torch.empty(shape).uniform_(-7.0, -1.0, generator=gen)
        elif name == "final_norm.weight":
            value = 3.0 + torch.randn(shape, generator=gen) * 0.2
        elif "norm" in name:
            value = torch.randn(shape, generator=gen) * 0.2
        elif name.endswith("bias"):
            value = torch.randn(shape, generator=gen) * 0.1
        elif name.endswith("conv_1d.weight"):
            value = torch.randn(shape, generator=gen) * 0.5
        else:  # [out, in] matrices, the [heads, in, out] gate blocks and the embedding
            gain = out_gain if name.endswith(("o_proj.weight", "linear_out.weight", "down_proj.weight")) else 1.0
            fan_in = shape[-2] if name.endswith("gate_weight") else shape[-1]
            value = torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))
        yield name, value


def init_random_(model: Griffin, seed: int = 0, out_gain: float = 4.0) -> Griffin:
    """Fill a plain (f32/bf16) model, possibly on the meta device, with `random_tensors`."""
    dtype = model.dtype
    weights = {name: value.to(dtype) for name, value in random_tensors(model, seed, out_gain)}
    model.load_state_dict(weights, assign=True, strict=True)
    return model


def random_weights(shape: str, precision: str, seed: int = 0) -> tuple[Griffin, dict[str, torch.Tensor]]:
    """A meta model of `shape` in `precision` and random weights for it, converted tensor by tensor as
    `rgchat convert` does (so peak memory is the converted model plus one float tensor)."""
    with torch.device("meta"):
        model = Griffin(config_lib.preset(shape), dtype_of(precision))
    quantizable = quantizable_weights(model)
    weights: dict[str, torch.Tensor] = {}
    for name, value in random_tensors(model, seed):
        weights.update(convert_tensor(name, value, precision, quantizable))
    return swap_modules_(model, precision), weights


def random_model(shape: str, precision: str, device: torch.device, seed: int = 0) -> Griffin:
    """Random weights in the same modules a model file of `precision` loads into."""
    model, weights = random_weights(shape, precision, seed)
    model.load_state_dict({n: t.to(device) for n, t in weights.items()}, assign=True, strict=True)
    return ready_for_device_(model.eval())


CORPUS = """The quick brown fox jumps over the lazy dog. RecurrentGemma keeps a fixed-size state.
A linear recurrence runs beside local attention; the window is two thousand and forty-eight tokens.
Über café naïve façade — 日本語のテキスト, emoji 🙂 and numbers 12345 mix with plain words.
Chat turns start with a marker and end with another; the model answers after its own marker.
"""


def train_tokenizer(folder: Path, pieces: int = 512) -> Path:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), its chat markers and
    byte fallback, trained on a few lines: enough to tokenize any text for random weights."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=pieces, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=0.995,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2,
    )
    corpus.unlink()
    return folder / "sp.model"


def save_random_model(shape: str, precision: str, path: Path, seed: int = 0) -> Path:
    """Write random weights as a model file, to measure loading and start-up like a real model's, with a
    small tokenizer beside it (unless one is there) so that `rgchat run` and `rgchat serve` take it."""
    model, weights = random_weights(shape, precision, seed)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in weights.items()}
    metadata = {"name": f"random-{shape}", "config": json.dumps(model.config.to_dict()), "precision": precision,
                "source": json.dumps({"kind": "random", "seed": seed}), "rgchat_version": __version__}
    modelfile.write(path, layout, metadata, weights.items())
    tokenizer = path.parent / TOKENIZER_FILE
    if not tokenizer.exists():
        import tempfile

        with tempfile.TemporaryDirectory(dir=path.parent) as folder:
            os.replace(train_tokenizer(Path(folder)), tokenizer)
    return path
