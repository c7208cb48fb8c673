"""A conversation: its State (a slot of an engine), its transcript, one snapshot for /undo and /regen, and
its settings; it drives the decode loop (rgchat/generate.py) for each turn.

Each turn prefills only its own new tokens on top of the state, so a turn costs the same whether it is the
first or the thousandth. The session never looks inside the model, and the model never owns a conversation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator

import torch

from rgchat.engine import Engine
from rgchat.generate import Event, Request, Stats, generate
from rgchat.model import Griffin
from rgchat.sampling import Sampler
from rgchat.settings import REPEAT_WINDOW, Settings
from rgchat.state import State
from rgchat.tokenizer import Tokenizer


def with_system(system: str | None, text: str) -> str:
    """The first user turn's text: Gemma has no system role, so the system text heads that turn."""
    return f"{system}\n\n{text}" if system else text


@dataclasses.dataclass
class Turn:
    role: str  # "user" or "model"
    text: str
    ids: list[int]  # exactly the tokens this turn fed into the state (template markers included)


@dataclasses.dataclass
class Snapshot:
    """The conversation as it was before the last exchange or /clear (one only: memory must not grow with
    length)."""

    state: State
    transcript: list[Turn]  # a copy of the list (the turns themselves are never changed)
    recent: list[int]
    valid: bool = False


class ChatSession:
    """One conversation with one model, in a one-slot engine of its own. `template` selects Gemma's chat
    turns; without it every input is plain text that the model continues (base models)."""

    def __init__(self, model: Griffin, tokenizer: Tokenizer, settings: Settings | None = None, *, template: bool,
                 system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.sampler = Sampler(settings)
        self.template, self.system = template, system
        if template and (tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None):
            tokenizer.chat_prompt("")  # raises the clear error
        self.engine = Engine(model, slots=1)
        self.slot = self.engine.admit()
        self.state = self.engine.state(self.slot)
        self.transcript: list[Turn] = []
        self.recent: deque[int] = deque(maxlen=REPEAT_WINDOW)  # for the repetition penalty
        self.stats = Stats()
        self.cancel = threading.Event()  # set (by the CLI's Ctrl-C handler) to stop the answer in progress
        self.on_change: Callable[[ChatSession], None] | None = None  # called when the conversation changed
        self._before_last = Snapshot(self.state.clone(), [], [])

    @property
    def settings(self) -> Settings:
        return self.sampler.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings; a changed seed restarts the random stream from it."""
        if settings.seed != self.sampler.settings.seed:
            self.sampler.reseed(settings.seed)
        self.sampler.settings = settings

    @property
    def stop_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        return frozenset({tok.eos_id} | ({tok.end_of_turn_id} if self.template else set()))

    # --- the conversation ------------------------------------------------------------------------------

    def ask(self, text: str) -> Iterator[Event]:
        """Add a user turn and stream the answer's events. Afterwards the turn is closed in the state,
        `transcript` holds both turns, `stats` what it cost, and `on_change` has run.

        However the answer ends (its end, a stop, `cancel`, or the consumer closing the iterator), the turn is
        closed and kept, as an answer capped at the tokens shown would be. Withdrawn instead, with state and
        transcript as before the question: a cancel during the prefill, an error in the engine, and an
        exception the consumer throws in (`events.throw(e)`: the answer could not be delivered)."""
        self._remember()
        self.cancel.clear()
        request = None
        try:
            ids = self._turn_ids(text)
            request = Request(self.slot, ids, self.sampler, self.tokenizer, self.stop_ids,
                              self._close_ids(), self.recent, self.cancel)
            self.transcript.append(Turn("user", text, ids))
            with contextlib.closing(generate(self.engine, request)) as events:
                for event in events:
                    yield event
        except GeneratorExit:
            self._end_turn(request)
            raise
        except BaseException:
            self._withdraw()
            raise
        self._end_turn(request)

    def _end_turn(self, request: Request | None) -> None:
        if request is None:
            return
        self.stats = request.stats
        if not request.closed:  # cancelled while reading the question: as if never asked
            self._withdraw()
            return
        answer = request.answer
        self.transcript.append(Turn("model", self.tokenizer.decode(answer), answer + request.close_ids))
        self._changed()

    def _withdraw(self) -> None:
        self._restore()
        self._before_last.valid = False

    def regen(self) -> Iterator[Event]:
        """Answer the last question again, from the state saved before it was asked. Should the new answer be
        withdrawn (see `ask`), the conversation is back as it was, old answer and /undo included; `on_change`
        runs only for a new answer."""
        before = self._before_last
        if not before.valid or len(self.transcript) <= len(before.transcript):
            raise ValueError("nothing to regenerate yet")
        asked_at = len(before.transcript)
        question = self.transcript[asked_at].text
        current = Snapshot(self.state.clone(), list(self.transcript), list(self.recent))
        random_stream = self.sampler.generator.get_state()
        self._restore()
        try:
            yield from self.ask(question)
        finally:
            if len(self.transcript) == asked_at:  # withdrawn: the old answer comes back
                self._restore(current)
                self.sampler.generator.set_state(random_stream)
                self._before_last.valid = True  # ask's snapshot is the conversation before the question

    def undo(self) -> None:
        """Go back to the state before the last exchange (once: one snapshot is kept)."""
        if not self._before_last.valid:
            raise ValueError("nothing to undo")
        self._withdraw()
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

    def _restore(self, snap: Snapshot | None = None) -> None:
        """Put back `snap`, by default the one taken before the last exchange."""
        snap = self._before_last if snap is None else snap
        self.state.copy_(snap.state)
        self.transcript[:] = snap.transcript
        self.recent.clear()
        self.recent.extend(snap.recent)

    def _close_ids(self) -> list[int]:
        """What ends an answer's turn in the chat template (`<end_of_turn>\n`); nothing in raw text."""
        return self.tokenizer.end_of_turn() if self.template else []

    def _turn_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = [tok.bos_id] if self.state.pos == 0 else []
        if not self.template:
            return ids + tok.encode(text)
        if not any(t.role == "user" for t in self.transcript):
            text = with_system(self.system, text)
        return ids + tok.chat_prompt(text)
