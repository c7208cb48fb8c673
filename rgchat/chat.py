"""A conversation: its State, its transcript, one snapshot for /undo and /regen, and the answer loop.

Each turn prefills only its own new tokens on top of the state, so a turn costs the same whether it is the
first or the thousandth. The session never looks inside the model, and the model never owns a conversation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator

import torch

from rgchat.device import peak_rss_bytes
from rgchat.errors import RGChatError
from rgchat.model import Griffin
from rgchat.sampling import REPEAT_WINDOW, Sampler
from rgchat.state import State
from rgchat.tokenizer import StreamingDetokenizer, Tokenizer

MAX_TOKENS = 1024  # default answer length limit


@dataclasses.dataclass
class LoadedModel:
    """A network with its tokenizer, read from the store (or converted into it on first use)."""

    model: Griffin
    tokenizer: Tokenizer
    name: str
    precision: str
    weights_sha256: str  # over the model file's per-tensor checksums: names these exact weights
    tokenizer_sha256: str
    spec: str  # how the user named it (store name, file or checkpoint path)

    @property
    def instruction_tuned(self) -> bool:
        return self.name.endswith("-it")

    def identity(self) -> dict:
        """What a saved conversation must match to be resumed with this model."""
        return {"name": self.name, "spec": self.spec, "config": self.model.config.to_dict(),
                "precision": self.precision, "weights_sha256": self.weights_sha256,
                "tokenizer_sha256": self.tokenizer_sha256}


def load(spec: str, precision: str | None, device: torch.device, log=print) -> LoadedModel:
    """MODEL as `rgchat run` takes it: a store name, a model file, or a checkpoint (converted once to
    `precision`, by default int8)."""
    from rgchat.checkpoint import TOKENIZER_FILE, load_file
    from rgchat.modelfile import sha256_file
    from rgchat.quant import DEFAULT_PRECISION
    from rgchat.store import resolve

    wanted = precision or DEFAULT_PRECISION
    path = resolve(spec, wanted, log=log)
    model, mf = load_file(path, str(device))
    if precision and mf.precision != precision:
        raise RGChatError(f"{path} holds {mf.precision} weights, not {precision}: "
                          f"convert the original checkpoint with --precision {precision}")
    tokenizer_path = path.parent / TOKENIZER_FILE
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RGChatError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} pieces but "
                          f"the model only {model.config.vocab_size}: wrong tokenizer for this model")
    tokenizer_sha256 = sha256_file(tokenizer_path)
    if mf.metadata.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise RGChatError(f"{tokenizer_path}: not the tokenizer {path} was converted with; convert the "
                          "checkpoint again (`rgchat run CHECKPOINT` does it) or put its tokenizer.model back")
    weights = hashlib.sha256(mf.metadata["tensor_sha256"].encode()).hexdigest()
    return LoadedModel(model, tokenizer, mf.metadata.get("name", path.parent.name), mf.precision, weights,
                       tokenizer_sha256, spec)


@dataclasses.dataclass
class Turn:
    role: str  # "user" or "model"
    text: str
    ids: list[int]  # exactly the tokens this turn fed into the state (template markers included)


@dataclasses.dataclass
class Stats:
    """What the last answer cost. Times in seconds; decode covers the tokens fed back after sampling."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # from the question to the first answer token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # end_of_turn, eos, max_tokens, stop_string, interrupted
    peak_memory_bytes: int = 0

    def to_dict(self) -> dict:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None
        fields = {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {**fields, "prefill_tok_s": rate(self.prompt_tokens, self.prefill_s),
                "decode_tok_s": rate(self.generated_tokens, self.decode_s)}

    def summary(self) -> str:
        d = self.to_dict()
        return (f"{self.prompt_tokens} tokens in, {self.generated_tokens} out ({self.stop_reason}) · "
                f"first token {self.ttft_s:.2f} s · prefill {d['prefill_tok_s']} tok/s · "
                f"decode {d['decode_tok_s']} tok/s · peak memory {self.peak_memory_bytes / 2**30:.2f} GiB")


class StopText:
    """Streams text while holding back whatever might be the start of a stop string, so a stop string is
    never printed; reports when one is complete."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to print, whether a stop string was reached)."""
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
class Snapshot:
    """The conversation as it was before the last exchange or /clear (one only: memory must not grow with
    length)."""

    state: State
    transcript: list[Turn]  # a copy of the list (the turns themselves are never changed)
    recent: list[int]
    valid: bool = False


class ChatSession:
    """One conversation with one model. `template` selects Gemma's chat turns; without it every input is
    plain text that the model continues (base models)."""

    def __init__(self, model: Griffin, tokenizer: Tokenizer, sampler: Sampler, *, template: bool,
                 max_tokens: int = MAX_TOKENS, system: str | None = None, stop: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.template = template
        self.max_tokens, self.system, self.stop = max_tokens, system, stop
        if template and (tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None):
            tokenizer.chat_prompt("")  # raises the clear error
        self.state = model.new_state()
        self.transcript: list[Turn] = []
        self.recent: deque[int] = deque(maxlen=REPEAT_WINDOW)  # for the repetition penalty
        self.stats = Stats()
        self.interrupted = False  # set (by a signal handler) to stop the answer after the current token
        self.on_change: Callable[[ChatSession], None] | None = None  # called when the conversation changed
        self._before_last = Snapshot(self.state.clone(), [], [])

    @property
    def stop_ids(self) -> set[int]:
        tok = self.tokenizer
        return {tok.eos_id} | ({tok.end_of_turn_id} if self.template else set())

    # --- the conversation ------------------------------------------------------------------------------

    def ask(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the answer as text pieces. Afterwards the turn is closed in the state
        (also when the answer was cut short), `transcript` holds both turns and `stats` what it cost.

        Should the turn fail (an exception, or a consumer that stops reading), the question is withdrawn:
        state and transcript are as before it. `on_change` runs once the turn is complete."""
        self._remember()
        try:
            ids = self._turn_ids(text)
            self.transcript.append(Turn("user", text, ids))
            answered = yield from self._answer(ids)
        except BaseException:
            self._restore()
            self._before_last.valid = False
            raise
        if answered:
            self._changed()

    def regen(self) -> Iterator[str]:
        """Answer the last question again, from the state saved before it was asked."""
        before = self._before_last
        if not before.valid or len(self.transcript) <= len(before.transcript):
            raise ValueError("nothing to regenerate yet")
        question = self.transcript[len(before.transcript)].text
        self.undo()
        yield from self.ask(question)

    def undo(self) -> None:
        """Go back to the state before the last exchange (once: one snapshot is kept)."""
        if not self._before_last.valid:
            raise ValueError("nothing to undo")
        self._restore()
        self._before_last.valid = False
        self._changed()

    def clear(self) -> None:
        """A fresh conversation: empty state and transcript. `undo` brings the last one back until the next
        turn, so `on_change` is not called (a saved conversation is rewritten at the next turn)."""
        self._remember()
        self.state.zero_()
        self.transcript.clear()
        self.recent.clear()

    def resume(self, state: State, transcript: list[Turn], recent: list[int]) -> None:
        """Continue a saved conversation: its state (copied onto this model's device), transcript, and the
        recent tokens the repetition penalty looks at."""
        self.state.copy_(state)
        self.transcript[:] = transcript
        self.recent.clear()
        self.recent.extend(recent)
        self._before_last.valid = False

    def replay(self, turns: list[Turn], reuse_ids: bool) -> None:
        """Rebuild the state by prefilling a transcript: with the turns' own token ids (same tokenizer), or
        with their texts encoded again."""
        self._reset()
        close = self._close_ids()
        for turn in turns:
            if reuse_ids:
                ids = turn.ids
            elif turn.role == "user":
                ids = self._turn_ids(turn.text)
            else:
                ids = self.tokenizer.encode(turn.text) + close
            if ids:
                self.model.prefill(torch.tensor(ids, dtype=torch.long), self.state)
            self.transcript.append(Turn(turn.role, turn.text, ids))
            if turn.role == "model":
                self.recent.extend(ids[:len(ids) - len(close)])

    def _reset(self) -> None:
        self.state.zero_()
        self.transcript.clear()
        self.recent.clear()
        self._before_last.valid = False

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # --- internals ---------------------------------------------------------------------------------------

    def _remember(self) -> None:
        snap = self._before_last
        snap.state.copy_(self.state)  # into buffers allocated once
        snap.transcript, snap.recent, snap.valid = list(self.transcript), list(self.recent), True

    def _restore(self) -> None:
        snap = self._before_last
        self.state.copy_(snap.state)
        self.transcript[:] = snap.transcript
        self.recent.clear()
        self.recent.extend(snap.recent)

    def _close_ids(self) -> list[int]:
        """What ends an answer's turn in the chat template (`<end_of_turn>\n`); nothing in raw text."""
        return [self.tokenizer.end_of_turn_id, *self.tokenizer.encode("\n")] if self.template else []

    def _turn_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = [tok.bos_id] if self.state.pos == 0 else []
        if not self.template:
            return ids + tok.encode(text)
        if self.system and not any(t.role == "user" for t in self.transcript):
            text = f"{self.system}\n\n{text}"  # Gemma has no system role: it heads the first user turn
        return ids + tok.chat_prompt(text)

    def _answer(self, ids: list[int]) -> Generator[str, None, bool]:
        """Prefill the turn and stream its answer; returns whether the conversation changed (False when an
        interrupted prefill withdrew the question)."""
        self.interrupted = False
        stats = self.stats = Stats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        logits = None
        chunk = self.model.prefill_chunk
        for i in range(0, len(ids), chunk):
            logits = self.model.prefill(torch.tensor(ids[i:i + chunk], dtype=torch.long), self.state)
            if self.interrupted:  # the question is withdrawn: as if never asked
                self._restore()
                self._before_last.valid = False
                stats.stop_reason = "interrupted"
                return False
        stats.prefill_s = time.perf_counter() - t0

        detok, stop_text = StreamingDetokenizer(self.tokenizer), StopText(self.stop)
        vocab = self.tokenizer.vocab_size  # the embedding may have rows past the tokenizer's: never pick those
        answer: list[int] = []
        stats.stop_reason = "max_tokens"
        for n in range(self.max_tokens):
            token = self.sampler(logits[:vocab], self.recent)
            if n == 0:
                stats.ttft_s = time.perf_counter() - t0
            if token in self.stop_ids:
                stats.stop_reason = "eos" if token == self.tokenizer.eos_id else "end_of_turn"
                break
            answer.append(token)
            self.recent.append(token)
            piece, stopped = stop_text.add(detok.add(token))
            if piece:
                yield piece  # shown before the step below: consumers must run this generator to its end
            t1 = time.perf_counter()
            logits = self.model.step(token, self.state)  # every answer token is fed, also the last one
            stats.decode_s += time.perf_counter() - t1
            if stopped or self.interrupted:
                stats.stop_reason = "stop_string" if stopped else "interrupted"
                break
        stats.generated_tokens = len(answer)
        if stats.stop_reason != "stop_string":
            tail = stop_text.add(detok.flush())[0] + stop_text.flush()
            if tail:
                yield tail
        fed = list(answer)
        if close := self._close_ids():  # close the turn, whatever ended it, so the next one starts cleanly
            self.model.prefill(torch.tensor(close, dtype=torch.long), self.state)
            fed += close
        self.transcript.append(Turn("model", self.tokenizer.decode(answer), fed))
        stats.peak_memory_bytes = peak_memory_bytes(self.model.device)
        return True


def peak_memory_bytes(device: torch.device) -> int:
    """Peak process memory, plus the accelerator's own peak where there is one."""
    extra = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return peak_rss_bytes() + extra


@contextlib.contextmanager
def ctrl_c_stops(session: ChatSession) -> Iterator[None]:
    """While active, Ctrl-C asks the session to stop after the current token (or prefill chunk) instead
    of raising KeyboardInterrupt in the middle of a state update."""

    def handler(signum, frame):
        session.interrupted = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
