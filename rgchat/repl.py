"""The interactive chat, when stdin and stdout are terminals: line editing and persistent history
(readline), multi-line input, slash commands, streamed answers, and Ctrl-C that stops an answer but
keeps the conversation."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import platformdirs
from rich.console import Console
from rich.table import Table

from rgchat import statefile
from rgchat.chat import ChatSession, LoadedModel, ctrl_c_stops
from rgchat.errors import RGChatError

try:  # line editing and history; absent on some platforms, where plain input() still works
    import readline
except ImportError:  # pragma: no cover
    readline = None

PROMPT, MORE = ">>> ", "... "
FENCE = '"""'
HISTORY_LINES = 1000

HELP = f"""\
/help                 this list
/set                  show the settings; /set NAME VALUE changes one (see below)
/show                 model, settings, position and state size
/stats                what the last answer cost
/clear                start a fresh conversation
/undo                 go back to before the last exchange
/regen                answer the last question again
/save FILE            save the conversation (its state) to FILE
/load FILE            resume a conversation saved with /save
/bye                  exit (also Ctrl-D)
{FENCE} ... {FENCE}       a message over several lines (pasting several lines works too)
Ctrl-C                stop the answer (the conversation keeps what was said)"""


def history_path() -> Path:
    home = os.environ.get("RGCHAT_HOME")
    return Path(home) / "history" if home else Path(platformdirs.user_state_dir("rgchat")) / "history"


@dataclasses.dataclass
class Setting:
    parse: Callable[[str], object]
    get: Callable[[ChatSession], object]
    put: Callable[[ChatSession, object], None]


def _number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], object]:
    def parse(text: str):
        value = kind(text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
        return value

    return parse


def _sampler_setting(name: str, parse: Callable[[str], object]) -> Setting:
    return Setting(parse, lambda s: getattr(s.sampler, name), lambda s, v: setattr(s.sampler, name, v))


SETTINGS: dict[str, Setting] = {
    "temperature": _sampler_setting("temperature", _number(float, 0.0)),
    "top_k": _sampler_setting("top_k", _number(int, 0)),
    "top_p": _sampler_setting("top_p", _number(float, 0.0, 1.0)),
    "min_p": _sampler_setting("min_p", _number(float, 0.0, 1.0)),
    "repeat_penalty": _sampler_setting("repeat_penalty", _number(float, 0.01)),
    "seed": Setting(lambda t: None if t.lower() == "none" else int(t),
                    lambda s: s.sampler.seed, lambda s, v: s.sampler.reseed(v)),
    "max_tokens": Setting(_number(int, 1), lambda s: s.max_tokens, lambda s, v: setattr(s, "max_tokens", v)),
    "system": Setting(lambda t: t or None, lambda s: s.system, lambda s, v: setattr(s, "system", v)),
}


class Repl:
    def __init__(self, session: ChatSession, model: LoadedModel, console: Console, verbose: bool = False):
        self.session, self.model, self.console, self.verbose = session, model, console, verbose
        self.label = model.name

    def run(self) -> None:
        self._start_history()
        mode = "chat" if self.session.template else "raw text"
        self._note(f"rgchat · {self.label} · {mode} · /help for commands, /bye or Ctrl-D to exit")
        try:
            while True:
                try:
                    text = self._read_message()
                except EOFError:
                    print()
                    return
                except KeyboardInterrupt:
                    self._note("\n(Ctrl-D or /bye to exit)")
                    continue
                if not text.strip():
                    continue
                if text.startswith("/"):
                    if self._command(text) == "bye":
                        return
                else:
                    self._stream(self.session.ask(text))
        finally:
            self._save_history()

    # --- input ---------------------------------------------------------------------------------------------

    def _read_message(self) -> str:
        first = input(PROMPT)
        if not first.lstrip().startswith(FENCE):
            return first
        lines = [first.lstrip()[len(FENCE):]]
        while not lines[-1].rstrip().endswith(FENCE):
            lines.append(input(MORE))
        lines[-1] = lines[-1].rstrip()[:-len(FENCE)]
        return "\n".join(lines).strip("\n")

    def _start_history(self) -> None:
        if readline is None:
            return
        readline.parse_and_bind("set enable-bracketed-paste on")  # a pasted block arrives as one message
        readline.set_history_length(HISTORY_LINES)
        try:
            readline.read_history_file(history_path())
        except OSError:
            pass

    def _save_history(self) -> None:
        if readline is None:
            return
        path = history_path()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(tmp)
            os.replace(tmp, path)  # whole or not at all
        except OSError as e:
            print(f"rgchat: warning: could not save the input history: {e}", file=sys.stderr)

    # --- output --------------------------------------------------------------------------------------------

    def _stream(self, pieces) -> None:
        with ctrl_c_stops(self.session):
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = self.session.stats
        if stats.stop_reason == "interrupted":
            self._note("[stopped]" if stats.generated_tokens else "[question withdrawn]")
        elif stats.stop_reason == "max_tokens":
            self._note(f"[cut at max_tokens = {self.session.max_tokens}]")
        if self.verbose:
            self._note(stats.summary())

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def _note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def _command(self, text: str) -> str | None:
        name, _, arg = text[1:].strip().partition(" ")
        arg = arg.strip()
        session = self.session
        if name in ("bye", "exit", "quit"):
            return "bye"
        if name in ("help", "?"):
            self._say(HELP)
        elif name == "set":
            self._set(arg)
        elif name == "show":
            self._show()
        elif name == "stats":
            stats = session.stats
            self._say(stats.summary() if stats.stop_reason else "no answer yet")
        elif name == "clear":
            session.clear()
            self._note("(fresh conversation)")
        elif name == "undo":
            try:
                session.undo()
                self._note(f"(back to position {session.state.pos})")
            except ValueError as e:
                self._note(f"({e})")
        elif name == "regen":
            try:
                self._stream(session.regen())
            except ValueError as e:
                self._note(f"({e})")
        elif name in ("save", "load"):
            if not arg:
                self._note(f"usage: /{name} FILE")
                return None
            try:
                (self._save if name == "save" else self._load)(Path(arg).expanduser())
            except RGChatError as e:
                self._say(f"rgchat: error: {e}")
        else:
            self._note(f"unknown command /{name}: /help lists them")
        return None

    def _save(self, path: Path) -> None:
        statefile.save(path, self.session, self.model.identity())
        self._note(f"(saved {len(self.session.transcript)} turns to {path}, {path.stat().st_size / 2**20:.2f} MiB)")

    def _load(self, path: Path) -> None:
        statefile.restore(self.session, statefile.load_for(path, self.model.identity()))
        self._note(f"(resumed {len(self.session.transcript)} turns from {path}, position {self.session.state.pos})")

    def _set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            for key, setting in SETTINGS.items():
                self._say(f"{key} = {setting.get(self.session)!r}")
            return
        setting = SETTINGS.get(name)
        if setting is None:
            self._say(f"unknown setting {name!r}; one of: {', '.join(SETTINGS)}")
            return
        try:
            setting.put(self.session, setting.parse(value.strip()))
        except ValueError as e:
            self._say(f"bad value for {name}: {e}")
            return
        self._say(f"{name} = {setting.get(self.session)!r}")

    def _show(self) -> None:
        session = self.session
        table = Table(show_header=False, box=None)
        rows = [("model", self.label), ("mode", "chat" if session.template else "raw text"),
                ("device", str(session.model.device)),
                ("position", f"{session.state.pos} tokens"),
                ("turns", str(len(session.transcript))),
                ("state size", f"{session.state.nbytes / 2**20:.2f} MiB (fixed, whatever the length)")]
        rows += [(key, repr(setting.get(session))) for key, setting in SETTINGS.items()]
        for label, value in rows:
            table.add_row(label, value)
        self.console.print(table)
