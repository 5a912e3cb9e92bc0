"""llama-bench as a peer: finding the binary, running it, parsing its JSON, refusing junk in one line.

A fake `llama-bench` (a Python script written here) prints llama-bench-shaped JSON; nothing needs llama.cpp.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from gen_cli.errors import GenError, UsageError
from gen_cli.lab.llama_bench import LlamaRunner, bench_test_name, find_llama_bench, merge, parse_output, run_once


def _entry(n_prompt: int, n_gen: int, samples: list[float], **kw) -> dict:
    mean = sum(samples) / len(samples)
    return {"build_commit": "abc1234", "build_number": 1, "cpu_info": "fake CPU", "backends": "CPU",
            "model_filename": "m.gguf", "model_type": "llama ?B Q8_0", "model_size": 1234, "model_n_params": 99,
            "n_batch": 2048, "n_ubatch": 512, "n_threads": kw.get("threads", 2), "n_prompt": n_prompt,
            "n_gen": n_gen, "avg_ts": mean, "stddev_ts": 0.0, "samples_ts": samples,
            "samples_ns": [1e9 / s for s in samples]}  # fmt: skip


FAKE = """#!{python}
import json, sys
args = sys.argv[1:]
opt = dict(zip(args[::2], args[1::2]))
open({log!r}, "a").write(" ".join(args) + "\\n")
mode = {mode!r}
if mode == "fail":
    print("error: failed to load model", file=sys.stderr)
    sys.exit(1)
if mode == "junk":
    print("this is not json")
    sys.exit(0)
p, n, t = int(opt["-p"]), int(opt["-n"]), int(opt["-t"])
tests = []
if p:
    tests.append(dict(n_prompt=p, n_gen=0, avg_ts=500.0, stddev_ts=0.0, samples_ts=[500.0]))
if n:
    tests.append(dict(n_prompt=0, n_gen=n, avg_ts=100.0, stddev_ts=0.0, samples_ts=[100.0]))
for x in tests:
    x.update(model_type="llama 1M F32", model_size=4096, model_n_params=1024, n_threads=t, build_commit="fake")
print("build: fake", file=sys.stderr)
print(json.dumps(tests, indent=2))
"""


def fake_llama_bench(tmp_path: Path, mode: str = "ok") -> tuple[Path, Path]:
    """An executable llama-bench stand-in and the file it logs its arguments to."""
    log = tmp_path / "calls.log"
    path = tmp_path / "llama-bench"
    path.write_text(FAKE.format(python=sys.executable, log=str(log), mode=mode))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


def test_parse_names_tests_like_llama_bench():
    text = "warning: a line before the array\n" + json.dumps([_entry(512, 0, [449.0, 451.0]), _entry(0, 128, [45.0])])
    pp, tg = parse_output(text)
    assert (pp.test, tg.test) == ("pp512", "tg128")
    assert pp.median_ts == 450.0 and pp.stddev_ts == pytest.approx(2**0.5)
    assert tg.stddev_ts == 0.0 and tg.model_type == "llama ?B Q8_0" and tg.model_size == 1234
    assert bench_test_name(512, 128) == "pp512+tg128" and bench_test_name(0, 128, 512) == "tg128 @ d512"


@pytest.mark.parametrize("text", ["", "not json", "[]", "{}", json.dumps([{"n_prompt": "x", "n_gen": 1}])])
def test_parse_refuses_junk_in_one_line(text):
    with pytest.raises(GenError) as e:
        parse_output(text)
    assert "\n" not in str(e.value) and "llama-bench" in str(e.value)


def test_merge_joins_repeats_per_test():
    runs = [parse_output(json.dumps([_entry(8, 0, [10.0]), _entry(0, 4, [1.0])])) for _ in range(2)]
    runs[1][0].samples_ts = [30.0]
    pp, tg = merge(runs)
    assert pp.samples_ts == [10.0, 30.0] and tg.samples_ts == [1.0, 1.0] and pp.median_ts == 20.0
    assert runs[0][0].samples_ts == [10.0]  # merging copies


def test_find_prefers_the_given_binary_and_refuses_a_bad_one(tmp_path, monkeypatch):
    binary, _ = fake_llama_bench(tmp_path)
    assert find_llama_bench(binary) == binary
    with pytest.raises(UsageError):
        find_llama_bench(tmp_path / "missing")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_llama_bench() == binary
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_bench() is None


def test_run_passes_threads_and_lengths(tmp_path):
    binary, log = fake_llama_bench(tmp_path)
    runner = LlamaRunner(binary, tmp_path / "m.gguf", 3, 16, 4)
    runner(0)
    runner(1)
    args = log.read_text().splitlines()
    assert len(args) == 2 and args[0].split() == ["-m", str(tmp_path / "m.gguf"), "-t", "3", "-p", "16", "-n", "4",
                                                   "-r", "1", "-o", "json"]  # fmt: skip
    pp, tg = runner.tests()
    assert (pp.test, tg.test, tg.n_threads, len(tg.samples_ts)) == ("pp16", "tg4", 3, 2)


@pytest.mark.parametrize(("mode", "words"), [("fail", "exit 1"), ("junk", "not its JSON")])
def test_run_failures_are_one_clear_line(tmp_path, mode, words):
    binary, _ = fake_llama_bench(tmp_path, mode)
    with pytest.raises(GenError) as e:
        run_once(binary, tmp_path / "m.gguf", 2, 8, 4)
    assert words in str(e.value) and "\n" not in str(e.value)
