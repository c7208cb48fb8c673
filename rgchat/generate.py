"""The decode loop: prefill each answer's turn, sample and feed its tokens, stream events, and close the
turn however the loop ends.

`generate_many` drives any number of answers in one engine: each round prefills one chunk of every answer
still reading its prompt (so a long prompt holds the others up by one chunk at most), samples one token for
every answer that has logits, and feeds all those tokens in one batched decode step. `generate` is the same
loop for one answer. Closing the turn (feeding the last token and the template's `<end_of_turn>`) happens at
the end of iteration, on `close()` and when a request's cancel flag is set; the conversation is then exactly
what an answer capped at that many tokens would have left. Left open, for its owner to withdraw: a turn
whose prompt was not fully read when it was cancelled or closed, and any turn when the engine fails (or
when an exception is thrown into `generate_many` itself; `generate` turns one into a close).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from rgchat.device import peak_rss_bytes
from rgchat.engine import Engine
from rgchat.sampling import Sampler
from rgchat.settings import REPEAT_WINDOW
from rgchat.tokenizer import StreamingDetokenizer, Tokenizer

# Why an answer ended, as Stats.stop_reason has it (shown by --verbose and --stats-json), and the finish
# reason OpenAI's API (and Finish.reason) uses for it.
FINISH_REASONS = {"end_of_turn": "stop", "eos": "stop", "stop_string": "stop", "max_tokens": "length",
                  "interrupted": "cancelled"}


@dataclasses.dataclass
class Stats:
    """What an answer cost. Times in seconds; decode covers the tokens fed back after sampling."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # from the question to the first answer token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # a key of FINISH_REASONS
    peak_memory_bytes: int = 0

    def to_dict(self) -> dict:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None  # noqa: E731
        fields = {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {**fields, "prefill_tok_s": rate(self.prompt_tokens, self.prefill_s),
                "decode_tok_s": rate(self.generated_tokens, self.decode_s)}

    def summary(self) -> str:
        d = self.to_dict()
        return (f"{self.prompt_tokens} tokens in, {self.generated_tokens} out ({self.stop_reason}) · "
                f"first token {self.ttft_s:.2f} s · prefill {d['prefill_tok_s']} tok/s · "
                f"decode {d['decode_tok_s']} tok/s · peak memory {self.peak_memory_bytes / 2**30:.2f} GiB")


@dataclasses.dataclass(frozen=True)
class Token:
    """One sampled token, and the text it lets through (empty while it might begin a stop string or is part
    of a character)."""

    id: int
    text: str


@dataclasses.dataclass(frozen=True)
class Finish:
    """The answer ended: `reason` is stop, length or cancelled; `text` is what was held back until now."""

    reason: str
    text: str
    stats: Stats


Event = Token | Finish


def text(events: Iterable[Event]) -> str:
    """The whole answer's text."""
    return "".join(event.text for event in events)


class StopText:
    """Streams text while holding back whatever might be the start of a stop string, so a stop string is
    never shown; reports when one is complete."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was reached)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held)) + 1)
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclasses.dataclass
class Request:
    """One answer to generate in an engine slot, with this conversation's own sampler (settings and random
    stream) and recent tokens. The loop fills in `answer`, `stats`, `finish` and `closed`."""

    slot: int
    prompt: list[int]  # the turn's tokens, fed first
    sampler: Sampler
    tokenizer: Tokenizer
    stop_ids: frozenset[int]  # sampling one of these ends the answer (it is not part of it)
    close_ids: list[int] = dataclasses.field(default_factory=list)  # fed after the answer, however it ends
    recent: deque[int] = dataclasses.field(default_factory=lambda: deque(maxlen=REPEAT_WINDOW))
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    answer: list[int] = dataclasses.field(default_factory=list)
    stats: Stats = dataclasses.field(default_factory=Stats)
    finish: Finish | None = None
    closed: bool = False  # the answer and close_ids were fed: the conversation can take its next turn


def peak_memory_bytes(device: torch.device) -> int:
    """Peak process memory, plus the accelerator's own peak where there is one."""
    extra = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return peak_rss_bytes() + extra


class _Answer:
    """The loop's bookkeeping for one request."""

    def __init__(self, engine: Engine, request: Request):
        if not request.prompt:
            raise ValueError("an answer needs a prompt of at least one token")
        self.engine, self.request = engine, request
        self.fed = 0  # prompt tokens prefilled so far
        self.logits: torch.Tensor | None = None  # what the next token is sampled from
        self.token: int | None = None  # sampled and shown, not yet fed
        self.ending: str | None = None  # the stop reason, once the token in hand is the last
        self.stopping = False  # the consumer went away
        self.detok = StreamingDetokenizer(request.tokenizer)
        self.stop_text = StopText(request.sampler.settings.stop)
        request.stats = Stats(prompt_tokens=len(request.prompt))
        request.answer, request.finish, request.closed = [], None, False
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.request.finish is not None

    def prefill_chunk(self) -> Finish | None:
        """Feed the next chunk of the prompt. Cancelled, the question is left half-read (not closed): its
        owner withdraws it."""
        r, chunk = self.request, self.engine.model.prefill_chunk
        logits = self.engine.prefill(r.slot, r.prompt[self.fed:self.fed + chunk])
        self.fed = min(self.fed + chunk, len(r.prompt))
        if r.cancel.is_set():
            return self._end("interrupted", close=False)
        if self.fed == len(r.prompt):  # the first token is sampled from the prompt's last logits
            self.logits = logits
            r.stats.prefill_s = time.perf_counter() - self.started
        return None

    def sample(self) -> Event:
        r, logits = self.request, self.logits
        self.logits = None
        vocab = r.tokenizer.vocab_size  # the embedding may have rows past the tokenizer's: never pick those
        token = r.sampler(logits[:vocab], r.recent)
        if not r.answer:
            r.stats.ttft_s = time.perf_counter() - self.started
        if token in r.stop_ids:
            return self._end("eos" if token == r.tokenizer.eos_id else "end_of_turn")
        r.answer.append(token)
        r.recent.append(token)
        piece, stopped = self.stop_text.add(self.detok.add(token))
        self.token = token  # every answer token is fed, also the last one
        if stopped:
            self.ending = "stop_string"
        elif len(r.answer) >= r.sampler.settings.max_tokens:
            self.ending = "max_tokens"
        return Token(token, piece)

    def fed_token(self, logits: torch.Tensor, seconds: float) -> Finish | None:
        self.token, self.logits = None, logits
        self.request.stats.decode_s += seconds
        if self.ending is not None:
            return self._end(self.ending)
        if self.request.cancel.is_set() or self.stopping:
            return self._end("interrupted")
        return None

    def _end(self, reason: str, close: bool = True) -> Finish:
        r = self.request
        tail = ""
        if close:
            if reason != "stop_string":
                tail = self.stop_text.add(self.detok.flush())[0] + self.stop_text.flush()
            if r.close_ids:  # close the turn, whatever ended it, so the next one starts cleanly
                self.engine.prefill(r.slot, r.close_ids)
            r.closed = True
        r.stats.stop_reason = reason
        r.stats.generated_tokens = len(r.answer)
        r.stats.peak_memory_bytes = peak_memory_bytes(self.engine.model.device)
        r.finish = Finish(FINISH_REASONS[reason], tail, r.stats)
        return r.finish


def _step(engine: Engine, answers: list[_Answer]) -> list[Finish | None]:
    """Feed every answer's token in hand in one decode step."""
    t0 = time.perf_counter()
    logits = engine.decode([a.request.slot for a in answers], [a.token for a in answers])
    seconds = time.perf_counter() - t0
    return [a.fed_token(row, seconds) for a, row in zip(answers, logits, strict=True)]


def generate_many(engine: Engine, requests: list[Request],
                  arrivals: Callable[[], list[Request]] | None = None) -> Iterator[tuple[Request, Event]]:
    """Answer every request, yielding (request, event) as tokens come. `arrivals`, when given, is asked
    before every round for requests that join the batch (a server's queue, which checks them first: an
    invalid one stops the loop); the loop ends when no request is left. Each request gets exactly one Finish.
    Closing the iterator early ends every unfinished request as cancelled (without yielding), closing its turn
    if its prompt was fully read."""
    answers = [_Answer(engine, r) for r in requests]
    try:
        while True:
            if arrivals is not None:
                answers = [a for a in answers if not a.done] + [_Answer(engine, r) for r in arrivals()]
            live = [a for a in answers if not a.done]
            if not live:
                return
            for a in live:
                if a.fed < len(a.request.prompt) and (finish := a.prefill_chunk()) is not None:
                    yield a.request, finish
            for a in live:
                if a.logits is not None and not a.done:
                    yield a.request, a.sample()
            holding = [a for a in live if a.token is not None]
            if holding:
                for a, finish in zip(holding, _step(engine, holding), strict=True):
                    if finish is not None:
                        yield a.request, finish
    except GeneratorExit:
        _cancel(engine, answers)
        raise


def _cancel(engine: Engine, answers: list[_Answer]) -> None:
    """The consumer stopped: feed the tokens already shown, then close every turn that was answering."""
    for a in answers:
        a.stopping = True
    holding = [a for a in answers if a.token is not None and not a.done]
    if holding:
        _step(engine, holding)
    for a in answers:
        if not a.done:
            a._end("interrupted", close=a.fed == len(a.request.prompt))


def generate(engine: Engine, request: Request) -> Iterator[Event]:
    """The events of one answer (see `generate_many`)."""
    with contextlib.closing(generate_many(engine, [request])) as events:
        for _, event in events:
            yield event
