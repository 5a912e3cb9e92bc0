"""The training loop (single process or torchrun/DDP): set up a run, step, evaluate, save; LR schedule.

A run folder (see `run_folder`) is a model directory that `load_model` reads, plus the train state
a resume needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError
from gen_cli.train.args import TrainArgs
from gen_cli.train.distributed import Dist, init_distributed
from gen_cli.train.run_folder import (
    METRICS_FILE,
    STATE_FILE,
    clear_run,
    save_train_state,
    trim_metrics,
)
from gen_cli.train.setup import Reporter, Run, setup_run

if TYPE_CHECKING:
    import torch

    from gen_cli.train.evaluate import EvalResult


@dataclass(frozen=True)
class StepEvent:
    step: int
    steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class EvalEvent:
    step: int
    result: EvalResult


@dataclass(frozen=True)
class TrainSummary:
    out: str
    step: int
    steps: int
    loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    val_bits_per_byte: float | None
    parameters: int
    tokens_seen: int | None  # None when resumed from a state that predates the count
    seconds: float
    tokens_per_s: float
    device: str
    dtype: str
    world_size: int
    train_tokens: int
    val_tokens: int
    token_files_cached: bool
    resumed_from: int | None
    interrupted: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Schedule, optimizer groups, signals


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """LR for update `step` (0-based): linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# How long a signal may wait for the loop to notice it: a single step stuck in one long C call (a huge
# context) runs no Python code, so the handler cannot run; after this the process ends without saving.
STOP_GRACE_S = 10.0


@contextlib.contextmanager
def _stop_flag() -> Iterator[list[bool]]:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (a second Ctrl-C aborts); if the
    loop has not noticed within STOP_GRACE_S (stuck inside one C call), the process exits anyway."""
    flag, noticed, done = [False], threading.Event(), threading.Event()

    def handler(signum: int, frame: Any) -> None:
        noticed.set()
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here
        old = {}
    watcher = _watch_signals(noticed, done) if old else None
    try:
        yield flag
    finally:
        done.set()
        if watcher is not None:
            watcher()
        for s, h in old.items():
            signal.signal(s, h)


def _either(a: threading.Event, b: threading.Event, timeout: float) -> bool:
    """Wait until either event is set (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not (a.is_set() or b.is_set()) and time.monotonic() < end:
        a.wait(0.05)
    return a.is_set() or b.is_set()


def _watch_signals(noticed: threading.Event, done: threading.Event) -> Callable[[], None]:
    """A thread that learns of each signal at once (the C-level wakeup fd, written even while the main
    thread is inside a C call) and ends the process if the handler has not run within STOP_GRACE_S."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while (data := os.read(read_fd, 1)) and not done.is_set():
            if data[0] in (signal.SIGINT, signal.SIGTERM) and not _either(noticed, done, STOP_GRACE_S):
                os.write(2, f"error: the training step did not end within {STOP_GRACE_S:g} s of the signal; "
                            "stopped without saving (the last checkpoint is kept)\n".encode())  # fmt: skip
                os._exit(128 + data[0])

    thread = threading.Thread(target=watch, name="gen-signal-watch", daemon=True)
    thread.start()

    def stop() -> None:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)  # the watcher reads EOF and returns
        thread.join()
        os.close(read_fd)

    return stop


# ---------------------------------------------------------------------------------------------
# The run


def train(args: TrainArgs, report: Reporter | None = None) -> TrainSummary:
    """Train (or resume) a model; under torchrun every rank calls this and only rank 0 reports/writes."""
    dist = init_distributed(args.device)
    try:
        return _train(args, (report or (lambda e: None)) if dist.main else (lambda e: None), dist)
    finally:
        if dist.world > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _step(run: Run, step: int, stop: list[bool]) -> tuple[float, float, float, bool | None]:
    """One update's gradients (with accumulation): (lr, mean loss, gradient norm, the ranks' shared stop
    request under DDP, else None: a single process reads its own flag when it decides)."""
    import torch
    import torch.nn.functional as F

    from gen_cli.train.evaluate import autocast
    from gen_cli.train.tokens import windows

    a, dist, B, T = run.a, run.dist, run.a.batch_size, run.context
    lr = lr_at(step, a.steps, a.lr, a.warmup, a.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    n_starts = len(run.train_data) - T  # a window of T+1 tokens fits at starts 0 … N-T-1
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(a.grad_accum):
        # Every rank draws the same global batch and keeps its slice: the data equals a single
        # process with batch world × B.
        starts = torch.randint(0, n_starts, (dist.world * B,), generator=run.generator).numpy()
        mine = starts[dist.rank * B : (dist.rank + 1) * B]
        batch = torch.from_numpy(windows(run.train_data, mine, T + 1)).to(run.device)  # (B, T+1)
        last = micro == a.grad_accum - 1
        sync = run.fwd.no_sync() if dist.world > 1 and not last else contextlib.nullcontext()
        with sync:
            with autocast(run.device, run.amp):
                logits = run.fwd(batch[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            (loss / a.grad_accum).backward()
        loss_sum += loss.detach()
    loss_value, stopping = float(loss_sum) / a.grad_accum, None
    if dist.world > 1:  # ranks share the mean loss and the stop flag, so they stop together
        flags = torch.stack([loss_sum / a.grad_accum, torch.tensor(float(stop[0]), device=run.device)])
        torch.distributed.all_reduce(flags)
        loss_value, stopping = float(flags[0]) / dist.world, bool(flags[1] > 0)
    max_norm = a.grad_clip if a.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm))
    return lr, loss_value, grad_norm, stopping


def _train(args: TrainArgs, report: Reporter, dist: Dist) -> TrainSummary:
    run = setup_run(args, report, dist)
    try:
        return _run_loop(args, report, dist, run)
    finally:
        if run.lock is not None:
            run.lock.close()


def _run_loop(args: TrainArgs, report: Reporter, dist: Dist, run: Run) -> TrainSummary:
    from gen_cli.formats.checkpoint import save_model
    from gen_cli.runtime import dtype_name
    from gen_cli.train.evaluate import evaluate

    a, out, model, config, start = run.a, run.out, run.model, run.config, run.start
    can_eval = len(run.val_data) >= 2
    if not can_eval:
        report("the validation split is empty: no held-out evaluation")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if run.in_place:
            trim_metrics(out / METRICS_FILE, start)
        else:
            clear_run(out)
    saved_step = [start if run.in_place else None]  # the checkpoint in `out` a failure falls back to
    last_save = [time.monotonic()]

    def save(step: int) -> None:
        saved_step[0], last_save[0] = step, time.monotonic()
        if dist.main:
            save_train_state(out / STATE_FILE, model, run.optimizer, run.generator, step, dataclasses.asdict(a),
                             config, run.tok, run.tokens_seen(step))  # fmt: skip
            save_model(out, model, run.tok)

    def log(record: dict) -> None:
        if metrics is not None:
            try:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            except OSError as e:  # a full disk: one line, and the last checkpoint stays
                raise GenError(f"cannot write {out / METRICS_FILE}: {e.strerror or e}") from None

    def run_eval(step: int) -> EvalResult:
        res = evaluate(model, run.val_data, run.byte_table, run.context, a.batch_size, run.device, run.amp,
                       max_tokens=a.eval_batches * a.batch_size * run.context)  # fmt: skip
        log({"step": step, **{f"val_{k}": v for k, v in dataclasses.asdict(res).items()}})
        report(EvalEvent(step, res))
        return res

    end = a.steps if a.stop_after is None else min(a.steps, start + a.stop_after)
    step, loss_value, last_eval, interrupted = start, None, None, False
    timed_steps, timed_seconds, run_start = 0, 0.0, time.perf_counter()
    metrics = open(out / METRICS_FILE, "a", encoding="utf-8") if dist.main else None  # noqa: SIM115
    report(f"model: {model.num_parameters():,} parameters, {config.n_layer} layers, d_model {config.d_model}, "
           f"{config.attention_kind} ({config.n_head}/{config.n_kv_head} heads), {config.pos_encoding}, "
           f"context {run.context}; device {run.device}, {dtype_name(run.dtype)}, world size {dist.world}")  # fmt: skip
    try:
        with _stop_flag() as stop:
            while step < end:
                t0 = time.perf_counter()
                lr, loss_value, grad_norm, stopping = _step(run, step, stop)
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    where = f"step {saved_step[0]} in {out}" if saved_step[0] is not None else "none saved yet"
                    raise GenError(
                        f"training diverged at step {step + 1} (loss {loss_value}, gradient norm {grad_norm}); "
                        f"last good checkpoint: {where}; try a lower learning rate or a longer warm-up"
                    )
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - t0
                if step > start + 1 or end - start == 1:  # the first step pays warm-up / compile
                    timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
                per_step = timed_seconds / timed_steps if timed_steps else seconds
                event = StepEvent(step, a.steps, loss_value, lr, grad_norm, run.step_tokens / per_step,
                                  time.perf_counter() - run_start, per_step * (end - step))  # fmt: skip
                log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": event.tokens_per_s, "elapsed_s": event.elapsed_s})  # fmt: skip
                report(event)
                if dist.main and can_eval and ((a.eval_every and step % a.eval_every == 0) or step == end):
                    last_eval = run_eval(step)
                # One process acts on its own flag; DDP ranks act on the all-reduced one, together.
                if stop[0] if stopping is None else stopping:
                    interrupted = True
                    save(step)
                    break
                # Every N steps, and every few minutes: on a slow machine N steps can take hours.
                due = a.save_minutes and time.monotonic() - last_save[0] >= a.save_minutes * 60
                if step == end or (a.save_every and step % a.save_every == 0) or due:
                    save(step)
    finally:
        if metrics is not None:
            metrics.close()
    _debug_digest(model, dist)
    return TrainSummary(
        out=str(out), step=step, steps=a.steps, loss=loss_value,
        val_loss=last_eval.loss if last_eval else None,
        val_perplexity=last_eval.perplexity if last_eval else None,
        val_bits_per_byte=last_eval.bits_per_byte if last_eval else None,
        parameters=model.num_parameters(), tokens_seen=run.tokens_seen(step),
        seconds=time.perf_counter() - run_start,
        tokens_per_s=run.step_tokens * timed_steps / timed_seconds if timed_seconds else 0.0,
        device=str(run.device), dtype=dtype_name(run.dtype), world_size=dist.world, train_tokens=run.train_tf.tokens,
        val_tokens=run.val_tf.tokens, token_files_cached=run.train_tf.cached and run.val_tf.cached,
        resumed_from=start if args.resume else None, interrupted=interrupted,
    )  # fmt: skip


def _debug_digest(model: torch.nn.Module, dist: Dist) -> None:
    """GEN_TRAIN_DIGEST_DIR=folder: every rank writes a hash of its weights (tests check DDP sync)."""
    folder = os.environ.get("GEN_TRAIN_DIGEST_DIR")
    if not folder:
        return
    import hashlib

    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    Path(folder, f"rank{dist.rank}.txt").write_text(h.hexdigest(), encoding="utf-8")
