"""TextStream: generated ids to text for a terminal, never splitting a multi-byte character or a stop string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gen_cli.text.tokenizer import decode

REPLACEMENT = "\ufffd"


@dataclass
class TextStream:
    """One generated row as text: cut at end-of-text or a stop string; hands out only safe new text.

    The whole id sequence is decoded each time and only the new suffix is handed out, so a multi-byte
    character split across tokens is never printed half-way: a trailing U+FFFD (an incomplete UTF-8
    sequence) is held back, as is a tail that could still grow into a stop string.
    """

    tokenizer: Any
    stops: tuple[str, ...] = ()
    eot_id: int | None = None
    stop_ids: tuple[int, ...] = ()  # more end-of-turn ids (an imported model may declare several)
    # Ids just before the generated ones (the prompt's last), decoded with them and cut off again: a
    # SentencePiece decoder strips the leading space of a sequence, which would glue reply to prompt.
    context: tuple[int, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    printed: int = 0
    _context_text: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self._context_text = decode(self.tokenizer, self.context) if self.context else ""
        if REPLACEMENT in self._context_text:
            self.context, self._context_text = (), ""  # a character cut in half: decode the reply alone

    def push(self, token_id: int) -> None:
        """Add one generated id (ignored once the row is done)."""
        if self.done:
            return
        if token_id == self.eot_id or token_id in self.stop_ids:
            self.done = True
            return
        self.ids.append(token_id)
        full = decode(self.tokenizer, [*self.context, *self.ids])
        self.text = (
            full[len(self._context_text) :] if full.startswith(self._context_text) else decode(self.tokenizer, self.ids)
        )
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.done = self.text[: min(hits)], True

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that can no longer change; everything when `final` or done."""
        safe = self.text if final or self.done else self._stable_prefix()
        new = safe[self.printed :]
        self.printed = max(self.printed, len(safe))
        return new

    def _stable_prefix(self) -> str:
        end = len(self.text)
        while end > 0 and self.text[end - 1] == REPLACEMENT:
            end -= 1
        # Hold back the longest tail that is a proper prefix of a stop string: it may complete it.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, end), hold, -1):
                if self.text[end - n : end] == stop[:n]:
                    hold = n
                    break
        return self.text[: end - hold]
