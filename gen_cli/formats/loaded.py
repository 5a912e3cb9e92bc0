"""What loading a model returns, whatever it came from: the model, its tokenizer and what to tell the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from gen_cli.model.transformer import Transformer


@dataclass
class Loaded:
    """A model ready to run, its tokenizer, where it came from, and notes worth telling the user."""

    model: Transformer
    tokenizer: Tokenizer
    source: str
    notes: list[str] = field(default_factory=list)
    random_weights: bool = False
    stop_ids: tuple[int, ...] = ()  # end-of-turn ids the model declares (imported models); gen's use <|endoftext|>
    add_special_tokens: bool = False  # encode prompts with the tokenizer's BOS etc. (imported models)
    details: dict[str, Any] = field(default_factory=dict)  # format, architecture, tokenizer kind …
    chat_template: str | None = None  # the model's Jinja chat template, when it ships one
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token … for the template
    bos_id: int | None = None  # the beginning-of-sequence id the model declares (imported models)
