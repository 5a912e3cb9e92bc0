"""Serving an opened model: its scheduler and worker thread, the app, and uvicorn (in the foreground for
`gen serve`, in a background thread for tests and benches)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.scheduler import Scheduler
from gen_cli.serve.app import MAX_BODY, Served, build_app
from gen_cli.serve.worker import Worker

if TYPE_CHECKING:
    import uvicorn

    from gen_cli.infer.engine import Engine


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


def served(engine: Engine, name: str, options: ServeOptions = ServeOptions()) -> Served:
    """The app's view of `engine`: a scheduler and its (not yet started) worker, encoders, stop ids."""
    from gen_cli.text.chat import encode_rendered, render_chat

    scheduler = Scheduler(
        engine.model, engine.tokenizer, options.cache, options.max_batch, options.kv_budget, options.max_queue,
        options.prefill_chunk, options.mode, by_row=options.by_row,
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
        options.api_key, options.max_body, int(time.time()),
    )  # fmt: skip


def check_host(host: str, port: int) -> None:
    """Refuse a port out of range in one line (binding errors come from the socket itself)."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}", params=("port",))


def uvicorn_server(app_served: Served, host: str, port: int, sock: socket.socket | None = None) -> uvicorn.Server:
    import uvicorn

    check_host(host, port)
    config = uvicorn.Config(build_app(app_served), host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=2)  # fmt: skip
    return uvicorn.Server(config)


class BackgroundServer:
    """The app on 127.0.0.1 at a free port, in a thread: `url` once started; `stop()` ends server and worker."""

    def __init__(self, app_served: Served, host: str = "127.0.0.1") -> None:
        self.served = app_served
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))  # port 0: the system picks a free one, held until uvicorn takes the socket
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn_server(app_served, host, self.port)
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
        self._thread.join(timeout=10)
        self.served.worker.stop()
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
