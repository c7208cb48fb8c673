"""The errors users can cause; the CLI prints their message on one line and exits 1 (2 for usage)."""


class RGChatError(Exception):
    """A problem with the user's input or environment, with a message meant for humans."""


class UsageError(RGChatError):
    """The command line itself is wrong (exit 2, as for a bad flag)."""
