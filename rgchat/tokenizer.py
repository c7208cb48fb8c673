"""The Gemma SentencePiece tokenizer, and a detokenizer that streams text without splitting characters."""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from rgchat.errors import RGChatError
from rgchat.files import read_bounded

MAX_TOKENIZER_BYTES = 64 << 20  # Gemma's is about 4 MB
CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")
_MARKER_SPLIT = re.compile("(" + "|".join(map(re.escape, CHAT_MARKERS)) + ")")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise RGChatError(f"{path}: tokenizer.model not found")
        data = read_bounded(path, MAX_TOKENIZER_BYTES, "a SentencePiece model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (OSError, RuntimeError, TypeError) as e:
            raise RGChatError(f"{path}: not a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.end_of_turn_id = self._piece_id("<end_of_turn>")
        self.start_of_turn_id = self._piece_id("<start_of_turn>")

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() else i

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        """Plain text to ids. Chat markers typed in the text stay text, so input cannot fake a turn."""
        ids: list[int] = []
        for part in _MARKER_SPLIT.split(text):
            if part in CHAT_MARKERS:  # spell it as "<" + "start_of_turn>" instead of the control token
                ids += self.sp.EncodeAsIds("<") + self.sp.EncodeAsIds(part[1:])
            elif part:
                ids += self.sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def _require_markers(self) -> None:
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise RGChatError("this tokenizer has no <start_of_turn>/<end_of_turn> tokens: use --raw")

    def chat_prompt(self, text: str) -> list[int]:
        """One user turn asking for an answer, in Gemma's template (without BOS)."""
        self._require_markers()
        sot, eot = self.start_of_turn_id, self.end_of_turn_id
        return [sot, *self.encode("user\n" + text), eot, *self.encode("\n"), sot, *self.encode("model\n")]

    def end_of_turn(self) -> list[int]:
        """What closes a turn in Gemma's template (`<end_of_turn>\n`): fed after every answer."""
        self._require_markers()
        return [self.end_of_turn_id, *self.encode("\n")]


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Decoding token by token would drop SentencePiece's leading spaces and split multi-byte characters
    that byte-fallback tokens spell out, so we decode the pending tokens together and emit only text
    that can no longer change.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self.emitted = ""  # the text of `pending` already returned

    def add(self, token: int) -> str:
        """Take one token; return the text it completes (possibly empty)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its remaining bytes
            return ""
        new = text[len(self.emitted):]
        # Keep the last token as context, so the next one decodes with its leading space.
        self.pending = self.pending[-1:]
        self.emitted = self.tokenizer.decode(self.pending)
        return new

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD)."""
        new = self.tokenizer.decode(self.pending)[len(self.emitted):]
        self.pending, self.emitted = [], ""
        return new
