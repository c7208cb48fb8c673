"""Downloads from the Hub, against a loopback stand-in for it (tests/hub_server.py): no test touches the
internet. Every command runs as users run it, in a subprocess with HF_ENDPOINT pointing at the stand-in."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import CYCLES, tiny_model, write_hf_folder
from rgchat.config import ATTENTION, RECURRENT, GriffinConfig
from hub_server import HubServer, Repo, folder_files
from rgchat import hub, modelfile
from rgchat.checkpoint import convert
from rgchat.errors import RGChatError

REPO = "google/recurrentgemma-2b-it"  # what the alias 2b-it names
ANSWER = ("--temperature", "0", "--max-tokens", "12", "--precision", "f32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    return write_hf_folder(tiny_model(CYCLES, seed=31), tmp_path_factory.mktemp("m") / "local-2b-it",
                           tokenizer_path)


@pytest.fixture
def server(checkpoint):
    hub_server = HubServer()
    hub_server.repos[REPO] = Repo(folder_files(checkpoint))
    yield hub_server
    hub_server.close()


def rgchat(*args, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run([sys.executable, "-m", "rgchat", *args], capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_run_an_alias_downloads_converts_and_answers(server, checkpoint, isolated_store):
    result = rgchat("run", "2b-it", "Hello there", *ANSWER, endpoint=server.url)
    assert result.returncode == 0, result.stderr
    local = rgchat("run", str(checkpoint), "Hello there", *ANSWER, endpoint=server.url)
    assert result.stdout == local.stdout and len(result.stdout.strip()) > 3  # same weights, same answer
    assert "model-00001-of-00002.safetensors: 100%" in result.stderr  # plain progress lines on stderr
    assert "converting" in result.stderr
    # the raw download is gone, the store entry records where it came from
    assert not (isolated_store / hub.DOWNLOADS).exists()
    source = modelfile.open_file(isolated_store / "recurrentgemma-2b-it-f32" / "model.safetensors").source
    assert source["repo"] == REPO and source["commit"] == server.repos[REPO].commit
    # from now on no network: the Hub may be gone
    requests = len(server.requests)
    server.close()
    again = rgchat("run", "2b-it", "Hello there", *ANSWER, endpoint="http://127.0.0.1:9")
    assert again.returncode == 0 and again.stdout == result.stdout
    assert len(server.requests) == requests
    listed = rgchat("list", endpoint="http://127.0.0.1:9")
    assert f"hf:{REPO}@" in listed.stdout


# Three blocks wide enough that a shard spans more than one of huggingface_hub's 10 MiB read chunks, so a
# broken transfer leaves whole chunks behind to resume from.
WIDE = GriffinConfig(vocab_size=512, width=512, mlp_width=1024, lru_width=512, num_heads=4, num_kv_heads=1,
                     block_types=(RECURRENT, RECURRENT, ATTENTION))
CHUNK = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, tokenizer_path):
    return write_hf_folder(tiny_model(WIDE, seed=5), tmp_path_factory.mktemp("w") / "wide-it", tokenizer_path,
                           shards=1)


@pytest.fixture
def wide_server(wide_checkpoint):
    hub_server = HubServer()
    hub_server.repos[REPO] = Repo(folder_files(wide_checkpoint))
    assert len(hub_server.repos[REPO].files[SHARD]) > CHUNK + 1_000_000
    yield hub_server
    hub_server.close()


SHARD = "model-00001-of-00001.safetensors"


def assert_same_as_converting(wide_checkpoint, isolated_store):
    expected = modelfile.open_file(convert(wide_checkpoint, "f32", isolated_store.parent / "direct.safetensors"))
    got = modelfile.open_file(isolated_store / "recurrentgemma-2b-it-f32" / "model.safetensors")
    assert got.metadata["tensor_sha256"] == expected.metadata["tensor_sha256"]


def test_a_dropped_connection_is_resumed_with_a_range_request(wide_server, wide_checkpoint, isolated_store):
    wide_server.repos[REPO].drop_after[SHARD] = CHUNK + 500_000
    result = rgchat("pull", "2b-it", "--precision", "f32", "--keep-original", endpoint=wide_server.url)
    assert result.returncode == 0, result.stderr
    assert wide_server.ranges(SHARD) == [None, f"bytes={CHUNK}-"]
    assert_same_as_converting(wide_checkpoint, isolated_store)
    kept = isolated_store / hub.DOWNLOADS / "recurrentgemma-2b-it" / wide_server.repos[REPO].commit / SHARD
    assert kept.read_bytes() == (wide_checkpoint / SHARD).read_bytes()
    assert "(all files): 100%" in result.stderr


def test_an_interrupted_pull_continues_where_it_stopped(wide_server, wide_checkpoint, isolated_store):
    """Ctrl-C during a download keeps the partial file; the next pull asks only for the rest."""
    wide_server.repos[REPO].slow_after[SHARD] = CHUNK + 100_000
    env = {**os.environ, "HF_ENDPOINT": wide_server.url}
    proc = subprocess.Popen([sys.executable, "-m", "rgchat", "pull", "2b-it", "--precision", "f32"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    commit = wide_server.repos[REPO].commit
    partial = isolated_store / hub.DOWNLOADS / "recurrentgemma-2b-it" / commit / f"{SHARD}.partial"
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size >= CHUNK):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out == b"" and b"Traceback" not in err
    assert partial.stat().st_size == CHUNK

    wide_server.repos[REPO].slow_after.clear()
    result = rgchat("pull", "2b-it", "--precision", "f32", endpoint=wide_server.url)
    assert result.returncode == 0, result.stderr
    assert wide_server.ranges(SHARD)[-1] == f"bytes={CHUNK}-"
    assert_same_as_converting(wide_checkpoint, isolated_store)


def assert_refused(result, *phrases):
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rgchat: error:")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_gated_unknown_corrupted_and_offline(server, isolated_store):
    server.repos[REPO].gated = True
    assert_refused(rgchat("pull", "2b-it", endpoint=server.url), "gated", f"{server.url}/{REPO}", "HF_TOKEN",
                   "hf auth login", "rgchat pull")
    server.repos[REPO].gated = False

    assert_refused(rgchat("pull", "hf:someone/nothing-here", endpoint=server.url), "no model", "2b-it")
    assert rgchat("pull", "not-an-alias", endpoint=server.url).returncode == 2

    server.repos[REPO].corrupt.add("model-00001-of-00002.safetensors")
    assert_refused(rgchat("pull", "2b-it", endpoint=server.url), "checksum")
    assert rgchat("list", endpoint=server.url).stdout == ""  # nothing was converted
    server.repos[REPO].corrupt.clear()

    assert_refused(rgchat("run", "2b-it", "hi", endpoint=server.url, offline=True), "HF_HUB_OFFLINE",
                   "still run")
    assert_refused(rgchat("run", "2b-it", "hi", endpoint="http://127.0.0.1:9"), "cannot reach")


def test_offline_uses_the_hf_cache(server, checkpoint, isolated_store):
    """Files someone else (transformers, `hf download`) put in the HF cache serve offline runs."""
    env = {**os.environ, "HF_ENDPOINT": server.url}
    fetch = ("from huggingface_hub import snapshot_download; "
             f"print(snapshot_download('{REPO}', allow_patterns=['*.json', '*.safetensors', 'tokenizer.model']))")
    subprocess.run([sys.executable, "-c", fetch], env=env, check=True, capture_output=True, timeout=120)
    result = rgchat("run", "2b-it", "Hello there", *ANSWER, endpoint=server.url, offline=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == rgchat("run", str(checkpoint), "Hello there", *ANSWER, endpoint=server.url).stdout
    assert "HF cache" in result.stderr
    # online too, files already in the HF cache are not fetched again
    shutil.rmtree(isolated_store / "recurrentgemma-2b-it-f32")
    fetched = [p for p, _ in server.requests if "/resolve/" in p]
    assert rgchat("run", "2b-it", "Hello there", *ANSWER, endpoint=server.url).stdout == result.stdout
    assert [p for p, _ in server.requests if "/resolve/" in p] == fetched


def test_a_damaged_file_in_the_hf_cache_is_fetched_anew(server, checkpoint, isolated_store):
    env = {**os.environ, "HF_ENDPOINT": server.url}
    fetch = ("from huggingface_hub import hf_hub_download; "
             f"print(hf_hub_download('{REPO}', 'model-00001-of-00002.safetensors'))")
    cached = subprocess.run([sys.executable, "-c", fetch], env=env, check=True, capture_output=True, text=True,
                            timeout=120).stdout.strip()
    blob = os.path.realpath(cached)
    with open(blob, "r+b") as f:  # the same size, other bytes
        f.seek(os.path.getsize(blob) // 2)
        f.write(b"\xff" * 64)
    fetches = lambda: sum(p.endswith("/model-00001-of-00002.safetensors") for p, _ in server.requests)  # noqa: E731
    before = fetches()
    result = rgchat("run", "2b-it", "Hello there", *ANSWER, endpoint=server.url)
    assert result.returncode == 0, result.stderr
    assert fetches() == before + 1  # fetched anew, not converted from the damaged copy
    assert result.stdout == rgchat("run", str(checkpoint), "Hello there", *ANSWER, endpoint=server.url).stdout


def test_a_repo_with_an_rgchat_file_is_downloaded_as_is(server, checkpoint, isolated_store, tmp_path):
    ready = convert(checkpoint, "int8", tmp_path / "ready" / "m.safetensors")
    server.repos["someone/tiny-rgchat"] = Repo({"rgchat-int8.safetensors": ready.read_bytes(),
                                                 "tokenizer.model": (checkpoint / "tokenizer.model").read_bytes(),
                                                 "README.md": b"# tiny"})
    result = rgchat("pull", "hf:someone/tiny-rgchat", "--precision", "int8", endpoint=server.url)
    assert result.returncode == 0, result.stderr
    assert "converting" not in result.stderr
    stored = isolated_store / "someone--tiny-rgchat-int8" / "model.safetensors"
    assert stored.read_bytes() == ready.read_bytes()
    answer = rgchat("run", "hf:someone/tiny-rgchat", "Hello there", "--precision", "int8", "--temperature", "0",
                    endpoint="http://127.0.0.1:9")
    assert answer.returncode == 0 and answer.stdout.strip()


def test_not_enough_disk_space_is_said_before_downloading(server, monkeypatch, isolated_store, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RGChatError, match="not enough disk space"):
        hub.pull(hub.parse("2b-it"), "f32", log=lambda line: None)
    assert not any(p.suffix == ".partial" and p.stat().st_size for p in isolated_store.rglob("*"))


def test_aliases_and_specs():
    assert hub.parse("2b-it") == hub.HubModel("google/recurrentgemma-2b-it")
    assert hub.parse("hf:me/repo@v2") == hub.HubModel("me/repo", "v2")
    assert hub.parse("hf:me/repo").name == "me--repo"
    assert hub.parse("recurrentgemma-2b-it-int8") is None  # a store name
    for bad in ("hf:", "hf:noslash", "hf:a/b/c", "hf:../x"):
        with pytest.raises(RGChatError):
            hub.parse(bad)
    sizes = dict((alias, s) for alias, _, s in hub.available())
    assert sizes["2b"]["int4"] < sizes["2b"]["int8"] < sizes["2b"]["bf16"] < sizes["9b"]["bf16"]
    assert json.dumps(sizes)  # plain numbers
