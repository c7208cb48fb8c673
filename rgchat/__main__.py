"""The `rgchat` command (and `python -m rgchat`). Importing the CLI loads torch, which takes a second or two;
Ctrl-C meanwhile ends rgchat quietly with exit code 130 instead of a traceback from inside an import."""

import sys


def main() -> None:
    try:
        from rgchat.cli import main as cli_main
    except KeyboardInterrupt:
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
