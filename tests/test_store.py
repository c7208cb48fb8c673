import hashlib
import os
import stat
import struct
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from typer.testing import CliRunner

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from rgchat import checkpoint, loader, modelfile, store
from rgchat.cli import app
from rgchat.errors import RGChatError
from rgchat.loader import resolve
from rgchat.store import list_entries, remove, store_dir


def verify(model: str) -> list[tuple[str, str]]:
    return loader.verify(store.find(model))


def show_lines(model: str) -> list[tuple[str, str]]:
    """What `rgchat show MODEL` prints, as (label, value) pairs."""
    out = CliRunner().invoke(app, ["show", model])
    assert out.exit_code == 0, out.output
    return [tuple(line.split(": ", 1)) for line in out.stdout.splitlines()]


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


# --- helpers (test_loader.py uses them too) ----------------------------------------------------------------

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def other_tokenizer(tokenizer: Path, dest: Path) -> Path:
    """A valid tokenizer with other bytes: the first scored piece of the SentencePiece model proto (field 1
    of ModelProto; its score is field 2, a fixed32 float) gets another score. Same length, so no framing
    changes, and no protobuf package needed."""
    data = bytearray(tokenizer.read_bytes())
    i = 0
    while i < len(data):
        tag, i = _varint(data, i)
        if tag & 7 != 2:
            raise AssertionError("unexpected wire type at the top of the model proto")
        length, i = _varint(data, i)
        end = i + length
        if tag >> 3 == 1:
            j = i
            while j < end:
                inner, j = _varint(data, j)
                if inner == (2 << 3 | 5):  # score
                    (score,) = struct.unpack_from("<f", data, j)
                    if score != 0:
                        struct.pack_into("<f", data, j, score - 0.25)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(bytes(data))
                        assert spm.SentencePieceProcessor(model_file=str(dest)).get_piece_size() == 512
                        return dest
                    j += 4
                elif inner & 7 == 0:
                    _, j = _varint(data, j)
                elif inner & 7 == 2:
                    n, j = _varint(data, j)
                    j += n
                elif inner & 7 == 5:
                    j += 4
                else:
                    raise AssertionError("unexpected wire type in a piece")
        i = end
    raise AssertionError("no scored piece found")


def converting(said: list[str]) -> int:
    return sum(line.startswith("rgchat: converting ") for line in said)


def flip_byte(path: Path, keep_mtime: bool) -> None:
    """Damage one byte of tensor data in place (same inode and size); keep or move the mtime."""
    st = path.stat()
    data_start = modelfile.open_file(path).data_start
    at = (data_start + st.st_size) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))


def assert_clean_error(result, *needles: str):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rgchat: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- naming and re-use -------------------------------------------------------------------------------------

def test_same_folder_names_get_their_own_entries(tmp_path, tokenizer_path):
    a = write_hf_folder(tiny_model(CYCLES, seed=71), tmp_path / "a" / "tiny-it", tokenizer_path)
    b = write_hf_folder(tiny_model(CYCLES, seed=72), tmp_path / "b" / "tiny-it", tokenizer_path)
    other_tokenizer(tokenizer_path, b / "tokenizer.model")
    said = []
    path_a = resolve(str(a), "int8", log=said.append)
    path_b = resolve(str(b), "int8", log=said.append)
    assert path_a == store_dir() / "tiny-it-int8" / "model.safetensors"
    assert path_b == store_dir() / "tiny-it-2-int8" / "model.safetensors"
    assert converting(said) == 2
    shas = {p: sha(p) for p in (path_a, path_b)}
    assert shas[path_a] != shas[path_b]
    assert sha(path_a.parent / "tokenizer.model") == sha(tokenizer_path)
    assert sha(path_b.parent / "tokenizer.model") == sha(b / "tokenizer.model") != sha(tokenizer_path)

    for _ in range(2):  # each finds its own entry again, in either order, converting nothing
        assert resolve(str(b), "int8", log=said.append) == path_b
        assert resolve(str(a), "int8", log=said.append) == path_a
    assert converting(said) == 2 and len(said) == 2
    assert {p: sha(p) for p in (path_a, path_b)} == shas
    assert [(e.name, e.source) for e in list_entries()] == [
        ("tiny-it-2-int8", str(b.resolve())), ("tiny-it-int8", str(a.resolve()))]
    assert [line for line in verify("tiny-it-2-int8") if line[0] == "tokenizer"] == [
        ("tokenizer", "matches its sha256")]


def test_a_hugging_face_cache_snapshot_is_named_after_its_repo(tmp_path, tokenizer_path):

    snapshot = tmp_path / "hub" / "models--google--recurrentgemma-2b-it" / "snapshots" / "0123abcd"
    write_hf_folder(tiny_model(CYCLES, seed=74), snapshot, tokenizer_path)
    said = []
    path = resolve(str(snapshot), "int8", log=said.append)
    assert path == store_dir() / "recurrentgemma-2b-it-int8" / "model.safetensors"
    assert not (store_dir() / "0123abcd-int8").exists()
    assert modelfile.read_metadata(path)["name"] == "recurrentgemma-2b-it"
    loaded = loader.load(str(snapshot), "int8", torch.device("cpu"), log=said.append)
    assert loaded.name == "recurrentgemma-2b-it" and loaded.instruction_tuned
    assert converting(said) == 1  # loading found the entry made above


def test_removing_one_entry_does_not_duplicate_the_other(tmp_path, tokenizer_path):
    a = write_hf_folder(tiny_model(CYCLES, seed=86), tmp_path / "a" / "tiny", tokenizer_path)
    b = write_hf_folder(tiny_model(CYCLES, seed=87), tmp_path / "b" / "tiny", tokenizer_path)
    said = []
    resolve(str(a), "int8", log=said.append)
    path_b = resolve(str(b), "int8", log=said.append)
    assert path_b.parent.name == "tiny-2-int8"
    remove("tiny-int8")
    assert resolve(str(b), "int8", log=said.append) == path_b
    assert converting(said) == 2
    assert [e.name for e in list_entries()] == ["tiny-2-int8"]


# --- damage ------------------------------------------------------------------------------------------------

def test_damaged_entries_are_listed_as_damaged(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=77), tmp_path / "tiny", tokenizer_path)
    path = resolve(str(source), "int8", log=lambda line: None)
    path.write_bytes(path.read_bytes()[:-64])  # cut short
    garbage = store_dir() / "junk-int8"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"not a model")
    (store_dir() / ".downloads").mkdir()  # hidden folders are not entries
    entries = {e.name: e for e in list_entries()}
    assert sorted(entries) == ["junk-int8", "tiny-int8"]
    assert entries["tiny-int8"].precision == entries["junk-int8"].precision == "?"
    assert "truncated or padded" in entries["tiny-int8"].damage
    assert "not an rgchat model file (bad header length)" in entries["junk-int8"].damage
    assert entries["junk-int8"].size == len(b"not a model")

    listed = run_cli("list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["junk-int8", "?"], ["tiny-int8", "?"]]
    assert all("\tDAMAGED: " in line for line in lines)
    assert "truncated or padded" in lines[1]

    # the damaged entry still records its source, so its checkpoint converts into it again
    said = []
    assert resolve(str(source), "int8", log=said.append) == path
    assert any("tiny-int8 is damaged (" in line for line in said) and converting(said) == 1
    assert {e.name: e.damage for e in list_entries()}["tiny-int8"] is None


# --- the store's folders -----------------------------------------------------------------------------------

def test_removing_a_symlinked_entry_keeps_what_it_points_to(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=78), tmp_path / "tiny", tokenizer_path)
    elsewhere = tmp_path / "elsewhere"
    checkpoint.convert(source, "int8", elsewhere / "model.safetensors")
    kept = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    store_dir().mkdir(parents=True)
    (store_dir() / "linked-int8").symlink_to(elsewhere, target_is_directory=True)
    assert [e.name for e in list_entries()] == ["linked-int8"]
    remove("linked-int8")
    assert not os.path.lexists(store_dir() / "linked-int8")
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == kept
    assert list_entries() == []


def test_show_takes_a_store_folder_like_run(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=79), tmp_path / "tiny", tokenizer_path)
    path = resolve(str(source), "int8", log=lambda line: None)
    by_name = show_lines("tiny-int8")
    assert show_lines(str(path.parent)) == by_name == show_lines(str(path))
    assert dict(by_name)["file"] == str(path)
    out = CliRunner().invoke(app, ["show", str(source)])  # a checkpoint is not shown, it is converted
    assert out.exit_code == 1 and "not an rgchat model file or store folder" in out.output


def test_a_folder_where_the_model_file_should_be(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=80), tmp_path / "tiny", tokenizer_path)
    blocked = store_dir() / "tiny-int8" / "model.safetensors"
    blocked.mkdir(parents=True)
    # the name holds something that records no source: it is never replaced, the next name is used
    said = []
    path = resolve(str(source), "int8", log=said.append)
    assert path == store_dir() / "tiny-2-int8" / "model.safetensors" and converting(said) == 1
    assert blocked.is_dir() and os.listdir(blocked) == []
    assert resolve(str(source), "int8", log=said.append) == path and converting(said) == 1
    [entry] = [e for e in list_entries() if e.name == "tiny-int8"]
    assert entry.precision == "?" and "a folder, not a regular file" in entry.damage
    # writing there explicitly is refused with one line
    with pytest.raises(RGChatError, match="a folder; refusing to write over it"):
        checkpoint.convert(source, "int8", blocked, own_folder=True)
    assert blocked.is_dir() and os.listdir(blocked) == []


def test_a_store_that_is_not_a_folder(tmp_path, monkeypatch, tokenizer_path):
    home = tmp_path / "home-file"
    home.write_bytes(b"not a folder")
    monkeypatch.setenv("RGCHAT_HOME", str(home))
    for call in (store_dir, list_entries, lambda: resolve("some-name", "int8")):
        with pytest.raises(RGChatError, match="is not a folder"):
            call()
    assert_clean_error(run_cli("list"), f"the model store {home} is not a folder")
    assert home.read_bytes() == b"not a folder"


def test_a_store_that_cannot_be_created(tmp_path, monkeypatch, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=81), tmp_path / "tiny", tokenizer_path)
    monkeypatch.setenv("RGCHAT_HOME", "/proc/rgchat-nope")
    with pytest.raises(RGChatError, match="/proc/rgchat-nope/tiny-int8: cannot create the folder"):
        resolve(str(source), "int8", log=lambda line: None)
    assert_clean_error(run_cli("convert", str(source)), "/proc/rgchat-nope")
    assert not os.path.lexists("/proc/rgchat-nope")


# --- convert -o --------------------------------------------------------------------------------------------

def test_convert_output_into_a_new_folder(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=82), tmp_path / "tiny", tokenizer_path)
    out = tmp_path / "new" / "deeper" / "tiny.safetensors"
    assert checkpoint.convert(source, "int8", out) == out
    assert sorted(os.listdir(out.parent)) == ["tiny.safetensors", "tokenizer.model"]
    assert (out.parent / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    modelfile.open_file(out).verify(force=True)
    assert modelfile.read_metadata(out)["precision"] == "int8"


def test_convert_output_over_a_fifo_is_refused_and_writes_nothing(tmp_path, tokenizer_path):
    source = write_hf_folder(tiny_model(CYCLES, seed=83), tmp_path / "tiny", tokenizer_path)
    fifo = tmp_path / "out" / "pipe"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(RGChatError, match="a FIFO; refusing to write over it"):
        checkpoint.convert(source, "int8", fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(fifo.parent) == ["pipe"]  # no temp file, no tokenizer copy beside it


def test_a_full_disk_while_converting(tmp_path, monkeypatch, tokenizer_path):
    from rgchat import files

    source = write_hf_folder(tiny_model(CYCLES, seed=84), tmp_path / "tiny", tokenizer_path)
    out = tmp_path / "out" / "tiny.safetensors"
    checkpoint.convert(source, "int8", out)
    before = {name: (out.parent / name).read_bytes() for name in os.listdir(out.parent)}

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(RGChatError, match="No space left") as e:
        checkpoint.convert(source, "bf16", out)  # over the previous file
    assert str(out) in str(e.value)
    with pytest.raises(RGChatError, match="No space left"):
        checkpoint.convert(source, "int8", tmp_path / "fresh" / "tiny.safetensors")
    monkeypatch.undo()
    assert {name: (out.parent / name).read_bytes() for name in os.listdir(out.parent)} == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert modelfile.read_metadata(out)["precision"] == "int8"
    modelfile.open_file(out).verify(force=True)
