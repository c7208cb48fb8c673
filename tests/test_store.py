import os
from pathlib import Path

import pytest

from conftest import CYCLES, tiny_model, write_hf_folder
from rgchat.errors import RGChatError
from rgchat.store import list_entries, remove, resolve, show_lines, store_dir


def test_store_dir_honours_rgchat_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RGCHAT_HOME", str(tmp_path))
    assert store_dir() == tmp_path
    monkeypatch.delenv("RGCHAT_HOME")
    assert store_dir().name == "rgchat" and isinstance(store_dir(), Path)


def test_checkpoint_is_converted_once_then_found_by_name(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=61), tmp_path / "tiny-it", tokenizer_path)
    said = []
    path = resolve(str(source), "int8", log=said.append)
    assert path == store_dir() / "tiny-it-int8" / "model.safetensors" and len(said) == 1
    stamp = path.stat().st_mtime_ns
    assert resolve(str(source), "int8", log=said.append) == path and len(said) == 1  # no second conversion
    assert path.stat().st_mtime_ns == stamp
    assert resolve("tiny-it-int8", "bf16") == path  # a store name is used as it is
    assert resolve(str(path), "bf16") == path  # so is a model file

    config = source / "config.json"  # the source changes: convert again
    config.write_text(config.read_text())
    os.utime(config, ns=(stamp + 10**9, stamp + 10**9))
    resolve(str(source), "int8", log=said.append)
    assert len(said) == 2

    [entry] = list_entries()
    assert (entry.name, entry.precision, entry.source) == ("tiny-it-int8", "int8", str(source.resolve()))
    assert entry.size > path.stat().st_size  # tokenizer included
    lines = dict(show_lines("tiny-it-int8"))
    assert lines["precision"] == "int8" and lines["name"] == "tiny-it"
    assert "state size" in lines
    remove("tiny-it-int8")
    assert list_entries() == []


def test_unknown_models_are_refused(tmp_path):
    with pytest.raises(RGChatError, match="not in the store"):
        resolve("nothing-here", "int8")
    with pytest.raises(RGChatError, match="no such file"):
        resolve(str(tmp_path / "missing"), "int8")
    with pytest.raises(RGChatError, match="no model named"):
        remove("nothing-here")
