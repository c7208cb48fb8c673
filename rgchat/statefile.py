"""The state file: a whole conversation saved as its recurrent snapshot, resumed later, in another process or
on another device, without re-reading the transcript.

One safetensors file (no pickle). Tensors: the State (RG-LRU carries in float32, conv buffers, and the
attention ring buffers only up to their filled slots), the transcript's token ids, the sampler's RNG state
and recent tokens. Metadata: format and version, the identity of the model it belongs to (config,
precision, weights and tokenizer checksums), position, the transcript's roles and texts, the settings, the
rgchat version, the creation time, and a sha256 over all of that. Written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from rgchat import __version__
from rgchat.chat import ChatSession, Turn
from rgchat.config import RECURRENT, GriffinConfig
from rgchat.errors import RGChatError
from rgchat.files import PRIVATE, lock, read_bounded, stamp, writable_target, write_atomically
from rgchat.quant import dtype_of
from rgchat.settings import Settings
from rgchat.state import AttentionLayerState, RecurrentLayerState, State

FORMAT = "rgchat-state"
VERSION = 1
MAX_FILE_BYTES = 1 << 30  # a 9B state at full window is about 50 MiB; anything this big is not ours
MAX_STATE_BYTES = 1 << 30  # nor a state this big, whatever config a file claims
IDENTITY_KEYS = ("config", "precision", "weights_sha256", "tokenizer_sha256")


@dataclasses.dataclass
class SavedConversation:
    path: Path
    identity: dict  # the model it belongs to (see LoadedModel.identity)
    state: State  # on the CPU
    transcript: list[Turn]
    template: bool
    system: str | None
    settings: dict
    rng: torch.Tensor  # the sampler generator's state
    recent: list[int]
    metadata: dict[str, str]


# --- writing -------------------------------------------------------------------------------------------------

def state_tensors(state: State, config: GriffinConfig) -> dict[str, torch.Tensor]:
    """The State as named CPU tensors; ring buffers keep only their filled slots (fewer after a short chat)."""
    filled = min(state.pos, config.window)
    tensors = {}
    for i, layer in enumerate(state.layers):
        if isinstance(layer, RecurrentLayerState):
            tensors[f"layers.{i}.h"], tensors[f"layers.{i}.conv"] = layer.h, layer.conv
        else:
            tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"] = layer.k[:filled], layer.v[:filled]
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def payload_sha256(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (but this checksum) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "payload_sha256"},
                                  sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(state: State, config: GriffinConfig, transcript: list[Turn], *, identity: dict, template: bool,
           system: str | None, settings: Settings, rng: torch.Tensor, recent: list[int],
           extra: dict[str, str] | None = None) -> bytes:
    """A conversation as the bytes of a state file; `extra` adds metadata fields of the caller's own."""
    tensors = state_tensors(state, config)
    tensors["transcript.ids"] = torch.tensor([t for turn in transcript for t in turn.ids], dtype=torch.int32)
    tensors["sampler.rng"] = rng
    tensors["sampler.recent"] = torch.tensor(list(recent), dtype=torch.int32)
    metadata = {
        **(extra or {}),
        "format": FORMAT,
        "format_version": str(VERSION),
        "model": json.dumps(identity, sort_keys=True),
        "pos": str(state.pos),
        "template": "chat" if template else "raw",
        "system": json.dumps(system),
        "transcript": json.dumps([{"role": t.role, "text": t.text, "tokens": len(t.ids)} for t in transcript]),
        "settings": json.dumps(settings.to_dict()),
        "rgchat_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata["payload_sha256"] = payload_sha256(metadata, tensors)
    return save_tensors(tensors, metadata)


def save(path: str | Path, session: ChatSession, identity: dict) -> None:
    """Write the session's conversation to `path` atomically (see `files.atomic_writer`; a new file is 0600:
    it holds a private conversation)."""
    data = encode(session.state, session.model.config, session.transcript, identity=identity,
                  template=session.template, system=session.system, settings=session.settings,
                  rng=session.sampler.generator.get_state(), recent=list(session.recent))
    write_atomically(path, data, mode=PRIVATE)


def save_copy(path: str | Path, session: ChatSession, identity: dict) -> None:
    """`save`, refused while another rgchat process holds `path` as its conversation (see `StateFile`)."""
    with lock(path, "conversation"):
        save(path, session, identity)


# --- reading -------------------------------------------------------------------------------------------------

def _read_metadata(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header longer than the file")
    metadata = json.loads(data[8:8 + length]).get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("no metadata")
    return metadata


def _read(path: Path) -> tuple[dict[str, str], bytes]:
    """The file's metadata (format and version checked) and its bytes."""
    data = read_bounded(path, MAX_FILE_BYTES, "an rgchat state file")
    if not data:
        raise RGChatError(f"{path}: empty: no conversation has been saved in it")
    try:
        metadata = _read_metadata(data)
    except (ValueError, struct.error, UnicodeDecodeError, AttributeError) as e:
        raise RGChatError(f"{path}: not an rgchat state file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise RGChatError(f"{path}: not an rgchat state file")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise RGChatError(f"{path}: rgchat state file with a damaged version field") from None
    if version > VERSION:
        raise RGChatError(f"{path}: written by a newer rgchat (state format {version}, this one reads "
                          f"{VERSION}); upgrade rgchat")
    return metadata, data


def load(path: str | Path, identity: dict | None = None) -> SavedConversation:
    """Read and fully validate a state file; any damage is refused with one clear message. With `identity`,
    a conversation of another model is refused (see `check_model`) before anything is allocated for it."""
    path = Path(path)
    metadata, data = _read(path)
    if identity is not None:
        try:
            saved_identity = json.loads(metadata["model"])
        except (KeyError, ValueError):
            raise RGChatError(f"{path}: damaged state file (no model identity)") from None
        check_model(path, saved_identity, identity)
    try:
        tensors = load_tensors(data)
    except Exception as e:  # safetensors' own error type: a damaged or truncated container
        raise RGChatError(f"{path}: damaged state file ({str(e).splitlines()[0]})") from None
    if metadata.get("payload_sha256") != payload_sha256(metadata, tensors):
        raise RGChatError(f"{path}: damaged state file (checksum mismatch)")
    try:
        return _parse(path, metadata, tensors)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, RGChatError) as e:
        # a checksum-valid file that is still inconsistent was written wrongly, not damaged in transit
        raise RGChatError(f"{path}: inconsistent state file ({e})") from None


def _parse(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> SavedConversation:
    identity = json.loads(metadata["model"])
    config = GriffinConfig.from_dict(identity["config"])
    dtype = dtype_of(identity["precision"])
    if not 0 < State.size_for(config, dtype) <= MAX_STATE_BYTES:  # before anything is allocated for it
        raise ValueError(f"its model's state would take {State.size_for(config, dtype):,} bytes")
    pos = int(metadata["pos"])
    turns = json.loads(metadata["transcript"])
    ids = tensors["transcript.ids"].tolist()
    if pos < 0 or sum(int(t["tokens"]) for t in turns) != len(ids) or len(ids) != pos:
        raise ValueError("transcript and position disagree")
    transcript, at = [], 0
    for t in turns:
        if t["role"] not in ("user", "model") or not isinstance(t["text"], str):
            raise ValueError("bad transcript entry")
        transcript.append(Turn(t["role"], t["text"], ids[at:at + int(t["tokens"])]))
        at += int(t["tokens"])

    filled = min(pos, config.window)
    state = State.empty(config, dtype, "cpu")
    state.pos = pos
    expected = state_tensors(state, config)
    for name, want in expected.items():
        got = tensors[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"tensor {name} is {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}")
    for i, (kind, layer) in enumerate(zip(config.block_types, state.layers, strict=True)):
        if kind == RECURRENT:
            assert isinstance(layer, RecurrentLayerState)
            layer.h.copy_(tensors[f"layers.{i}.h"])
            layer.conv.copy_(tensors[f"layers.{i}.conv"])
        else:
            assert isinstance(layer, AttentionLayerState)
            layer.k[:filled] = tensors[f"layers.{i}.k"]
            layer.v[:filled] = tensors[f"layers.{i}.v"]
    template = {"chat": True, "raw": False}[metadata["template"]]
    system = json.loads(metadata["system"])
    settings = json.loads(metadata["settings"])
    if (system is not None and not isinstance(system, str)) or not isinstance(settings, dict):
        raise ValueError("bad settings")
    return SavedConversation(path, identity, state, transcript, template, system, settings,
                             tensors["sampler.rng"], tensors["sampler.recent"].tolist(), metadata)


def check_model(path: Path, saved: dict, identity: dict) -> None:
    """Refuse a conversation (whose model identity is `saved`) that belongs to another model, precision or
    tokenizer than `identity`, naming the command that moves it to this one."""
    identity = json.loads(json.dumps(identity))  # as it reads back from a file (tuples become lists)
    if not isinstance(saved, dict):
        raise RGChatError(f"{path}: damaged state file (bad model identity)")
    differs = [key for key in IDENTITY_KEYS if saved.get(key) != identity.get(key)]
    if differs:
        what = {"config": "model", "precision": "precision", "weights_sha256": "weights",
                "tokenizer_sha256": "tokenizer"}
        command = shlex.join(["rgchat", "state", "replay", str(path), "--model", identity.get("spec", identity["name"]),
                              "--precision", identity["precision"]])
        raise RGChatError(
            f"{path}: this conversation belongs to {saved.get('name', '?')} ({saved.get('precision', '?')}); it "
            f"differs from {identity['name']} ({identity['precision']}) in {', '.join(what[k] for k in differs)}. "
            f"To continue it with this model, run: {command}")


def restore(session: ChatSession, saved: SavedConversation) -> None:
    """Make `session` continue the saved conversation on the session's device: its state, transcript, mode,
    system text and random stream (the session keeps its own sampling settings)."""
    _restore_rng(session, saved)
    session.template, session.system = saved.template, saved.system
    session.resume(saved.state, saved.transcript, saved.recent)


def resume(session: ChatSession, saved: SavedConversation, identity: dict, *, template: bool | None,
           seed: int | None, system: str | None, warn) -> None:
    """`run --state`: continue `saved` with the model of `identity` and what this command line asked.
    `template` (--chat/--raw, None if neither) must match the conversation's mode. A `seed` other than the
    one the conversation was started with restarts the random stream from it; without one, or with the same
    one, the saved stream goes on, so resuming equals never stopping. `system` heads the conversation only if
    it has no user turn yet, else `warn` says it was not used."""
    check_model(saved.path, saved.identity, identity)
    if template is not None and template != saved.template:
        raise RGChatError(f"{saved.path} holds a {'chat' if saved.template else 'raw text'} conversation: "
                          "leave out --raw/--chat")
    restore(session, saved)
    sampler = session.sampler
    if seed is not None and seed != saved.settings.get("seed"):
        sampler.reseed(seed)
    else:
        try:  # only the record of how the stream began (the stream itself was restored): no reseeding
            sampler.settings = sampler.settings.replace(seed=saved.settings.get("seed"))
        except ValueError:
            pass
    if system is not None and system != saved.system:
        if any(turn.role == "user" for turn in saved.transcript):
            warn(f"rgchat: warning: --system is not used: the conversation in {saved.path} has begun, and the "
                 "system text heads its first turn only")
        else:
            session.system = system


def replay(saved: SavedConversation, session: ChatSession, same_tokenizer: bool) -> None:
    """Rebuild the saved conversation in `session` (another model or precision) by prefilling its transcript:
    its own token ids when the tokenizer is the same, else its texts. Settings and random stream carry over."""
    session.template, session.system = saved.template, saved.system
    session.replay(saved.transcript, reuse_ids=same_tokenizer)
    if same_tokenizer:
        session.recent.clear()
        session.recent.extend(saved.recent)
    _restore_rng(session, saved)
    try:  # the settings as they were, random stream included (restored above): no reseeding
        session.sampler.settings = Settings.from_dict(saved.settings)
    except (TypeError, ValueError):
        raise RGChatError(f"{saved.path}: inconsistent state file (bad settings)") from None


def _restore_rng(session: ChatSession, saved: SavedConversation) -> None:
    try:
        session.sampler.generator.set_state(saved.rng)
    except RuntimeError:
        raise RGChatError(f"{saved.path}: inconsistent state file (bad random generator state)") from None


def describe(saved: SavedConversation) -> list[tuple[str, str]]:
    """What `rgchat state show` prints before the transcript."""
    identity, m = saved.identity, saved.metadata
    stored = state_tensors(saved.state, GriffinConfig.from_dict(identity["config"]))
    state_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    return [
        ("model", f"{identity.get('name', '?')} ({identity.get('precision', '?')})"),
        ("weights sha256", identity.get("weights_sha256", "?")),
        ("tokenizer sha256", identity.get("tokenizer_sha256", "?")),
        ("mode", "chat" if saved.template else "raw text"),
        ("position", f"{saved.state.pos} tokens"),
        ("turns", str(len(saved.transcript))),
        ("state in file", f"{state_bytes / 2**20:.2f} MiB"),
        ("system", saved.system or "-"),
        ("settings", json.dumps(saved.settings)),
        ("created", m.get("created", "?")),
        ("rgchat version", m.get("rgchat_version", "?")),
    ]


# --- the file a session keeps its conversation in ----------------------------------------------------------

class StateFile:
    """The state file a session resumes from and saves to after every change (`run --state`, `/load`).

    While open it is locked, so a second rgchat is refused at once instead of one of them silently losing a
    turn; opening it also proves, before any model runs, that it can be written. A write is refused when the
    file changed since it was read or written (another program wrote it): the conversation then goes to a
    new file beside it, which later writes use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = lock(self.path, "conversation")
        self._seen = stamp(self._lock.target)

    def read(self) -> SavedConversation | None:
        """The saved conversation, or None for a new one (no file yet, or an empty file)."""
        if self._seen is None or self._seen[1] == 0:
            return None
        return load(self.path)

    def write(self, session: ChatSession, identity: dict) -> None:
        if stamp(self._lock.target) != self._seen:
            changed, elsewhere = self.path, self._free_sibling()
            held = lock(elsewhere, "conversation")
            self._lock.release()
            self.path, self._lock = elsewhere, held
            save(self._lock.target, session, identity)
            self._seen = stamp(self._lock.target)
            raise RGChatError(f"{changed} changed since rgchat last read or wrote it (another program wrote it), "
                              f"so it was left as it is; this conversation was saved to {self.path} instead, "
                              "and later turns go there")
        save(self._lock.target, session, identity)
        self._seen = stamp(self._lock.target)

    def load_other(self, path: str | Path, identity: dict) -> SavedConversation:
        """Continue the conversation saved in `path` from now on (/load with --state): it is read, checked
        against `identity` and locked; this file is released. On any refusal nothing changes."""
        other = self if self.same_file(path) else StateFile(path)  # this file itself: read it again
        try:
            saved = other.read()
            if saved is None:
                raise RGChatError(f"{path}: no conversation has been saved in it")
            check_model(saved.path, saved.identity, identity)
        except BaseException:
            if other is not self:
                other.close()
            raise
        if other is not self:
            self.close()
            self.path, self._lock, self._seen = other.path, other._lock, other._seen
        return saved

    def same_file(self, path: str | Path) -> bool:
        return writable_target(path) == self._lock.target

    def close(self) -> None:
        self._lock.release()

    def _free_sibling(self) -> Path:
        target = self._lock.target
        for n in range(1, 10_000):
            candidate = target.with_name(f"{target.stem}.conflict-{n}{target.suffix}")
            if not os.path.lexists(candidate):
                return candidate
        raise RGChatError(f"{target}: changed by another program, and no free name beside it to save to")
