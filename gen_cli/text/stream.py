"""TextStream: generated ids to text for a terminal, never splitting a multi-byte character or a stop string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gen_cli.text.tokenizer import decode

REPLACEMENT = "\ufffd"
# Ids decoded together at most while they still end in a U+FFFD: no character needs more than 4 bytes,
# so past this the U+FFFD is in the ids themselves (invalid bytes) and is final.
MAX_PENDING_IDS = 8


@dataclass
class TextStream:
    """One generated row as text: cut at end-of-text or a stop string; hands out only safe new text.

    Each new id is decoded with a bounded tail of the ids before it (the ids since the last complete
    text, plus the group before them, so a decoder that treats a sequence's start specially sees the
    same context): constant work per token however long the row. A trailing U+FFFD (an incomplete
    UTF-8 sequence) is held back, as is a tail that could still grow into a stop string.
    """

    tokenizer: Any
    stops: tuple[str, ...] = ()
    eot_id: int | None = None
    stop_ids: tuple[int, ...] = ()  # more end-of-turn ids (an imported model may declare several)
    # Ids just before the generated ones (the prompt's last), decoded with them and cut off again: a
    # SentencePiece decoder strips the leading space of a sequence, which would glue reply to prompt.
    context: tuple[int, ...] = ()
    ids: list[int] = field(default_factory=list)
    done: bool = False
    printed: int = 0  # characters handed out by `take`
    _seq: list[int] = field(default_factory=list, init=False, repr=False)  # context + ids
    _start: int = field(default=0, init=False, repr=False)  # where the decoded tail starts in _seq
    _read: int = field(default=0, init=False, repr=False)  # ids before it are text in _pieces
    _start_text: str = field(default="", init=False, repr=False)  # decode(_seq[_start:_read])
    _pieces: list[str] = field(default_factory=list, init=False, repr=False)  # the final text so far
    _pending: str = field(default="", init=False, repr=False)  # text of ids past _read, may still change
    _recent: str = field(default="", init=False, repr=False)  # the final text's end, for stop strings
    _unprinted: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        context = list(self.context)
        text = decode(self.tokenizer, context) if context else ""
        if REPLACEMENT in text:
            context, text = [], ""  # a character cut in half: decode the reply alone
        self._seq, self._start, self._read, self._start_text = context, 0, len(context), text

    @property
    def text(self) -> str:
        """The row's text so far (cut before any stop string)."""
        return "".join(self._pieces) + self._pending

    def push(self, token_id: int) -> None:
        """Add one generated id (ignored once the row is done)."""
        if self.done:
            return
        if token_id == self.eot_id or token_id in self.stop_ids:
            self._commit(self._pending)  # the row is over: what it has is final
            self.done = True
            return
        self.ids.append(token_id)
        self._seq.append(token_id)
        tail = decode(self.tokenizer, self._seq[self._start :])
        if tail.startswith(self._start_text):
            piece = tail[len(self._start_text) :]
        else:  # a decoder that rewrites what came before: the new ids alone
            piece = decode(self.tokenizer, self._seq[self._read :])
        if self._cut_at_stop(piece):
            return
        if piece.endswith(REPLACEMENT) and len(self._seq) - self._read < MAX_PENDING_IDS:
            self._pending = piece  # a character not complete yet: decoded again with the next id
            return
        self._commit(piece)

    def _commit(self, piece: str) -> None:
        """`piece`, the text of the ids past _read, is final: the decoded tail starts after them now."""
        self._pieces.append(piece)
        self._unprinted.append(piece)
        self._pending = ""
        keep = max(map(len, self.stops), default=1) - 1
        self._recent = (self._recent + piece)[-keep:] if keep else ""
        self._start, self._read = self._read, len(self._seq)
        self._start_text = decode(self.tokenizer, self._seq[self._start : self._read])

    def _cut_at_stop(self, piece: str) -> bool:
        """End the row before the first stop string in the final text's end plus `piece`, if one is there."""
        window = self._recent + piece
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if not hits:
            return False
        before = "".join(self._pieces)
        text = before[: len(before) - len(self._recent)] + window[: min(hits)]
        self._pieces, self._pending, self.done = [text], "", True
        self._unprinted = [text[self.printed :]]
        return True

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that can no longer change; everything when `final` or done."""
        if final and not self.done:
            self._commit(self._pending)  # nothing more comes: an incomplete character is shown as it is
        text = "".join(self._unprinted)
        if final or self.done:
            self._unprinted = []
            self.printed += len(text)
            return text
        safe = self._stable_prefix(text)
        self._unprinted = [text[safe:]] if safe < len(text) else []
        self.printed += safe
        return text[:safe]

    def _stable_prefix(self, text: str) -> int:
        """How much of `text` (the end of the final text, not handed out yet) can no longer change."""
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT:
            end -= 1
        # Hold back the longest tail that is a proper prefix of a stop string: it may complete it.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, end), hold, -1):
                if text[end - n : end] == stop[:n]:
                    hold = n
                    break
        return end - hold
