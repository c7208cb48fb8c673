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
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from rgchat import __version__
from rgchat.chat import ChatSession, Turn
from rgchat.config import RECURRENT, GriffinConfig
from rgchat.errors import RGChatError
from rgchat.files import write_atomically
from rgchat.quant import dtype_of
from rgchat.state import AttentionLayerState, RecurrentLayerState, State

FORMAT = "rgchat-state"
VERSION = 1
MAX_FILE_BYTES = 1 << 30  # a 9B state at full window is about 50 MiB; anything this big is not ours
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


def save(path: str | Path, session: ChatSession, identity: dict) -> None:
    """Write the session's conversation to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    s = session.sampler
    tensors = state_tensors(session.state, session.model.config)
    tensors["transcript.ids"] = torch.tensor([t for turn in session.transcript for t in turn.ids], dtype=torch.int32)
    tensors["sampler.rng"] = s.generator.get_state()
    tensors["sampler.recent"] = torch.tensor(list(session.recent), dtype=torch.int32)
    settings = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                "repeat_penalty": s.repeat_penalty, "seed": s.seed, "max_tokens": session.max_tokens,
                "stop": list(session.stop)}
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "model": json.dumps(identity, sort_keys=True),
        "pos": str(session.state.pos),
        "template": "chat" if session.template else "raw",
        "system": json.dumps(session.system),
        "transcript": json.dumps([{"role": t.role, "text": t.text, "tokens": len(t.ids)} for t in session.transcript]),
        "settings": json.dumps(settings),
        "rgchat_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata["payload_sha256"] = payload_sha256(metadata, tensors)
    write_atomically(path, save_tensors(tensors, metadata))


# --- reading -------------------------------------------------------------------------------------------------

def _read_metadata(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header longer than the file")
    metadata = json.loads(data[8:8 + length]).get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("no metadata")
    return metadata


def load(path: str | Path) -> SavedConversation:
    """Read and fully validate a state file; any damage is refused with one clear message."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RGChatError(f"{path}: too large to be an rgchat state file")
        data = path.read_bytes()
    except OSError as e:
        raise RGChatError(f"{path}: cannot read the state file ({e.strerror or e})") from None
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
    state = State.empty(config, dtype_of(identity["precision"]), "cpu")
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


def load_for(path: str | Path, identity: dict) -> SavedConversation:
    """`load`, refusing a conversation of another model (see `check_model`)."""
    saved = load(path)
    check_model(saved, identity)
    return saved


def check_model(saved: SavedConversation, identity: dict) -> None:
    """Refuse a conversation that belongs to another model, precision or tokenizer."""
    identity = json.loads(json.dumps(identity))  # as it reads back from a file (tuples become lists)
    differs = [key for key in IDENTITY_KEYS if saved.identity.get(key) != identity.get(key)]
    if differs:
        what = {"config": "model", "precision": "precision", "weights_sha256": "weights",
                "tokenizer_sha256": "tokenizer"}
        raise RGChatError(
            f"{saved.path}: this conversation belongs to {saved.identity.get('name', '?')} "
            f"({saved.identity.get('precision', '?')}); it differs from {identity['name']} "
            f"({identity['precision']}) in {', '.join(what[k] for k in differs)}. To continue it with this model, "
            f"run: rgchat state replay {saved.path} --model {identity.get('spec', identity['name'])}")


def restore(session: ChatSession, saved: SavedConversation) -> None:
    """Make `session` continue the saved conversation on the session's device: its state, transcript, mode,
    system text and random stream (the session keeps its own sampling settings)."""
    _restore_rng(session, saved)
    session.template, session.system = saved.template, saved.system
    session.resume(saved.state, saved.transcript, saved.recent)


def replay(saved: SavedConversation, session: ChatSession, same_tokenizer: bool) -> None:
    """Rebuild the saved conversation in `session` (another model or precision) by prefilling its transcript:
    its own token ids when the tokenizer is the same, else its texts. Settings and random stream carry over."""
    session.template, session.system = saved.template, saved.system
    session.replay(saved.transcript, reuse_ids=same_tokenizer)
    if same_tokenizer:
        session.recent.clear()
        session.recent.extend(saved.recent)
    _restore_rng(session, saved)
    settings, sampler = saved.settings, session.sampler
    try:
        for key in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
            setattr(sampler, key, settings[key])
        session.max_tokens, session.stop = int(settings["max_tokens"]), tuple(settings["stop"])
    except (KeyError, TypeError, ValueError):
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
