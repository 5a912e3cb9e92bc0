"""`gen bench startup`: fresh processes timed from spawn to exit, each child's own peak RSS, llama.cpp's
self-reported load and prompt times parsed. A fake `llama-simple` (a Python script written here) prints what
llama.cpp's does; nothing needs llama.cpp."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch
from hf_builders import byte_level_tokenizer
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.errors import GenError, UsageError
from gen_cli.formats.export_gguf import export_gguf
from gen_cli.lab.startup import find_llama, parse_gen, parse_llama, run_child
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.text.tokenizer import configure

runner = CliRunner()

# What llama-simple prints on stderr after its model-loading log (llama.cpp b5xxx), figures made up.
LLAMA_SIMPLE_STDERR = """llama_model_loader: loaded meta data with 25 key-value pairs and 147 tensors from m.gguf
main: decoded 16 tokens in 0.25 s, speed: 64.00 t/s

llama_perf_sampler_print:    sampling time =       0.73 ms /    17 runs   (    0.04 ms per token, 23287.67 tokens per second)
llama_perf_context_print:        load time =     304.62 ms
llama_perf_context_print: prompt eval time =      40.12 ms /     5 tokens (    8.02 ms per token,   124.63 tokens per second)
llama_perf_context_print:        eval time =     228.39 ms /    15 runs   (   15.23 ms per token,    65.68 tokens per second)
llama_perf_context_print:       total time =     573.89 ms /    20 tokens
"""  # noqa: E501 (llama.cpp's own lines)

FAKE = """#!{python}
import sys
open({log!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if {fail!r}:
    print("error: unable to load model", file=sys.stderr)
    sys.exit(1)
print("The quick brown fox jumps over")
sys.stderr.write({stderr!r})
"""


def fake_llama_simple(tmp_path: Path, fail: bool = False) -> tuple[Path, Path]:
    log, path = tmp_path / "calls.log", tmp_path / "llama-simple"
    path.write_text(FAKE.format(python=sys.executable, log=str(log), fail=fail, stderr=LLAMA_SIMPLE_STDERR))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, d_model=32, d_ff=64, n_head=2, n_kv_head=1, vocab_size=320, context_length=64)
    path = tmp_path_factory.mktemp("startup") / "tiny.gguf"
    export_gguf(Transformer(config).eval(), configure(byte_level_tokenizer()), path)
    return path


def test_parse_llama_reads_load_and_prompt_times():
    load, first = parse_llama(LLAMA_SIMPLE_STDERR, "llama-simple")
    assert load == pytest.approx(0.30462) and first == pytest.approx(0.30462 + 0.04012)
    with pytest.raises(GenError, match="llama_perf_context_print") as e:
        parse_llama("main: decoded 16 tokens\n", "llama-simple")
    assert "\n" not in str(e.value)


def test_parse_gen_adds_the_time_to_first_token_to_the_load():
    assert parse_gen(json.dumps({"stats": {"load_s": 0.5, "ttft_s": 0.25}})) == (0.5, 0.75)
    with pytest.raises(GenError, match="load_s"):
        parse_gen("not json")


def test_each_child_reports_its_own_peak_rss():
    """wait4's rusage: a small child after a big one is not given the big one's peak (RUSAGE_CHILDREN would)."""
    big = run_child([sys.executable, "-c", "x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096])"])
    small = run_child([sys.executable, "-c", "pass"])
    assert big[1] == small[1] == 0
    assert big[4] > 300 << 20 and small[4] < 200 << 20
    failed = run_child([sys.executable, "-c", "import sys; print('bad', file=sys.stderr); sys.exit(3)"])
    assert failed[1] == 3 and failed[3].strip() == "bad"


def test_find_llama_prefers_a_given_binary_then_path(tmp_path, monkeypatch):
    fake, _ = fake_llama_simple(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_llama() == ("llama-simple", fake)
    assert find_llama(cli=fake) == ("llama-cli", fake)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UsageError, match="not an executable"):
        find_llama(simple=tmp_path / "plain")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama() is None


def test_bench_startup_interleaves_gen_and_llama_on_the_same_file(tiny_gguf, tmp_path):
    fake, log = fake_llama_simple(tmp_path)
    result = runner.invoke(app, ["bench", "startup", "--model", str(tiny_gguf), "--repeats", "1",
                                 "--max-new-tokens", "3", "--llama-simple", str(fake), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    gen, torch_path, llama = data["sides"]
    assert (gen["tool"], torch_path["tool"], llama["tool"]) == ("gen", "gen (torch)", "llama-simple")
    assert gen["repeats"] == torch_path["repeats"] == llama["repeats"] == 1
    assert llama["load_s"]["median"] == pytest.approx(0.30462)
    assert 0 < gen["load_s"]["median"] <= gen["first_token_s"]["median"] < gen["wall_s"]["median"]
    assert gen["peak_rss_bytes"]["min"] > 0 and llama["peak_rss_bytes"]["min"] > 0
    calls = log.read_text().splitlines()  # the warm-up and one timed run, each with the same arguments
    assert calls == [f"-m {tiny_gguf} -n 3 The quick brown fox"] * 2


def test_a_failing_llama_is_refused_in_one_line(tiny_gguf, tmp_path):
    fake, _ = fake_llama_simple(tmp_path, fail=True)
    result = runner.invoke(app, ["bench", "startup", "-m", str(tiny_gguf), "--repeats", "1",
                                 "--llama-simple", str(fake)])  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "llama-simple exited with status 1: error: unable to load model" in " ".join(result.stderr.split())
