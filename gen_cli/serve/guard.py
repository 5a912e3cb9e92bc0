"""uvicorn's h11 protocol with the limits a public socket needs and uvicorn leaves out: a deadline for a
request's headers (a client trickling them byte by byte is answered 408 and closed), header size past the
limit answered 431 (uvicorn says 400), and connections past a count answered 503 with Retry-After — each
as OpenAI's error JSON, on a connection that is then closed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gen_cli.serve.schemas import ApiError

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Limits:
    """Per-connection limits: seconds to send a request's headers, their bytes, open connections at once."""

    header_timeout_s: float = 10.0
    max_header: int = 16 * 1024
    max_connections: int = 256


def error_bytes(error: ApiError) -> bytes:
    """A whole HTTP/1.1 response carrying `error` as JSON that closes the connection."""
    body = json.dumps(error.body()).encode()
    retry = b"retry-after: 1\r\n" if error.status in (429, 503) else b""
    head = f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n".encode()
    fields = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return head + fields + retry + b"\r\n" + body


class _Connection(h11.Connection):
    """h11's connection, keeping the protocol error uvicorn swallows (its status hint: 431 for long headers).
    h11 bounds only headers that arrive in pieces; a request's whole head is bounded here too."""

    error: h11.RemoteProtocolError | None = None

    def __init__(self, max_header: int) -> None:
        super().__init__(h11.SERVER, max_header)
        self.max_header = max_header

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.max_header:
                    raise h11.RemoteProtocolError("headers too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The app a connection past the limit gets: 503, try again shortly."""
    error = ApiError(503, "too many connections to this server; try again shortly", code="too_many_connections")
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded(limits: Limits) -> type[H11Protocol]:
    """An H11Protocol class holding `limits` (uvicorn builds one instance per connection)."""

    class Guarded(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _Connection(limits.max_header)
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self.app = _busy  # answered once its headers arrive (closing now could reset the client)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: the app times its body
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection has the same deadline for its headers
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            error = self.conn.error
            status = getattr(error, "error_status_hint", 400)
            if status == 431:
                message = f"the request's headers are larger than {limits.max_header:,} bytes"
                self._close_with(ApiError(431, message, code="headers_too_large"))
            else:
                self._close_with(ApiError(400, f"malformed HTTP request: {error or msg}"[:200]))

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its headers came in time)
            message = f"the request's headers did not arrive within {limits.header_timeout_s:g} s"
            self._close_with(ApiError(408, message, code="request_timeout"))

        def _close_with(self, error: ApiError) -> None:
            if not self.transport.is_closing():
                self.transport.write(error_bytes(error))
                self.transport.close()

    return Guarded
