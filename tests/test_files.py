"""Atomic writes: the target is whole afterwards, or untouched when writing fails; only regular files are
written over or read; locks between processes."""

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rgchat import files
from rgchat.errors import RGChatError


def test_copy_and_write_replace_the_target(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")
    files.copy_atomically(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    files.write_atomically(dst, b"written")
    assert dst.read_bytes() == b"written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.write_bytes(b"old")

    def fail_with(error):
        def fsync(fd):
            raise error
        return fsync

    monkeypatch.setattr(files.os, "fsync", fail_with(OSError(28, "No space left on device")))
    with pytest.raises(RGChatError, match="No space left"):
        files.write_atomically(dst, b"new")
    monkeypatch.setattr(files.os, "fsync", fail_with(KeyboardInterrupt()))  # Ctrl-C half way: the same
    with pytest.raises(KeyboardInterrupt):
        files.copy_atomically(dst, dst.with_name("other"))
    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(dst, b"new")
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


# --- what may be written over ------------------------------------------------------------------------------

WRITERS = {
    "write": lambda dst, src: files.write_atomically(dst, b"new"),
    "copy": lambda dst, src: files.copy_atomically(src, dst),
    "writer": lambda dst, src: _write_with_writer(dst),
}


def _write_with_writer(dst):
    with files.atomic_writer(dst) as f:
        f.write(b"new")


@pytest.mark.parametrize("how", sorted(WRITERS))
def test_only_regular_files_are_written_over(tmp_path, how):
    src = tmp_path / "src"
    src.write_bytes(b"new")
    fifo, folder = tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    (folder / "inside").write_bytes(b"kept")
    for target, still in ((fifo, stat.S_ISFIFO), (folder, stat.S_ISDIR), (Path("/dev/null"), stat.S_ISCHR)):
        with pytest.raises(RGChatError, match="refusing to write over it") as e:
            WRITERS[how](target, src)
        assert str(target) in str(e.value)
        assert still(os.lstat(target).st_mode)
    assert (folder / "inside").read_bytes() == b"kept" and os.listdir(folder) == ["inside"]
    assert sorted(os.listdir(tmp_path)) == ["fifo", "folder", "src"]  # no temp file left


def test_writes_go_through_symlinks_to_their_target(tmp_path):
    real = tmp_path / "real.txt"
    real.write_bytes(b"old")
    link = tmp_path / "link.txt"
    link.symlink_to("real.txt")  # relative, as users make them
    files.write_atomically(link, b"via the link")
    assert link.is_symlink() and os.readlink(link) == "real.txt"
    assert real.read_bytes() == b"via the link" and not real.is_symlink()
    src = tmp_path / "src"
    src.write_bytes(b"copied")
    files.copy_atomically(src, link)
    assert os.readlink(link) == "real.txt" and real.read_bytes() == b"copied"

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "sub-target")
    files.write_atomically(dangling, b"created")
    assert dangling.is_symlink() and os.readlink(dangling) == str(tmp_path / "sub-target")
    assert (tmp_path / "sub-target").read_bytes() == b"created"
    assert sorted(os.listdir(tmp_path)) == ["dangling", "link.txt", "real.txt", "src", "sub-target"]


def test_symlink_loops_and_missing_folders_are_refused(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(RGChatError, match="symlink loop"):
        files.write_atomically(loop, b"x")
    assert os.readlink(loop) == "loop"
    with pytest.raises(RGChatError, match=r"folder .*missing does not exist"):
        files.write_atomically(tmp_path / "missing" / "f", b"x")
    assert sorted(os.listdir(tmp_path)) == ["loop"]


def test_modes_are_kept_or_set(tmp_path):
    for mode in (0o600, 0o640, 0o755):
        f = tmp_path / f"existing-{mode:o}"
        f.write_bytes(b"old")
        f.chmod(mode)
        files.write_atomically(f, b"new")
        assert stat.S_IMODE(f.stat().st_mode) == mode and f.read_bytes() == b"new"
        files.write_atomically(f, b"newer", mode=files.PRIVATE)  # `mode` is for new files only
        assert stat.S_IMODE(f.stat().st_mode) == mode and f.read_bytes() == b"newer"

    files.write_atomically(tmp_path / "private", b"secret", mode=files.PRIVATE)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    old_umask = os.umask(0o027)
    try:
        files.write_atomically(tmp_path / "plain", b"x")
        files.copy_atomically(tmp_path / "plain", tmp_path / "copy")
        files.write_atomically(tmp_path / "explicit", b"x", mode=0o644)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~0o027
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o666 & ~0o027
    assert stat.S_IMODE((tmp_path / "explicit").stat().st_mode) == 0o644


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temp_files_of_dead_processes_are_removed_on_the_next_write(tmp_path):
    dead = tmp_path / f".model.safetensors.rgchat-{_dead_pid()}-abcd1234.tmp"
    mine = tmp_path / f".state.rgchat-{os.getpid()}-0badcafe.tmp"
    parent = tmp_path / f".other.rgchat-{os.getppid()}-12345678.tmp"  # a live process
    unrelated = [tmp_path / ".x.123.tmp", tmp_path / "notes.tmp", tmp_path / "x.rgchat-1-ab.tmp"]
    for f in (dead, mine, parent, *unrelated):
        f.write_bytes(b"partial")
    files.write_atomically(tmp_path / "target", b"new")
    assert not dead.exists()
    assert all(f.read_bytes() == b"partial" for f in (mine, parent, *unrelated))
    assert (tmp_path / "target").read_bytes() == b"new"


def test_a_temp_name_with_an_impossible_pid_does_not_break_writes(tmp_path):
    (tmp_path / ".x.rgchat-2147483648-abcd1234.tmp").write_bytes(b"junk")
    files.write_atomically(tmp_path / "target", b"new")
    assert (tmp_path / "target").read_bytes() == b"new"


# --- reading -----------------------------------------------------------------------------------------------

def test_read_bounded_reads_regular_files_exactly(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(range(256)) * 4)
    assert files.read_bounded(f, 1024) == bytes(range(256)) * 4
    assert files.read_bounded(f, 5000) == bytes(range(256)) * 4
    with pytest.raises(RGChatError, match="too large") as e:
        files.read_bounded(f, 1023, "a config.json")
    assert "1,023 bytes" in str(e.value) and "a config.json" in str(e.value)
    (tmp_path / "empty").write_bytes(b"")
    assert files.read_bounded(tmp_path / "empty", 0) == b""
    with pytest.raises(RGChatError, match="cannot read it"):
        files.read_bounded(tmp_path / "missing", 10)
    with pytest.raises(RGChatError, match="a character device, not a regular file"):
        files.read_bounded("/dev/zero", 10)
    with pytest.raises(RGChatError, match="a folder, not a regular file"):
        files.read_bounded(tmp_path, 10)


def test_read_bounded_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []

    def read():
        for call in (lambda: files.read_bounded(fifo, 10), lambda: files.copy_atomically(fifo, tmp_path / "copy")):
            try:
                outcome.append(call())
            except RGChatError as e:
                outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the reader before failing, so nothing is left hanging
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_bounded blocked on a FIFO with no writer")
    assert len(outcome) == 2
    for error in outcome:
        assert isinstance(error, RGChatError) and "a FIFO, not a regular file" in str(error)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["fifo"]


# --- locking -----------------------------------------------------------------------------------------------

TRY_LOCK = """
import sys
from rgchat import files
from rgchat.errors import RGChatError
try:
    files.lock(sys.argv[1], "conversation").release()
except RGChatError as e:
    print(e)
    sys.exit(3)
print("locked")
"""


def _lock_elsewhere(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)], capture_output=True, text=True, timeout=60)


def test_a_locked_file_is_refused_to_another_process_until_released(tmp_path):
    target = tmp_path / "trip.state"
    lock_file = tmp_path / ".trip.state.lock"
    held = files.lock(target, "conversation")
    assert lock_file.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    other = _lock_elsewhere(target)
    assert other.returncode == 3, other.stderr
    assert "this conversation is open in another rgchat process" in other.stdout
    assert f"(pid {os.getpid()})" in other.stdout
    with pytest.raises(RGChatError, match=f"open in another rgchat process \\(pid {os.getpid()}\\)"):
        files.lock(target)  # a second lock in the same process is refused as well
    held.release()
    held.release()  # twice is harmless
    assert not lock_file.exists() and not target.exists()
    again = _lock_elsewhere(target)
    assert (again.returncode, again.stdout) == (0, "locked\n"), again.stderr
    assert not lock_file.exists()
    with files.lock(target) as mine:
        assert mine.target == target and lock_file.exists()
    assert os.listdir(tmp_path) == []


def test_a_lock_follows_symlinks_and_refuses_non_files(tmp_path):
    real = tmp_path / "real.state"
    real.write_bytes(b"x")
    (tmp_path / "link.state").symlink_to("real.state")
    with files.lock(tmp_path / "link.state"):
        assert (tmp_path / ".real.state.lock").exists()
        with pytest.raises(RGChatError, match="open in another rgchat process"):
            files.lock(real)
    with pytest.raises(RGChatError, match="refusing to write over it"):
        files.lock(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["link.state", "real.state"]
