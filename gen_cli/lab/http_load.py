"""The serving bench over HTTP: `gen serve` and llama.cpp's `llama-server` started on the same GGUF file, the
same threads and parallel slots, each driven by the same closed loop of streaming clients on loopback.

Each client sends a streamed `/v1/completions` request (greedy, a fixed number of new tokens), reads its
server-sent events to the end, and sends the next; throughput counts the tokens each server says it made
(`usage`, asked for with `stream_options`), time to first token is the first text event, inter-token latency
the gaps between text events. The servers run one at a time, rounds alternating, each in its own process
that is always stopped. Only loopback is targeted, and every request has a deadline.

With `turns` > 1 each client holds chats: every prompt after the first is the last prompt + its answer + a new
message, and each reply's prompt tokens served from the server's prefix cache are counted (OpenAI's
`usage.prompt_tokens_details.cached_tokens`, else llama-server's `timings.cache_n`), as is the most KV a server
says on /health it has held (gen serve with a paged pool, started afresh for each run; llama-server says none).
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
from dataclasses import dataclass, field
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


def gen_server(model: Path, threads: int, slots: int, port: int, kv_blocks: int | None = None) -> Server:
    """gen serve with `slots` rows in its batch; with `kv_blocks`, a paged KV pool (prefix sharing on)."""
    command = [sys.executable, "-m", "gen_cli", "serve", "-m", str(model), "--host", HOST, "--port", str(port)]
    command += ["--threads", str(threads), "--max-batch", str(slots), "--name", "bench"]
    if kv_blocks is not None:
        command += ["--kv-blocks", str(kv_blocks)]
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


@dataclass
class Reply:
    """One streamed completion as the client saw it."""

    tokens: int = 0  # as the server reports them (else the text events)
    times: list[float] = field(default_factory=list)  # of its text events
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens from the server's prefix cache, when it says


def stream_one(port: int, prompt: str, new_tokens: int) -> tuple[int, list[float]]:
    """One streamed completion: (tokens the server reports, the times of its text events)."""
    reply = stream_reply(port, prompt, new_tokens)
    return reply.tokens, reply.times


def stream_reply(port: int, prompt: str, new_tokens: int) -> Reply:
    """One streamed completion: its text, event times and usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise GenError(f"the server answered {response.status}: {response.read()[:200]!r}")
        reply = Reply()
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            text = "".join(choice.get("text") or "" for choice in event.get("choices") or [])
            if text:
                reply.times.append(time.perf_counter())
                reply.text += text
            if event.get("usage"):
                usage = event["usage"]
                reply.tokens, reply.prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                reply.cached_tokens = int(cached) if cached is not None else reply.cached_tokens
            if reply.cached_tokens is None and "cache_n" in (event.get("timings") or {}):
                reply.cached_tokens = int(event["timings"]["cache_n"])
        reply.tokens = reply.tokens or len(reply.times)
        return reply
    finally:
        conn.close()


def closed_loop(name: str, port: int, clients: int, requests: int, new_tokens: int, turns: int = 1) -> ServeRun:
    """`clients` threads each send a request, read it to the end and send the next, `requests` in all; with
    `turns` > 1, as `requests // turns` chats of `turns` turns (each prompt the last + its answer + more)."""
    run = ServeRun(name, 0, 0, 0.0)
    lock, failures = threading.Lock(), []
    counter = iter(range(max(1, requests // turns)))
    reported = [False]  # whether any reply said how many prompt tokens came from the cache

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            prompt = f"Request {i}: tell me, in your own words, a story about the number {i}."  # no shared prefix
            if turns > 1:  # a chat's opening as long as a short system prompt + question (a block or more)
                prompt = f"Chat {i}. You are a storyteller: tell me, in your own words, a story about the number {i}, "
                prompt += "with a beginning, a middle and an end, one turn at a time.\n"
            for turn in range(turns):
                start = time.perf_counter()
                try:
                    reply = stream_reply(port, prompt, new_tokens)
                except (OSError, GenError, ValueError) as e:
                    with lock:
                        failures.append(e)
                    return
                with lock:
                    run.requests += 1
                    run.tokens += reply.tokens
                    run.prompt_tokens += reply.prompt_tokens
                    run.cached_tokens += reply.cached_tokens or 0
                    reported[0] |= reply.cached_tokens is not None
                    if reply.times:
                        run.ttft_ms.append((reply.times[0] - start) * 1e3)
                        run.itl_ms += [(b - a) * 1e3 for a, b in itertools.pairwise(reply.times)]
                prompt += f"{reply.text}\nAnd then, in turn {turn + 2}, what happened to {i}?\n"

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * requests)
    run.seconds = time.perf_counter() - start
    run.kv_peak = _kv_peak(port)
    if not reported[0]:
        run.cached_tokens = None
    if failures:
        raise GenError(f"{name}: {len(failures)} request(s) failed, the first: {failures[0]}")
    return run


def _kv_peak(port: int) -> int:
    """The most KV bytes the server says it has held (gen serve's /health with a paged pool), else 0."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/health")
        kv = json.loads(conn.getresponse().read()).get("kv")
        conn.close()
    except (OSError, ValueError):
        return 0
    return int(kv.get("peak_bytes_in_use", 0)) if isinstance(kv, dict) else 0


def compare_servers(
    model: Path,
    llama: Path,
    threads: int,
    clients: int,
    requests: int,
    rounds: int,
    new_tokens: int,
    context: int,
    turns: int = 1,
) -> dict[str, list[ServeRun]]:
    """Both servers, rounds alternating (gen first in odd rounds, llama.cpp first in even ones); with `turns`
    > 1, chats (`closed_loop`), gen serve on a paged pool so that it shares prefixes (llama-server keeps each
    slot's last prompt cached by itself)."""
    kv_blocks = (clients + 1) * -(-context // 16) if turns > 1 else None  # 16: gen serve's default block size
    runs: dict[str, list[ServeRun]] = {"gen serve": [], "llama-server": []}
    for r in range(rounds):
        sides = [gen_server, None]
        for side in sides if r % 2 == 0 else sides[::-1]:
            port = free_port()
            server = (
                gen_server(model, threads, clients, port, kv_blocks)
                if side is gen_server
                else llama_server(llama, model, threads, clients, port, context)
            )
            with running(server, port):
                stream_one(port, "warm up", 4)  # first-request costs (oneDNN set-up, page faults) left out
                runs[server.name].append(closed_loop(server.name, port, clients, requests, new_tokens, turns))
    return runs
