"""`gen bench startup`: how long a fresh process takes to load a model and print its first token.

Each repeat starts a new process (`gen generate … -n N --json`; on a GGUF file the same command again with
GEN_TORCH_FREE=0, the PyTorch path, for the torch-free path's gain; and llama.cpp's llama-simple or llama-cli on
the same file when one is given or on PATH), interleaved so every side sees the same minute of a busy machine.
Per run: the whole command's wall time, the load time and the time to first token each tool reports about
itself, and the child's peak RSS (ru_maxrss from wait4, per child). Medians with their range are reported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError, UsageError

LLAMA_BINARIES = ("llama-simple", "llama-cli")  # llama-simple first: the plainest load-prompt-decode loop
PROMPT = "The quick brown fox"
TIMEOUT_S = 600


@dataclass
class Run:
    """One process: wall time from spawn to exit, load and first-token times (s), peak RSS (bytes)."""

    wall_s: float
    load_s: float
    first_token_s: float  # from the start of loading to the first new token (load + prompt + one step)
    peak_rss_bytes: int


@dataclass
class Side:
    """One tool's runs on the file and the command that ran them."""

    tool: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set for this side's processes

    def summary(self) -> dict[str, Any]:
        """Median and (min, max) of each figure over the runs."""
        out: dict[str, Any] = {"tool": self.tool, "command": self.command, "repeats": len(self.runs)}
        for key in ("wall_s", "load_s", "first_token_s", "peak_rss_bytes"):
            values = [getattr(r, key) for r in self.runs]
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out["runs"] = [asdict(r) for r in self.runs]
        return out


def find_llama(simple: str | Path | None = None, cli: str | Path | None = None) -> tuple[str, Path] | None:
    """(name, path) of the llama.cpp binary to compare with: one given (refused unless executable), else
    llama-simple or llama-cli on PATH, else None."""
    for name, given in (("llama-simple", simple), ("llama-cli", cli)):
        if given is not None:
            path = Path(given)
            if not path.is_file() or not os.access(path, os.X_OK):
                flag = name.replace("-", "_")
                raise UsageError(f"{flag}: {path} is not an executable file", params=(flag,))
            return name, path
    for name in LLAMA_BINARIES:
        if found := shutil.which(name):
            return name, Path(found)
    return None


def gen_command(model: Path, new_tokens: int, prompt: str = PROMPT) -> list[str]:
    """A fresh `gen generate` process that reports its own load and first-token times as JSON."""
    return [sys.executable, "-m", "gen_cli", "generate", prompt, "--model", str(model),
            "--max-new-tokens", str(new_tokens), "--temperature", "0", "--json"]  # fmt: skip


def llama_command(tool: str, binary: Path, model: Path, new_tokens: int, prompt: str = PROMPT) -> list[str]:
    """llama-simple's `-m FILE -n N PROMPT`, or llama-cli's one-shot (no conversation) form."""
    if tool == "llama-simple":
        return [str(binary), "-m", str(model), "-n", str(new_tokens), prompt]
    return [str(binary), "-m", str(model), "-n", str(new_tokens), "-p", prompt, "-no-cnv", "--temp", "0"]


# A small launcher between this process and the measured one. Linux folds the exec-ing process's peak RSS into
# the new program's ru_maxrss, so a child spawned straight from a big parent reports at least the parent's
# size; spawned from this launcher (a bare interpreter) it reports its own. The launcher also times it.
_LAUNCHER = """
import os, sys, time
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        os.write(2, f"cannot run {sys.argv[2]}: {e.strerror}\\n".encode())
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
os.write(fd, f"{wall} {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}".encode())
"""


def run_child(
    command: list[str], timeout: float = TIMEOUT_S, env: dict[str, str] | None = None
) -> tuple[float, int, str, str, int]:
    """(wall seconds, exit status, stdout, stderr, peak RSS bytes) of one child process, timed and measured
    by a small launcher (see _LAUNCHER) so the RSS is the child's own."""
    read, write = os.pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(write), *command], stdout=out,
                                        stderr=err, stdin=subprocess.DEVNULL, pass_fds=(write,),
                                        start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip
            except OSError as e:
                raise GenError(f"cannot run {command[0]}: {e.strerror or e}") from None
            os.close(write)
            write = -1
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the measured process with it
                proc.wait()
                raise GenError(f"{Path(command[0]).name} ran longer than {timeout:.0f} s; stopped") from None
            report = os.read(read, 256).decode().split()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    if len(report) != 3:
        raise GenError(f"the launcher measuring {Path(command[0]).name} failed: {stderr.strip()[-200:]}")
    wall, code, maxrss = float(report[0]), int(report[1]), int(report[2])
    return wall, code, stdout, stderr, maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux


def parse_gen(stdout: str) -> tuple[float, float]:
    """(load s, load + time to first token s) from `gen generate --json`'s stats."""
    try:
        stats = json.loads(stdout)["stats"]
        load, ttft = float(stats["load_s"]), float(stats["ttft_s"])
    except (ValueError, KeyError, TypeError) as e:
        raise GenError(f"gen generate printed no JSON stats with load_s and ttft_s ({e})") from None
    return load, load + ttft


_PERF = re.compile(r"llama_perf_context_print:\s*(load time|prompt eval time|eval time)\s*=\s*([0-9.]+) ms")


def parse_llama(stderr: str, tool: str) -> tuple[float, float]:
    """(load s, load + prompt eval s) from the llama_perf_context_print lines llama.cpp prints at exit."""
    times = {name: float(ms) / 1000 for name, ms in _PERF.findall(stderr)}
    if "load time" not in times or "prompt eval time" not in times:
        raise GenError(f"{tool} printed no llama_perf_context_print load and prompt eval times; is it llama.cpp's?")
    return times["load time"], times["load time"] + times["prompt eval time"]


def run_side(side: Side) -> Run:
    """One fresh process of `side`, parsed; a failing command is refused with its last stderr line."""
    wall, code, stdout, stderr, rss = run_child(side.command, env=side.env)
    if code != 0:
        last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "no message")
        raise GenError(f"{side.tool} exited with status {code}: {last.strip()}")
    load, first = parse_gen(stdout) if side.tool.startswith("gen") else parse_llama(stderr, side.tool)
    return Run(wall, load, first, rss)


def bench_startup(
    model: Path,
    repeats: int = 3,
    new_tokens: int = 16,
    llama: tuple[str, Path] | None = None,
    on_run: Any = None,
) -> list[Side]:
    """`repeats` rounds, each one fresh gen process then (when `llama` is given) one llama.cpp process on
    the same file; a first untimed round of each warms the page cache so no side pays for the disk alone."""
    if not model.is_file() and not model.is_dir():
        raise UsageError(f"{model}: no such model file or folder", params=("model",))
    sides = [Side("gen", gen_command(model, new_tokens))]
    if model.is_file() and model.suffix.lower() == ".gguf":  # the same command made to import torch, beside
        from gen_cli.infer.torch_free import TORCH_FREE_ENV

        sides.append(Side("gen (torch)", gen_command(model, new_tokens), env={TORCH_FREE_ENV: "0"}))
    if llama is not None:
        if not model.is_file() or model.suffix.lower() != ".gguf":
            raise UsageError(f"{model}: llama.cpp runs .gguf files; compare on one", params=("model",))
        sides.append(Side(llama[0], llama_command(llama[0], llama[1], model, new_tokens)))
    for side in sides:  # warm-up: the file's pages in the page cache for both
        run_side(side)
    for i in range(repeats):
        for side in sides:
            side.runs.append(run_side(side))
            if on_run is not None:
                on_run(f"round {i + 1}/{repeats}: {side.tool}")
    return sides


def format_sides(sides: list[Side]) -> list[str]:
    """A table: per tool, median (min–max) of wall, load, first token and peak RSS."""

    def cell(s: dict[str, Any], key: str, scale: float, unit: str, digits: int) -> str:
        v = s[key]
        return f"{v['median'] * scale:.{digits}f} ({v['min'] * scale:.{digits}f}–{v['max'] * scale:.{digits}f}){unit}"

    lines = [f"{'tool':<14}{'wall s':<22}{'load s':<22}{'first token s':<22}peak RSS MB"]
    for side in sides:
        s = side.summary()
        lines.append(
            f"{side.tool:<14}{cell(s, 'wall_s', 1, '', 2):<22}{cell(s, 'load_s', 1, '', 2):<22}"
            f"{cell(s, 'first_token_s', 1, '', 2):<22}{cell(s, 'peak_rss_bytes', 2**-20, '', 0)}"
        )
    return lines
