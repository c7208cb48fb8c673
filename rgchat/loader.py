"""From the MODEL argument a user typed to a model ready on its device, in one place: a model file or store
name as it is; a checkpoint converted into the store once (again if its files change or its entry is
damaged); a Hub alias or hf:OWNER/REPO downloaded and converted once; then the model file read (mmap, the
tensors verified once), the int4 pack cache used or written, the weights readied for the device, and the
tokenizer checked against the one the weights were converted with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from pathlib import Path

import torch

from rgchat import hub, modelfile
from rgchat.checkpoint import Checkpoint, convert
from rgchat.errors import RGChatError
from rgchat.model import Griffin, ready_for_device_
from rgchat.quant import (DEFAULT_PRECISION, check_precision, dtype_of, int4_runs_native, packed_tensors,
                          runs_from_copies, swap_modules_)
from rgchat.store import TOKENIZER_FILE, entry_for, entry_path, model_file, source_name, store_dir
from rgchat.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    """A network with its tokenizer, read from the store (or converted into it on first use)."""

    model: Griffin
    tokenizer: Tokenizer
    name: str
    precision: str
    weights_sha256: str  # over the model file's per-tensor checksums: names these exact weights
    tokenizer_sha256: str
    spec: str  # how the user named it (store name, file or checkpoint path)

    @property
    def instruction_tuned(self) -> bool:
        return self.name.endswith("-it")

    def identity(self) -> dict:
        """What a saved conversation must match to be resumed with this model."""
        return {"name": self.name, "spec": self.spec, "config": self.model.config.to_dict(),
                "precision": self.precision, "weights_sha256": self.weights_sha256,
                "tokenizer_sha256": self.tokenizer_sha256}


def load(spec: str, precision: str | None, device: torch.device, log=print) -> LoadedModel:
    """MODEL as `rgchat run` takes it: a store name, a model file, or a checkpoint (converted once to
    `precision`, by default int8)."""
    wanted = precision or DEFAULT_PRECISION
    path = resolve(spec, wanted, log=log)
    model, mf = load_file(path, str(device))
    if precision and mf.precision != precision:
        raise RGChatError(f"{path} holds {mf.precision} weights, not {precision}: "
                          f"convert the original checkpoint with --precision {precision}")
    tokenizer_path = path.parent / TOKENIZER_FILE
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RGChatError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} pieces but "
                          f"the model only {model.config.vocab_size}: wrong tokenizer for this model")
    tokenizer_sha256 = modelfile.sha256_file(tokenizer_path)
    if mf.metadata.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise RGChatError(f"{tokenizer_path}: not the tokenizer {path} was converted with; convert the "
                          "checkpoint again (`rgchat run CHECKPOINT` does it) or put its tokenizer.model back")
    weights = hashlib.sha256(mf.metadata["tensor_sha256"].encode()).hexdigest()
    return LoadedModel(model, tokenizer, mf.metadata.get("name", path.parent.name), mf.precision, weights,
                       tokenizer_sha256, spec)


def resolve(model: str, precision: str, log=print) -> Path:
    """The model file to run for MODEL: a model file, a store name, a checkpoint that is converted into the
    store at `precision` the first time it is met (and again if its files change or its entry is damaged),
    or a Hub alias or hf:OWNER/REPO that is downloaded and converted the first time (no network after)."""
    path = Path(model).expanduser()
    if (found := model_file(path)) is not None:
        return found
    if path.exists():
        ckpt = Checkpoint(path)
        target = checkpoint_entry(ckpt, precision)
        if not _up_to_date(target, ckpt.path, log):
            log(f"rgchat: converting {path} to {precision} into {target.parent} (once)")
            convert(ckpt.path, precision, target, own_folder=True)
        return target
    remote = hub.parse(model)
    if remote is not None:
        return hub.pull(remote, precision, log=log)
    if "/" in model or model.startswith("."):
        raise RGChatError(f"{path}: no such file or directory")
    if os.path.lexists(entry_path(model)):
        return entry_path(model)
    raise RGChatError(f"no model {model!r}: not a path, not in the store {store_dir()} (see `rgchat list`), and "
                      f"not a Hub alias ({', '.join(hub.ALIASES)}) or hf:OWNER/REPO")


def checkpoint_entry(ckpt: Checkpoint, precision: str) -> Path:
    """The model file in the store for the checkpoint `ckpt` at `precision`."""
    return entry_path(entry_for(source_name(ckpt.path), precision, str(ckpt.path.resolve())))


def _up_to_date(target: Path, source: Path, log) -> bool:
    """Whether the entry at `target` holds an intact conversion of `source` as it is now (its files' sizes and
    mtimes as recorded; tensors verified, or remembered as verified since the file last changed)."""
    if not target.is_file():
        return False
    try:
        mf = modelfile.open_file(target)
        recorded = mf.source
        folder = source.parent if source.is_file() else source
        for name, info in recorded.get("files", {}).items():
            st = (folder / name).stat()
            if st.st_size != info["size"] or st.st_mtime_ns != info["mtime_ns"]:
                return False
        mf.verify()
        tokenizer = target.parent / TOKENIZER_FILE
        if modelfile.sha256_file(tokenizer) != mf.metadata.get("tokenizer_sha256"):
            raise RGChatError(f"{tokenizer} is not the tokenizer it was converted with")
    except RGChatError as e:
        log(f"rgchat: {target.parent.name} is damaged ({e}); converting it again")
        return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def load_file(path: str | Path, device: str = "cpu") -> tuple[Griffin, modelfile.ModelFile]:
    """Build the network from a model file: tensors are mmap views (copied only to move off the CPU)."""
    mf = modelfile.open_file(path)
    mf.verify()
    precision = check_precision(mf.precision)
    with torch.device("meta"):
        model = swap_modules_(Griffin(mf.config, dtype_of(precision)), precision)
    try:
        weights = {name: t.to(device) for name, t in mf.tensors().items()}
        model.load_state_dict(weights, assign=True, strict=True)
    except RuntimeError as e:
        raise RGChatError(f"{mf.path}: tensors do not match the model it describes ({str(e).splitlines()[0]})")
    cache = mf.path.with_name(f"{mf.path.name}.int4pack-torch-{torch.__version__}")
    repacks = precision == "int4" and device == "cpu" and not int4_runs_native()
    packed = _read_pack_cache(cache, mf) if repacks else None
    ready_for_device_(model, packed)
    if repacks and packed is None:
        _write_pack_cache(cache, mf, model)
    if (device != "cpu" or repacks or runs_from_copies(model)) and hasattr(mf.buffer, "madvise"):
        # The weights now live in copies (on the device, or repacked), so the file's pages may go; the few
        # rows still read from it (int4 embedding lookups) fault back in from the page cache.
        mf.buffer.madvise(mmap.MADV_DONTNEED)
    return model.eval(), mf


# int4 on a CPU without the native kernel runs from torch's own packed layout, which depends on the torch
# version and takes seconds to build for a 2B model, so the packed tensors are cached beside the model file,
# tied to its exact state. The native kernel reads the file's own layout.
PACK_CACHE_FORMAT = "rgchat-int4-pack-cache"


def _model_stamp(mf: modelfile.ModelFile) -> str:
    return json.dumps([mf.stamp(), mf.metadata["tensor_sha256"]], sort_keys=True)


def _read_pack_cache(path: Path, mf: modelfile.ModelFile) -> dict[str, torch.Tensor] | None:
    try:
        cache = modelfile.open_file(path, PACK_CACHE_FORMAT)
        if cache.metadata.get("model_stamp") != _model_stamp(mf):
            return None
        cache.verify()
        return cache.tensors()
    except (RGChatError, OSError):
        return None  # missing, stale or damaged: pack again


def _write_pack_cache(path: Path, mf: modelfile.ModelFile, model: Griffin) -> None:
    tensors = packed_tensors(model)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    metadata = {"config": mf.metadata["config"], "precision": "int4", "model_stamp": _model_stamp(mf)}
    try:
        modelfile.write(path, layout, metadata, tensors.items(), PACK_CACHE_FORMAT)
    except RGChatError:  # a read-only folder: pack again next time
        pass


def verify(path: Path) -> list[tuple[str, str]]:
    """Hash every tensor of the model file `path` and its tokenizer against the checksums recorded at
    conversion, whatever the `.verified` stamp says; raises on the first mismatch. Returns what was checked."""
    mf = modelfile.open_file(path)
    mf.verify(force=True)
    tokenizer = path.parent / TOKENIZER_FILE
    recorded = mf.metadata.get("tokenizer_sha256")
    if recorded and modelfile.sha256_file(tokenizer) != recorded:
        raise RGChatError(f"{tokenizer}: not the tokenizer {path} was converted with (checksum differs)")
    return [("file", str(path)), ("tensors", f"{len(mf.entries)} match their sha256"),
            ("tokenizer", "matches its sha256" if recorded else "no checksum recorded")]
