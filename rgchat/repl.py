"""The interactive chat, when stdin and stdout are terminals: line editing and persistent history
(readline), multi-line input, slash commands, streamed answers, and Ctrl-C that stops an answer but
keeps the conversation."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import platformdirs
from rich.console import Console
from rich.table import Table

from rgchat import files, statefile
from rgchat import settings as settings_lib
from rgchat.chat import ChatSession
from rgchat.errors import RGChatError
from rgchat.interrupt import ctrl_c_sets
from rgchat.loader import LoadedModel

try:  # line editing and history; absent on some platforms, where plain input() still works
    import readline
except ImportError:  # pragma: no cover
    readline = None

PROMPT, MORE = ">>> ", "... "
FENCE = '"""'
HISTORY_LINES = 1000

# What /set can change: every generation setting but the stop strings, and the system text.
SETTINGS = (*(name for name in settings_lib.NAMES if name != "stop"), "system")

HELP = f"""\
/help                 this list
/set                  show the settings; /set NAME VALUE changes one, NAME being one of:
                      {", ".join(SETTINGS)}
/show                 model, settings, position and state size
/stats                what the last answer cost
/clear                start a fresh conversation (/undo brings the last one back)
/undo                 go back to before the last exchange or /clear
/regen                answer the last question again
/save FILE            save the conversation (its state) to FILE
/load FILE            resume a conversation saved with /save (with --state, later turns are saved to FILE)
/bye                  exit (also Ctrl-D)
//TEXT                send /TEXT as a message (a message that starts with /)
{FENCE} ... {FENCE}       a message over several lines (pasting several lines works too)
Ctrl-C                stop the answer (the conversation keeps what was said)"""
MAX_HISTORY_BYTES = 16 << 20


def history_path() -> Path:
    home = os.environ.get("RGCHAT_HOME")
    return Path(home) / "history" if home else Path(platformdirs.user_state_dir("rgchat")) / "history"


def get_setting(session: ChatSession, name: str):
    return session.system if name == "system" else getattr(session.settings, name)


def put_setting(session: ChatSession, name: str, text: str) -> None:
    """Set `name` from what the user typed; ValueError says why a value is refused."""
    if name == "system":
        session.system = text or None
    elif name == "seed":  # the random stream starts again from it, also when it is the same seed
        session.sampler.reseed(settings_lib.parse(name, text))
    else:
        session.settings = session.settings.replace(**{name: settings_lib.parse(name, text)})


class Repl:
    """The interactive chat. `state_file`, when given (`--state`), is where the conversation is saved after
    every turn; `/load` moves it to the loaded file."""

    def __init__(self, session: ChatSession, model: LoadedModel, console: Console, verbose: bool = False,
                 state_file: statefile.StateFile | None = None):
        self.session, self.model, self.console, self.verbose = session, model, console, verbose
        self.label = model.name
        self.state_file = state_file

    def run(self) -> None:
        with contextlib.suppress(AttributeError, ValueError):  # typed bytes that are not UTF-8 become U+FFFD
            sys.stdin.reconfigure(errors="replace")
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
                if text.strip() and self._handle(text) == "bye":
                    return
        finally:
            self._save_history()

    def _handle(self, text: str) -> str | None:
        """One message or command. Whatever goes wrong in it, the chat goes on with the conversation intact
        (a failed turn is withdrawn by the session), after one line saying what happened."""
        try:
            if text.startswith("/") and not text.startswith("//"):
                return self._command(text)
            self._stream(self.session.ask(text[1:] if text.startswith("//") else text))
        except RGChatError as e:
            self._say(f"rgchat: error: {e}")
        except KeyboardInterrupt:
            self._note("(interrupted)")
        except Exception as e:  # a bug, or the machine ran out of something: keep the conversation
            self._say(f"rgchat: error: {type(e).__name__}: {e} (the conversation is kept)")
        return None

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
        path = history_path()
        try:  # readline reads the file itself: check first that it is a regular file of sane size
            with files.open_regular(path) as f:
                if os.fstat(f.fileno()).st_size > MAX_HISTORY_BYTES:
                    return
            readline.read_history_file(path)
        except (RGChatError, OSError):
            pass

    def _save_history(self) -> None:
        if readline is None:
            return
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as scratch:  # readline writes only by name: let it write here,
                readline.write_history_file(os.path.join(scratch, "history"))  # then replace ours by the rule
                data = files.read_bounded(os.path.join(scratch, "history"), MAX_HISTORY_BYTES, "a history")
            files.write_atomically(path, data, files.PRIVATE)
        except (RGChatError, OSError) as e:
            print(f"rgchat: warning: could not save the input history: {e}", file=sys.stderr)

    # --- output --------------------------------------------------------------------------------------------

    def _stream(self, events) -> None:
        try:
            with ctrl_c_sets(self.session.cancel), contextlib.closing(events):
                for event in events:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()
        stats = self.session.stats
        if stats.stop_reason == "interrupted":
            self._note("[stopped]" if stats.generated_tokens else "[question withdrawn]")
        elif stats.stop_reason == "max_tokens":
            self._note(f"[cut at max_tokens = {self.session.settings.max_tokens}]")
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
            kept = f"; {self.state_file.path} keeps it until the next turn" if self.state_file else ""
            self._note(f"(fresh conversation: /undo brings the last one back{kept})")
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
            (self._save if name == "save" else self._load)(Path(arg).expanduser())
        else:
            self._note(f"unknown command /{name}: /help lists them")
        return None

    def _save(self, path: Path) -> None:
        """A copy of the conversation in `path`; with --state, later turns still go to the state file."""
        bound = self.state_file
        if bound is not None and bound.same_file(path):
            bound.write(self.session, self.model.identity())
            also = ""
        else:
            statefile.save_copy(path, self.session, self.model.identity())
            also = f"; later turns are still saved to {bound.path}" if bound else ""
        self._note(f"(saved {len(self.session.transcript)} turns to {path}, "
                   f"{path.stat().st_size / 2**20:.2f} MiB{also})")

    def _load(self, path: Path) -> None:
        """Resume the conversation in `path`; with --state it becomes the file later turns are saved to."""
        identity = self.model.identity()
        if self.state_file is not None:
            saved = self.state_file.load_other(path, identity)
        else:
            saved = statefile.load(path, identity)
        statefile.restore(self.session, saved)
        also = f"; later turns are saved to {path}" if self.state_file else ""
        self._note(f"(resumed {len(self.session.transcript)} turns from {path}, position "
                   f"{self.session.state.pos}{also})")

    def _set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            for key in SETTINGS:
                self._say(f"{key} = {get_setting(self.session, key)!r}")
            return
        if name not in SETTINGS:
            self._say(f"unknown setting {name!r}; one of: {', '.join(SETTINGS)}")
            return
        try:
            put_setting(self.session, name, value.strip())
        except ValueError as e:
            self._say(f"bad value for {name}: {e}")
            return
        self._say(f"{name} = {get_setting(self.session, name)!r}")

    def _show(self) -> None:
        session = self.session
        table = Table(show_header=False, box=None)
        rows = [("model", self.label), ("mode", "chat" if session.template else "raw text"),
                ("device", str(session.model.device)),
                ("position", f"{session.state.pos} tokens"),
                ("turns", str(len(session.transcript))),
                ("state size", f"{session.state.nbytes / 2**20:.2f} MiB (fixed, whatever the length)")]
        rows += [(key, repr(get_setting(session, key))) for key in SETTINGS]
        for label, value in rows:
            table.add_row(label, value)
        self.console.print(table)
