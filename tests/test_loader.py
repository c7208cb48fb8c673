"""The loader: a MODEL argument resolved to a model file (converted once, again when its source or entry
changes), and verification of what was converted."""

import os

import pytest

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from rgchat import loader, modelfile
from rgchat.errors import RGChatError
from rgchat.loader import resolve
from rgchat.store import remove
from test_store import assert_clean_error, converting, flip_byte, other_tokenizer, sha, verify


def test_unknown_models_are_refused(tmp_path):
    with pytest.raises(RGChatError, match="not in the store"):
        resolve("nothing-here", "int8")
    with pytest.raises(RGChatError, match="no such file"):
        resolve(str(tmp_path / "missing"), "int8")
    with pytest.raises(RGChatError, match="no model named"):
        remove("nothing-here")


def converted(tmp_path, tokenizer_path, seed: int, name: str = "tiny"):
    """A tiny checkpoint folder resolved (converted into the store) once: (source, model file, log lines)."""
    source = write_hf_folder(tiny_model(CYCLES, seed=seed), tmp_path / name, tokenizer_path)
    said: list[str] = []
    return source, resolve(str(source), "int8", log=said.append), said


def test_a_replaced_tokenizer_is_noticed(tmp_path, tokenizer_path):
    source, path, said = converted(tmp_path, tokenizer_path, 73, "tiny-it")
    tokenizer = source / "tokenizer.model"
    before = tokenizer.stat().st_mtime_ns
    other_tokenizer(tokenizer_path, tokenizer)
    os.utime(tokenizer, ns=(before + 10**9, before + 10**9))
    assert resolve(str(source), "int8", log=said.append) == path
    assert converting(said) == 2
    assert (path.parent / "tokenizer.model").read_bytes() == tokenizer.read_bytes() != tokenizer_path.read_bytes()
    assert modelfile.read_metadata(path)["tokenizer_sha256"] == sha(tokenizer)
    verify("tiny-it-int8")  # the pair matches
    assert resolve(str(source), "int8", log=said.append) == path and converting(said) == 2


def test_a_damaged_entry_is_converted_again(tmp_path, tokenizer_path):
    source, path, said = converted(tmp_path, tokenizer_path, 75)
    good = path.read_bytes()
    loader.load_file(path)  # verified once: FILE.verified remembers it
    assert (path.parent / "model.safetensors.verified").is_file()
    flip_byte(path, keep_mtime=False)
    assert path.read_bytes() != good
    assert resolve(str(source), "int8", log=said.append) == path
    damaged = [line for line in said if " is damaged (" in line]
    assert len(damaged) == 1 and "tiny-int8 is damaged" in damaged[0] and "fails its checksum" in damaged[0]
    assert converting(said) == 2
    assert path.read_bytes() == good
    modelfile.open_file(path).verify(force=True)
    assert resolve(str(source), "int8", log=said.append) == path and len(said) == 3


def test_verify_finds_damage_that_loading_skips(tmp_path, tokenizer_path):
    _, path, _ = converted(tmp_path, tokenizer_path, 76)
    lines = dict(verify("tiny-int8"))
    n = len(modelfile.open_file(path).entries)
    assert lines == {"file": str(path), "tensors": f"{n} match their sha256", "tokenizer": "matches its sha256"}
    assert verify(str(path.parent)) == verify(str(path)) == verify("tiny-int8")
    loader.load_file(path)

    flip_byte(path, keep_mtime=True)  # bit rot: same size, inode and mtime
    loader.load_file(path)  # the fast path trusts FILE.verified
    with pytest.raises(RGChatError, match="fails its checksum"):
        verify("tiny-int8")
    with pytest.raises(RGChatError, match="fails its checksum"):
        modelfile.open_file(path).verify(force=True)
    assert_clean_error(run_cli("verify", "tiny-int8"), "fails its checksum", str(path))


def test_verify_notices_a_swapped_tokenizer(tmp_path, tokenizer_path):
    _, path, _ = converted(tmp_path, tokenizer_path, 85)
    other_tokenizer(tokenizer_path, path.parent / "tokenizer.model")
    with pytest.raises(RGChatError, match="not the tokenizer .* was converted with"):
        verify("tiny-int8")


def test_an_entry_with_the_wrong_tokenizer_is_converted_again(tmp_path, tokenizer_path):
    source, path, said = converted(tmp_path, tokenizer_path, 88)
    other_tokenizer(tokenizer_path, path.parent / "tokenizer.model")
    assert resolve(str(source), "int8", log=said.append) == path
    assert converting(said) == 2
    assert sha(path.parent / "tokenizer.model") == sha(tokenizer_path)
    verify("tiny-int8")
