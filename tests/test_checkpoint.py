import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import BLOCKS, CYCLES, official_state_dict, tiny_model, write_hf_folder, write_official
from rgchat.checkpoint import Checkpoint, convert
from rgchat.loader import load_file
from rgchat.config import from_hf_shapes
from rgchat.errors import RGChatError


def load_checkpoint(path, out_folder, precision="f32"):
    """A checkpoint as `rgchat run` loads it: converted (f32 is lossless), then the model file loaded."""
    out = out_folder / f"{path.name}-{precision}" / "model.safetensors"
    return load_file(convert(path, precision, out))[0]


def logits_of(model, n=24):
    tokens = torch.arange(n) * 7 % model.config.vocab_size
    return model.forward(tokens, model.new_state(), all_logits=True)


@pytest.mark.parametrize("config", [CYCLES, BLOCKS], ids=["cycles", "blocks"])
def test_hf_folder_and_official_pt_give_identical_logits(tmp_path, tokenizer_path, config):
    model = tiny_model(config, seed=21)
    hf_dir = write_hf_folder(model, tmp_path / "hf", tokenizer_path, shards=3)
    pt_file = write_official(model, tmp_path / "kaggle", tokenizer_path)

    hf_ckpt, pt_ckpt = Checkpoint(hf_dir), Checkpoint(pt_file)
    from_hf = load_checkpoint(hf_dir, tmp_path / "out-hf")
    from_pt = load_checkpoint(pt_file, tmp_path / "out-pt")
    from_pt_folder = load_checkpoint(pt_file.parent, tmp_path / "out-folder")  # the folder holding the .pt
    assert hf_ckpt.config == pt_ckpt.config == config
    assert pt_ckpt.tokenizer_path.exists() and hf_ckpt.tokenizer_path.exists()
    expected = logits_of(model)
    assert torch.equal(logits_of(from_hf), expected)
    assert torch.equal(logits_of(from_pt), expected)
    assert torch.equal(logits_of(from_pt_folder), expected)


def test_single_file_safetensors_and_bf16_load(tmp_path, tokenizer_path):
    model = tiny_model(CYCLES, seed=22)
    folder = write_hf_folder(model, tmp_path / "hf", tokenizer_path, shards=1)
    (folder / "model.safetensors.index.json").unlink()
    loaded = load_checkpoint(folder, tmp_path, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(layer.h.dtype == torch.float32 for layer in loaded.new_state().layers if hasattr(layer, "h"))


def test_config_inferred_from_official_shapes():
    sd = official_state_dict(tiny_model(BLOCKS, seed=23))
    from rgchat.checkpoint import _official_to_hf

    shapes = {n: tuple(t.shape) for name, t in sd.items() for n, t in _official_to_hf(name, t)}
    assert from_hf_shapes(shapes) == BLOCKS


class Payload:
    """Any class: unpickling it could run code, so the loader must refuse it."""


def test_pickled_object_in_pt_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"embedder.input_embedding": torch.zeros(2, 2), "x": Payload()}, path)
    with pytest.raises(RGChatError, match="refused"):
        load_checkpoint(path, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "missing_tensor", "bad_config", "unknown_model"])
def test_damaged_hf_folder_is_refused(tmp_path, tokenizer_path, damage):
    folder = write_hf_folder(tiny_model(CYCLES, seed=24), tmp_path / "hf", tokenizer_path, shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "wrong_shape":
        from safetensors.torch import load_file

        sd = load_file(shard)
        name = next(n for n in sd if n.endswith("mlp_block.up_proj.weight"))
        sd[name] = torch.zeros(3, 3)
        save_file(sd, shard)
    elif damage == "missing_tensor":
        from safetensors.torch import load_file

        sd = load_file(shard)
        sd.pop(next(n for n in sd if n.startswith("model.")))
        save_file(sd, shard)
    elif damage == "bad_config":
        (folder / "config.json").write_text("{not json")
    elif damage == "unknown_model":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(RGChatError):
        load_checkpoint(folder, tmp_path)


def test_missing_path_and_non_checkpoint(tmp_path):
    with pytest.raises(RGChatError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RGChatError, match="not a RecurrentGemma checkpoint"):
        Checkpoint(tmp_path)
