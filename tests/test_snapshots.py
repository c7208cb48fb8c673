"""The snapshot cache: keys chain messages, memory and disk stay within their budgets (least recently used
and oldest go first), snapshots survive a new cache on the same folder, and a damaged, foreign or misnamed
file is dropped with one log line."""

import os
import time

import pytest
import torch

from conftest import CYCLES
from rgchat.chat import Turn
from rgchat.snapshots import Snapshot, SnapshotCache, message_keys, model_key, next_key
from rgchat.state import State

IDENTITY = {"name": "tiny", "spec": "tiny", "config": CYCLES.to_dict(), "precision": "f32",
            "weights_sha256": "w" * 64, "tokenizer_sha256": "t" * 64}


def snapshot(pos: int, fill: float) -> Snapshot:
    state = State.empty(CYCLES, torch.float32)
    for t in state.tensors():
        t.fill_(fill)
    state.pos = pos
    return Snapshot(state, [5, 6], [Turn("user", "hi", [2] * (pos - 1)), Turn("model", "a", [7])])


def cache(folder, memory=1 << 30, disk=1 << 30, log=None) -> SnapshotCache:
    return SnapshotCache(IDENTITY, CYCLES, memory, folder, disk, log if log is not None else (lambda _: None))


def test_keys_chain_messages_and_name_the_model():
    root = model_key(IDENTITY)
    keys = message_keys(root, [("user", "a"), ("assistant", "b")])
    assert keys[1] == next_key(keys[0], "assistant", "b")
    assert message_keys(root, [("user", "a")]) == keys[:1]
    assert message_keys(root, [("user", "ab")])[0] != keys[0]
    assert model_key({**IDENTITY, "spec": "elsewhere"}) == root  # how it was named does not matter
    assert model_key({**IDENTITY, "weights_sha256": "x" * 64}) != root


def test_memory_is_an_lru_within_its_budget():
    one = snapshot(3, 1.0).nbytes
    assert one > snapshot(3, 1.0).state.nbytes  # the transcript counts too
    c = cache(None, memory=2 * one)
    for i, key in enumerate("abc"):
        c.put(key * 64, snapshot(3, float(i)))
        if key == "b":
            assert c.get("a" * 64) is not None  # a is now the most recent
    assert c.get("b" * 64) is None and c.get("a" * 64) is not None and c.get("c" * 64) is not None
    assert c.memory_used == 2 * one
    assert c.longest(["x" * 64, "a" * 64, "c" * 64], lambda i: i < 2)[0] == 1
    assert (c.hits, c.misses) == (1, 0)
    assert c.longest(["x" * 64], lambda i: True) is None and c.misses == 1


def test_snapshots_survive_on_disk_and_the_oldest_go_first(tmp_path):
    first = cache(tmp_path)
    first.put("a" * 64, snapshot(3, 1.0))
    first.close()
    folder = first.folder
    assert folder.parent == tmp_path  # a subfolder per model
    size = (folder / f"{'a' * 64}.state").stat().st_size
    (folder / "notes.txt").write_text("left alone")
    later = cache(tmp_path, memory=0, disk=2 * size + size // 2)
    got = later.get("a" * 64)
    assert got is not None and got.state.pos == 3 and got.recent == [5, 6]
    assert all(torch.equal(x, y) for x, y in zip(got.state.tensors()[:2], snapshot(3, 1.0).state.tensors()[:2]))
    later.put("b" * 64, snapshot(3, 2.0))
    later.put("c" * 64, snapshot(3, 3.0))
    later.close()
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == ["b" * 64 + ".state", "c" * 64 + ".state", "notes.txt"]
    assert later.disk_used == 2 * size


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "renamed"])
def test_a_bad_file_is_dropped_with_one_line(tmp_path, damage):
    key, other = "a" * 64, "b" * 64
    writer = SnapshotCache({**IDENTITY, "weights_sha256": "x" * 64} if damage == "foreign" else IDENTITY,
                           CYCLES, 1 << 30, tmp_path, 1 << 30, lambda _: None)
    writer.put(key, snapshot(3, 1.0))
    writer.close()
    folder = cache(tmp_path).folder
    if damage == "foreign":  # another model's file, put where this model's go
        os.rename(writer.folder / f"{key}.state", folder / f"{key}.state")
    path = folder / f"{key}.state"
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])
    elif damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "renamed":
        os.rename(path, folder / f"{other}.state")
        path, key = folder / f"{other}.state", other
    lines = []
    c = cache(tmp_path, memory=0, log=lines.append)
    assert c.get(key) is None
    assert len(lines) == 1 and "dropped" in lines[0] and path.name in lines[0]
    assert not path.exists() and c.disk_used == 0


def test_a_restart_keeps_the_disk_order(tmp_path):
    c = cache(tmp_path)
    for key in "abd":
        c.put(key * 64, snapshot(3, 1.0))
    c.close()
    folder = c.folder
    old = time.time() - 100
    os.utime(folder / f"{'b' * 64}.state", (old, old))  # b is now the oldest
    os.utime(folder / f"{'a' * 64}.state", (old - 1, old - 1))  # and a older still, but used below
    size = (folder / f"{'a' * 64}.state").stat().st_size
    c = cache(tmp_path, disk=3 * size + size // 2)
    assert c.get("a" * 64) is not None  # read from disk: now the most recent
    assert c.get("a" * 64) is not None  # a memory hit refreshes the file too
    c.put("c" * 64, snapshot(3, 1.0))
    c.close()
    assert not (folder / f"{'b' * 64}.state").exists() and (folder / f"{'a' * 64}.state").exists()
