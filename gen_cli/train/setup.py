"""Setting up a training run: arguments resolved, tokenizer, shape, token files, model and optimizer (or a resume)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError, UsageError
from gen_cli.train.args import DEFAULTS, MODEL_OPTIONS, TrainArgs, build_config, check_same_architecture, resolve_args
from gen_cli.train.distributed import Dist, main_first
from gen_cli.train.run_folder import TrainState, check_out_dir, load_train_state, run_folder_lock

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.model.config import ModelConfig
    from gen_cli.train.tokens import TokenFile

Reporter = Callable[[Any], None]


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


def _trained_tokenizer(corpus: Any, vocab_size: int, report: Reporter) -> Tokenizer:
    """Train a tokenizer on the corpus, or reuse the one an identical earlier run trained."""
    import hashlib

    from gen_cli.resources import cache_dir
    from gen_cli.text.tokenizer import load_tokenizer, save_tokenizer, special_id, train_tokenizer
    from gen_cli.train.tokens import corpus_identity

    key = hashlib.sha256(json.dumps([1, corpus_identity(corpus), vocab_size]).encode()).hexdigest()[:32]
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            tok = load_tokenizer(path)
        except GenError:
            tok = None  # a damaged cache entry: train again and overwrite it
        if tok is not None and special_id(tok) is not None:
            report(f"reusing tokenizer {path}")
            return tok
        report(f"the cached tokenizer {path} is damaged; training it again")
    report(f"training a tokenizer (vocab {vocab_size}) on {corpus.size / 1e6:.1f} MB")
    tok, _ = train_tokenizer(corpus, vocab_size)
    save_tokenizer(tok, path)
    return tok


@dataclass
class Run:
    """One set-up training run: resolved arguments, data, model, optimizer and where it writes."""

    a: TrainArgs
    dist: Dist
    out: Path
    in_place: bool  # resuming into the folder the state came from
    device: torch.device
    dtype: torch.dtype
    amp: torch.dtype | None
    tok: Tokenizer
    config: ModelConfig
    context: int
    train_tf: TokenFile
    val_tf: TokenFile
    train_data: Any  # np.ndarray memory maps
    val_data: Any
    byte_table: Any
    model: torch.nn.Module
    fwd: Any  # the model as called for training: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start: int
    tokens_before: int | None  # None when resumed from a state that predates the count
    lock: contextlib.ExitStack | None = None  # holds the run folder's lock until the run ends; close() frees it

    @property
    def step_tokens(self) -> int:
        return self.dist.world * self.a.batch_size * self.a.grad_accum * self.context

    def tokens_seen(self, step: int) -> int | None:
        """Tokens trained on up to `step`: earlier runs' count plus this run's (its batch and world size)."""
        return None if self.tokens_before is None else self.tokens_before + (step - self.start) * self.step_tokens


def run_label(args: TrainArgs) -> str:
    """What a default run folder is named after: the preset, unless an option changed its shape."""
    if args.init:
        return Path(args.init).name or "init"
    changed = [k for k in MODEL_OPTIONS if k != "preset" and getattr(args, k) is not None]
    return "custom" if changed else args.preset or DEFAULTS["preset"]


def _out_folder(args: TrainArgs, a: TrainArgs, resuming: bool) -> tuple[Path, bool]:
    """The run folder and whether a resume writes into the folder it came from."""
    import time

    from gen_cli.resources import work_dir

    if args.resume and not args.out:
        out = Path(args.resume)
    else:
        out = Path(a.out or work_dir() / "runs" / f"{run_label(args)}-{time.strftime('%Y%m%d-%H%M%S')}")
    in_place = resuming and out.resolve() == Path(args.resume).resolve()
    if not in_place:
        check_out_dir(out, a.force)
    return out, in_place


def _run_tokenizer(args: TrainArgs, a: TrainArgs, state: TrainState | None, corpus: Any, report: Reporter,
                   dist: Dist) -> Tokenizer:  # fmt: skip
    """The resumed run's tokenizer (a --tokenizer given must be the same), a given one, or one trained here."""
    from gen_cli.text.tokenizer import configure, load_tokenizer
    from gen_cli.train.tokens import tokenizer_digest

    if state is None:
        return load_tokenizer(a.tokenizer) if a.tokenizer else main_first(
            dist, lambda: _trained_tokenizer(corpus, a.vocab_size, report))  # fmt: skip
    tok = configure(_tokenizer_from_str(state.tokenizer_json))
    if args.tokenizer:
        given = load_tokenizer(args.tokenizer)
        if given.get_vocab_size() != state.config.vocab_size:
            raise UsageError(
                f"tokenizer {args.tokenizer} has {given.get_vocab_size()} tokens but the model "
                f"being resumed has a vocabulary of {state.config.vocab_size}; leave the tokenizer out"
            )
        if tokenizer_digest(given) != tokenizer_digest(tok):
            raise UsageError(f"tokenizer {args.tokenizer} is not the tokenizer this run was trained with")
    return tok


def _check_memory(config: ModelConfig, a: TrainArgs, context: int, device: torch.device) -> None:
    from gen_cli.memory import check_fits, parameter_count, training_bytes

    params = parameter_count(config)
    check_fits(
        training_bytes(config, a.batch_size, context, params, eager=a.attn_impl == "eager"),
        f"training {params:,} parameters on batches of {a.batch_size} × {context} tokens",
        "use a smaller batch_size, context or model",
        device,
        params=("batch_size", "context"),
    )


def setup_run(args: TrainArgs, report: Reporter, dist: Dist) -> Run:
    """Resolve the arguments, the tokenizer, the shape and the token files; build (or restore) model and optimizer.

    The main process locks the run folder first; the returned run holds the lock (`run.lock.close()`).
    """
    with contextlib.ExitStack() as lock:
        run = _setup_run(args, report, dist, lock)
        run.lock = lock.pop_all()
    return run


def _setup_run(args: TrainArgs, report: Reporter, dist: Dist, lock: contextlib.ExitStack) -> Run:
    import torch

    from gen_cli.formats.checkpoint import load_model
    from gen_cli.model.transformer import Transformer, set_attention_impl
    from gen_cli.runtime import resolve_device, run_dtype
    from gen_cli.text.corpus import Corpus
    from gen_cli.train.evaluate import training_precision
    from gen_cli.train.tokens import byte_lengths, require_tokens, tokenize_split

    same_folder = args.resume and (not args.out or Path(args.out).resolve() == Path(args.resume).resolve())
    # Locked before reading, so a run still writing the folder is refused.
    if same_folder and dist.main and Path(args.resume).is_dir():
        lock.enter_context(run_folder_lock(Path(args.resume)))
    state = load_train_state(Path(args.resume)) if args.resume else None
    try:
        a = resolve_args(args, state.args if state else None)
    except TypeError as e:  # a saved argument of the wrong type (a damaged state), compared with a number
        raise GenError(f"{state.path if state else 'arguments'}: damaged saved arguments ({e})") from None
    if state is not None and state.step >= a.steps:  # before any tokenizing or model building
        raise UsageError(f"the run already finished its {a.steps} steps; give a larger step count to continue")
    out, in_place = _out_folder(args, a, state is not None)
    if not in_place and dist.main:
        lock.enter_context(run_folder_lock(out))
        check_out_dir(out, a.force)  # again, now that no other run can be starting in it
    a.out, a.resume = str(out), None
    device = resolve_device(a.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    dtype = run_dtype(a.dtype, device)

    if state is None and not a.tokenizer:  # before minutes of tokenizer training for a run that cannot fit
        early = build_config(a, a.vocab_size)
        _check_memory(early, a, a.context or early.context_length, device)
    corpus = Corpus(a.inputs)
    corpus.require_text()
    init = load_model(a.init) if state is None and a.init else None  # (model, tokenizer) to start from
    tok = init[1] if init else _run_tokenizer(args, a, state, corpus, report, dist)
    if state is not None:
        check_same_architecture(args, state.config)
        config = state.config
    else:
        config = init[0].config if init else build_config(a, tok.get_vocab_size())
    context = a.context or config.context_length
    if context > config.context_length:
        raise UsageError(
            f"a training context of {context} tokens is longer than the model allows ({config.context_length} "
            "tokens); use a shorter one"
        )
    if tok.get_vocab_size() != config.vocab_size:
        raise UsageError(f"tokenizer has {tok.get_vocab_size()} tokens but the model expects {config.vocab_size}")
    _check_memory(config, a, context, device)

    train_tf, val_tf = main_first(
        dist, lambda: (tokenize_split(tok, corpus, "train"), tokenize_split(tok, corpus, "val"))
    )
    report(f"token files: train {train_tf.tokens:,} tokens, val {val_tf.tokens:,} tokens"
           f" ({'reused' if train_tf.cached else 'written to'} {train_tf.path.parent})")  # fmt: skip
    train_data, val_data = train_tf.load(), val_tf.load()
    require_tokens(len(train_data), context, "training text")

    torch.manual_seed(a.seed)
    model = Transformer(config)
    if init is not None:
        model.load_state_dict(init[0].state_dict())
        report(f"starting from the weights of {a.init}")
    model = model.to(device)
    set_attention_impl(model, a.attn_impl)
    optimizer = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(a.seed)
    start, tokens_before = 0, 0
    if state is not None:
        state.apply(model, optimizer, generator)
        start, tokens_before = state.step, state.tokens_seen
    fwd: Any = torch.compile(model) if a.compile else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(a, dist, out, in_place, device, dtype, training_precision(dtype), tok, config, context, train_tf,
                val_tf, train_data, val_data, byte_lengths(tok), model, fwd, optimizer, generator, start,
                tokens_before)  # fmt: skip


def _tokenizer_from_str(text: str) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own exception type for bad JSON
        raise GenError(f"the train state's tokenizer is damaged ({e})") from None
