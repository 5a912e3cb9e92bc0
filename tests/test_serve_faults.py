"""`gen serve` under faults, against a real server on 127.0.0.1: slow senders (headers or a body trickled
then stalled), headers, bodies and connections past their limits, clients that leave mid-request, a full
queue, lengths past the context — each answered with OpenAI's error JSON or a closed connection, and the
server still serving after every one. Every wait is bounded by a socket timeout or a deadline."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from gen_cli.infer.engine import open_model
from gen_cli.infer.options import EngineOptions, Preset
from gen_cli.serve.guard import Limits
from gen_cli.serve.server import BackgroundServer, ServeOptions, served

openai = pytest.importorskip("openai")
CPU = EngineOptions(device="cpu", native=False)
FAST = Limits(header_timeout_s=1.0, max_header=4096, max_connections=6)


@pytest.fixture(autouse=True)
def no_server_errors():
    """No case logs an error (an exception in the app) in the server's log: each is an ordinary answer."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def engine():
    """Random weights of the tiny preset: a long context, so a request can run while a test acts on it."""
    return open_model(Preset("tiny"), CPU)


def _server(engine, **options) -> BackgroundServer:
    opts = ServeOptions(**{"limits": FAST, "body_timeout_s": 1.0, "drain_s": 0.0, **options})
    return BackgroundServer(served(engine, "tiny", opts), options=opts)


@pytest.fixture(scope="module")
def server(engine):
    with _server(engine, max_batch=2, max_queue=1) as srv:
        yield srv


def _serves(srv: BackgroundServer) -> None:
    """The server answers a normal request and is left with nothing running and no KV held."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    done = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3
    _settles(srv)


def _settles(srv: BackgroundServer) -> None:
    scheduler = srv.served.worker.scheduler
    deadline = time.monotonic() + 30
    while not (scheduler.idle() and scheduler.reserved == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.idle() and scheduler.reserved == 0 and srv.served.worker.live == 0


def _raw(srv: BackgroundServer) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=20)


def _answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read until the server closes: the status, the JSON error body, the raw head."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.lower()


def _error_json(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_headers_trickled_then_stalled_get_408_while_others_are_served(server):
    sock = _raw(server)
    for byte in b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-":
        sock.send(bytes([byte]))
    _serves(server)  # the stalled client holds no worker and no slot in the batch
    status, body, head = _answer(sock)  # returns once the server closes the connection
    assert status == 408 and b"connection: close" in head
    _error_json(body, "request_timeout")
    _serves(server)


def test_a_body_trickled_then_stalled_gets_408_and_holds_no_sequence(server):
    sock = _raw(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
    sock.sendall(b"content-length: 200\r\n\r\n")
    for byte in b'{"prompt": "hel':
        sock.send(bytes([byte]))
    _serves(server)
    status, body, head = _answer(sock)
    assert status == 408 and b"connection: close" in head
    _error_json(body, "request_timeout")
    assert "did not arrive" in body["error"]["message"]
    _serves(server)


def test_headers_past_the_limit_get_431(server):
    sock = _raw(server)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n")
    status, body, _ = _answer(sock)
    assert status == 431
    _error_json(body, "headers_too_large")
    _serves(server)


def test_a_chunked_body_past_the_limit_gets_413(engine):
    with _server(engine, max_body=1000) as srv:
        sock = _raw(srv)
        # no content-length: the size is counted as the body arrives. Two 512-byte chunks pass the limit, and
        # nothing more is sent: the server answers and closes, so a later chunk could meet a closed socket.
        chunk = b"200\r\n" + b" " * 512 + b"\r\n"
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 2)
        status, body, head = _answer(sock)
        assert status == 413 and b"connection: close" in head
        _error_json(body, "request_too_large")
        _serves(srv)


def test_connections_past_the_limit_get_503_with_retry_after(engine):
    with _server(engine, limits=Limits(header_timeout_s=30, max_connections=2)) as srv:
        idle = [_raw(srv), _raw(srv)]
        time.sleep(0.2)  # both accepted before the next one
        extra = _raw(srv)
        extra.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        status, body, head = _answer(extra)
        assert status == 503 and b"retry-after: 1" in head
        _error_json(body, "too_many_connections")
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 20
        while True:  # the server notices the closed connections on its next read
            try:
                _serves(srv)
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline
                time.sleep(0.1)


def _stream(srv: BackgroundServer, prompt: str, max_tokens: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    return response


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_client_leaving_a_whole_request_frees_its_sequence_and_kv(server):
    scheduler = server.served.worker.scheduler
    sock = _raw(server)
    body = json.dumps({"prompt": "Hello", "max_tokens": 1000, "temperature": 0}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    _wait(lambda: scheduler.running == 1 and scheduler.reserved > 0, "the request runs")
    steps = scheduler.steps
    sock.close()
    _wait(lambda: scheduler.running == 0, "the sequence leaves the batch")
    assert scheduler.reserved == 0 and scheduler.steps - steps < 1000
    _serves(server)


def test_a_full_queue_gets_429_and_the_server_goes_on(engine):
    with _server(engine, max_batch=1, max_queue=1) as srv:
        scheduler = srv.served.worker.scheduler
        running = _stream(srv, "Hello", 1000)
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        body = json.dumps({"prompt": "two", "max_tokens": 4, "temperature": 0})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})  # waits in the queue
        _wait(lambda: scheduler.waiting == 1, "the second request waits")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="tiny", prompt="three", max_tokens=2)
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "queue_full"
        running.close()  # the first client leaves: the waiting one runs and finishes
        assert conn.getresponse().status == 200
        _serves(srv)


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "word " * 3000}, None), ({"prompt": "a", "max_tokens": 100_000}, "max_tokens")],
)
def test_lengths_past_the_context_get_400_and_the_server_goes_on(server, body, param):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", **body)
    assert refused.value.body["code"] == "context_length_exceeded" and refused.value.body["param"] == param
    _serves(server)


def test_shutdown_drains_in_flight_streams_to_done(engine):
    srv = _server(engine, drain_s=60.0).start()
    response = _stream(srv, "Hello", 40)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    lines = [line for line in response.read().decode().split("\n\n") if line]
    stopper.join(timeout=60)
    assert lines[-1] == "data: [DONE]" and not stopper.is_alive()


class _Process:
    """`gen serve --preset PRESET --port 0` in a subprocess; `port` once it listens."""

    def __init__(self, *args: str, preset: str = "tiny") -> None:
        import os
        import re
        import subprocess
        import sys
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root, "COLUMNS": "300", "NO_COLOR": "1"}
        argv = [sys.executable, "-m", "gen_cli", "serve", "--preset", preset, "--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        self.lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self.lines.append(line)
                if re.search(r"http://127\.0\.0\.1:\d+/v1", line):
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            self.proc.kill()
            raise AssertionError("the server did not start: " + "".join(self.lines))
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", "".join(self.lines))
        self.host, self.port = "127.0.0.1", int(port.group(1))  # type: ignore[union-attr]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _events(response: http.client.HTTPResponse) -> list[str]:
    """The stream's remaining events, read to its end (a cut chunked body raises IncompleteRead)."""
    return [line for line in response.read().decode().split("\n\n") if line]


def test_sigterm_with_streams_in_flight_ends_each_well_and_exits_0():
    import signal

    server = _Process("--drain-s", "0")
    try:
        streams = [_stream(server, "Hello", 1000) for _ in range(2)]  # type: ignore[arg-type]
        whole = http.client.HTTPConnection(server.host, server.port, timeout=60)
        body = json.dumps({"prompt": "Hello", "max_tokens": 1000, "temperature": 0})
        whole.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        time.sleep(0.3)  # the whole request is read and queued
        server.signal(signal.SIGTERM)
        for stream in streams:
            last = _events(stream)[-1]
            assert last == "data: [DONE]" or json.loads(last[6:])["error"]["code"] == "cancelled"
        answer = whole.getresponse()
        data = json.loads(answer.read())
        assert (answer.status, data.get("error", {}).get("code")) in ((200, None), (503, "cancelled"))
        assert server.proc.wait(60) == 0
        assert "Traceback" not in "".join(server.lines)
    finally:
        server.close()


def test_a_second_signal_exits_at_once():
    import signal

    # The small preset: the tiny one writes 1000 tokens in a fraction of a second, so its stream could end (and the
    # process be tearing down, signals back to their defaults) before the second signal.
    server = _Process("--drain-s", "600", preset="small")
    try:
        stream = _stream(server, "Hello", 1000)  # type: ignore[arg-type]
        server.signal(signal.SIGINT)
        time.sleep(0.5)
        assert server.proc.poll() is None  # draining: the stream goes on
        assert any(stream.readline().startswith(b"data: ") for _ in range(3))
        server.signal(signal.SIGINT)
        assert server.proc.wait(30) == 1
        assert "stopped at once" in "".join(server.lines) and "Traceback" not in "".join(server.lines)
    finally:
        server.close()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "a", "max_tokens": 2, "colour": "blue"}, 400, "colour"),
        ({"prompt": "a", "max_tokens": 2, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"prompt": "a", "max_tokens": 2, "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"prompt": "a", "max_tokens": 2, "user": "u1", "frequency_penalty": 0, "logit_bias": {}}, 200, None),
    ],
)
def test_unknown_fields_are_refused_and_harmless_defaults_accepted(server, body, status, param):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    assert response.status == status
    if status == 400:
        assert data["error"]["param"] == param and "Traceback" not in data["error"]["message"]
    _serves(server)


def test_a_signal_as_soon_as_the_server_says_it_listens_exits_0():
    import signal

    server = _Process()
    try:
        server.signal(signal.SIGTERM)  # right after the line: before or while uvicorn starts
        assert server.proc.wait(60) == 0 and "Traceback" not in "".join(server.lines)
    finally:
        server.close()


def test_a_client_leaving_mid_body_logs_no_traceback(server):
    sock = _raw(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b'{"prom')
    time.sleep(0.2)  # the handler is reading the body
    sock.close()
    _serves(server)  # and no_server_errors finds nothing in the log


def test_a_port_in_use_is_one_line():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = str(taken.getsockname()[1])
        done = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--device", "cpu", "--port", port])
    finally:
        taken.close()
    assert done.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in done.output
    assert "Traceback" not in done.output


def test_a_client_that_stops_reading_its_stream_holds_no_sequence(server):
    sock = _raw(server)
    body = json.dumps({"prompt": "Hello", "max_tokens": 300, "temperature": 0, "stream": True}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body)  # and never reads
    _serves(server)  # served meanwhile; then the unread request has finished and freed its KV (_settles)
    sock.close()
