"""The one error type users can cause; the CLI prints its message and exits 1."""


class RGChatError(Exception):
    """A problem with the user's input or environment, with a message meant for humans."""
