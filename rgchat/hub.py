"""Models from the Hugging Face Hub: aliases, downloads that resume and verify, then conversion into the store.

Everything goes through huggingface_hub (its endpoint, token, offline switch and cache settings apply as
everywhere else): `model_info` lists the files with their sizes and checksums, files already in the user's
HF cache are used from there, and the others are fetched with huggingface_hub's `http_get` into a partial
file of our own that survives an interrupted run (hf_hub_download discards its partial files), so the next
pull continues where the last one stopped. Every file is checked against the Hub's sha256 (git-sha1 for
small files) before anything is converted.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

from rgchat.checkpoint import convert
from rgchat.errors import RGChatError
from rgchat.files import copy_atomically, open_regular, read_bounded, write_atomically
from rgchat.modelfile import sha256_file
from rgchat.progress import Reporter, Task
from rgchat.store import ORIGIN_FILE, TOKENIZER_FILE, entry_for, entry_path, hub_stem, store_dir

ALIASES = {
    "2b": "google/recurrentgemma-2b",
    "2b-it": "google/recurrentgemma-2b-it",
    "9b": "google/recurrentgemma-9b",
    "9b-it": "google/recurrentgemma-9b-it",
}
HUB_PREFIX = "hf:"
CHECKPOINT_FILES = ("config.json", "tokenizer.model")
INDEX_FILE = "model.safetensors.index.json"
DOWNLOADS = ".downloads"  # under the store: partial and finished raw files, until converted


def prebuilt_file(precision: str) -> str:
    """The name of an rgchat model file that a Hub repo may already hold (downloaded as is, not converted)."""
    return f"rgchat-{precision}.safetensors"


@dataclasses.dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """The model's name and store name's stem: the repo's name for Google's repos, OWNER--REPO for any
        other."""
        return hub_stem(self.repo_id)


def parse(spec: str) -> HubModel | None:
    """An alias (2b-it) or hf:OWNER/REPO[@REVISION] as a HubModel; None for anything else (paths, names)."""
    if spec in ALIASES:
        return HubModel(ALIASES[spec])
    if not spec.startswith(HUB_PREFIX):
        return None
    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p.startswith(".") for p in parts):
        raise RGChatError(f"{spec!r}: write a Hub model as hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
    return HubModel(repo_id, revision or None)


# --- errors users meet, in one or two lines ---------------------------------------------------------------

class HubUnreachable(RGChatError):
    """Offline, or the Hub cannot be reached."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Network failures as raised by the HTTP client of the installed huggingface_hub (httpx2 in 2.x,
    httpx before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(model: HubModel, e: Exception) -> RGChatError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    retry = f"rgchat pull {HUB_PREFIX}{model.repo_id}" + (f"@{model.revision}" if model.revision else "")
    page = f"{constants.ENDPOINT}/{model.repo_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status == 403:
        return RGChatError(f"{model.repo_id} is gated: accept its licence at {page} while logged in, give rgchat "
                           f"a token (HF_TOKEN=... or `hf auth login`), then run `{retry}` again")
    if isinstance(e, RevisionNotFoundError):
        return RGChatError(f"{model.repo_id} has no revision {model.revision!r}")
    if isinstance(e, RepositoryNotFoundError):
        return RGChatError(f"no model {model.repo_id!r} on the Hub (or it is private: log in with `hf auth "
                           f"login`); aliases: {', '.join(ALIASES)}, or {HUB_PREFIX}OWNER/REPO")
    if isinstance(e, (OfflineModeIsEnabled, *_network_errors())):
        why = "HF_HUB_OFFLINE is set" if isinstance(e, OfflineModeIsEnabled) else f"cannot reach {constants.ENDPOINT}"
        return HubUnreachable(f"{why}, and {model.repo_id} is neither in the store nor in the HF cache; "
                              "models already in the store still run (`rgchat list`)")
    if isinstance(e, HfHubHTTPError):
        return RGChatError(f"the Hub refused {model.repo_id} ({str(e).strip().splitlines()[0]})")
    return RGChatError(f"downloading {model.repo_id} failed: {e}")


def _hub_call(model: HubModel, fn, *args, **kwargs):
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except (HfHubHTTPError, *_network_errors()) as e:
        raise _hub_error(model, e) from None


# --- pulling ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # large (LFS) files
    git_sha1: str | None  # small files: the git blob id


def _remote_files(model: HubModel) -> tuple[str, dict[str, RemoteFile]]:
    """The commit the revision points at, and every file of the repo with its size and checksum."""
    from huggingface_hub import HfApi

    info = _hub_call(model, HfApi().model_info, model.repo_id, revision=model.revision, files_metadata=True)
    files = {}
    for s in info.siblings or []:
        if Path(s.rfilename).is_absolute() or ".." in Path(s.rfilename).parts:
            continue  # never a path outside the download folder
        lfs = s.lfs
        files[s.rfilename] = RemoteFile(s.rfilename, lfs.size if lfs else (s.size or 0),
                                        lfs.sha256 if lfs else None, None if lfs else s.blob_id)
    return info.sha, files


def _wanted(model: HubModel, files: dict[str, RemoteFile], precision: str, fetch) -> tuple[list[str], bool]:
    """The files to fetch, and whether they are a ready rgchat model file (else a checkpoint to convert)."""
    if prebuilt_file(precision) in files and "tokenizer.model" in files:
        return [prebuilt_file(precision), "tokenizer.model"], True
    missing = [f for f in CHECKPOINT_FILES if f not in files]
    if missing:
        raise RGChatError(f"{model.repo_id} is not a RecurrentGemma checkpoint rgchat can use ({missing[0]} is "
                          f"missing, and there is no {prebuilt_file(precision)})")
    if INDEX_FILE in files:
        from rgchat.checkpoint import MAX_JSON_BYTES

        try:
            index = json.loads(read_bounded(fetch(INDEX_FILE), MAX_JSON_BYTES, "a safetensors index"))
            shards = sorted(set(index.get("weight_map", {}).values()))
        except (ValueError, AttributeError, TypeError) as e:
            raise RGChatError(f"{model.repo_id}: {INDEX_FILE} is not a valid index ({e})") from None
        if not shards or any(s not in files for s in shards):
            raise RGChatError(f"{model.repo_id}: {INDEX_FILE} names shards the repo does not have")
        return [*CHECKPOINT_FILES, INDEX_FILE, *shards], False
    if "model.safetensors" in files:
        return [*CHECKPOINT_FILES, "model.safetensors"], False
    raise RGChatError(f"{model.repo_id} has no safetensors weights")


def _checksum_ok(path: Path, remote: RemoteFile) -> bool:
    if remote.sha256:
        return sha256_file(path) == remote.sha256
    if remote.git_sha1:
        with open_regular(path) as f:
            h = hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size)
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest() == remote.git_sha1
    return True


def _download(model: HubModel, commit: str, remote: RemoteFile, folder: Path, progress: Reporter,
              total: Task | None = None) -> Path:
    """One file into `folder`, continuing a partial download, verified; files in the HF cache that match
    the Hub's checksum and files an earlier pull finished are reused.
    `total` is the bar of the whole pull, advanced along with the file's own."""
    from huggingface_hub import hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    cached = try_to_load_from_cache(model.repo_id, remote.name, revision=commit)
    cached = Path(cached) if isinstance(cached, str) else None
    target = folder / remote.name
    for ready, verified in ((cached, False), (target, True)):  # ours was verified before it took its name
        if (ready is not None and ready.is_file() and ready.stat().st_size == remote.size
                and (verified or _checksum_ok(ready, remote))):
            if total:
                total.advance(remote.size)
            return ready  # in the user's HF cache (a damaged copy there is fetched anew), or finished by us
    partial = target.with_name(target.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    if have > remote.size:
        partial.unlink()
        have = 0
    free = shutil.disk_usage(folder).free
    if remote.size - have > free:
        raise RGChatError(f"not enough disk space in {folder}: {remote.name} needs {(remote.size - have) / 1e9:.2f} GB "
                          f"more, {free / 1e9:.2f} GB free; free some and run again (what is downloaded is kept)")
    tasks = [progress.task(remote.name, remote.size), *([total] if total else [])]
    for task in tasks:
        task.advance(have)
    with open(partial, "ab") as f:
        try:
            _hub_call(model, http_get, hf_hub_url(model.repo_id, remote.name, revision=commit), _CountingFile(f, tasks),
                      resume_size=have, headers=build_hf_headers(), expected_size=remote.size,
                      tqdm_class=_NoBar)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise RGChatError(f"disk full while downloading {remote.name} into {folder}; free space and run "
                                  "again: the download continues where it stopped") from None
            raise RGChatError(f"download of {remote.name} from {model.repo_id} broke off ({e}); run again to "
                              "continue it") from None
    tasks[0].done()
    if not _checksum_ok(partial, remote):
        partial.unlink()
        raise RGChatError(f"{remote.name} from {model.repo_id} does not match the Hub's checksum (damaged in "
                          "transit or on the server); it was deleted, run again to fetch it anew")
    partial.replace(target)
    return target


class _CountingFile:
    """The partial file, reporting every write to the progress display."""

    def __init__(self, f, tasks: list[Task]):
        self.f, self.tasks = f, tasks

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        for task in self.tasks:
            task.advance(len(data))
        return n

    def __getattr__(self, name):  # tell, seek, truncate
        return getattr(self.f, name)


class _NoBar:
    """Silences huggingface_hub's own tqdm bar (rgchat draws its own)."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def pull(model: HubModel, precision: str, keep_original: bool = False, progress: Reporter | None = None,
         log=print) -> Path:
    """Make MODEL at `precision` available in the store and return its model file. Without network access
    when it is already there; otherwise download (resuming), verify, convert and drop the raw files."""
    from rgchat import modelfile

    target = entry_path(entry_for(model.name, precision, f"hf:{model.repo_id}"))
    if target.is_file():
        return target
    try:
        commit, files = _remote_files(model)
    except HubUnreachable:
        snapshot = _cached_snapshot(model)
        if snapshot is None:
            raise
        log(f"rgchat: the Hub is out of reach; converting {model.repo_id} from the HF cache ({snapshot})")
        return convert(snapshot, precision, target, name=model.name,
                       origin={"repo": model.repo_id, "revision": model.revision or "main"}, progress=progress,
                       own_folder=True)
    folder = store_dir() / DOWNLOADS / model.name / commit
    folder.mkdir(parents=True, exist_ok=True)
    progress = progress or Reporter()
    with progress:
        fetch = lambda name: _download(model, commit, files[name], folder, progress)  # noqa: E731
        names, prebuilt = _wanted(model, files, precision, fetch)
        total = progress.task(f"{model.repo_id} (all files)", sum(files[n].size for n in names))
        paths = {name: _download(model, commit, files[name], folder, progress, total) for name in names}
        total.done()
        target.parent.mkdir(parents=True, exist_ok=True)
        if prebuilt:  # an rgchat model file already: check it is one, of this precision, then move it in
            mf = modelfile.open_file(paths[names[0]])
            mf.verify(remember=False)
            if mf.precision != precision:
                raise RGChatError(f"{model.repo_id}: {names[0]} holds {mf.precision} weights, not {precision}")
            copy_atomically(paths["tokenizer.model"], target.parent / TOKENIZER_FILE)
            write_atomically(target.parent / ORIGIN_FILE, f"hf:{model.repo_id}\n".encode())
            _move_or_copy(paths[names[0]], target)
        else:
            source = paths["config.json"].parent
            if any(p.parent != source for p in paths.values()):  # mixed HF cache and fresh files: gather them
                for name, p in paths.items():
                    if p.parent != folder:
                        copy_atomically(p, folder / name)
                source = folder
            log(f"rgchat: converting {model.repo_id} to {precision} into {target.parent} (once)")
            convert(source, precision, target, name=model.name,
                    origin={"repo": model.repo_id, "revision": model.revision or "main", "commit": commit},
                    progress=progress, own_folder=True)
    if keep_original:
        log(f"rgchat: the original files stay in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        for empty in (folder.parent, folder.parent.parent):  # the model's and the downloads folder, if empty
            try:
                empty.rmdir()
            except OSError:
                break
    return target


def _cached_snapshot(model: HubModel) -> Path | None:
    """The repo's folder in the user's HF cache when it holds a whole checkpoint (for offline use)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model.repo_id, revision=model.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if all((folder / f).is_file() for f in CHECKPOINT_FILES) else None


def _move_or_copy(src: Path, dst: Path) -> None:
    """Move a finished download into the store; a file from the user's HF cache is copied (theirs to keep)."""
    from huggingface_hub import constants

    if Path(constants.HF_HUB_CACHE) in src.parents:
        copy_atomically(src, dst)
    else:
        src.replace(dst)


def available() -> list[tuple[str, str, dict[str, int]]]:
    """(alias, repo, bytes per precision) for `rgchat list --available`: sizes of the converted model files."""
    import torch

    from rgchat.config import preset
    from rgchat.model import Griffin
    from rgchat.quant import PRECISIONS, dtype_of, swap_modules_

    sizes = {}
    for shape in ("2b", "9b"):
        sizes[shape] = {}
        for precision in PRECISIONS:
            with torch.device("meta"):
                model = swap_modules_(Griffin(preset(shape), dtype_of(precision)), precision)
            sizes[shape][precision] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return [(alias, repo, sizes[alias.split("-")[0]]) for alias, repo in ALIASES.items()]

