"""The model's one thread: it steps the scheduler while requests run and sleeps when none do. The event loop
submits and cancels requests (thread-safe) and receives each request's events through an asyncio queue.

`gen serve` steps in the thread that loaded the model (`run_here`), with uvicorn's loop in another: every OpenMP
region of the process then starts from one thread. Loading in one thread and stepping in a second left libgomp two
thread pools on two cores, so it cut its idle threads' spin to 100 turns, and the C step's ~200 parallel regions a
step slept and woke its threads between them: batched decode ran at 0.6-0.8x (8 rows of the 135M Q4_1 file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from gen_cli.infer.scheduler import Event, Request, Scheduler

log = logging.getLogger("gen.serve")


class Worker:
    """Runs `scheduler.step` in a daemon thread until `stop`; a failing step ends the running requests with an
    error event, and the thread goes on serving the next ones."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._live: set[Request] = set()  # submitted and not yet finished (what a shutdown drains or cancels)
        self._thread = threading.Thread(target=self._run, name="gen-model", daemon=True)

    def start(self) -> None:
        """Step in a thread of its own (the tests' background servers)."""
        self._thread.start()

    def run_here(self, keep_going: Callable[[], bool]) -> None:
        """Step in the calling thread while `keep_going()` and until `stop` (gen serve: the main thread)."""
        self._run(keep_going)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[Event]:
        """Queue `request`; its events arrive on the returned queue (QueueFull, UsageError raised here)."""
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            if event.finish is not None:
                with self._lock:
                    self._live.discard(request)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        request.emit = emit
        with self._lock:
            self._live.add(request)
        try:
            self.scheduler.submit(request)
        except BaseException:
            with self._lock:
                self._live.discard(request)
            raise
        return events

    @property
    def live(self) -> int:
        """Requests submitted and not yet finished."""
        with self._lock:
            return len(self._live)

    def cancel_all(self) -> int:
        """Cancel every unfinished request (each then ends with a `cancelled` event); how many there were."""
        with self._lock:
            live = list(self._live)
        for request in live:
            self.scheduler.cancel(request)
        return len(live)

    def _run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        while not self._stop.is_set() and keep_going():
            self.scheduler.wait_for_work(0.1)
            if self.scheduler.idle():
                continue
            try:
                self.scheduler.step()
            except Exception:  # one bad step must not take the server down: its requests end with an error
                log.exception("a decode step failed; ending the running requests")
                self.scheduler.abort("error")
