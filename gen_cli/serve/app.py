"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions (streamed as server-sent events when
asked), /v1/models and /health, over one `Worker` that runs the model.

Handlers validate and encode on the event loop, submit to the scheduler, and read the request's events from
a queue; a client that disconnects cancels its sequence. Every failure is OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gen_cli.errors import GenError
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.scheduler import Event, QueueFull
from gen_cli.infer.scheduler import Request as Job
from gen_cli.serve.schemas import ApiError, Params, chat_params, completion_params
from gen_cli.serve.worker import Worker

MAX_BODY = 1 << 20  # bytes of request body: prompts far past any context still fit
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_TOKENS = 512  # a chat reply's default cap (and never past the context)


@dataclass
class Served:
    """What the app serves: the model's name, how to encode a prompt and a conversation, its stop ids."""

    name: str
    worker: Worker
    encode: Callable[[str], list[int]]
    chat_ids: Callable[[list[dict[str, str]]], list[int]] | None
    stop_ids: tuple[int, ...]
    context_length: int
    api_key: str | None = None
    max_body: int = MAX_BODY
    created: int = 0
    body_timeout_s: float = 30.0  # the whole body must arrive within this (a trickling client gets 408)
    closing: bool = False  # set on shutdown: new requests are answered 503


def build_app(served: Served) -> Starlette:
    """A Starlette app for `served` (the worker already started by the caller)."""

    async def health(request: Request) -> Response:
        s = served.worker.scheduler
        body: dict[str, Any] = {"status": "ok", "running": s.running, "waiting": s.waiting}
        if s.pool is not None:  # what the paged pool holds: blocks in use, cached (evictable) ones, prefix hits
            body["kv"] = s.pool.stats()
        return JSONResponse(body)

    async def models(request: Request) -> Response:
        _authorize(request, served)
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "gen"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        _authorize(request, served)
        params = completion_params(await _json(request, served))
        ids = _encode(lambda: served.encode(params.prompt or ""))
        return await _respond(request, served, params, ids, chat=False)

    async def chat(request: Request) -> Response:
        _authorize(request, served)
        params = chat_params(await _json(request, served))
        if served.chat_ids is None:
            raise ApiError(400, f"{served.name} has no chat template; use /v1/completions", "messages")
        messages = params.messages or []
        ids = _encode(lambda: served.chat_ids(messages))  # type: ignore[misc]
        return await _respond(request, served, params, ids, chat=True)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


def _authorize(request: Request, served: Served) -> None:
    if served.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key")


async def _json(request: Request, served: Served) -> Any:
    """The body as JSON, refused past `max_body` bytes (413), when slower than `body_timeout_s` (408) or when
    malformed (400)."""
    if served.closing:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    limit = served.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(served.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")
    except TimeoutError:
        message = f"the request body did not arrive within {served.body_timeout_s:g} s"
        raise ApiError(408, message, code="request_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; an ApiError keeps it out of the server's error log
        raise ApiError(400, "the client left before its request body was whole", code="client_disconnected") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _encode(encode: Callable[[], list[int]]) -> list[int]:
    try:
        return encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the text is not valid UTF-8 (a lone surrogate)") from None
    except GenError as e:
        raise ApiError(400, str(e)) from None


def _job(served: Served, params: Params, ids: list[int], chat: bool) -> Job:
    if params.model is not None and params.model != served.name:
        raise ApiError(400, f"model {params.model!r} is not served here; this server runs {served.name!r}", "model",
                       "model_not_found")  # fmt: skip
    max_tokens = params.max_tokens
    if max_tokens is None:
        room = served.context_length - len(ids)
        max_tokens = max(1, min(room, CHAT_DEFAULT_TOKENS if chat else COMPLETION_DEFAULT_TOKENS))
    sampling = SamplingConfig(temperature=params.temperature, top_p=params.top_p)
    return Job(ids, max_tokens, sampling, params.seed, served.stop_ids, params.stop)


async def _respond(request: Request, served: Served, params: Params, ids: list[int], chat: bool) -> Response:
    job = _job(served, params, ids, chat)
    scheduler = served.worker.scheduler
    try:
        events = served.worker.submit(job, asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except GenError as e:
        named = getattr(e, "params", ())
        param = "max_tokens" if "max_tokens" in named or "max_new_tokens" in named else None
        raise ApiError(400, str(e), param, "context_length_exceeded" if "context" in str(e) else None) from None
    head = _Head(served.name, chat)
    if params.stream:
        chunks = _sse(head, job, events, params.include_usage)
        return EventStream(chunks, lambda: scheduler.cancel(job))
    watcher = asyncio.create_task(_watch(request.receive, lambda: scheduler.cancel(job)))
    try:
        while (await events.get()).finish is None:
            pass
    finally:
        watcher.cancel()
    if job.finish in ("cancelled", "error"):
        raise ApiError(503, "the generation was stopped before it finished", code=job.finish)
    return JSONResponse(head.whole(job))


@dataclass
class _Head:
    model: str
    chat: bool

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def frame(self, obj: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        out["choices"] = choices
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, job: Job) -> dict[str, Any]:
        finish = "stop" if job.finish == "stop" else "length"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": job.text}, "finish_reason": finish}
            choice["logprobs"] = None
            return self.frame("chat.completion", [choice], _usage(job))
        choice = {"index": 0, "text": job.text, "finish_reason": finish, "logprobs": None}
        return self.frame("text_completion", [choice], _usage(job))

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self.frame("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self.frame("text_completion", [choice])


def _usage(job: Job) -> dict[str, Any]:
    prompt, completion = len(job.ids), len(job.tokens)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    # OpenAI's field for prompt tokens served from the prefix cache (a paged pool's shared blocks), not computed
    usage["prompt_tokens_details"] = {"cached_tokens": job.cached_tokens}
    return usage


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _sse(head: _Head, job: Job, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[bytes]:
    """The request's events as OpenAI stream chunks: text deltas, the finish reason, usage if asked, [DONE]."""
    if head.chat:
        yield _data(head.chunk(None, None, first=True))
    while True:
        event = await events.get()
        if event.finish is not None:
            break
        if event.text:
            yield _data(head.chunk(event.text, None))
    if event.finish in ("cancelled", "error"):
        error = ApiError(503, "the generation was stopped before it finished", code=event.finish)
        yield _data(error.body())
        return
    yield _data(head.chunk(None, "stop" if event.finish == "stop" else "length"))
    if include_usage:
        yield _data(head.frame(head.chunk(None, None)["object"], [], _usage(job)))
    yield b"data: [DONE]\n\n"


async def _watch(receive: Callable[[], Any], on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client goes away (the body has been read: only a disconnect can come)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EventStream(Response):
    """A text/event-stream response that calls `on_disconnect` as soon as the client leaves."""

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.chunks, self.on_disconnect = chunks, on_disconnect
        self.status_code, self.background = 200, None
        # No content-length: the body is sent as it is generated (chunked).
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        gone = asyncio.Event()

        def left() -> None:
            gone.set()
            self.on_disconnect()

        watcher = asyncio.create_task(_watch(receive, left))
        try:
            async for chunk in self.chunks:
                if gone.is_set():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"retry-after": "1"} if exc.status in (429, 503) else {}
    if (
        exc.status in (408, 413) or exc.code == "shutting_down"
    ):  # the body was not read to its end: the connection cannot carry another request
        headers["connection"] = "close"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")
    return JSONResponse(error.body(), status_code=500)
