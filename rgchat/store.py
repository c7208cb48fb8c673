"""The local model store: one folder per converted model under platformdirs' user data folder (or
$RGCHAT_HOME), holding model.safetensors and tokenizer.model.

Naming rule: an entry is named STEM-PRECISION after its source (the Hub repo, or the checkpoint's folder or
.pt file); when that name already holds weights from another source, the next free STEM-N-PRECISION is
used. An entry is only ever replaced by a conversion of its own source.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import platformdirs

from rgchat.errors import RGChatError

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
# A model file downloaded as is records the source its uploader converted it from; this file beside it says
# where the entry's weights came from instead.
ORIGIN_FILE = "origin"


def store_dir() -> Path:
    root = Path(os.environ.get("RGCHAT_HOME") or platformdirs.user_data_dir("rgchat"))
    if root.exists() and not root.is_dir():
        raise RGChatError(f"the model store {root} is not a folder (set RGCHAT_HOME to a folder)")
    return root


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    path: Path  # the model file
    precision: str  # "?" when damaged
    size: int  # bytes on disk, tokenizer included
    source: str
    damage: str | None = None  # why the entry cannot be used, if it cannot


def entry_path(name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise RGChatError(f"invalid model name {name!r}")
    return store_dir() / name / MODEL_FILE


def source_key(source: dict) -> str:
    """What identifies where an entry's weights came from: its Hub repo, or its checkpoint's path."""
    return f"hf:{source['repo']}" if "repo" in source else str(source.get("path", ""))


def _recorded_key(path: Path) -> str | None:
    """The source key of the entry whose model file is `path`: its origin file's, else what the model file
    records; None when neither can be read."""
    from rgchat import modelfile
    from rgchat.files import read_bounded

    try:
        if os.path.lexists(origin := path.parent / ORIGIN_FILE):
            return read_bounded(origin, 4096, "an origin file").decode("utf-8").strip()
        return source_key(json.loads(modelfile.read_metadata(path).get("source", "{}")))
    except (RGChatError, ValueError, AttributeError):
        return None


def entry_for(stem: str, precision: str, key: str) -> str:
    """The entry name for weights from source `key` at `precision` (see the naming rule above): the entry
    that already holds them, else the first name without a model file (a folder left by a failed conversion
    is free)."""
    def name(n: int) -> str:
        return f"{stem}-{precision}" if n == 1 else f"{stem}-{n}-{precision}"

    pattern = re.compile(rf"{re.escape(stem)}(?:-[0-9]+)?-{re.escape(precision)}")
    root = store_dir()
    for folder in sorted(os.listdir(root) if root.is_dir() else []):
        if pattern.fullmatch(folder) and _recorded_key(entry_path(folder)) == key:
            return folder
    return name(next(n for n in itertools.count(1) if not os.path.lexists(entry_path(name(n)))))


def hub_stem(repo_id: str) -> str:
    """The store-name stem of a Hub repo OWNER/REPO: REPO for Google's repos, OWNER--REPO for any other."""
    owner, repo = repo_id.split("/")
    return repo if owner == "google" else f"{owner}--{repo}"


def source_name(path: Path) -> str:
    """A checkpoint's name: its Hub repo's stem for a snapshot in a Hugging Face cache
    (.../models--OWNER--REPO/snapshots/COMMIT[/FILE]), else its folder's name, or the .pt file's stem
    ("2b-it" for 2b-it.pt)."""
    folder = path.parent if path.is_file() else path
    for snapshot in (folder, folder.resolve()):
        repo_folder = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo_folder.name.startswith("models--"):
            owner, sep, repo = repo_folder.name[len("models--"):].partition("--")
            if sep and owner and repo:
                return hub_stem(f"{owner}/{repo}")
    return path.stem if path.is_file() else path.name


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def read_entry(name: str) -> Entry:
    from rgchat import modelfile

    path = entry_path(name)
    mf = modelfile.open_file(path)
    source = mf.source
    origin = f"hf:{source['repo']}@{source.get('commit', '?')[:12]}" if "repo" in source else source.get("path", "?")
    return Entry(name, path, mf.precision, _folder_size(path.parent), origin)


def list_entries() -> list[Entry]:
    """Every model in the store, by name; an entry that cannot be read is listed with what is wrong."""
    root = store_dir()
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            entries.append(read_entry(folder.name))
        except RGChatError as e:
            entries.append(Entry(folder.name, folder / MODEL_FILE, "?", _folder_size(folder), "?", str(e)))
    return entries


def remove(name: str) -> None:
    """Delete a store entry (a symlinked entry loses the link, never what it points to)."""
    folder = entry_path(name).parent
    try:
        if folder.is_symlink():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)
        else:
            raise RGChatError(f"no model named {name!r} in {store_dir()} (see `rgchat list`)")
    except OSError as e:
        raise RGChatError(f"{folder}: could not remove it ({e.strerror or e})") from None


def model_file(path: Path) -> Path | None:
    """The model file that `path` names directly: a model file, or a store folder holding one."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / MODEL_FILE).exists() and not (path / "config.json").exists():
        return path / MODEL_FILE
    return None


def find(model: str) -> Path:
    """The model file of MODEL as `show` and `verify` take it: a model file, a store folder, a store name."""
    path = Path(model).expanduser()
    if (found := model_file(path)) is not None:
        return found
    if "/" in model or model.startswith(".") or path.exists():
        raise RGChatError(f"{path}: not an rgchat model file or store folder")
    if os.path.lexists(entry_path(model)):
        return entry_path(model)
    raise RGChatError(f"no model named {model!r} in {store_dir()} (see `rgchat list`)")


