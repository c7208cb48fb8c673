"""Ctrl-C during an answer: the CLI's one signal handler, which sets the answer's cancel flag so the decode
loop stops after the current token (or prefill chunk), instead of raising KeyboardInterrupt in the middle of
a state update."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def ctrl_c_sets(flag: threading.Event) -> Iterator[None]:
    """While active (in the main thread), Ctrl-C sets `flag`."""

    def handler(signum, frame):
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
