"""The serving bench over HTTP: `gen serve` and llama.cpp's `llama-server` started on the same GGUF file, the
same threads and parallel slots, each driven by the same closed loop of streaming clients on loopback.

Each client sends a streamed `/v1/completions` request (greedy, a fixed number of new tokens), reads its
server-sent events to the end, and sends the next; throughput counts the tokens each server says it made
(`usage`, asked for with `stream_options`), time to first token is the first text event, inter-token latency
the gaps between text events. The servers run one at a time, rounds alternating, each in its own process
that is always stopped. Only loopback is targeted, and every request has a deadline.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gen_cli.errors import GenError
from gen_cli.lab.serve_bench import ServeRun

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # a server that is not healthy by then is given up on
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Server:
    """How to start one side: its name and its command, given the port."""

    name: str
    command: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def gen_server(model: Path, threads: int, slots: int, port: int) -> Server:
    command = [sys.executable, "-m", "gen_cli", "serve", "-m", str(model), "--host", HOST, "--port", str(port)]
    command += ["--threads", str(threads), "--max-batch", str(slots), "--name", "bench"]
    return Server("gen serve", command)


def llama_server(binary: Path, model: Path, threads: int, slots: int, port: int, context: int) -> Server:
    """llama-server with `slots` parallel sequences and continuous batching, each slot `context` tokens."""
    command = [str(binary), "-m", str(model), "--host", HOST, "--port", str(port), "-t", str(threads)]
    command += ["--parallel", str(slots), "--cont-batching", "-c", str(context * slots), "--no-webui"]
    return Server("llama-server", command)


@contextmanager
def running(server: Server, port: int) -> Iterator[None]:
    """The server started, healthy on `port`, and stopped (killed if it does not stop) when done."""
    process = subprocess.Popen(server.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(process, server.name, port)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(process: subprocess.Popen[str], name: str, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (process.stderr.read() if process.stderr else "").strip().splitlines()[-3:]
            raise GenError(f"{name} exited ({process.returncode}) before it served: {' / '.join(tail) or '?'}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise GenError(f"{name} did not answer /health on port {port} within {START_TIMEOUT_S:g} s")


def stream_one(port: int, prompt: str, new_tokens: int) -> tuple[int, list[float]]:
    """One streamed completion: (tokens the server reports, the times of its text events)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise GenError(f"the server answered {response.status}: {response.read()[:200]!r}")
        times, tokens = [], 0
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(choice.get("text") for choice in event.get("choices") or []):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
        return tokens or len(times), times
    finally:
        conn.close()


def closed_loop(name: str, port: int, clients: int, requests: int, new_tokens: int) -> ServeRun:
    """`clients` threads each send a request, read it to the end and send the next, `requests` in all."""
    run = ServeRun(name, 0, 0, 0.0)
    lock, failures = threading.Lock(), []
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            prompt = f"Request {i}: tell me, in your own words, a story about the number {i}."  # no shared prefix
            start = time.perf_counter()
            try:
                tokens, times = stream_one(port, prompt, new_tokens)
            except (OSError, GenError, ValueError) as e:
                with lock:
                    failures.append(e)
                return
            with lock:
                run.requests += 1
                run.tokens += tokens
                if times:
                    run.ttft_ms.append((times[0] - start) * 1e3)
                    run.itl_ms += [(b - a) * 1e3 for a, b in itertools.pairwise(times)]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * requests)
    run.seconds = time.perf_counter() - start
    if failures:
        raise GenError(f"{name}: {len(failures)} request(s) failed, the first: {failures[0]}")
    return run


def compare_servers(
    model: Path, llama: Path, threads: int, clients: int, requests: int, rounds: int, new_tokens: int, context: int
) -> dict[str, list[ServeRun]]:
    """Both servers, rounds alternating (gen first in odd rounds, llama.cpp first in even ones)."""
    runs: dict[str, list[ServeRun]] = {"gen serve": [], "llama-server": []}
    for r in range(rounds):
        sides = [gen_server, None]
        for side in sides if r % 2 == 0 else sides[::-1]:
            port = free_port()
            server = (
                gen_server(model, threads, clients, port)
                if side is gen_server
                else llama_server(llama, model, threads, clients, port, context)
            )
            with running(server, port):
                stream_one(port, "warm up", 4)  # first-request costs (oneDNN set-up, page faults) left out
                runs[server.name].append(closed_loop(server.name, port, clients, requests, new_tokens))
    return runs
