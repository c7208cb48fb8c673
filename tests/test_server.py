"""`rgchat serve` through the real `openai` client and raw HTTP, on loopback ports the tests pick: answers equal
`rgchat run`, streams are OpenAI's SSE byte for byte in shape, follow-ups resume their snapshot (also after a
restart), and every bad request gets a 4xx in OpenAI's error shape while the server goes on serving."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from rgchat import loader, server
from rgchat.chat import ChatSession
from rgchat.checkpoint import convert
from rgchat.cli import app
from rgchat.generate import text as generated_text
from rgchat.serving import Worker
from rgchat.settings import Settings
from rgchat.snapshots import SnapshotCache

MODEL_SEED = 31
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tokenizer_path) -> Path:
    folder = write_hf_folder(tiny_model(CYCLES, seed=MODEL_SEED), tmp_path_factory.mktemp("m") / "tiny-it",
                             tokenizer_path)
    return convert(folder, "f32", tmp_path_factory.mktemp("f") / "tiny-it.safetensors")


class Running:
    """A server on a free loopback port, in this process (so tests can reach into its engine)."""

    def __init__(self, worker: Worker, service: server.Service, url: str, lines: list[str]):
        self.worker, self.service, self.url, self.lines = worker, service, url, lines

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str) -> int:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers()).text
        return int(re.search(rf"^{name} (\d+)$", text, re.M).group(1))

    def headers(self) -> dict:
        key = self.service.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def running(model_file: Path, cache_dir: Path | None = None, *, slots: int = 4, queue: int = 64,
            api_key: str | None = None, max_prompt_tokens: int = 4096, load=None):
    lines: list[str] = []
    log = lines.append

    def make_cache(loaded):
        return SnapshotCache(loaded.identity(), loaded.model.config, 1 << 30, cache_dir, 1 << 30, log)

    load = load or (lambda: loader.load(str(model_file), None, torch.device("cpu"), log=log))
    worker = Worker(load, slots, queue, make_cache, log)
    service = server.Service(worker, api_key, max_prompt_tokens, log)
    sock = server.bind("127.0.0.1", 0)
    uv = server.Uvicorn(uvicorn.Config(server.create_app(service), log_level="warning", access_log=False,
                                       lifespan="off"), on_shutdown=worker.begin_stop)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    worker.start()
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield Running(worker, service, url, lines)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()
        worker.stop()


@pytest.fixture(scope="module")
def srv(model_file, tmp_path_factory):
    with running(model_file, tmp_path_factory.mktemp("cache")) as r:
        r.worker.ready.wait(30)
        yield r


def wait_for(condition, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def ask(client, messages, **settings):
    reply = client.chat.completions.create(model="tiny-it", messages=messages, **{**GREEDY, **settings})
    return reply.choices[0].message.content, reply


def test_chat_and_completions_equal_rgchat_run(srv, model_file):
    cli = run_cli("run", str(model_file), "--lines", "--temperature", "0", "--max-tokens", "12",
                  stdin="Hello there\nThe quick brown fox\n")
    first, second = cli.stdout.splitlines()
    client = srv.client()
    answer, reply = ask(client, [{"role": "user", "content": "Hello there"}])
    assert answer == first
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the follow-up resumes the snapshot of the first exchange and answers as `run --lines` does
    follow, reply = ask(client, [{"role": "user", "content": "Hello there"},
                                 {"role": "assistant", "content": answer},
                                 {"role": "user", "content": [{"type": "text", "text": "The quick "},
                                                              {"type": "text", "text": "brown fox"}]}])
    assert follow == second
    assert 0 < reply.usage.prompt_tokens_details.cached_tokens < reply.usage.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    done = client.completions.create(model="tiny-it", prompt="The quick brown", **GREEDY)
    assert done.choices[0].text == session_answer(model_file, "The quick brown", template=False)
    assert done.object == "text_completion" and done.usage.completion_tokens == 12


def session_answer(model_file: Path, text: str, *, template: bool, system: str | None = None) -> str:
    """What `rgchat run MODEL TEXT --temperature 0 --max-tokens 12` answers (the session it runs; tests/test_pipe.py
    checks the two agree)."""
    loaded = loader.load(str(model_file), None, torch.device("cpu"), log=lambda _: None)
    session = ChatSession(loaded.model, loaded.tokenizer, Settings(temperature=0, max_tokens=12), template=template,
                          system=system)
    return generated_text(session.ask(text))


def test_a_system_message_heads_the_first_turn_as_system_does(srv, model_file):
    answer, _ = ask(srv.client(), [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"}])
    assert answer == session_answer(model_file, "Hello there", template=True, system="Be brief.")
    assert answer != ask(srv.client(), [{"role": "user", "content": "Hello there"}])[0]


def test_streamed_deltas_make_the_whole_answer(srv):
    client = srv.client()
    messages = [{"role": "user", "content": "A linear recurrence"}]
    whole, reply = ask(client, messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model="tiny-it", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **{**GREEDY,
                                                                                           "max_tokens": 20}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_bytes(srv):
    body = {"model": "tiny-it", "messages": [{"role": "user", "content": "Hi"}], "stream": True, **GREEDY}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = r.read().decode()
    events = data.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in payloads)
    assert all(set(p["choices"][0]["delta"]) == {"content"} for p in payloads[1:-1])


def test_concurrent_greedy_requests_equal_sequential_ones(srv):
    client = srv.client()
    prompts = ["Hello there", "The quick brown fox", "RecurrentGemma keeps", "Chat turns start", "Über café"]
    alone = [ask(client, [{"role": "user", "content": p}], max_tokens=16)[0] for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def one(i):
        together[i] = ask(client, [{"role": "user", "content": prompts[i]}], max_tokens=16)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_a_client_that_drops_a_stream_frees_its_slot_and_is_not_cached(srv):
    body = {"model": "tiny-it", "prompt": "The quick brown", "stream": True, "temperature": 0,
            "max_tokens": 3000}
    generated = srv.metric("rgchat_generated_tokens_total")
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 3:
                break
    assert wait_for(lambda: srv.metric("rgchat_active_slots") == 0)
    assert srv.metric("rgchat_generated_tokens_total") - generated < 150  # left running, it would make 3000
    assert wait_for(lambda: any("/v1/completions 200" in line and "client went away" in line for line in srv.lines))

    # a chat answer cut off by its client: the follow-up quoting what it saw finds no snapshot
    messages = [{"role": "user", "content": "Über café naïve"}]
    body = {"model": "tiny-it", "messages": messages, "stream": True, "temperature": 0, "max_tokens": 3000}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as r:
        seen = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if len(seen) > 3:
                break
    _, reply = ask(srv.client(), messages + [{"role": "assistant", "content": seen},
                                             {"role": "user", "content": "Go on"}])
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_an_uncut_answer_runs_long(srv):
    """The precondition of the test above: without the client leaving, the answer would not stop early."""
    done = srv.client().completions.create(model="tiny-it", prompt="The quick brown", temperature=0, max_tokens=200)
    assert done.choices[0].finish_reason == "length"


def test_the_cache_survives_a_restart_and_a_damaged_file_is_dropped(model_file, tmp_path):
    messages = [{"role": "user", "content": "Hello there"}]
    with running(model_file, tmp_path) as first:
        assert first.worker.ready.wait(30)  # asked while loading, the client's retries may run out
        answer, _ = ask(first.client(), messages)
        wait_for(lambda: list(tmp_path.glob("*/*.state")))  # written by the cache's own thread
        files = list(tmp_path.glob("*/*.state"))
        follow = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        in_memory, _ = ask(first.client(), follow)
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    shown = run_cli("state", "show", str(files[0]))  # a cache file is a state file like any other
    assert shown.returncode == 0 and "Hello there" in shown.stdout and answer in shown.stdout
    with running(model_file, tmp_path) as second:
        assert second.worker.ready.wait(30)
        resumed, reply = ask(second.client(), follow)
        assert reply.usage.prompt_tokens_details.cached_tokens > 0 and resumed == in_memory

    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with running(model_file, tmp_path) as third:
        assert third.worker.ready.wait(30)
        _, reply = ask(third.client(), follow)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert any("cache: dropped" in line and files[0].name in line for line in third.lines)
    assert not files[0].exists()


def bad(srv, body, *, path="/v1/chat/completions", raw: bytes | None = None, headers=None) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", content=raw if raw is not None else json.dumps(body).encode(),
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=30)


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, param, status", [
    ({"messages": USER, "n": 2}, "n", 400),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", 400),
    ({"messages": USER, "logprobs": True}, "logprobs", 400),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", 400),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty", 400),
    ({"messages": USER, "temperature": "hot"}, "temperature", 400),
    ({"messages": USER, "top_p": 2}, "top_p", 400),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", 400),
    ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", 400),
    ({"messages": USER, "seed": -1}, "seed", 400),
    ({"messages": USER, "stop": [1, 2]}, "stop", 400),
    ({"messages": USER, "stop": ["x"] * 5}, "stop", 400),
    ({"messages": USER, "stream": "yes"}, "stream", 400),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"messages": []}, "messages", 400),
    ({"messages": "Hi"}, "messages", 400),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", 400),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", 400),
    ({"messages": USER + USER}, "messages[1]", 400),
    ({"messages": USER + [{"role": "assistant", "content": "x"}]}, "messages", 400),
    ({"messages": [{"role": "assistant", "content": "x"}] + USER}, "messages[0]", 400),
    ({"messages": USER + [{"role": "assistant", "content": "x"}, {"role": "system", "content": "s"}] + USER},
     "messages[2]", 400),
    ({"messages": USER, "model": "gpt-4o"}, "model", 404),
    ({"messages": USER, "model": 5}, "model", 400),
])
def test_bad_requests_get_openai_errors(srv, body, param, status):
    r = bad(srv, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_bodies_and_routes(srv):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe{}", b"", b"[" * 100_000 + b"]" * 100_000,
                b'{"messages": [{"role": "user", "content": "\\ud800"}]}'):
        r = bad(srv, None, raw=raw)
        assert r.status_code == 400 and "error" in r.json(), raw[:20]
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    r = bad(srv, None, raw=huge)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    def chunks():  # no Content-Length: the bound is enforced while reading
        for _ in range(6):
            yield b" " * (1 << 20)
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert bad(srv, {"prompt": 5}, path="/v1/completions").json()["error"]["param"] == "prompt"
    assert bad(srv, {}, path="/v1/nothing").status_code == 404
    r = httpx.get(f"{srv.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    # after all that, it still answers
    assert ask(srv.client(), USER)[0]


def test_prompt_limit(model_file):
    with running(model_file, max_prompt_tokens=40) as r:
        r.worker.ready.wait(30)
        with pytest.raises(openai.BadRequestError) as e:
            ask(r.client(), [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}])
        assert e.value.body["code"] == "context_length_exceeded"
        assert ask(r.client(), USER)[0]


def test_api_key(model_file):
    with running(model_file, api_key="s3cret") as r:
        r.worker.ready.wait(30)
        assert httpx.get(f"{r.url}/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.get(f"{r.url}/v1/models", headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            r.client("wrong").models.list()
        assert [m.id for m in r.client("s3cret").models.list()] == ["tiny-it"]
        assert bad(r, {"messages": USER}).status_code == 401


def test_health_is_503_while_loading_and_models_lists_one(model_file):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return loader.load(str(model_file), None, torch.device("cpu"), log=lambda _: None)

    with running(model_file, load=slow_load) as r:
        health = httpx.get(f"{r.url}/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "unavailable_error"
        assert bad(r, {"messages": USER}).status_code == 503
        gate.set()
        r.worker.ready.wait(30)
        assert httpx.get(f"{r.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{r.url}/v1/models/tiny-it").json()["id"] == "tiny-it"
        assert httpx.get(f"{r.url}/v1/models/other").status_code == 404


def test_an_engine_failure_fails_the_request_and_the_server_goes_on(srv, monkeypatch):
    engine = srv.worker.engine
    real = engine.decode
    calls = {"n": 0}

    def failing(slots, tokens):
        calls["n"] += 1
        if calls["n"] in (2, 5):  # the second step of each of the next two requests
            raise RuntimeError("injected")
        return real(slots, tokens)

    monkeypatch.setattr(engine, "decode", failing)
    with pytest.raises(openai.InternalServerError):
        ask(srv.client(), USER)
    with pytest.raises(openai.APIError):  # mid-stream: an error event
        list(srv.client().chat.completions.create(model="tiny-it", messages=USER, stream=True, **GREEDY))
    assert any("the engine failed" in line for line in srv.lines)
    assert len(engine.free) == engine.slots
    assert ask(srv.client(), USER)[0]


def test_a_full_queue_gets_429(model_file):
    with running(model_file, slots=1, queue=1) as r:
        r.worker.ready.wait(30)
        body = {"prompt": "The quick brown", "stream": True, "temperature": 0, "max_tokens": 3000}
        with httpx.stream("POST", f"{r.url}/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # it holds the only slot
            waiting = threading.Thread(target=lambda: httpx.post(f"{r.url}/v1/completions", json={
                "prompt": "Hi", "max_tokens": 2}, timeout=30))
            waiting.start()
            assert wait_for(lambda: r.metric("rgchat_queue_length") == 1)
            third = httpx.post(f"{r.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        waiting.join(30)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_binds_loopback_by_default_and_stops_on_a_signal(model_file, tmp_path, stop):
    proc = subprocess.Popen([sys.executable, "-m", "rgchat", "serve", str(model_file), "--port", "0",
                             "--device", "cpu", "--cache-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"serving tiny-it at (http://[^/ ]+)/v1", line):
                url = m.group(1)
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        answer, _ = ask(openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0), USER)
        body = {"prompt": "The quick brown", "stream": True, "temperature": 0, "max_tokens": 100_000}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(stop)  # an answer in progress ends with an error event, then [DONE]
            rest = [line for line in lines if line]
        assert "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert proc.wait(20) == 0
        assert len(list(tmp_path.glob("*/*.state"))) == 1  # the snapshot reached the disk before the exit
    finally:
        proc.kill()
        proc.wait()


def test_serve_warns_beyond_loopback_without_a_key_and_refuses_bad_flags(model_file, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "rgchat", "serve", str(model_file), "--host", "0.0.0.0",
                             "--port", "0", "--device", "cpu", "--cache-dir", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "warning" in first and "--api-key" in first
    finally:
        proc.kill()
        proc.wait()
    result = CliRunner().invoke(app, ["serve", str(model_file), "--cache-memory", "lots"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--cache-memory" in result.stderr
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.stderr.startswith("rgchat: error:")


def test_the_load_benchmark_runs_against_a_server(srv):
    from rgchat.bench import server_load

    client = server_load.Client(srv.url, None)
    turn = server_load.resumed_turn(client, turns=3, history_tokens=300, answer_tokens=8, last_words=4)
    assert turn["resumed"]["cached_tokens"] >= 0.8 * turn["conversation_tokens"] > 0
    assert turn["cold"]["cached_tokens"] == 0 and turn["cold"]["prompt_tokens"] > turn["conversation_tokens"]
    together = server_load.concurrent(client, 3, max_tokens=8)
    assert together["clients"] == 3 and together["generated_tokens"] <= 24 and together["tok_s"] > 0


def test_a_bug_in_a_handler_is_a_500_in_openai_shape_and_one_log_line(srv, monkeypatch):
    from rgchat import serving

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving, "prepare", broken)
    r = bad(srv, {"messages": USER})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert wait_for(lambda: any(line.startswith("rgchat: error: POST /v1/chat/completions: RuntimeError: a bug")
                                for line in srv.lines))  # logged once the response is out
    monkeypatch.undo()
    assert ask(srv.client(), USER)[0]
