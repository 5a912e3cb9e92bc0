"""What a model says about its own text, apart from its weights: the tokenizer, whether prompts start with a BOS,
the ids that end a turn, the chat template and its special tokens; and the two ways a run turns text into ids
(a prompt to continue, a message to reply to). No torch: the torch-free decode path encodes with it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gen_cli.errors import UsageError
from gen_cli.text.tokenizer import encode


@dataclass(frozen=True)
class TextConventions:
    """A model's tokenizer and text rules; `source` names the model in messages."""

    tokenizer: Any
    source: str
    stop_ids: tuple[int, ...] = ()  # end-of-turn ids
    bos_id: int | None = None  # the beginning-of-sequence id an imported model declares
    add_special_tokens: bool = False  # prompts encode with the tokenizer's own BOS etc. (imported models)
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids as the model reads them (its BOS rules); an empty text is the BOS alone, refused when
        the model declares none (generating from nothing would continue an arbitrary token)."""
        check_utf8(text, "the prompt")
        special = self.add_special_tokens
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids if special else encode(self.tokenizer, text)
        if text:
            return ids
        bos = [self.bos_id] if self.bos_id is not None else ids  # else what the tokenizer adds itself, if any
        if not bos:
            raise UsageError(f"the prompt is empty and {self.source} has no BOS token to start from; give text")
        return bos

    def chat_ids(self, message: str, system: str | None, context_length: int) -> list[int]:
        """The ids of a one-turn conversation rendered by the model's chat template, ready for its reply."""
        from gen_cli.text.chat import conversation, encode_rendered, render_chat

        if self.chat_template is None:
            raise UsageError(f"{self.source} has no chat template; give the text as a prompt to continue instead")
        check_utf8(message, "the message")
        check_utf8(system or "", "the system message")
        rendered = render_chat(self.chat_template, conversation(message, system), special_tokens=self.special_tokens,
                               source=f"{self.source}: chat template")  # fmt: skip
        return encode_rendered(self.tokenizer, rendered, context_length)


def check_utf8(text: str, what: str) -> None:
    """Refuse text holding lone surrogates (undecodable command-line bytes): the tokenizer cannot encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid UTF-8 (at character {e.start})") from None
