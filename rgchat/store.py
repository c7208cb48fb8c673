"""The local model store: one folder per converted model under platformdirs' user data folder (or
$RGCHAT_HOME), holding model.safetensors and tokenizer.model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import platformdirs

from rgchat.errors import RGChatError

MODEL_FILE = "model.safetensors"


def store_dir() -> Path:
    return Path(os.environ.get("RGCHAT_HOME") or platformdirs.user_data_dir("rgchat"))


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    path: Path  # the model file
    precision: str
    size: int  # bytes on disk, tokenizer included
    source: str


def entry_name(source: Path, precision: str) -> str:
    """The store name of a checkpoint converted to `precision`: recurrentgemma-2b-it-int8."""
    from rgchat.checkpoint import source_name

    return f"{source_name(source)}-{precision}"


def entry_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise RGChatError(f"invalid model name {name!r}")
    return store_dir() / name / MODEL_FILE


def read_entry(name: str) -> Entry:
    from rgchat import modelfile

    path = entry_path(name)
    mf = modelfile.open_file(path)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    source = mf.source
    origin = f"hf:{source['repo']}@{source.get('commit', '?')[:12]}" if "repo" in source else source.get("path", "?")
    return Entry(name, path, mf.precision, size, origin)


def list_entries() -> list[Entry]:
    """Every model in the store, by name; folders without a readable model file are skipped."""
    root = store_dir()
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / MODEL_FILE).is_file():
            try:
                entries.append(read_entry(folder.name))
            except RGChatError:
                continue
    return entries


def remove(name: str) -> None:
    folder = entry_path(name).parent
    if not folder.is_dir():
        raise RGChatError(f"no model named {name!r} in {store_dir()} (see `rgchat list`)")
    shutil.rmtree(folder)


def _same_source(path: Path, source: Path) -> bool:
    """Whether the model file at `path` was converted from `source` as it is now (sizes and mtimes)."""
    from rgchat import modelfile

    try:
        recorded = modelfile.open_file(path).source
    except RGChatError:
        return False
    if recorded.get("path") != str(source.resolve()):
        return False
    folder = source.parent if source.is_file() else source
    for name, info in recorded.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != info["size"] or f.stat().st_mtime_ns != info["mtime_ns"]:
            return False
    return True


def resolve(model: str, precision: str, log=print) -> Path:
    """The model file to run for MODEL: a model file, a store name, a checkpoint that is converted into the
    store at `precision` the first time it is met (and again if its files change), or a Hub alias or
    hf:OWNER/REPO that is downloaded and converted the first time (no network after that)."""
    from rgchat import hub
    from rgchat.checkpoint import Checkpoint, convert

    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / MODEL_FILE).is_file() and not (path / "config.json").exists():
        return path / MODEL_FILE
    if path.exists():
        ckpt = Checkpoint(path)
        target = entry_path(entry_name(ckpt.path, precision))
        if not (target.is_file() and _same_source(target, path)):
            log(f"rgchat: converting {path} to {precision} into {target.parent} (once)")
            convert(ckpt.path, precision, target)
        return target
    remote = hub.parse(model)
    if remote is not None:
        return hub.pull(remote, precision, log=log)
    if "/" in model or model.startswith("."):
        raise RGChatError(f"{path}: no such file or directory")
    if entry_path(model).is_file():
        return entry_path(model)
    raise RGChatError(f"no model {model!r}: not a path, not in the store {store_dir()} (see `rgchat list`), and "
                      f"not a Hub alias ({', '.join(hub.ALIASES)}) or hf:OWNER/REPO")


def show_lines(model: str) -> list[tuple[str, str]]:
    """What `rgchat show` prints: identity, config, precision, sizes, and the state a conversation needs."""
    import torch

    from rgchat import modelfile
    from rgchat.quant import dtype_of
    from rgchat.state import State

    path = Path(model).expanduser()
    if not path.is_file():
        path = entry_path(model)
        if not path.is_file():
            raise RGChatError(f"no model named {model!r} in {store_dir()} (see `rgchat list`)")
    mf = modelfile.open_file(path)
    config = mf.config
    with torch.device("meta"):
        state_bytes = State.empty(config, dtype_of(mf.precision), "meta").nbytes
    params = sum(torch.Size(e["shape"]).numel() for e in mf.entries.values())
    source = mf.source
    return [
        ("name", mf.metadata.get("name", "?")),
        ("file", str(path)),
        ("precision", mf.precision),
        ("size on disk", f"{path.stat().st_size:,} bytes"),
        ("stored values", f"{params:,}"),
        ("config", json.dumps(config.to_dict())),
        ("layers", f"{config.num_layers} ({config.block_types.count('recurrent')} recurrent, "
                   f"{config.block_types.count('attention')} attention)"),
        ("state size", f"{state_bytes:,} bytes at any length"),
        ("source", f"{source.get('path', '?')} ({source.get('kind', '?')})"),
        ("tokenizer sha256", mf.metadata.get("tokenizer_sha256", "?")),
        ("written by", f"rgchat {mf.metadata.get('rgchat_version', '?')}, format {mf.metadata['format_version']}"),
    ]
