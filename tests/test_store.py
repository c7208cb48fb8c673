from pathlib import Path

from rgchat.store import store_dir


def test_store_dir_honours_rgchat_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RGCHAT_HOME", str(tmp_path))
    assert store_dir() == tmp_path
    monkeypatch.delenv("RGCHAT_HOME")
    assert store_dir().name == "rgchat" and isinstance(store_dir(), Path)
