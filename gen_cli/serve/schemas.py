"""OpenAI-compatible request bodies, checked by hand: every bad field is an `ApiError` with its status, the
field's name and one clear message (never a traceback)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error the server answers as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}.get(
            status, "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """What a completion or chat request asks, validated; `prompt` text or `messages` (chat)."""

    model: str | None
    max_tokens: int | None
    temperature: float
    top_p: float | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "object"}


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is not a number here.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{name}' must be a {names}, got {type(value).__name__}: {value!r}"[:300], name)
    return value


# OpenAI's request fields. Those not listed in Params are accepted only at a value that changes nothing here
# (checked in _unsupported); a field outside OpenAI's schema is refused as OpenAI refuses it.
_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "logprobs",
    "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "frequency_penalty", "presence_penalty",
    "logit_bias", "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
}  # fmt: skip
_COMPLETION_FIELDS = _FIELDS | {"prompt"}
_CHAT_FIELDS = _FIELDS | {
    "messages", "max_completion_tokens", "tool_choice", "parallel_tool_calls", "function_call", "response_format",
    "modalities", "reasoning_effort", "audio", "prediction", "web_search_options", "verbosity",
}  # fmt: skip
_NO_EFFECT = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}


def _unsupported(body: dict[str, Any], chat: bool) -> None:
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name in body:
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}"[:200], name)
    for name, harmless in _NO_EFFECT.items():
        value = body.get(name)
        if value is not None and value not in harmless:
            raise ApiError(400, f"'{name}' is not supported by this server (only its default)", name)


def _common(body: Any, chat: bool) -> Params:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _unsupported(body, chat)
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_key, (int,))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{max_key}' must be at least 1, got {max_tokens}", max_key)
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2 or math.isnan(temperature):
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = _get(body, "top_p", (int, float))
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request is served), got {n}", "n")
    for name in ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions"):
        value = body.get(name)
        if value not in (None, False) and not (name == "best_of" and value == 1):
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    options = _get(body, "stream_options", (dict,), {})
    return Params(
        model=_get(body, "model", (str,)),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=float(top_p) if top_p is not None and top_p < 1 else None,
        stop=tuple(stop),
        seed=_get(body, "seed", (int,)),
        stream=_get(body, "stream", (bool,), False),
        include_usage=bool(options.get("include_usage", False)),
    )


def completion_params(body: Any) -> Params:
    """POST /v1/completions: `prompt` one string (or a list holding one)."""
    params = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    params.prompt = prompt
    return params


def chat_params(body: Any) -> Params:
    """POST /v1/chat/completions: `messages`, each {role, content} with text content."""
    params = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # the parts form: text parts only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        checked.append({"role": m["role"], "content": content})
    params.messages = checked
    return params
