"""Incremental detokenization and stop strings, for streaming text one token at a time.

Decoding each token alone is wrong twice over: a multi-byte character split across byte
tokens decodes to U+FFFD pieces, and SentencePiece-style tokenizers drop a word's leading
space when it is decoded without its left neighbour. `IncrementalDetokenizer` decodes a
short window of the previous tokens with the new one and emits only the text that has
become final, holding back while the window ends in an incomplete character. The emitted
pieces concatenate to `tokenizer.decode(all_ids)` for tokenizers whose decoding is
prefix-stable (all byte-level BPE and SentencePiece ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context that keeps spacing right
        self._read = 0  # tokens whose text was emitted

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return str(self._tok.decode(list(ids), skip_special_tokens=self._skip))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes final (possibly empty)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            # Only the new tail: the window's earlier text was emitted already.
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (an incomplete character
        decodes to U+FFFD, as `tokenizer.decode` would)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Finds the first stop string in streamed text, across token boundaries.

    Text that could be the start of a stop string is held back until it is known not to
    be one, so a client never sees any part of a stop string (unless `include` is set, in
    which case the stop string itself ends the output)."""

    def __init__(self, stops: Sequence[str], *, include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self._held = ""
        self.hit: str | None = None

    def push(self, text: str) -> str:
        """Add decoded text; returns the part that may be emitted now. After a stop string
        is found, `hit` is set and everything after it is dropped."""
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            i, s = first
            self.hit = s
            self._held = ""
            return buf[: i + len(s)] if self.include else buf[:i]
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of a sequence that hit no stop string: the held-back text."""
        out, self._held = self._held, ""
        return "" if self.hit is not None else out
