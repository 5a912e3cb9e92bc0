"""`gen bench serve --llama-server`: the same closed loop over HTTP against gen serve and llama.cpp's server.
llama-server here is a stand-in script that takes its flags and serves the file with gen serve, so the test
needs no llama.cpp; what is checked is the load generator, the servers' start and stop, and the report."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from hf_builders import byte_level_tokenizer, random_hf_model, write_gguf
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.lab import http_load

runner = CliRunner()

# llama-server's flags as http_load passes them, answered by gen serve (-c and --cont-batching checked, unused)
FAKE_LLAMA_SERVER = """#!{python}
import os, sys
args = sys.argv[1:]
def value(flag):
    return args[args.index(flag) + 1]
assert "--cont-batching" in args and int(value("-c")) > 0
# llama-server answers whatever model name a client sends: gen serve is told the bench's
os.execv(sys.executable, [sys.executable, "-m", "gen_cli", "serve", "-m", value("-m"), "--host", value("--host"),
         "--port", value("--port"), "--threads", value("-t"), "--max-batch", value("--parallel"), "--name", "bench"])
"""


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http")
    model = random_hf_model("llama", max_position_embeddings=256)
    return write_gguf(model, byte_level_tokenizer(), "llama", root / "tiny.gguf", "Q8_0")


@pytest.fixture
def fake_llama_server(tmp_path) -> Path:
    script = tmp_path / "llama-server"
    script.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_both_servers_serve_the_same_closed_loop(gguf_file, fake_llama_server, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the servers import this checkout's gen_cli
    args = ["bench", "serve", "-m", str(gguf_file), "--llama-server", str(fake_llama_server), "--clients", "2",
            "--requests", "3", "--rounds", "1", "--modes", "single", "-n", "5", "--threads", "1", "--json"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    rows = {row["mode"]: row for row in json.loads(done.stdout)["http"]}
    assert set(rows) == {"gen serve", "llama-server"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["ttft_p50"] > 0


def test_chats_over_http_count_the_prompt_tokens_served_from_the_cache(gguf_file, fake_llama_server, monkeypatch):
    """--turns with --llama-server: chats on the scheduler and over HTTP; gen serve runs on a paged pool, so
    its later turns are served from its prefix cache (usage's cached_tokens) and /health gives its KV held."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    args = ["bench", "serve", "-m", str(gguf_file), "--llama-server", str(fake_llama_server), "--clients", "2",
            "--requests", "4", "--rounds", "1", "--turns", "2", "-n", "6", "--threads", "1", "--json"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    rows = {row["mode"]: row for row in json.loads(done.stdout)["turns"]}
    assert set(rows) == {"prefix cache on", "prefix cache off", "gen serve (http)", "llama-server (http)"}
    gen = rows["gen serve (http)"]
    assert gen["prompt_tokens"] > gen["cached_tokens"] > 0 and gen["kv_peak"] > 0
    # the stand-in llama-server is gen serve without a pool: it says it served nothing from a cache
    assert rows["llama-server (http)"]["cached_tokens"] == 0 and rows["llama-server (http)"]["kv_peak"] == 0


def test_a_stream_counts_the_tokens_the_server_reports(gguf_file, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    port = http_load.free_port()
    with http_load.running(http_load.gen_server(gguf_file, 1, 2, port), port):
        tokens, times = http_load.stream_one(port, "Hello there", 6)
        run = http_load.closed_loop("gen serve", port, clients=2, requests=4, new_tokens=3)
    assert tokens == 6 and 1 <= len(times) <= 6  # a token that ends mid-character shows in the next event
    assert run.requests == 4 and run.tokens == 12 and len(run.ttft_ms) == 4


def test_the_llama_server_option_needs_a_gguf_file_and_an_executable(gguf_file, tmp_path):
    not_exec = tmp_path / "llama-server"
    not_exec.write_text("")
    done = runner.invoke(app, ["bench", "serve", "--llama-server", str(not_exec), "-m", str(gguf_file)])
    assert done.exit_code == 2 and "not an executable file" in done.output
    done = runner.invoke(app, ["bench", "serve", "--llama-server", str(not_exec), "--preset", "tiny"])
    assert done.exit_code == 2 and "serves a .gguf file" in done.output


def test_a_server_that_dies_at_start_is_one_clear_error(tmp_path):
    dead = http_load.Server("llama-server", [sys.executable, "-c", "import sys; sys.exit('no such model')"])
    with (
        pytest.raises(http_load.GenError, match=r"llama-server exited .* no such model"),
        http_load.running(dead, http_load.free_port()),
    ):
        pass
