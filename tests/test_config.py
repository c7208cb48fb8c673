import pytest
import torch

from conftest import BLOCKS, CYCLES, hf_config_json
from rgchat.config import ATTENTION, RECURRENT, GriffinConfig, from_hf_config, preset
from rgchat.errors import RGChatError

# The 2B config.json as published on the Hub (the fields rgchat reads).
HUB_2B = {
    "model_type": "recurrent_gemma", "vocab_size": 256000, "hidden_size": 2560, "intermediate_size": 15360,
    "num_hidden_layers": 26, "num_attention_heads": 10, "num_key_value_heads": 1, "lru_width": 2560,
    "attention_window_size": 2048, "conv1d_width": 4, "logits_soft_cap": 30.0, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "embeddings_scale_by_sqrt_dim": True,
    "_block_types": ["recurrent", "recurrent", "attention"],
}


def test_hub_config_reads_as_the_2b_preset():
    assert from_hf_config(HUB_2B) == preset("2b")
    renamed = {**{k: v for k, v in HUB_2B.items() if k != "_block_types"}, "block_types": HUB_2B["_block_types"]}
    assert from_hf_config(renamed) == preset("2b")


@pytest.mark.parametrize("config", [CYCLES, BLOCKS])
def test_hf_config_round_trip(config):
    assert from_hf_config(hf_config_json(config)) == config


def test_embed_scale_is_rounded_to_bf16():
    assert preset("2b").embed_scale == 50.5 and preset("9b").embed_scale == 64.0
    for width in range(1, 5000):  # the pure-Python rounding agrees with torch's
        scale = GriffinConfig(**{**preset("2b").to_dict(), "width": width, "lru_width": width, "num_heads": 1}).embed_scale
        assert scale == float(torch.tensor(width ** 0.5, dtype=torch.bfloat16))


@pytest.mark.parametrize("change", [{"model_type": "gemma"}, {"hidden_size": None}, {"partial_rotary_factor": 1.0}])
def test_unsupported_configs_are_refused(change):
    with pytest.raises(RGChatError):
        from_hf_config({**HUB_2B, **change})


def test_inconsistent_shapes_are_refused():
    with pytest.raises(RGChatError):
        GriffinConfig(vocab_size=10, width=30, mlp_width=8, lru_width=30, num_heads=4, num_kv_heads=1,
                      block_types=(RECURRENT, ATTENTION))
    with pytest.raises(RGChatError):
        preset("7b")
