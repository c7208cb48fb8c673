"""Non-interactive use, when stdin is not a terminal: one answer to PROMPT and stdin, or with --lines one
answer per stdin line in one conversation. stdout gets the answers and nothing else; notes go to stderr."""

from __future__ import annotations

import json
from typing import BinaryIO, TextIO

from rgchat.chat import ChatSession, ctrl_c_stops
from rgchat.errors import RGChatError, UsageError

MAX_INPUT_BYTES = 32 << 20  # far beyond any sane prompt; refuse rather than tokenize gigabytes


def decode_input(data: bytes, err: TextIO) -> str:
    """UTF-8 text; invalid bytes become U+FFFD, with one warning line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"rgchat: warning: input is not valid UTF-8 (byte {e.start}); invalid bytes were replaced",
              file=err)
        return data.decode("utf-8", errors="replace")


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
    with ctrl_c_stops(session):
        for piece in session.ask(text):
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    report(session, err, verbose, stats_json)
    if session.stats.stop_reason == "interrupted":
        raise KeyboardInterrupt


def answer_lines(session: ChatSession, stdin: BinaryIO, out: TextIO, err: TextIO, verbose: bool = False,
                 stats_json: bool = False) -> None:
    """Each non-blank stdin line is one user turn, answered as it arrives."""
    while line := stdin.readline(MAX_INPUT_BYTES + 1):
        if len(line) > MAX_INPUT_BYTES:
            raise RGChatError(f"an input line is longer than {MAX_INPUT_BYTES >> 20} MiB")
        text = decode_input(line, err).rstrip("\r\n")
        if text.strip():
            answer(session, text, out, err, verbose, stats_json)


def report(session: ChatSession, err: TextIO, verbose: bool, stats_json: bool) -> None:
    if verbose:
        print(f"rgchat: {session.stats.summary()}", file=err)
    if stats_json:
        print(json.dumps(session.stats.to_dict()), file=err)
    err.flush()
