"""Benchmark: `gen`'s tokenizer training against calling HF `tokenizers` directly, same configuration.

Every run happens in a fresh subprocess so that its peak RSS is its own. Both sides train on the
same bytes: the direct runs read a file holding exactly gen's training split.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gen_cli.text.corpus import BUILTIN, Corpus
from gen_cli.text.tokenizer import DEFAULT_VOCAB_SIZE

VARIANTS = ("gen", "tokenizers.train(files)", "tokenizers.train_from_iterator")


@dataclass(frozen=True)
class TokenizerBenchRow:
    scenario: str
    variant: str
    files: int
    train_bytes: int
    seconds: list[float]
    mb_per_s: float  # median
    peak_rss_bytes: int  # largest over repeats, above the process's baseline after imports
    ratio_vs_direct: float | None  # gen's median throughput / tokenizers.train(files)'s

    def to_dict(self) -> dict:
        return asdict(self)


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, unlike ru_maxrss, is not inherited from the forking parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant: str, inputs: list[str], train_file: str, vocab_size: int) -> dict:
    """Train once in this process and return {seconds, bytes, peak_rss_bytes}."""
    from gen_cli.text.tokenizer import new_tokenizer, new_trainer, train_tokenizer

    baseline = _peak_rss_bytes()
    if variant == "gen":
        start = time.perf_counter()
        corpus = Corpus(inputs)
        setup = time.perf_counter() - start
        _, summary = train_tokenizer(corpus, vocab_size=vocab_size)
        seconds, n_bytes = setup + summary.train_seconds, summary.input_bytes
    else:
        trainer = new_trainer(vocab_size)  # the settings train_tokenizer uses by default
        tok = new_tokenizer()
        start = time.perf_counter()
        if variant == "tokenizers.train(files)":
            tok.train([train_file], trainer=trainer)
        else:
            with open(train_file, encoding="utf-8") as f:
                tok.train_from_iterator(f, trainer=trainer)
        seconds, n_bytes = time.perf_counter() - start, Path(train_file).stat().st_size
    return {"seconds": seconds, "bytes": n_bytes, "peak_rss_bytes": max(0, _peak_rss_bytes() - baseline)}


def _in_subprocess(variant: str, inputs: list[str], train_file: Path, vocab_size: int) -> dict:
    args = json.dumps([variant, inputs, str(train_file), vocab_size])
    code = (
        "import json, sys; from gen_cli.lab.tokenizer_bench import run_variant; "
        f"print(json.dumps(run_variant(*{args})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scenarios(workdir: Path, scale_mb: float, many_files: int) -> list[tuple[str, list[str]]]:
    """The built-in corpus; the same text repeated to about `scale_mb` MB in one file; and in many files."""
    text = "".join(Corpus([BUILTIN]).chunks("all"))
    repeats = max(1, round(scale_mb * 1e6 / len(text.encode())))
    repeated = text * repeats
    big = workdir / "repeated.txt"
    big.write_text(repeated, encoding="utf-8")
    folder = workdir / "many"
    folder.mkdir()
    lines = repeated.splitlines(keepends=True)
    per_file = -(-len(lines) // many_files)
    for i in range(many_files):
        (folder / f"{i:05d}.txt").write_text("".join(lines[i * per_file : (i + 1) * per_file]), encoding="utf-8")
    size = f"{big.stat().st_size / 1e6:.0f} MB"
    return [(BUILTIN, [BUILTIN]), (f"{size}, 1 file", [str(big)]), (f"{size}, {many_files} files", [str(folder)])]


def bench_tokenizer(
    repeats: int = 3,
    scale_mb: float = 50.0,
    many_files: int = 1000,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    on_step=lambda: None,
) -> list[TokenizerBenchRow]:
    """Measure every variant on every scenario, `repeats` times each, interleaved to share the noise."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        workdir = Path(tmp)
        for scenario, inputs in _scenarios(workdir, scale_mb, many_files):
            corpus = Corpus(inputs)
            train_file = workdir / "train-split.txt"
            with open(train_file, "w", encoding="utf-8") as f:
                f.writelines(corpus.chunks("train"))
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(repeats):
                for variant in VARIANTS:
                    runs[variant].append(_in_subprocess(variant, inputs, train_file, vocab_size))
                    on_step()
            medians = {v: statistics.median(r["bytes"] / r["seconds"] for r in runs[v]) for v in VARIANTS}
            for variant in VARIANTS:
                rows.append(
                    TokenizerBenchRow(
                        scenario=scenario,
                        variant=variant,
                        files=len(corpus.documents),
                        train_bytes=runs[variant][0]["bytes"],
                        seconds=[r["seconds"] for r in runs[variant]],
                        mb_per_s=medians[variant] / 1e6,
                        peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs[variant]),
                        ratio_vs_direct=medians[variant] / medians["tokenizers.train(files)"]
                        if variant == "gen"
                        else None,
                    )
                )
    return rows
