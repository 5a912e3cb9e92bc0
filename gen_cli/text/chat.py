"""Chat templates: a model's Jinja template (from downloaded files, so untrusted) rendered in a sandbox.

Rendering follows transformers' `apply_chat_template`: an immutable sandboxed environment with
trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that keeps non-ASCII text, and
`add_generation_prompt`. A template that fails or reaches outside the sandbox is one GenError line.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from gen_cli.errors import GenError


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    source: str = "chat template",
) -> str:
    """The conversation as the model's template writes it; `special_tokens` gives bos_token, eos_token …"""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except jinja2.exceptions.SecurityError as e:
        raise GenError(f"{source} tried to leave its sandbox ({e}); refusing it") from None
    except Exception as e:  # a template is code from a file: any failure is the file's
        raise GenError(f"{source} failed: {type(e).__name__}: {e}") from None


def conversation(message: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: an optional system message, then the user's."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]


def encode_rendered(tok: Any, text: str) -> list[int]:
    """Ids of a rendered template: there its special-token spellings are the special tokens (gen's `encode`
    reads them as text), and it writes any BOS itself, so none is added."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = False
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = before
