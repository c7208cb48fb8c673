"""Non-interactive use, when stdin is not a terminal: one answer to PROMPT and stdin, or with --lines one
answer per stdin line in one conversation. stdout gets the answers and nothing else; notes go to stderr.
An answer that cannot be written (stdout full or gone) stops the turn, which is then withdrawn."""

from __future__ import annotations

import contextlib
import json
from typing import BinaryIO, TextIO

from rgchat.chat import ChatSession
from rgchat.errors import RGChatError, UsageError
from rgchat.interrupt import ctrl_c_sets

MAX_INPUT_BYTES = 32 << 20  # far beyond any sane prompt; refuse rather than tokenize gigabytes


def decode_input(data: bytes, err: TextIO, what: str = "input") -> str:
    """UTF-8 text; invalid bytes become U+FFFD, with one warning line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"rgchat: warning: {what} is not valid UTF-8 (byte {e.start}); invalid bytes were replaced",
              file=err)
        return data.decode("utf-8", errors="replace")


def decode_argument(text: str | None, what: str, err: TextIO) -> str | None:
    """A command-line argument as valid text: Python keeps bytes that are not UTF-8 as lone surrogates,
    which no tokenizer takes; they become U+FFFD, with one warning line."""
    if text is None:
        return None
    return decode_input(text.encode("utf-8", "surrogateescape"), err, what)


class OutputError(RGChatError):
    """The answer could not be written to stdout."""


def emit(out: TextIO, text: str) -> None:
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # full (/dev/full), closed, or gone
        raise OutputError(f"cannot write the answer to standard output ({getattr(e, 'strerror', None) or e})") from None


def read_prompt(prompt: str | None, stdin: BinaryIO | None, err: TextIO) -> str:
    """PROMPT + "\\n\\n" + stdin, either may be absent, not both."""
    piped = ""
    if stdin is not None:
        data = stdin.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise RGChatError(f"input is larger than {MAX_INPUT_BYTES >> 20} MiB")
        piped = decode_input(data, err)
    parts = [p for p in (prompt, piped) if p and p.strip()]
    if not parts:
        raise UsageError("nothing to answer: give a PROMPT or pipe text into stdin")
    return "\n\n".join(parts)


def answer(session: ChatSession, text: str, out: TextIO, err: TextIO, verbose: bool = False,
           stats_json: bool = False) -> None:
    """Stream one answer to `out`, ending with a newline. Ctrl-C stops it and then exits 130."""
    try:
        with ctrl_c_sets(session.cancel), contextlib.closing(session.ask(text)) as events:
            for event in events:
                try:
                    emit(out, event.text)
                except (OutputError, BrokenPipeError) as e:
                    events.throw(e)  # the answer never reached its reader: the session withdraws the turn
    except (OutputError, BrokenPipeError):
        raise
    except BaseException:
        emit(out, "\n")  # what was shown of the answer still ends its line
        raise
    emit(out, "\n")
    report(session, err, verbose, stats_json)
    if session.stats.stop_reason == "interrupted":
        raise KeyboardInterrupt


def answer_lines(session: ChatSession, prompt: str | None, stdin: BinaryIO, out: TextIO, err: TextIO,
                 verbose: bool = False, stats_json: bool = False) -> None:
    """Each non-blank stdin line is one user turn, answered as it arrives; PROMPT, when given, heads every
    line as it heads stdin without --lines (PROMPT, a blank line, the line)."""
    answered = False
    while line := stdin.readline(MAX_INPUT_BYTES + 1):
        if len(line) > MAX_INPUT_BYTES:
            raise RGChatError(f"an input line is longer than {MAX_INPUT_BYTES >> 20} MiB")
        text = decode_input(line, err).rstrip("\r\n")
        if text.strip():
            answer(session, f"{prompt}\n\n{text}" if prompt and prompt.strip() else text, out, err, verbose,
                   stats_json)
            answered = True
    if not answered:
        raise UsageError("nothing to answer: --lines answers each non-blank line of stdin, and there was none")


def report(session: ChatSession, err: TextIO, verbose: bool, stats_json: bool) -> None:
    if verbose:
        print(f"rgchat: {session.stats.summary()}", file=err)
    if stats_json:
        print(json.dumps(session.stats.to_dict()), file=err)
    err.flush()
