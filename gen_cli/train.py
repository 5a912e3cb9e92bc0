"""Training: options, the loop (single process or torchrun/DDP), LR schedule, evaluation, train state.

A run folder is a model directory (config.json, model.safetensors, tokenizer.json, readable by
`load_model`) plus `train_state.safetensors` and `metrics.jsonl`. The train state is ONE file holding
everything a resume needs (fp32 weights, AdamW moments, RNG states, step, arguments, config and the
tokenizer JSON in its metadata), written by temp + rename, so `kill -9` at any moment leaves either
the previous state or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.config import ModelConfig, kv_heads_for, load_preset
from gen_cli.errors import GenError, UsageError
from gen_cli.tokenizer import DEFAULT_VOCAB_SIZE

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.data import EvalResult

MODEL_OPTIONS = ("preset", "attention", "kv_heads", "pos", "norm", "layers", "heads", "d_model", "d_ff")
# Defaults for options left as None; on --resume, None means "what the run used".
DEFAULTS: dict[str, Any] = {
    "vocab_size": DEFAULT_VOCAB_SIZE, "preset": "tiny", "steps": 1000, "batch_size": 16, "grad_accum": 1, "lr": 3e-3,
    "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 100, "eval_batches": 20, "save_every": 500,
    "seed": 0,
}  # fmt: skip


@dataclass
class TrainArgs:
    """Everything `gen train` accepts; None means default (or, on resume, the run's own value)."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    tokenizer: str | None = None
    vocab_size: int | None = None
    preset: str | None = None
    attention: str | None = None
    kv_heads: int | None = None
    pos: str | None = None
    norm: str | None = None
    layers: int | None = None
    heads: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    context: int | None = None
    lr: float | None = None
    warmup: int | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    save_every: int | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    out: str | None = None
    force: bool = False
    resume: str | None = None
    stop_after: int | None = None  # library-only: stop (and save) after this many steps of this run


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


Reporter = Callable[[Any], None]


# ---------------------------------------------------------------------------------------------
# Schedule, model config, evaluation


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """LR for update `step` (0-based): linear warm-up to `lr`, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_config(args: TrainArgs, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The model shape: preset (or `base`), then size and architecture overrides; vocab from the tokenizer."""
    base = base or load_preset(args.preset)
    heads = args.heads or base.n_head
    changes: dict[str, Any] = {"vocab_size": vocab_size, "n_head": heads}
    if args.attention is not None or args.kv_heads is not None:
        changes["n_kv_head"] = kv_heads_for(heads, args.attention, args.kv_heads)
    elif args.heads is not None:
        # Only the head count changed: keep MHA as MHA and MQA as MQA; GQA keeps its KV count.
        kind = base.attention_kind
        changes["n_kv_head"] = kv_heads_for(heads, kind, None) if kind != "gqa" else base.n_kv_head
    for opt, field in (("layers", "n_layer"), ("d_model", "d_model"), ("d_ff", "d_ff"),
                       ("pos", "pos_encoding"), ("norm", "norm"), ("context", "context_length")):  # fmt: skip
        if getattr(args, opt) is not None:
            changes[field] = getattr(args, opt)
    return base.replace(**changes)


def check_same_architecture(args: TrainArgs, saved: ModelConfig) -> None:
    """On resume, every architecture option given must agree with the saved model."""
    if all(getattr(args, k) is None for k in MODEL_OPTIONS):
        return
    base = load_preset(args.preset) if args.preset else saved
    wanted = build_config(dataclasses.replace(args, context=None), saved.vocab_size, base)
    diffs = [f"{f} {getattr(wanted, f)} (the run has {getattr(saved, f)})"
             for f in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "pos_encoding", "norm")
             if getattr(wanted, f) != getattr(saved, f)]  # fmt: skip
    if diffs:
        raise UsageError(f"cannot resume with a different architecture: {', '.join(diffs)}; drop those options")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay weight matrices only.

    Norm gains and biases set scales and offsets, where decay just pulls them away from their
    working values; embedding rows of rare tokens get few gradient updates, so decay would shrink
    them towards zero regardless of the data (the tied output head shares that matrix).
    """
    import torch

    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, plain = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embedding else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when RANK/WORLD_SIZE are set (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0)
    import torch
    import torch.distributed as dist

    from gen_cli.runtime import resolve_device

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_name).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


@contextlib.contextmanager
def _stop_flag() -> Iterator[list[bool]]:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (a second Ctrl-C aborts)."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here
        old = {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# The run


def resolve_args(args: TrainArgs, saved: dict | None = None) -> TrainArgs:
    """Fill options left as None: from the resumed run's arguments, then from DEFAULTS; validate."""
    r = dataclasses.replace(args, inputs=list(args.inputs))
    if saved:
        for f in dataclasses.fields(TrainArgs):
            if getattr(r, f.name) is None and f.name not in ("out", "resume", "stop_after", "tokenizer"):
                setattr(r, f.name, saved.get(f.name))
        r.inputs = r.inputs or list(saved.get("inputs") or [])
    # Absolute paths, so that a resume from another folder reads the same files.
    r.inputs = [str(Path(i).resolve()) if i != "-" and Path(i).exists() else i for i in r.inputs]
    for name, value in DEFAULTS.items():
        if getattr(r, name) is None:
            setattr(r, name, value)
    if r.warmup is None:
        r.warmup = min(100, r.steps // 10)
    if not 0 < r.lr < math.inf:
        raise UsageError(f"--lr must be a positive number, got {r.lr}")
    if r.min_lr is None:
        r.min_lr = r.lr / 10
    for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
        if getattr(r, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(r, name)}")
    for name in ("warmup", "eval_every", "save_every", "weight_decay", "grad_clip", "min_lr"):
        if getattr(r, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(r, name)}")
    if r.context is not None and r.context < 1:
        raise UsageError(f"--context must be at least 1, got {r.context}")
    if r.min_lr > r.lr:
        raise UsageError(f"--min-lr {r.min_lr} is above --lr {r.lr}; the decay ends at --min-lr")
    return r


def _trained_tokenizer(corpus: Any, vocab_size: int, report: Reporter) -> Tokenizer:
    """Train a tokenizer on the corpus, or reuse the one an identical earlier run trained."""
    import hashlib

    from gen_cli.data import corpus_identity
    from gen_cli.resources import cache_dir
    from gen_cli.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    key = hashlib.sha256(json.dumps([1, corpus_identity(corpus), vocab_size]).encode()).hexdigest()[:32]
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        report(f"reusing tokenizer {path}")
        return load_tokenizer(path)
    report(f"training a tokenizer (vocab {vocab_size}) on {corpus.size / 1e6:.1f} MB")
    tok, _ = train_tokenizer(corpus, vocab_size)
    save_tokenizer(tok, path)
    return tok


def _main_first(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Rank 0 computes (and caches) first; the others wait, then read what it cached."""
    if dist.main:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()


def train(args: TrainArgs, report: Reporter | None = None) -> TrainSummary:
    """Train (or resume) a model; under torchrun every rank calls this and only rank 0 reports/writes."""
    dist = init_distributed(args.device)
    try:
        return _train(args, (report or (lambda e: None)) if dist.main else (lambda e: None), dist)
    finally:
        if dist.world > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train(args: TrainArgs, report: Reporter, dist: Dist) -> TrainSummary:
    import torch
    import torch.nn.functional as F

    from gen_cli.checkpoint import save_model
    from gen_cli.corpus import Corpus
    from gen_cli.data import (
        METRICS_FILE,
        STATE_FILE,
        autocast,
        byte_lengths,
        check_out_dir,
        clear_run,
        evaluate,
        load_train_state,
        require_tokens,
        run_dtype,
        save_train_state,
        tokenize_split,
        tokenizer_digest,
        training_precision,
        trim_metrics,
        windows,
    )
    from gen_cli.model import Transformer
    from gen_cli.resources import work_dir
    from gen_cli.runtime import dtype_name, resolve_device
    from gen_cli.tokenizer import configure, load_tokenizer

    state = load_train_state(Path(args.resume)) if args.resume else None
    a = resolve_args(args, state.args if state else None)
    if state is not None and state.step >= a.steps:  # before any tokenizing or model building
        raise UsageError(f"the run already finished its {a.steps} steps; pass a larger --steps to continue")
    if args.resume and not args.out:
        out = Path(args.resume)
    else:
        out = Path(a.out or work_dir() / "runs" / f"{a.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    in_place = state is not None and out.resolve() == Path(args.resume).resolve()
    if not in_place:
        check_out_dir(out, a.force)
    a.out, a.resume = str(out), None
    device = resolve_device(a.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    dtype = run_dtype(a.dtype, device)
    amp = training_precision(dtype)

    corpus = Corpus(a.inputs)
    corpus.require_text()
    if state is not None:
        tok = configure(_tokenizer_from_str(state.tokenizer_json))
        if args.tokenizer:
            given = load_tokenizer(args.tokenizer)
            if given.get_vocab_size() != state.config.vocab_size:
                raise UsageError(
                    f"--tokenizer {args.tokenizer} has {given.get_vocab_size()} tokens but the model "
                    f"being resumed has a vocabulary of {state.config.vocab_size}; drop --tokenizer"
                )
            if tokenizer_digest(given) != tokenizer_digest(tok):
                raise UsageError(f"--tokenizer {args.tokenizer} is not the tokenizer this run was trained with")
    elif a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    else:
        tok = _main_first(dist, lambda: _trained_tokenizer(corpus, a.vocab_size, report))

    if state is not None:
        check_same_architecture(args, state.config)
        config = state.config
    else:
        config = build_config(a, tok.get_vocab_size())
    context = a.context or config.context_length
    if context > config.context_length:
        raise UsageError(
            f"--context {context} is longer than the model allows ({config.context_length} tokens); "
            f"use --context {config.context_length} or less"
        )
    if tok.get_vocab_size() != config.vocab_size:
        raise UsageError(f"tokenizer has {tok.get_vocab_size()} tokens but the model expects {config.vocab_size}")

    files = _main_first(dist, lambda: (tokenize_split(tok, corpus, "train"), tokenize_split(tok, corpus, "val")))
    train_tf, val_tf = files
    report(f"token files: train {train_tf.tokens:,} tokens, val {val_tf.tokens:,} tokens"
           f" ({'reused' if train_tf.cached else 'written to'} {train_tf.path.parent})")  # fmt: skip
    train_data, val_data = train_tf.load(), val_tf.load()
    require_tokens(len(train_data), context, "training text")
    can_eval = len(val_data) >= 2
    if not can_eval:
        report("the validation split is empty: no held-out evaluation")
    byte_table = byte_lengths(tok)

    torch.manual_seed(a.seed)
    model = Transformer(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(a.seed)
    start, tokens_before = 0, 0
    if state is not None:
        state.apply(model, optimizer, generator)
        start, tokens_before = state.step, state.tokens_seen
        state = None  # free the CPU copies
    fwd: Any = torch.compile(model) if a.compile else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if in_place:
            trim_metrics(out / METRICS_FILE, start)
        else:
            clear_run(out)

    saved_step = [start if in_place else None]  # the checkpoint in `out` a failure falls back to

    def save(step: int) -> None:
        saved_step[0] = step
        if dist.main:
            save_train_state(out / STATE_FILE, model, optimizer, generator, step, dataclasses.asdict(a), config, tok,
                             tokens_seen(step))  # fmt: skip
            save_model(out, model, tok)

    def log(record: dict) -> None:
        if dist.main:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def run_eval(step: int) -> EvalResult:
        res = evaluate(model, val_data, byte_table, context, a.batch_size, device, amp,
                       max_tokens=a.eval_batches * a.batch_size * context)  # fmt: skip
        log({"step": step, **{f"val_{k}": v for k, v in dataclasses.asdict(res).items()}})
        report(EvalEvent(step, res))
        return res

    B, T = a.batch_size, context
    n_starts = len(train_data) - T  # a window of T+1 tokens fits at starts 0 … N-T-1
    step_tokens = dist.world * B * a.grad_accum * T
    max_norm = a.grad_clip if a.grad_clip > 0 else math.inf

    def tokens_seen(step: int) -> int | None:
        """Tokens trained on up to `step`: earlier runs' count plus this run's (its batch and world size)."""
        return None if tokens_before is None else tokens_before + (step - start) * step_tokens

    end = a.steps if a.stop_after is None else min(a.steps, start + a.stop_after)
    step, loss_value, last_eval, interrupted = start, None, None, False
    timed_steps, timed_seconds, run_start = 0, 0.0, time.perf_counter()
    metrics = open(out / METRICS_FILE, "a", encoding="utf-8") if dist.main else None  # noqa: SIM115
    report(f"model: {model.num_parameters():,} parameters, {config.n_layer} layers, d_model {config.d_model}, "
           f"{config.attention_kind} ({config.n_head}/{config.n_kv_head} heads), {config.pos_encoding}, "
           f"context {T}; device {device}, {dtype_name(dtype)}, world size {dist.world}")  # fmt: skip
    try:
        with _stop_flag() as stop:
            while step < end:
                t0 = time.perf_counter()
                lr = lr_at(step, a.steps, a.lr, a.warmup, a.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(a.grad_accum):
                    # Every rank draws the same global batch and keeps its slice: the data equals a
                    # single process with batch world × B.
                    starts = torch.randint(0, n_starts, (dist.world * B,), generator=generator).numpy()
                    mine = starts[dist.rank * B : (dist.rank + 1) * B]
                    batch = torch.from_numpy(windows(train_data, mine, T + 1)).to(device)  # (B, T+1)
                    last = micro == a.grad_accum - 1
                    sync = fwd.no_sync() if dist.world > 1 and not last else contextlib.nullcontext()
                    with sync:
                        with autocast(device, amp):
                            logits = fwd(batch[:, :-1])  # (B, T, V)
                        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                        (loss / a.grad_accum).backward()
                    loss_sum += loss.detach()
                loss_value = float(loss_sum) / a.grad_accum
                if dist.world > 1:  # ranks share the mean loss and the stop flag
                    flags = torch.stack([loss_sum / a.grad_accum, torch.tensor(float(stop[0]), device=device)])
                    torch.distributed.all_reduce(flags)
                    loss_value = float(flags[0]) / dist.world
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    where = f"step {saved_step[0]} in {out}" if saved_step[0] is not None else "none saved yet"
                    raise GenError(
                        f"training diverged at step {step + 1} (loss {loss_value}, gradient norm {grad_norm}); "
                        f"last good checkpoint: {where}; try a lower --lr or more --warmup"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - t0
                if step > start + 1 or end - start == 1:  # the first step pays warm-up / compile
                    timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
                per_step = timed_seconds / timed_steps if timed_steps else seconds
                event = StepEvent(step, a.steps, loss_value, lr, grad_norm, step_tokens / per_step,
                                  time.perf_counter() - run_start, per_step * (end - step))  # fmt: skip
                log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": event.tokens_per_s, "elapsed_s": event.elapsed_s})  # fmt: skip
                report(event)
                if dist.main and can_eval and ((a.eval_every and step % a.eval_every == 0) or step == end):
                    last_eval = run_eval(step)
                # One process acts on its own flag; DDP ranks act on the all-reduced one, together.
                if (flags[1] > 0) if dist.world > 1 else stop[0]:
                    interrupted = True
                    save(step)
                    break
                if step == end or (a.save_every and step % a.save_every == 0):
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
        parameters=model.num_parameters(), tokens_seen=tokens_seen(step), seconds=time.perf_counter() - run_start,
        tokens_per_s=step_tokens * timed_steps / timed_seconds if timed_seconds else 0.0,
        device=str(device), dtype=dtype_name(dtype), world_size=dist.world, train_tokens=train_tf.tokens,
        val_tokens=val_tf.tokens, token_files_cached=train_tf.cached and val_tf.cached,
        resumed_from=start if args.resume else None, interrupted=interrupted,
    )  # fmt: skip


def _tokenizer_from_str(text: str) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


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
