"""The server's snapshot cache: the state of every answered conversation, keyed by its exact messages, so a
follow-up request resumes it and reads only what is new.

A key names one model (its identity) and one list of messages, the answer included exactly as it was
returned: `message_keys` chains them, so the keys of every prefix of a request come out of one pass and the
longest cached prefix is found by looking them up from the end. Entries live in memory (least recently used
evicted beyond a byte budget) and are written, by a thread of their own, to state files in a folder of the
model's own (`FOLDER/MODEL/KEY.state`, the least recently used evicted beyond a byte budget), so a
restarted server resumes them. A file that is
damaged, of another model or of another key is deleted with one log line, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from rgchat import statefile
from rgchat.chat import Turn
from rgchat.config import GriffinConfig
from rgchat.errors import RGChatError
from rgchat.files import PRIVATE, write_atomically
from rgchat.settings import Settings
from rgchat.state import State

KEY_FIELD = "server_cache_key"  # the state file's metadata field holding the entry's key
_FILE = re.compile(r"^([0-9a-f]{64})\.state$")
WRITE_QUEUE = 16  # snapshots waiting for the disk; beyond it one is kept in memory only


def model_key(identity: dict) -> str:
    """What names the model in every key: its config, precision, weights and tokenizer, not how it was
    named on the command line."""
    fields = {k: identity.get(k) for k in statefile.IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def next_key(key: str, role: str, text: str) -> str:
    """The key of a conversation one message longer than the one `key` names."""
    return hashlib.sha256(json.dumps([key, role, text]).encode()).hexdigest()


def message_keys(root: str, messages: list[tuple[str, str]]) -> list[str]:
    """keys[i] names the conversation of messages[:i + 1] ((role, text) pairs) under `root`."""
    keys, key = [], root
    for role, text in messages:
        key = next_key(key, role, text)
        keys.append(key)
    return keys


@dataclasses.dataclass
class Snapshot:
    """A conversation's state after an answer (closed, as the chat closes it), on the CPU, with the tokens the
    repetition penalty looks at and the transcript a state file needs."""

    state: State
    recent: list[int]
    transcript: list[Turn]
    template: bool = True
    system: str | None = None
    nbytes: int = dataclasses.field(init=False)  # what it holds in memory: the transcript grows with length

    def __post_init__(self) -> None:
        held = sum(36 * len(turn.ids) + len(turn.text) for turn in self.transcript)  # a Python int and its slot
        self.nbytes = self.state.nbytes + held


class SnapshotCache:
    """Snapshots by key: an LRU in memory of at most `memory_bytes`, backed by state files in `folder` (at
    most `disk_bytes`; 0 or no folder: memory only). Safe to use from several threads."""

    def __init__(self, identity: dict, config: GriffinConfig, memory_bytes: int, folder: Path | None,
                 disk_bytes: int, log: Callable[[str], None]):
        self.identity, self.config, self.log = identity, config, log
        self.root = model_key(identity)
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        # each model its own subfolder: one model's snapshots never count against another's budget
        self.folder = folder / self.root[:16] if folder is not None and disk_bytes > 0 else None
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, Snapshot] = OrderedDict()
        self._memory_used = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._writes: queue.Queue[tuple[str, Snapshot] | None] = queue.Queue(WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        if self.folder is not None:
            self._open_folder()
            self._writer = threading.Thread(target=self._write_loop, name="rgchat-cache-writer", daemon=True)
            self._writer.start()

    # --- lookups -------------------------------------------------------------------------------------------

    def longest(self, keys: list[str], usable: Callable[[int], bool]) -> tuple[int, Snapshot] | None:
        """(i, snapshot) for the largest i with `usable(i)` whose keys[i] is cached; counts a hit or a miss."""
        for i in range(len(keys) - 1, -1, -1):
            if usable(i) and (found := self.get(keys[i])) is not None:
                with self._lock:
                    self.hits += 1
                return i, found
        with self._lock:
            self.misses += 1
        return None

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            on_disk = key in self._disk
            if on_disk:
                self._disk.move_to_end(key)
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
        if found is not None:
            if on_disk:
                self._touch(key)
            return found
        if not on_disk:
            return None
        snapshot = self._read(key)
        if snapshot is not None:
            self._remember(key, snapshot)
        return snapshot

    def _read(self, key: str) -> Snapshot | None:
        path = self._path(key)
        try:
            saved = statefile.load(path, self.identity)
            if saved.metadata.get(KEY_FIELD) != key:
                raise RGChatError(f"{path}: holds another conversation than its name says")
        except RGChatError as e:
            self.log(f"rgchat: cache: dropped {path.name}: {e}")
            self._forget_file(key)
            return None
        self._touch(key)
        return Snapshot(saved.state, saved.recent, saved.transcript, saved.template, saved.system)

    # --- storing -------------------------------------------------------------------------------------------

    def put(self, key: str, snapshot: Snapshot) -> None:
        """Keep `snapshot` under `key` (in memory now, on disk soon)."""
        self._remember(key, snapshot)
        if self._writer is not None:
            try:
                self._writes.put_nowait((key, snapshot))
            except queue.Full:
                self.log("rgchat: cache: the disk is behind; a snapshot was kept in memory only")

    def _remember(self, key: str, snapshot: Snapshot) -> None:
        if snapshot.nbytes > self.memory_bytes:
            return
        with self._lock:
            old = self._memory.pop(key, None)
            self._memory_used -= old.nbytes if old is not None else 0
            self._memory[key] = snapshot
            self._memory_used += snapshot.nbytes
            while self._memory_used > self.memory_bytes:
                _, gone = self._memory.popitem(last=False)
                self._memory_used -= gone.nbytes

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            key, snapshot = item
            try:
                self._write(key, snapshot)
            except Exception as e:  # a full disk or a vanished folder must not stop the writer
                self.log(f"rgchat: cache: could not write a snapshot ({e})")

    def _write(self, key: str, snapshot: Snapshot) -> None:
        data = statefile.encode(snapshot.state, self.config, snapshot.transcript, identity=self.identity,
                                template=snapshot.template, system=snapshot.system, settings=Settings(),
                                rng=torch.Generator().get_state(), recent=snapshot.recent,
                                extra={KEY_FIELD: key})
        if len(data) > self.disk_bytes:
            return
        write_atomically(self._path(key), data, mode=PRIVATE)
        with self._lock:
            self._disk.pop(key, None)
            self._disk[key] = len(data)
            doomed = []
            while sum(self._disk.values()) > self.disk_bytes:
                doomed.append(self._disk.popitem(last=False)[0])
        for old in doomed:
            with contextlib.suppress(OSError):
                os.unlink(self._path(old))

    def close(self) -> None:
        """Finish the writes in flight (a restarted server finds them)."""
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None

    # --- the folder ----------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self.folder is not None and _FILE.match(f"{key}.state")
        return self.folder / f"{key}.state"

    def _open_folder(self) -> None:
        """Index the snapshots a previous run left, oldest first (files not named as ours are left alone)."""
        assert self.folder is not None
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            entries = [(e.stat().st_mtime_ns, m.group(1), e.stat().st_size) for e in os.scandir(self.folder)
                       if (m := _FILE.match(e.name)) and e.is_file(follow_symlinks=False)]
        except OSError as e:
            raise RGChatError(f"{self.folder}: cannot use it as the snapshot cache ({e.strerror or e})") from None
        for _, key, size in sorted(entries):
            self._disk[key] = size

    def _touch(self, key: str) -> None:
        """Mark the file used now: the least recently used go first, also after a restart."""
        with contextlib.suppress(OSError):
            os.utime(self._path(key))

    def _forget_file(self, key: str) -> None:
        with self._lock:
            self._disk.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(self._path(key))

    # --- figures -------------------------------------------------------------------------------------------

    @property
    def memory_used(self) -> int:
        return self._memory_used

    @property
    def disk_used(self) -> int:
        with self._lock:
            return sum(self._disk.values())
