"""GriffinConfig: the shape of a RecurrentGemma network, from a preset, an HF config.json or a state dict."""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Mapping, Sequence

from rgchat.errors import RGChatError

RECURRENT = "recurrent"
ATTENTION = "attention"


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    vocab_size: int
    width: int  # D
    mlp_width: int  # M (HF's intermediate_size is 2*M)
    lru_width: int  # L
    num_heads: int  # attention heads, and also the number of RG-LRU gate blocks
    num_kv_heads: int
    block_types: tuple[str, ...]  # one entry per layer: "recurrent" or "attention"
    conv_width: int = 4
    window: int = 2048  # a token sees itself and `window` tokens before it
    logit_cap: float = 30.0
    rms_eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.width % self.num_heads or self.lru_width % self.num_heads:
            raise RGChatError(f"width {self.width} / lru width {self.lru_width} not divisible by {self.num_heads} heads")
        if self.num_heads % self.num_kv_heads:
            raise RGChatError(f"{self.num_heads} heads not divisible by {self.num_kv_heads} KV heads")
        unknown = set(self.block_types) - {RECURRENT, ATTENTION}
        if unknown:
            raise RGChatError(f"unknown block types {sorted(unknown)}")

    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def embed_scale(self) -> float:
        """sqrt(D) rounded to bfloat16, as both reference implementations do."""
        return _round_to_bf16(math.sqrt(self.width))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> GriffinConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in fields}
            kwargs["block_types"] = tuple(kwargs["block_types"])
            return cls(**kwargs)
        except (KeyError, TypeError) as e:
            raise RGChatError(f"invalid rgchat model config: {e}") from None


def _round_to_bf16(value: float) -> float:
    """Round to the nearest bfloat16 (ties to even) through float32's bits: no torch, which may be inside a
    meta-device context while a model is built."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _pattern(num_layers: int, pattern: Sequence[str] = (RECURRENT, RECURRENT, ATTENTION)) -> tuple[str, ...]:
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


PRESETS: dict[str, GriffinConfig] = {
    "2b": GriffinConfig(
        vocab_size=256000, width=2560, mlp_width=7680, lru_width=2560, num_heads=10, num_kv_heads=1,
        block_types=_pattern(26),
    ),
    "9b": GriffinConfig(
        vocab_size=256000, width=4096, mlp_width=12288, lru_width=4096, num_heads=16, num_kv_heads=1,
        block_types=_pattern(38),
    ),
}


def preset(name: str) -> GriffinConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise RGChatError(f"unknown shape {name!r}; choose one of {', '.join(PRESETS)}") from None


def from_hf_config(data: Mapping) -> GriffinConfig:
    """Read a transformers RecurrentGemma config.json (already parsed)."""
    if data.get("model_type") != "recurrent_gemma":
        raise RGChatError(f"config.json is for model_type {data.get('model_type')!r}, not 'recurrent_gemma'")
    try:
        width = int(data["hidden_size"])
        num_layers = int(data["num_hidden_layers"])
        num_heads = int(data["num_attention_heads"])
        pattern = data.get("block_types") or data.get("_block_types") or (RECURRENT, RECURRENT, ATTENTION)
        rope = data.get("rope_parameters") or {}
        rotary = float(rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 0.5)))
        if rotary != 0.5:
            raise RGChatError(f"partial_rotary_factor {rotary} is not supported (RecurrentGemma uses 0.5)")
        if not data.get("embeddings_scale_by_sqrt_dim", True):
            raise RGChatError("embeddings_scale_by_sqrt_dim=false is not supported")
        return GriffinConfig(
            vocab_size=int(data["vocab_size"]),
            width=width,
            mlp_width=int(data["intermediate_size"]) // 2,
            lru_width=int(data.get("lru_width") or width),
            num_heads=num_heads,
            num_kv_heads=int(data.get("num_key_value_heads") or num_heads),
            block_types=_pattern(num_layers, tuple(pattern)),
            conv_width=int(data.get("conv1d_width", 4)),
            window=int(data.get("attention_window_size", 2048)),
            logit_cap=float(data.get("logits_soft_cap", 30.0)),
            rms_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_base=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RGChatError(f"config.json is missing or has a bad field: {e}") from None


def from_hf_shapes(shapes: Mapping[str, Sequence[int]]) -> GriffinConfig:
    """Infer the config from the tensor shapes of an rgchat/HF-named state dict (window and cap are fixed)."""
    try:
        vocab, width = shapes["embed_tokens.weight"]
        layers = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))})
        if layers != list(range(len(layers))) or not layers:
            raise RGChatError("the checkpoint's layers are not numbered 0..N-1")
        types, lru_width, num_heads, kv_dim = [], None, None, None
        for i in layers:
            if f"layers.{i}.temporal_block.linear_x.weight" in shapes:
                types.append(RECURRENT)
                lru_width = shapes[f"layers.{i}.temporal_block.linear_x.weight"][0]
                num_heads = shapes[f"layers.{i}.temporal_block.rg_lru.input_gate_weight"][0]
            else:
                types.append(ATTENTION)
                kv_dim = shapes[f"layers.{i}.temporal_block.k_proj.weight"][0]
        mlp_width = shapes["layers.0.mlp_block.up_proj.weight"][0]
        if num_heads is None:
            raise RGChatError("the checkpoint has no recurrent layer to read the head count from")
        head_dim = width // num_heads
        return GriffinConfig(
            vocab_size=vocab,
            width=width,
            mlp_width=mlp_width,
            lru_width=lru_width,
            num_heads=num_heads,
            num_kv_heads=max(1, (kv_dim or head_dim) // head_dim),
            block_types=tuple(types),
        )
    except KeyError as e:
        raise RGChatError(f"the checkpoint lacks tensor {e.args[0]!r}") from None
