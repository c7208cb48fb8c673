"""The rgchat model file: one safetensors file holding converted (possibly quantized) weights, with metadata
that says what it is (format version, config, precision, source, tokenizer checksum, tensor checksums).

It is written tensor by tensor (the layout is known before any data arrives) and atomically, and read by
mmap: tensors are views of the page cache, so a 2.7 GB model is ready as soon as its checksums pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from rgchat.config import GriffinConfig
from rgchat.errors import RGChatError
from rgchat.files import atomic_writer, open_regular, read_bounded, write_atomically

FORMAT = "rgchat-model"
VERSION = 1
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
           torch.uint8: "U8", torch.int32: "I32"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}
_HASH_PLACEHOLDER = "0" * 64
# Tensor data is mapped straight into the kernels, and some need aligned pointers (torch's
# _weight_int8pack_mm crashes on int8 weights that are not 16-byte aligned), so data starts at a multiple of
# 64 bytes, which aligns every tensor whose predecessors' sizes are multiples of 64 (all of a 2B or 9B model).
ALIGN = 64


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header_bytes(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
                  hashes: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    header: dict = {"__metadata__": {**metadata, "tensor_sha256": json.dumps(hashes, sort_keys=True)}}
    offsets, pos = {}, 0
    for name, (dtype, shape) in layout.items():
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets[name] = (pos, pos + size)
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # whitespace padding (allowed by the format): data starts aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def write(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
          tensors: Iterable[tuple[str, torch.Tensor]], file_format: str = FORMAT) -> None:
    """Write every tensor of `layout` (in any order) to `path`, atomically: a temp file, fsync, rename."""
    placeholder = {name: _HASH_PLACEHOLDER for name in layout}
    meta = {"format": file_format, "format_version": str(VERSION), **metadata}
    header, offsets = _header_bytes(layout, meta, placeholder)
    hashes: dict[str, str] = {}
    with atomic_writer(path) as f:
        f.write(header)
        f.truncate(len(header) + max((end for _, end in offsets.values()), default=0))
        for name, tensor in tensors:
            dtype, shape = layout[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RGChatError(f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected {dtype} {tuple(shape)}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy
            f.seek(len(header) + offsets[name][0])
            f.write(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
        missing = set(layout) - set(hashes)
        if missing:
            raise RGChatError(f"conversion produced no data for {len(missing)} tensors, e.g. {min(missing)}")
        final, _ = _header_bytes(layout, meta, hashes)
        assert len(final) == len(header)  # same length: hashes replace placeholders of equal size
        f.seek(0)
        f.write(final)


@dataclasses.dataclass
class ModelFile:
    """An opened model file: its metadata, and its tensors as zero-copy views of an mmap."""

    path: Path
    metadata: dict[str, str]
    entries: dict[str, dict]
    data_start: int
    buffer: mmap.mmap

    @property
    def config(self) -> GriffinConfig:
        return GriffinConfig.from_dict(json.loads(self.metadata["config"]))

    @property
    def precision(self) -> str:
        return self.metadata["precision"]

    @property
    def source(self) -> dict:
        return json.loads(self.metadata.get("source", "{}"))

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.data_start + begin)
        if flat.data_ptr() % ALIGN:  # a tensor after odd-sized ones (tiny models), or an older file
            flat = flat.clone()
        return flat.view(entry["shape"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.entries}

    def stamp(self) -> dict:
        """Identifies the file as it is on disk now: any write changes it."""
        st = self.path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}

    def verify(self, threads: int = 2, remember: bool = True, force: bool = False) -> None:
        """Check every tensor against its sha256 in the metadata (hashing in parallel threads).

        Hashing reads every byte of the file (docs/performance.md), so a pass is remembered in FILE.verified
        (size, mtime, inode); later loads of the unchanged file skip the hashing (unless `force`). Any write
        to the file changes its mtime; damage that keeps it (bit rot) is found only by a forced check
        (`rgchat verify`).
        """
        stamp_file = self.path.with_name(self.path.name + ".verified")
        try:
            if remember and not force and json.loads(read_bounded(stamp_file, 4096)) == self.stamp():
                return
        except (RGChatError, ValueError):
            pass
        self._verify_all(threads)
        if remember:
            try:
                write_atomically(stamp_file, json.dumps(self.stamp()).encode())
            except RGChatError:  # a read-only folder: verify again next time
                pass

    def _verify_all(self, threads: int) -> None:
        expected = json.loads(self.metadata["tensor_sha256"])
        if set(expected) != set(self.entries):
            raise RGChatError(f"{self.path}: the checksum list does not match the tensors: file damaged")
        with memoryview(self.buffer) as view:

            def digest(name: str) -> str:
                begin, end = self.entries[name]["data_offsets"]
                return hashlib.sha256(view[self.data_start + begin:self.data_start + end]).hexdigest()

            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                for name, got in zip(expected, pool.map(digest, expected)):
                    if got != expected[name]:
                        raise RGChatError(f"{self.path}: tensor {name} fails its checksum: the file is damaged; "
                                          "convert or download it again")


def _valid_entry(entry) -> bool:
    """A header entry whose dtype is known and whose byte range matches its shape."""
    try:
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin, end = (int(v) for v in entry["data_offsets"])
        numel = torch.Size([int(d) for d in entry["shape"]]).numel()
    except (KeyError, TypeError, ValueError, RuntimeError):
        return False
    return 0 <= begin <= end and end - begin == numel * torch.empty(0, dtype=dtype).element_size()


def _read_header(path: Path, f) -> tuple[dict, int, int]:
    """(header, where the data starts, file size), or one clear error."""
    try:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise RGChatError(f"{path}: too short to be an rgchat model file")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, 100 << 20):
            raise RGChatError(f"{path}: not an rgchat model file (bad header length)")
        header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RGChatError(f"{path}: not a readable rgchat model file ({e})") from None
    if not isinstance(header, dict):
        raise RGChatError(f"{path}: not an rgchat model file (bad header)")
    return header, 8 + header_len, size


def _checked_metadata(path: Path, header: dict, file_format: str) -> dict[str, str]:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or metadata.get("format") != file_format:
        raise RGChatError(f"{path}: a safetensors file, but not an rgchat model file "
                          "(convert checkpoints with `rgchat convert`)")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > VERSION:
        raise RGChatError(f"{path}: written by a newer rgchat (model format {version}); upgrade rgchat")
    if version < 1 or not {"config", "precision", "tensor_sha256"} <= set(metadata):
        raise RGChatError(f"{path}: rgchat model file with missing or bad metadata")
    return metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """A model file's metadata alone, also when its tensor data is damaged or cut short (to tell where a
    damaged store entry came from)."""
    path = Path(path)
    with open_regular(path) as f:
        header, _, _ = _read_header(path, f)
    return _checked_metadata(path, header, FORMAT)


def open_file(path: str | Path, file_format: str = FORMAT) -> ModelFile:
    """Open and sanity-check a model file (header, format, version, sizes); data is mapped, not read."""
    path = Path(path)
    with open_regular(path) as f:
        header, data_start, size = _read_header(path, f)
        try:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise RGChatError(f"{path}: not a readable rgchat model file ({e})") from None
    metadata = _checked_metadata(path, header, file_format)
    try:  # every structured field parses now, so later use cannot fail half way
        GriffinConfig.from_dict(json.loads(metadata["config"]))
        hashes = json.loads(metadata["tensor_sha256"])
        json.loads(metadata.get("source", "{}"))
        if not isinstance(hashes, dict):
            raise ValueError("tensor_sha256 is not an object")
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, RGChatError) as e:
        raise RGChatError(f"{path}: rgchat model file with damaged metadata ({e})") from None
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise RGChatError(f"{path}: damaged header entry for tensor {name!r}")
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if data_start + end != size:
        raise RGChatError(f"{path}: truncated or padded ({size} bytes, header says {data_start + end})")
    return ModelFile(path, metadata, header, data_start, buffer)
