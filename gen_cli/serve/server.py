"""Serving an opened model: its scheduler and worker, the app, and uvicorn (for `gen serve` in a thread beside the
main one, which steps the model; for tests and benches in a background thread, the worker in another)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.scheduler import Scheduler
from gen_cli.serve.app import MAX_BODY, Served, build_app
from gen_cli.serve.guard import Limits, guarded
from gen_cli.serve.worker import Worker

if TYPE_CHECKING:
    from gen_cli.infer.engine import Engine

log = logging.getLogger("gen.serve")


@dataclass(frozen=True)
class ServeOptions:
    """How many requests run at once and wait, the KV budget, the prefill chunk, the scheduling mode."""

    max_batch: int = 8
    max_queue: int = 64
    kv_budget: int | None = None  # bytes of KV cache all running requests may hold (None: no limit)
    prefill_chunk: int = 256
    mode: str = "continuous"
    cache: CacheSpec = field(default_factory=CacheSpec)
    api_key: str | None = None
    max_body: int = MAX_BODY
    by_row: bool = False  # decode each running request through the single-sequence step (infer.batch)
    limits: Limits = field(default_factory=Limits)  # headers' deadline and size, open connections
    body_timeout_s: float = 30.0  # a request's whole body must arrive within this
    drain_s: float = 5.0  # on shutdown, in-flight requests may finish within this; the rest are cancelled
    kv_blocks: int | None = None  # a paged KV pool of this many blocks: admission by free blocks, prefix sharing
    block_tokens: int = 16
    speculate: int = 0  # prompt-lookup guesses per request and step (infer.scheduler); 0: none


def served(engine: Engine, name: str, options: ServeOptions = ServeOptions()) -> Served:
    """The app's view of `engine`: a scheduler and its (not yet started) worker, encoders, stop ids."""
    from gen_cli.text.chat import encode_rendered, render_chat

    scheduler = Scheduler(
        engine.model, engine.tokenizer, options.cache, options.max_batch, options.kv_budget, options.max_queue,
        options.prefill_chunk, options.mode, by_row=options.by_row, kv_blocks=options.kv_blocks,
        block_tokens=options.block_tokens, speculate=options.speculate,
    )  # fmt: skip
    chat_ids = None
    template = engine.chat_template
    if template is not None:

        def chat_ids(messages: list[dict[str, str]]) -> list[int]:
            rendered = render_chat(template, messages, special_tokens=engine.special_tokens,
                                   source=f"{engine.source}: chat template")  # fmt: skip
            return encode_rendered(engine.tokenizer, rendered, engine.model.config.context_length)

    return Served(
        name, Worker(scheduler), engine.encode, chat_ids, engine.stop_ids, engine.model.config.context_length,
        options.api_key, options.max_body, int(time.time()), options.body_timeout_s,
    )  # fmt: skip


def check_host(host: str, port: int) -> None:
    """Refuse a port out of range in one line (binding errors come from the socket itself)."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}", params=("port",))


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or one clear error."""
    check_host(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # clients that come before uvicorn runs wait in the backlog, not refused
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}", params=("host", "port")) from None
    return sock


class GenServer(uvicorn.Server):
    """uvicorn's server with gen's shutdown: the first SIGINT/SIGTERM stops accepting, lets in-flight requests
    finish for `drain_s` and cancels the rest (each client gets its error event or [DONE]), then returns
    normally (exit 0); a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app_served: Served, drain_s: float) -> None:
        super().__init__(config)
        self.served, self.drain_s = app_served, drain_s

    def install_signals(self) -> None:
        """Take SIGINT/SIGTERM now (main thread), so a signal before `run` starts is a graceful stop too."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after a graceful exit (the process then dies of it); gen exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # the second signal: no more waiting
            os.write(2, b"gen serve: stopped at once (second signal); in-flight requests were cut off\n")
            os._exit(1)
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before draining
        self.served.closing = True
        worker, loop = self.served.worker, asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        while worker.live and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if worker.live:
            log.warning("cancelling %d in-flight request(s) on shutdown", worker.cancel_all())
            # The worker ends running requests at its next step; bounded in case a step never returns.
            deadline = loop.time() + 10
            while worker.live and loop.time() < deadline:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the handlers write their last event
        await super().shutdown(sockets)


def uvicorn_server(app_served: Served, host: str, port: int, options: ServeOptions = ServeOptions()) -> GenServer:
    """The server for `app_served` on host:port, with the limits and shutdown of `options`."""
    check_host(host, port)
    limits = options.limits
    config = uvicorn.Config(build_app(app_served), host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=2, http=guarded(limits),  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=limits.max_header)  # fmt: skip
    return GenServer(config, app_served, options.drain_s)


class BackgroundServer:
    """The app on 127.0.0.1 at a free port, in a thread: `url` once started; `stop()` ends server and worker."""

    def __init__(self, app_served: Served, host: str = "127.0.0.1", options: ServeOptions = ServeOptions()) -> None:
        self.served = app_served
        self._sock = listen(host, 0)  # port 0: the system picks a free one, held until uvicorn takes the socket
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn_server(app_served, host, self.port, options)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self.served.worker.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=self.server.drain_s + 15)  # the drain, the cancellations, uvicorn's own 2 s
        self.served.worker.stop()
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
