"""llama.cpp's `llama-bench` as a peer of `gen bench decode`: find the binary, run it once, parse its JSON.

llama-bench runs a test per length it is given: `pp<P>` (a P-token prompt in one batch, `n_gen` 0) and
`tg<N>` (N tokens generated one at a time, `n_prompt` 0); with `-o json` it prints one object per test
on stdout (rates in `avg_ts` ± `stddev_ts`, each repeat in `samples_ts`). gen runs it with `-r 1`
between its own repeats, so both sides see the same minutes of machine noise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError, UsageError

BINARY = "llama-bench"
TIMEOUT_S = 1800.0  # one run of both tests on a 135M model takes seconds; a stuck binary must not hang the bench


@dataclass
class LlamaTest:
    """One llama-bench test (`pp512`, `tg128`…), its repeats merged; rates in tokens/s."""

    test: str
    n_prompt: int
    n_gen: int
    samples_ts: list[float]
    model_type: str
    model_size: int  # bytes of the model's tensors, as llama-bench reports them
    model_n_params: int
    n_threads: int
    build: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ts(self) -> float:
        return statistics.median(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_ts": self.median_ts, "stddev_ts": self.stddev_ts}


def find_llama_bench(explicit: str | Path | None = None) -> Path | None:
    """The binary given (refused when it is not an executable file), else `llama-bench` on PATH, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UsageError(f"llama_bench: {path} is not an executable file", params=("llama_bench",))
        return path
    found = shutil.which(BINARY)
    return Path(found) if found else None


def bench_test_name(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    """llama-bench's name for a test: pp512, tg128, pp512+tg128 for a combined one, `@ d<N>` after a context."""
    parts = ([f"pp{n_prompt}"] if n_prompt else []) + ([f"tg{n_gen}"] if n_gen else [])
    return ("+".join(parts) or "none") + (f" @ d{n_depth}" if n_depth else "")


def _number(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is {value!r}, not a number")
    return kind(value)


def parse_output(text: str) -> list[LlamaTest]:
    """llama-bench's `-o json` stdout as tests; GenError (one line) when it is not that shape."""
    start = text.find("[")  # some builds print a line before the array
    try:
        data = json.loads(text[start:] if start >= 0 else text)
        if not isinstance(data, list) or not data:
            raise ValueError("expected a non-empty JSON array of tests")
        tests = []
        for obj in data:
            if not isinstance(obj, dict):
                raise ValueError("an entry is not an object")
            n_prompt, n_gen = _number(obj, "n_prompt", int), _number(obj, "n_gen", int)
            samples = obj.get("samples_ts")
            if not isinstance(samples, list) or not samples:
                samples = [_number(obj, "avg_ts", float)]
            tests.append(
                LlamaTest(
                    test=bench_test_name(n_prompt, n_gen, int(obj.get("n_depth") or 0)),
                    n_prompt=n_prompt,
                    n_gen=n_gen,
                    samples_ts=[float(s) for s in samples],
                    model_type=str(obj.get("model_type", "")),
                    model_size=int(obj.get("model_size") or 0),
                    model_n_params=int(obj.get("model_n_params") or 0),
                    n_threads=int(obj.get("n_threads") or 0),
                    build=f"{obj.get('build_commit', '?')} ({obj.get('build_number', '?')})",
                    extra={k: obj[k] for k in ("cpu_info", "backends", "n_batch", "n_ubatch", "type_k") if k in obj},
                )
            )
        return tests
    except (ValueError, TypeError) as e:
        head = " ".join(text.split())[:80]
        raise GenError(f"llama-bench printed something that is not its JSON output ({e}): {head!r}") from None


def run_once(binary: Path, model: Path, threads: int, prompt_len: int, new_tokens: int) -> list[LlamaTest]:
    """One repeat of llama-bench's tests on `model` (`-r 1`), same threads and lengths as gen's run."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(prompt_len), "-n", str(new_tokens)]
    cmd += ["-r", "1", "-o", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except OSError as e:
        raise GenError(f"llama-bench could not start: {e}") from None
    except subprocess.TimeoutExpired:
        raise GenError(f"llama-bench ran past {TIMEOUT_S:.0f} s on {model.name}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        reason = last[-1] if last else "no output"
        raise GenError(f"llama-bench failed (exit {proc.returncode}) on {model.name}: {reason}")
    return parse_output(proc.stdout)


def merge(runs: list[list[LlamaTest]]) -> list[LlamaTest]:
    """Tests of several one-repeat runs, samples joined per test name, in first-seen order."""
    merged: dict[str, LlamaTest] = {}
    for run in runs:
        for t in run:
            if t.test in merged:
                merged[t.test].samples_ts += t.samples_ts
            else:
                merged[t.test] = LlamaTest(**{**asdict(t), "samples_ts": list(t.samples_ts)})
    return list(merged.values())


class LlamaRunner:
    """Runs llama-bench once per call (gen calls it between its repeats) and keeps the merged tests."""

    def __init__(self, binary: Path, model: Path, threads: int, prompt_len: int, new_tokens: int) -> None:
        self.args = (binary, model, threads, prompt_len, new_tokens)
        self.runs: list[list[LlamaTest]] = []

    def __call__(self, _round: int = 0) -> None:
        self.runs.append(run_once(*self.args))

    def tests(self) -> list[LlamaTest]:
        return merge(self.runs)
