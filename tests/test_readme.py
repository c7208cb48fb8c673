"""The README's path for a newcomer, walked as a new user walks it: a fresh copy of the tree and a fresh
virtual environment, the install command exactly as written, then every command of the quick start. No
test reaches the internet: the Hub's address points at a closed loopback port, so each command that needs
a download must end in one clear line and exit 1. The Python snippet runs against `rgchat serve` of a tiny
model file, installed the same way."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CYCLES, tiny_model, write_hf_folder
from rgchat.checkpoint import convert

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README's `## title` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"the README has no '## {title}' section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, without the comments after them."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_ci_runs_the_readme_test_command():
    [block] = blocks(section("Test"), "sh")
    assert commands(block) == ["python3 -m pytest -q tests"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == commands(block)[0]


def checkout(target: Path) -> Path:
    """The tracked files of this tree, as a fresh clone would hold them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_a_newcomer_installs_and_follows_the_quick_start(tmp_path, tokenizer_path):
    tree = checkout(tmp_path / "rgchat")
    # torch comes from the system's site packages: it is the one prerequisite the README installs apart
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path / 'venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "NO_COLOR": "1", "PYTHONNOUSERSITE": "1"}
    for name in ("RGCHAT_HOME", "HF_HOME", "HF_TOKEN", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
                 "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)

    def shell(command: str, cwd: Path = home, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    [install] = blocks(section("Install"), "sh")
    for command in commands(install):
        done = shell(command, cwd=tree, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    where = shell("python3 -c 'import rgchat; print(rgchat.__file__)'").stdout.strip()
    assert Path(where).is_relative_to(tree), where  # the fresh install, not the tree under test

    start = section("Quick start")
    [shell_block] = blocks(start, "sh")
    ran = []
    for command in commands(shell_block):
        done = shell(command)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        if command.startswith("rgchat doctor"):
            assert done.returncode == 0 and "rgchat" in done.stdout, (command, done.stderr)
        else:  # everything else needs the Hub's model first
            assert done.returncode == 1, (command, done.returncode, done.stderr)
            errors = [line for line in done.stderr.splitlines() if line.startswith("rgchat: error:")]
            assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], (command, done.stderr)
            assert errors[0].startswith("rgchat: error: cannot reach http://127.0.0.1:"), (command, done.stderr)
        ran.append(command.split()[1] if command.startswith("rgchat ") else command)
    assert {"doctor", "run", "serve"} <= set(ran) and any("|" in c for c in ran)
    assert not (home / "trip.state").exists()  # a refused run writes nothing

    # the Python snippet, against the server the quick start starts, serving a tiny model as "2b-it" would
    [snippet] = blocks(start, "python")
    model = convert(write_hf_folder(tiny_model(CYCLES, seed=5), tmp_path / "tiny-it", tokenizer_path), "f32",
                    tmp_path / "tiny-it.safetensors")
    server = subprocess.Popen(["rgchat", "serve", str(model), "--port", "0", "--device", "cpu", "--cache-dir",
                               str(tmp_path / "cache")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if found := re.search(r"serving tiny-it at (http://127\.0\.0\.1:\d+)/v1", line):
                url = found.group(1)
                break
        assert url, "the server did not start"
        assert "http://127.0.0.1:8080/v1" in snippet and 'model="2b-it"' in snippet
        script = snippet.replace("http://127.0.0.1:8080", url).replace('model="2b-it"', 'model="tiny-it"')
        done = subprocess.run(["python3", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    finally:
        server.kill()
        server.wait()
