"""`rgchat serve`: the OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of one engine thread.

Handlers check the request (rgchat/api.py), prepare a job from the snapshot cache in a helper thread, submit
it to the engine thread (rgchat/serving.py) and stream its events back; they never touch the model. Every
failure a request can cause is answered in OpenAI's error shape; the engine thread outlives any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from rgchat import api, serving
from rgchat.api import ApiError
from rgchat.errors import RGChatError
from rgchat.generate import Finish, Token
from rgchat.serving import Job, QueueFull, Worker

MAX_BODY_BYTES = 4 << 20  # a conversation of a million tokens is less than this
LOG_KEY = "rgchat.log"  # where a handler leaves the token counts for the request's log line


class Service:
    """What the routes need: the engine thread, the served model's names, the key and the limits."""

    def __init__(self, worker: Worker, api_key: str | None, max_prompt_tokens: int, log: Callable[[str], None]):
        self.worker, self.api_key, self.max_prompt_tokens, self.log = worker, api_key, max_prompt_tokens, log
        self.started = int(time.time())

    @property
    def model_id(self) -> str:
        return self.loaded().name

    def loaded(self):
        if not self.worker.ready.is_set() or self.worker.loaded is None or self.worker.engine is None:
            raise ApiError(503, "Loading model", code="model_loading")
        return self.worker.loaded

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.api_key}".encode())

    # --- answering -----------------------------------------------------------------------------------------

    async def answer(self, request: Request, parse: Callable[[dict], api.Call]) -> Response:
        body = api.parse_json(await read_body(request, MAX_BODY_BYTES))
        loaded = self.loaded()
        call = parse(body)
        if call.model is not None and call.model not in (loaded.name, loaded.spec):
            raise ApiError(404, f"the model {call.model!r} is not served here; this server serves "
                                f"{loaded.name!r} (see /v1/models)", "model", "model_not_found")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = await asyncio.to_thread(serving.prepare, loaded, self.worker.cache, call, self.max_prompt_tokens,
                                      deliver)
        record = request.scope.setdefault(LOG_KEY, {})
        record.update(tokens_in=job.prompt_tokens, cached=job.cached_tokens, out=0)
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({self.worker.queued} requests are waiting); try again "
                                "shortly", code="queue_full") from None
        response = api.Response(call.chat, loaded.name)
        if call.stream:
            return StreamingResponse(self._stream(job, events, response, record), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, response, record)

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, response: api.Response,
                     record: dict) -> Response:
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody waits for the answer any more
                        job.cancel.set()
                        record["gone"] = True
                        return Response(status_code=499)
                    continue
                if isinstance(event, ApiError):
                    raise event
                pieces.append(event.text)
                if isinstance(event, Finish):
                    record["out"] = event.stats.generated_tokens
                    if event.reason == "cancelled":
                        raise ApiError(503, "the server is shutting down")
                    used = api.usage(job.prompt_tokens, job.cached_tokens, event.stats.generated_tokens)
                    return JSONResponse(response.whole("".join(pieces), event.reason, used))
        finally:
            job.cancel.set()  # an answer still running when the handler ends has nobody to go to

    async def _stream(self, job: Job, events: asyncio.Queue, response: api.Response,
                      record: dict) -> AsyncIterator[bytes]:
        usage_field, done = job.call.include_usage, False
        try:
            if response.chat:
                yield api.sse(response.chunk(role=True, with_usage=usage_field))
            while True:
                event = await events.get()
                if isinstance(event, ApiError):
                    done = True
                    yield api.sse(event.body())
                    break
                if event.text:
                    yield api.sse(response.chunk(event.text, with_usage=usage_field))
                if isinstance(event, Token):
                    continue
                record["out"], done = event.stats.generated_tokens, True
                if event.reason == "cancelled":
                    yield api.sse(ApiError(503, "the server is shutting down").body())
                    break
                yield api.sse(response.chunk(finish_reason=event.reason, with_usage=usage_field))
                if usage_field:
                    yield api.sse(response.usage_chunk(
                        api.usage(job.prompt_tokens, job.cached_tokens, event.stats.generated_tokens)))
                break
            yield api.sse("[DONE]")
        finally:  # also when the client went away: the answer stops within a token and frees its slot
            if not done:
                record["gone"] = True
            job.cancel.set()

    # --- the other endpoints -------------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.started,
                                            "owned_by": "rgchat"}]}

    def metrics(self) -> str:
        w, m, cache = self.worker, self.worker.metrics, self.worker.cache
        rows = [
            ("rgchat_requests_total", "counter", "HTTP requests answered", m.requests),
            ("rgchat_prompt_tokens_total", "counter", "prompt tokens of admitted requests, cached included",
             m.prompt_tokens),
            ("rgchat_cached_tokens_total", "counter", "prompt tokens resumed from a snapshot", m.cached_tokens),
            ("rgchat_generated_tokens_total", "counter", "tokens generated", m.generated_tokens),
            ("rgchat_engine_failures_total", "counter", "decode loops that failed", m.engine_failures),
            ("rgchat_slots", "gauge", "conversation slots", w.slots),
            ("rgchat_active_slots", "gauge", "slots answering now", w.busy_slots),
            ("rgchat_queue_length", "gauge", "requests waiting for a slot", w.queued),
            ("rgchat_cache_hits_total", "counter", "chat requests resumed from a snapshot",
             cache.hits if cache else 0),
            ("rgchat_cache_misses_total", "counter", "chat requests read from the start",
             cache.misses if cache else 0),
            ("rgchat_cache_memory_bytes", "gauge", "snapshot bytes in memory", cache.memory_used if cache else 0),
            ("rgchat_cache_disk_bytes", "gauge", "snapshot bytes on disk", cache.disk_used if cache else 0),
        ]
        return "".join(f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value}\n"
                       for name, kind, text, value in rows)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length said."""
    data = bytearray()
    try:
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise ApiError(413, f"the request body is larger than {limit:,} bytes")
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the whole body") from None
    return bytes(data)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="rgchat", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.answer(request, api.parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.answer(request, api.parse_completion)

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        listed = service.models()["data"][0]
        if model_id != listed["id"]:
            raise ApiError(404, f"the model {model_id!r} is not served here", "model", "model_not_found")
        return listed

    @app.get("/health")
    async def health() -> dict:
        service.loaded()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {message}").body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:  # a bug: Gate logs it
        return error_response(ApiError(500, "internal error while handling the request"))

    return Gate(app, service)


class Gate:
    """ASGI middleware in front of the app: the API key (every path but /health), a declared body too large
    (413 before reading it), and one log line per request when it is done."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 0}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = None
        if scope["path"] != "/health" and not self.service.authorized(headers.get("authorization")):
            refusal = ApiError(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                               code="invalid_api_key")
        elif not headers.get("content-length", "0").isdigit():
            refusal = ApiError(400, "a bad Content-Length header")
        elif int(headers.get("content-length", "0")) > MAX_BODY_BYTES:
            refusal = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes")
        try:
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as e:  # noqa: BLE001 - answered with a 500 already (on_unexpected): one line, no traceback
            self.service.log(f"rgchat: error: {scope['method']} {scope['path']}: {type(e).__name__}: {e}")
        finally:
            self.service.worker.metrics.requests += 1
            self.service.log(request_line(scope, status["code"], time.perf_counter() - started))


def request_line(scope, status: int, seconds: float) -> str:
    record = scope.get(LOG_KEY, {})
    tokens = (f" in={record['tokens_in']} cached={record['cached']} out={record['out']}"
              if "tokens_in" in record else "")
    gone = " (client went away)" if record.get("gone") else ""
    return f"rgchat: {scope['method']} {scope['path']} {status or '-'}{tokens} {seconds:.2f}s{gone}"


# --- running it ------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is one clear error before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RGChatError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise RGChatError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


class Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the engine thread when its shutdown begins, so that answers in progress end
    with a "shutting down" error and queued requests get 503 while their clients still listen."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, *args, **kwargs) -> None:
        self.on_shutdown()
        await super().shutdown(*args, **kwargs)


class _Stopped(Exception):
    """SIGTERM, raised again by uvicorn after its graceful shutdown."""


@contextlib.contextmanager
def _sigterm_stops():
    """While serving, a SIGTERM ends the server like Ctrl-C, so the snapshots in flight reach the disk."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(worker: Worker, host: str, port: int, api_key: str | None, max_prompt_tokens: int,
          log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
    """Listen on host:port, load the model on the engine thread, and serve until SIGINT or SIGTERM."""
    sock = bind(host, port)
    if not is_loopback(host) and api_key is None:
        log(f"rgchat: warning: listening on {host}, beyond this machine, without --api-key: anyone who can "
            "reach it can use it")
    service = Service(worker, api_key, max_prompt_tokens, log)
    server = Uvicorn(uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=5), on_shutdown=worker.begin_stop)
    address = sock.getsockname()
    url = f"http://{f'[{address[0]}]' if ':' in address[0] else address[0]}:{address[1]}"

    def announce() -> None:
        worker.ready.wait()
        if worker.failed is not None:
            server.should_exit = True
            return
        log(f"rgchat: serving {worker.loaded.name} at {url}/v1 ({worker.slots} slots)")

    log(f"rgchat: loading the model; {url}/health answers 503 until it is ready")
    worker.start()
    threading.Thread(target=announce, name="rgchat-announce", daemon=True).start()
    try:
        with _sigterm_stops():
            server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):  # uvicorn raises the signal again once it has shut down
        pass
    finally:
        sock.close()
        worker.stop()
    if worker.failed is not None:
        raise RGChatError(worker.failed)
