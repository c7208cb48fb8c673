"""Serving many conversations from one model: a request becomes a `Job` (its prompt read from the snapshot
cache where it can be), and one engine thread, the only one that touches the model, answers the jobs
together in the engine's slots, admitting new ones between decode steps.

The HTTP side (rgchat/server.py) prepares jobs, submits them and reads their events; it never touches a
tensor. A job's events arrive through its `deliver` callback: Token and Finish from rgchat/generate.py, or
an ApiError when the engine failed.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable

from rgchat.api import ApiError, Call
from rgchat.chat import Turn, with_system
from rgchat.engine import Engine
from rgchat.generate import Finish, Request, Token, generate_many
from rgchat.loader import LoadedModel
from rgchat.sampling import Sampler
from rgchat.settings import REPEAT_WINDOW
from rgchat.snapshots import Snapshot, SnapshotCache, message_keys, next_key


@dataclasses.dataclass
class Job:
    """One answer to generate: the tokens to read (on top of `snapshot`, when the conversation was cached),
    how to answer, and where the events go."""

    prompt: list[int]
    call: Call
    deliver: Callable[[Token | Finish | ApiError], None]
    stop_ids: frozenset[int]
    close_ids: list[int]
    snapshot: Snapshot | None = None
    turns: list[Turn] = dataclasses.field(default_factory=list)  # the transcript, the new turns included
    recent: list[int] = dataclasses.field(default_factory=list)
    key: str | None = None  # the cache key of the messages so far; the answer's is derived from it
    system: str | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def cached_tokens(self) -> int:
        return self.snapshot.state.pos if self.snapshot is not None else 0

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + len(self.prompt)


def prepare(loaded: LoadedModel, cache: SnapshotCache | None, call: Call, max_prompt_tokens: int,
            deliver: Callable) -> Job:
    """The job for `call`: a chat resumes the longest cached prefix of its messages that ends with an answer
    and reads only the messages after it; a completion reads its prompt as plain text. ApiError (400) for a
    conversation Gemma's template cannot express or a prompt over `max_prompt_tokens`."""
    tok = loaded.tokenizer
    if not call.chat:
        prompt = [tok.bos_id, *tok.encode(call.prompt)]
        return _bounded(Job(prompt, call, deliver, frozenset({tok.eos_id}), []), max_prompt_tokens)
    if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    system, turns = _conversation(call.messages)
    keys = message_keys(cache.root if cache is not None else "", list(call.messages))
    first = len(call.messages) - len(turns)  # the index of the first user message
    found = cache.longest(keys, lambda i: i >= first and call.messages[i][0] == "assistant") if cache else None
    start, snapshot = (found[0] + 1, found[1]) if found else (first, None)
    job = Job([], call, deliver, frozenset({tok.eos_id, tok.end_of_turn_id}), tok.end_of_turn(),
              snapshot=snapshot, key=keys[-1], system=system)
    job.turns = list(snapshot.transcript) if snapshot else []
    job.recent = list(snapshot.recent) if snapshot else []
    for i, (role, text) in enumerate(call.messages[start:], start):
        if role == "user":
            ids = ([tok.bos_id] if not job.prompt and snapshot is None else []) + \
                tok.chat_prompt(with_system(system, text) if i == first else text)
        else:
            answer = tok.encode(text)
            ids = answer + job.close_ids
            job.recent = (job.recent + answer)[-REPEAT_WINDOW:]
        job.prompt += ids
        job.turns.append(Turn("user" if role == "user" else "model", text, ids))
    return _bounded(job, max_prompt_tokens)


def _conversation(messages: tuple[tuple[str, str], ...]) -> tuple[str | None, list[tuple[str, str]]]:
    """The system text (system messages before the first user message) and the turns, which must alternate
    user, assistant, ..., user, as Gemma's template does."""
    systems = []
    for role, text in messages:
        if role != "system":
            break
        systems.append(text)
    turns = list(messages[len(systems):])
    for j, (role, _) in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            where = f"messages[{len(systems) + j}]"
            if role == "system":
                raise ApiError(400, f"{where}: system messages must come before the conversation", where)
            raise ApiError(400, f"{where}: expected a {want} message (Gemma's turns alternate user, "
                                "assistant, and the last one is the user's)", where)
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return ("\n\n".join(systems) if systems else None), turns


def _bounded(job: Job, max_prompt_tokens: int) -> Job:
    if len(job.prompt) > max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(job.prompt)} new tokens; this server reads at most "
                            f"{max_prompt_tokens} per request", "messages" if job.call.chat else "prompt",
                       "context_length_exceeded")
    return job


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Metrics:
    """Counters for /metrics (written by the engine thread and the handlers; each is one integer)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    engine_failures: int = 0


class Worker:
    """The engine thread: loads the model, then answers submitted jobs `slots` at a time, taking queued
    ones into free slots between decode steps. At most `queue_limit` jobs wait for a slot."""

    def __init__(self, load: Callable[[], LoadedModel], slots: int, queue_limit: int,
                 make_cache: Callable[[LoadedModel], SnapshotCache | None], log: Callable[[str], None]):
        self._load, self._make_cache, self.log = load, make_cache, log
        self.slots, self.queue_limit = slots, queue_limit
        self.loaded: LoadedModel | None = None
        self.cache: SnapshotCache | None = None
        self.engine: Engine | None = None
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failed: str | None = None  # why loading failed
        self.active: dict[int, tuple[Job, Request, list[str]]] = {}  # by slot: job, request, text so far
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rgchat-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin_stop(self) -> None:
        """Admit nothing more: answers in progress end as cancelled, queued jobs get 503."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def stop(self) -> None:
        """`begin_stop`, then wait for the thread and finish the cache's disk writes."""
        self.begin_stop()
        if not self.ready.is_set():  # still loading: the thread is a daemon, it ends with the process
            return
        self._thread.join()
        if self.cache is not None:
            self.cache.close()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._pending) >= self.queue_limit:  # first make room that clients who left hold
                self._pending = deque(j for j in self._pending if not j.cancel.is_set())
            if len(self._pending) >= self.queue_limit:
                raise QueueFull
            self._pending.append(job)
            self._wake.notify()

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.loaded = self._load()
            self.cache = self._make_cache(self.loaded)
            self.engine = Engine(self.loaded.model, self.slots)
        except BaseException as e:  # noqa: BLE001 - reported by the server, which then exits
            self.failed = str(e) or type(e).__name__
            self.ready.set()
            return
        self.ready.set()
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            self._answer()
        with self._wake:
            for job in self._pending:
                job.deliver(ApiError(503, "the server is shutting down"))
            self._pending.clear()

    def _answer(self) -> None:
        """Run the decode loop until no job is left (new ones join it as slots free up)."""
        try:
            for request, event in generate_many(self.engine, [], arrivals=self._arrivals):
                job, _, pieces = self.active[request.slot]
                pieces.append(event.text)
                if isinstance(event, Finish):  # cached before the client hears of it: its follow-up finds it
                    self._finish(request.slot, event)
                job.deliver(event)
        except Exception as e:  # noqa: BLE001 - the engine failed: fail what was in flight, keep serving
            self.metrics.engine_failures += 1
            self.log(f"rgchat: error: the engine failed ({type(e).__name__}: {e}); "
                     f"{len(self.active)} request(s) failed")
            for slot, (job, _, _) in list(self.active.items()):
                self.engine.release(slot)
                job.deliver(ApiError(500, "the engine failed while answering; the request was not completed"))
            self.active.clear()

    def _arrivals(self) -> list[Request]:
        """Queued jobs that fit in the free slots (a job whose client left meanwhile is dropped). The queue's
        lock is held only to take them: the HTTP side submits under it."""
        if self._stopping:
            for job, _, _ in self.active.values():
                job.cancel.set()
            return []
        with self._wake:
            taken = []
            while self._pending and len(taken) < len(self.engine.free):
                job = self._pending.popleft()
                if not job.cancel.is_set():
                    taken.append(job)
        return [r for r in map(self._admit, taken) if r is not None]

    def _admit(self, job: Job) -> Request | None:
        """The job in a slot of its own, or None (and an error for it alone) if it cannot be."""
        slot = None
        try:
            slot = self.engine.admit(job.snapshot.state if job.snapshot else None)
            request = Request(slot, job.prompt, Sampler(job.call.settings), self.loaded.tokenizer, job.stop_ids,
                              job.close_ids, deque(job.recent, maxlen=REPEAT_WINDOW), job.cancel)
        except Exception as e:  # noqa: BLE001 - e.g. a snapshot that does not fit this engine
            if slot is not None:
                self.engine.release(slot)
            job.deliver(ApiError(500, f"cannot start the answer ({type(e).__name__}: {e})"))
            return None
        self.active[slot] = (job, request, [])
        self.metrics.prompt_tokens += job.prompt_tokens
        self.metrics.cached_tokens += job.cached_tokens
        return request

    def _finish(self, slot: int, finish: Finish) -> None:
        """Free the slot; keep the conversation, answer included, unless the answer was cut short."""
        job, request, pieces = self.active.pop(slot)
        self.metrics.generated_tokens += len(request.answer)
        try:
            state = self.engine.release(slot)
            if self.cache is None or job.key is None or finish.reason not in ("stop", "length") or not request.closed:
                return
            answer = "".join(pieces)
            turns = job.turns + [Turn("model", answer, request.answer + job.close_ids)]
            self.cache.put(next_key(job.key, "assistant", answer),
                           Snapshot(state.to("cpu"), list(request.recent), turns, system=job.system))
        except Exception as e:  # noqa: BLE001 - the answer stands; only its follow-up will read more
            self.log(f"rgchat: cache: could not keep a snapshot ({type(e).__name__}: {e})")

    @property
    def busy_slots(self) -> int:
        return len(self.active)
