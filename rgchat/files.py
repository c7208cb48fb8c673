"""Files written whole or not at all: a temp file in the same folder, fsync, then a rename over the target,
so a crash, Ctrl-C or a full disk leaves the previous file (or none) behind, never half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rgchat.errors import RGChatError


def _replace_from_temp(path: Path, fill) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RGChatError(f"{path}: could not write it ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: bytes) -> None:
    _replace_from_temp(Path(path), lambda f: f.write(data))


def copy_atomically(src: str | Path, dst: str | Path) -> None:
    with open(src, "rb") as source:
        _replace_from_temp(Path(dst), lambda f: shutil.copyfileobj(source, f, 1 << 24))
