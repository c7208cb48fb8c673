"""The one way rgchat reads and writes a user's files.

Writing: whole or not at all (a temp file in the same folder, fsync, rename), only over a regular file or
nothing (never a device, FIFO, socket or folder), through symlinks to their target, keeping an existing
file's mode and owner; new private files are created 0600. Temp files a killed process left behind are
removed on the next write to their folder.

Reading: only regular files (a FIFO or device would block or never end), with a size bound enforced while
reading.

Locking: a file held by one process for a long time (a conversation's state file) is locked through a
`.NAME.lock` file beside it, so a second process gets a clear refusal instead of silently losing a turn.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rgchat.errors import RGChatError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, files are still written atomically
    fcntl = None

PRIVATE = 0o600  # conversations and input history
_TEMP = re.compile(r"^\..+\.rgchat-(\d+)-[0-9a-f]+\.tmp$")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# --- reading -------------------------------------------------------------------------------------------------

def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; anything else is refused with one clear line.

    O_NONBLOCK keeps open() from waiting forever on a FIFO; for regular files it changes nothing."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RGChatError(f"{path}: cannot read it ({_why(e)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RGChatError(f"{path}: {_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, the bound enforced while reading (a file's size
    can lie or change)."""
    with open_regular(path) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise RGChatError(f"{path}: cannot read it ({_why(e)})") from None
    if len(data) > limit:
        raise RGChatError(f"{path}: larger than {limit:,} bytes: too large to be {what}")
    return data


def stamp(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of the file now, None when there is none: any write or replacement changes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# --- writing -------------------------------------------------------------------------------------------------

def writable_target(path: str | Path) -> Path:
    """The file a write to `path` must replace: symlinks followed to their target, which must be a regular
    file or not exist yet, in a folder that exists."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise RGChatError(f"{path}: cannot write it ({_why(e)})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RGChatError(f"{path}: a symlink loop, not a file")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RGChatError(f"{path}: {_kind(st.st_mode)}; refusing to write over it")
    if not real.parent.is_dir():
        raise RGChatError(f"{path}: cannot write it (folder {real.parent} does not exist)")
    return real


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files that rgchat processes which no longer run left in `folder` (killed mid-write)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or a number no process can have
        return False
    except OSError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a file to fill; on leaving the block it replaces `path` whole (see `writable_target`), or, if
    the block raised, is deleted and `path` stays as it was. `mode` is for a new file (default: as
    open() creates it); an existing file keeps its own mode and owner."""
    target = writable_target(path)
    folder = target.parent
    remove_stale_temps(folder)
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    tmp = folder / f".{target.name}.rgchat-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     PRIVATE if mode is not None or old is not None else 0o666)
    except OSError as e:
        raise RGChatError(f"{path}: cannot write it ({_why(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if old is not None:
                with contextlib.suppress(OSError):  # only root may give a file to another owner
                    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                        os.fchown(f.fileno(), old.st_uid, old.st_gid)
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            elif mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _sync_folder(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RGChatError(f"{path}: could not write it ({_why(e)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | Path, data: bytes, mode: int | None = None) -> None:
    with atomic_writer(path, mode) as f:
        f.write(data)


def copy_atomically(src: str | Path, dst: str | Path, mode: int | None = None) -> None:
    with open_regular(src) as source, atomic_writer(dst, mode) as f:
        shutil.copyfileobj(source, f, 1 << 24)


# --- locking -------------------------------------------------------------------------------------------------

class FileLock:
    """An exclusive lock on `target`, held through `.NAME.lock` beside it until `release()`. Creating the
    lock file also proves that the folder is writable."""

    def __init__(self, target: Path, fd: int | None, lock_path: Path):
        self.target, self._fd, self._lock_path = target, fd, lock_path

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)  # while still holding it: see `lock`
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(path: str | Path, what: str = "file") -> FileLock:
    """Lock the file `path` writes go to (see `writable_target`), or refuse with one line saying which
    process holds it."""
    target = writable_target(path)
    lock_path = target.with_name(f".{target.name}.lock")
    if fcntl is None:  # pragma: no cover
        return FileLock(target, None, lock_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), PRIVATE)
        except OSError as e:
            raise RGChatError(f"{path}: cannot write in {target.parent} ({_why(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise RGChatError(f"{path}: this {what} is open in another rgchat process"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}; close it there first") from None
        # A holder that released removed the file it locked: if ours is no longer at the path, lock again.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return FileLock(target, fd, lock_path)
