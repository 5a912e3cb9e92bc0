"""`gen serve`'s HTTP API against tiny models on 127.0.0.1: the official openai client and plain HTTP,
streaming, concurrent requests equal to single runs, OpenAI error JSON with the right status, and a client
that disconnects mid-stream cancelling its sequence."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from gen_cli.infer.engine import open_model
from gen_cli.infer.options import EngineOptions, Preset, SamplingConfig
from gen_cli.infer.scheduler import Request
from gen_cli.serve.server import BackgroundServer, ServeOptions, served
from gen_cli.text.tokenizer import decode

openai = pytest.importorskip("openai")
GREEDY = SamplingConfig(temperature=0.0)
CPU = EngineOptions(device="cpu", native=False)


@pytest.fixture(scope="module")
def engine(model_dir):
    return open_model(model_dir, CPU)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(served(engine, "tiny", ServeOptions(max_batch=4))) as srv:
        yield srv


def _client(srv, key: str = "none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _expected(engine, ids: list[int], n: int) -> tuple[str, list[int]]:
    """The greedy continuation one run gives, as text up to the first stop id."""
    tokens = engine.generate(ids, n, GREEDY).tokens[0].tolist()
    stops = [i for i, t in enumerate(tokens) if t in engine.stop_ids]
    kept = tokens[: stops[0]] if stops else tokens
    return decode(engine.tokenizer, [ids[-1], *kept])[len(decode(engine.tokenizer, [ids[-1]])) :], tokens


def _post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_completion_with_the_openai_client_equals_a_single_run(server, engine):
    client = _client(server)
    done = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, temperature=0)
    text, tokens = _expected(engine, engine.encode("The cat"), 12)
    assert done.choices[0].text == text
    assert done.usage.prompt_tokens == len(engine.encode("The cat"))
    stops = [i for i, t in enumerate(tokens) if t in engine.stop_ids]
    assert done.usage.completion_tokens == (stops[0] + 1 if stops else 12)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_streamed_completion_joins_to_the_whole_text(server):
    client = _client(server)
    whole = client.completions.create(model="tiny", prompt="a b c", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="a b c", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_plain_http_stream_is_server_sent_events_ending_in_done(server):
    body = {
        "prompt": "x y",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_concurrent_requests_each_equal_their_single_run(server, engine):
    prompts = ["one", "two three four", "five six", "seven eight nine ten eleven", "x", "the end"]
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        r = _client(server).completions.create(model="tiny", prompt=prompts[i], max_tokens=9, temperature=0)
        out[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [out[i] for i in range(len(prompts))] == [_expected(engine, engine.encode(p), 9)[0] for p in prompts]


def test_a_seed_repeats_a_sampled_completion(server):
    client = _client(server)
    ask = dict(model="tiny", prompt="The", max_tokens=8, temperature=1.0, top_p=0.9)
    texts = [client.completions.create(seed=s, **ask).choices[0].text for s in (5, 5, 6, 7, 8)]
    assert texts[0] == texts[1] and len(set(texts)) > 1


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "a", "temperature": True}, 400, "temperature"),
        ({"prompt": "a", "model": "gpt-4"}, 400, "model"),
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "max_tokens": 500}, 400, "max_tokens"),
        ({"prompt": "word " * 100}, 400, None),
        ({"prompt": "a", "stop": [1]}, 400, "stop"),
    ],
)
def test_bad_requests_answer_openai_error_json(server, body, status, param):
    code, data, _ = _post(server.url + "/v1/completions", body)
    assert code == status and set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["param"] == param and "Traceback" not in data["error"]["message"]


def test_chat_without_a_template_and_unknown_routes_are_json_errors(server):
    code, data, _ = _post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and "chat template" in data["error"]["message"]
    code, data, _ = _post(server.url + "/v1/nothing", {})
    assert code == 404 and data["error"]["message"]


def test_body_size_api_key_and_a_full_queue(engine):
    options = ServeOptions(max_batch=1, max_queue=1, api_key="sesame", max_body=2048)
    with BackgroundServer(served(engine, "tiny", options)) as srv:
        code, data, _ = _post(srv.url + "/v1/completions", {"prompt": "a"})
        assert code == 401 and data["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").models.list()
        auth = {"authorization": "Bearer sesame"}
        code, data, _ = _post(srv.url + "/v1/completions", {"prompt": "a" * 4000}, auth)
        assert code == 413
        assert _post(srv.url + "/v1/completions", {"prompt": "a", "max_tokens": 2}, auth)[0] == 200
        srv.served.worker.stop()  # nothing runs now: one queued request fills the queue
        srv.served.worker.scheduler.submit(Request([1, 2], 2))
        code, data, headers = _post(srv.url + "/v1/completions", {"prompt": "a", "max_tokens": 2}, auth)
        assert code == 429 and data["error"]["code"] == "queue_full" and headers["retry-after"] == "1"


def test_a_client_leaving_mid_stream_cancels_its_sequence():
    engine = open_model(Preset("tiny"), CPU)
    with BackgroundServer(served(engine, "tiny")) as srv:
        scheduler = srv.served.worker.scheduler
        cancelled: list[Request] = []
        cancel = scheduler.cancel
        scheduler.cancel = lambda r: (cancelled.append(r), cancel(r))[1]  # type: ignore[method-assign]
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        body = json.dumps({"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.sock.close()  # the client goes away after its first chunk
        conn.close()
        deadline = time.monotonic() + 30
        while (not cancelled or not scheduler.idle()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled and cancelled[0].finish == "cancelled" and len(cancelled[0].tokens) < 1000
        assert scheduler.reserved == 0 and scheduler.idle()


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    """The tiny ChatML instruct model tests/test_chat.py chats with."""
    pytest.importorskip("transformers")
    from hf_builders import write_chatml_model

    return open_model(write_chatml_model(tmp_path_factory.mktemp("chat")), CPU)


def test_chat_with_the_openai_client_streamed_and_whole_equals_a_single_run(chat_engine):
    with BackgroundServer(served(chat_engine, "chat")) as srv:
        client = _client(srv)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        chunks = list(
            client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0, stream=True)
        )
    ids = chat_engine.chat_ids("Hello there", system="Be brief.")
    text, _ = _expected(chat_engine, ids, 10)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_failing_step_answers_503_and_the_server_goes_on(engine, monkeypatch):
    import gen_cli.infer.scheduler as scheduler_module

    real = scheduler_module.prefill_chunk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "prefill_chunk", flaky)
    with BackgroundServer(served(engine, "tiny")) as srv:
        code, data, headers = _post(srv.url + "/v1/completions", {"prompt": "a", "max_tokens": 3})
        assert code == 503 and "stopped" in data["error"]["message"] and headers["retry-after"] == "1"
        assert srv.served.worker.scheduler.reserved == 0
        code, data, _ = _post(srv.url + "/v1/completions", {"prompt": "a", "max_tokens": 3})
        assert code == 200 and data["usage"]["completion_tokens"] == 3


def test_cli_bench_serve_json_and_serve_refusals():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    runner = CliRunner()
    argv = (
        "bench serve --preset tiny --clients 2 --requests 3 --rounds 1 --batches 1,2 --modes continuous,single --json"
    )
    done = runner.invoke(app, argv.split())
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert [m["mode"] for m in data["modes"]] == ["continuous", "single"] and [b["batch"] for b in data["batches"]] == [
        1,
        2,
    ]
    for argv in (
        ["serve", "--decode", "sideways"],
        ["bench", "serve", "--modes", "eager"],
        ["serve", "--port", "70000"],
    ):
        refused = runner.invoke(app, argv)
        assert refused.exit_code == 2 and "Traceback" not in refused.output, argv


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(server):
    client = _client(server)
    whole = client.completions.create(model="tiny", prompt="The cat", max_tokens=16, temperature=0).choices[0].text
    stop = whole.strip()[len(whole.strip()) // 2 :][:3]
    assert stop, whole  # the tiny model writes some text to cut
    cut = client.completions.create(model="tiny", prompt="The cat", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert whole.startswith(cut.choices[0].text) and len(cut.choices[0].text) < len(whole)
    streamed = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_gen_serve_steps_the_model_in_the_thread_that_loaded_it(engine):
    """`gen serve`'s worker runs in the calling thread (the main one, which loaded the model: one OpenMP root
    thread) until told to stop, and its events come from there."""
    from gen_cli.serve.worker import Worker

    app = served(engine, "tiny", ServeOptions(max_batch=2))
    worker: Worker = app.worker
    seen: list[threading.Thread] = []
    requests = [Request(engine.encode("The for statement"), 5, GREEDY) for _ in range(2)]
    for request in requests:
        request.emit = lambda event: seen.append(threading.current_thread())
        worker.scheduler.submit(request)
    worker.run_here(lambda: not all(r.finish for r in requests))
    assert [r.finish for r in requests] == ["length", "length"] and len(seen) == 2 * 6
    assert set(seen) == {threading.current_thread()}
    worker.stop()  # no thread of its own to join
