"""Atomic writes: the target is whole afterwards, or untouched when writing fails."""

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
