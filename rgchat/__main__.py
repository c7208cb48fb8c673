"""The `rgchat` command (and `python -m rgchat`). Importing the CLI loads torch, which takes a second or two,
and a Ctrl-C inside torch's native start-up can abort the process or be lost; so Ctrl-C is held back while
the CLI imports, and then ends rgchat quietly with exit code 130; once the command is over it is ignored."""

import signal
import sys


def main() -> None:
    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, a background job): keep it so
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        from rgchat.cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        sys.exit(130)
    try:
        cli_main()
    finally:
        # The command is over. Python's exit puts back the default Ctrl-C action, which would kill the
        # process with a signal while it tears torch down; nothing is left to stop, so ignore it instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
