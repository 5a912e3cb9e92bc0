"""What training reads and writes: token files, scoring a token stream, the one-file train state.

Token files: a corpus split tokenized once into a compact array that training and evaluation reuse.

Layout: every document is preceded by the `<|endoftext|>` id, so the stream reads
`EOT doc1 EOT doc2 …`. The leading EOT acts as a beginning-of-text marker: every text token then
has something before it and can be predicted, so evaluating the whole stream scores every byte of
the text. The file is raw little-endian uint16 (vocabulary ≤ 65535) or uint32, named by a hash of
everything that determines its contents, and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gen_cli.atomic import atomic_path
from gen_cli.config import ModelConfig
from gen_cli.errors import GenError, UsageError
from gen_cli.resources import cache_dir
from gen_cli.tokenizer import EOT, special_id, token_bytes

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.corpus import Corpus

_ENCODE_BATCH = 64
STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_FORMAT = "gen-train-state/1"


@dataclass(frozen=True)
class TokenFile:
    """A tokenized split on disk; `cached` says whether an earlier run had already written it."""

    path: Path
    dtype: str
    tokens: int
    cached: bool

    def load(self) -> np.ndarray:
        """The token ids as a read-only memory map (the file is never read whole)."""
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id: uint16 up to 65535, else uint32."""
    return "<u2" if vocab_size <= 65535 else "<u4"


def tokenizer_digest(tok: Tokenizer) -> str:
    """A hash of the tokenizer's full JSON (vocabulary, merges, normalisation, special tokens)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def corpus_identity(corpus: Corpus) -> list:
    """What determines a corpus's text, cheaply: file path + size + mtime, or a hash of other text.

    Built-in and stdin documents are not files; their text is hashed (a few ms for the built-in
    corpus), which also covers the Python version the built-in text came from.
    """
    ident: list = [sys.version_info[:3]]
    for doc in corpus.documents:
        path = Path(doc.name)
        if path.is_file():
            st = path.stat()
            ident.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        else:
            h = hashlib.sha256()
            for line in doc.lines("all"):
                h.update(line.encode("utf-8"))
            ident.append([doc.name, h.hexdigest()])
    return ident


def token_file_key(tok: Tokenizer, corpus: Corpus, split: str) -> str:
    """The cache key: tokenizer content, inputs' identity, split and layout version."""
    payload = json.dumps([1, tokenizer_digest(tok), corpus_identity(corpus), split])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _document_ids(tok: Tokenizer, corpus: Corpus, split: str, eot: int) -> Iterator[list[int]]:
    """Per document: [EOT, ids…]; documents encoded in batches so the Rust side runs in parallel."""
    texts = iter(corpus.texts(split))  # streamed: only one batch of documents is in memory
    while batch := list(itertools.islice(texts, _ENCODE_BATCH)):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            yield [eot, *enc.ids]


def tokenize_split(tok: Tokenizer, corpus: Corpus, split: str, folder: Path | None = None) -> TokenFile:
    """Tokenize one split into a token file, or reuse the one an earlier run wrote."""
    eot = special_id(tok, EOT)
    if eot is None:
        raise UsageError(f"the tokenizer has no {EOT} token; train one with `gen train-tokenizer`")
    dtype = token_dtype(tok.get_vocab_size())
    folder = folder or cache_dir() / "tokens"
    path = folder / f"{token_file_key(tok, corpus, split)}.bin"
    itemsize = np.dtype(dtype).itemsize
    if path.is_file():
        return TokenFile(path, dtype, path.stat().st_size // itemsize, cached=True)
    total = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for ids in _document_ids(tok, corpus, split, eot):
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            total += len(ids)
    return TokenFile(path, dtype, total, cached=False)


def byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (the EOT separator) count 0 bytes.

    Byte-level BPE tokens concatenate to exactly the encoded text's bytes, so summing this table
    over predicted tokens gives the exact byte count of the text they cover.
    """
    vocab = tok.get_vocab_size()
    table = np.zeros(vocab, dtype=np.int64)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for i in range(vocab):
        piece = tok.id_to_token(i)
        if piece is None or piece in specials:
            continue
        table[i] = len(token_bytes(tok, i))
    return table


def windows(data: np.ndarray, starts: np.ndarray | list[int], length: int) -> np.ndarray:
    """Rows data[s : s + length] for each start, as int64: (len(starts), length)."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)[None, :]  # (b, length)
    return np.asarray(data[idx], dtype=np.int64)


def require_tokens(tokens: int, window: int, what: str) -> None:
    """Refuse a split too small to cut even one training window from."""
    if tokens < window + 1:
        raise UsageError(
            f"the {what} has only {tokens} tokens, fewer than one window of {window + 1} "
            f"(--context {window} + 1); give more text or a smaller --context"
        )


# ---------------------------------------------------------------------------------------------
# Scoring a token stream


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures; bits_per_byte = nats / ln 2 / UTF-8 bytes of the predicted tokens' text."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int


def evaluate(
    model: torch.nn.Module,
    data: np.ndarray,
    byte_table: np.ndarray,
    context: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    max_tokens: int | None = None,
) -> EvalResult:
    """Score the token stream in contiguous, non-overlapping windows: every target exactly once.

    Window i feeds data[iT : iT+T] and predicts data[iT+1 : iT+T+1]; the last window may be
    shorter. Bytes are the exact UTF-8 length of the predicted tokens (EOT separators count 0).
    """
    import torch
    import torch.nn.functional as F

    n = len(data) if max_tokens is None else min(len(data), max_tokens + 1)
    targets_total = max(0, n - 1)
    if targets_total == 0:
        raise UsageError("nothing to evaluate: the validation text has fewer than 2 tokens")
    starts = list(range(0, targets_total, context))
    nats = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, autocast_dtype):
        full = [s for s in starts if s + context <= targets_total]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        if len(full) < len(starts):
            groups.append([starts[-1]])
        for group in groups:
            length = min(context, targets_total - group[0])
            win = torch.from_numpy(windows(data, group, length + 1)).to(device)  # (b, length+1)
            logits = model(win[:, :-1])  # (b, length, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), win[:, 1:].flatten(), reduction="sum")
            nats += float(loss)
    model.train(was_training)
    n_bytes = int(byte_table[np.asarray(data[1:n], dtype=np.int64)].sum())
    loss = nats / targets_total
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else float("nan"),
        tokens=targets_total,
        bytes=n_bytes,
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on a CUDA device that supports it, else float32; other names as runtime."""
    import torch

    from gen_cli.runtime import resolve_dtype

    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return resolve_dtype(name, device)


def training_precision(dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for a requested dtype: weights and optimizer always stay fp32."""
    import torch

    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return dtype
    raise UsageError("--dtype must be float32 or bfloat16 here (weights stay fp32; float16 would need loss scaling)")


def evaluate_model(
    model_dir: str | Path,
    inputs: list[str] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 8,
    context: int | None = None,
    max_tokens: int | None = None,
) -> EvalResult:
    """Held-out loss, perplexity and bits per byte of a model directory on the inputs' val split."""
    from gen_cli.checkpoint import load_model
    from gen_cli.corpus import Corpus
    from gen_cli.runtime import resolve_device

    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise UsageError("--batch-size and --max-tokens must be at least 1")
    dev = resolve_device(device)
    amp = training_precision(run_dtype(dtype, dev))
    model, tok = load_model(model_dir, dev)  # fp32 weights; bfloat16 runs under autocast
    limit = model.config.context_length
    context = context or limit
    if not 1 <= context <= limit:
        raise UsageError(f"--context {context} is outside what the model allows (1 to {limit} tokens)")
    corpus = Corpus(inputs or [])
    corpus.require_text()
    data = tokenize_split(tok, corpus, "val").load()
    if len(data) < 2:
        raise UsageError(f"the validation split of {', '.join(corpus.inputs)} is empty; give more text")
    return evaluate(model, data, byte_lengths(tok), context, batch_size, dev, amp, max_tokens)


# ---------------------------------------------------------------------------------------------
# The run folder: one-file train state, metrics


def save_train_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    args: dict,
    config: ModelConfig,
    tokenizer: Tokenizer,
    tokens_seen: int | None,
) -> None:
    """Write weights, AdamW moments, RNG states, the step and the tokens trained on so far as one
    self-consistent file, atomically."""
    import safetensors.torch
    import torch

    tensors = {f"model.{n}": p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {
        "format": STATE_FORMAT,
        "step": str(step),
        "args": json.dumps(args),
        "config": json.dumps(config.to_dict()),
        "tokenizer": tokenizer.to_str(),
    }
    if tokens_seen is not None:  # unknown when resumed from a state that predates the count
        metadata["tokens_seen"] = str(tokens_seen)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


@dataclass
class TrainState:
    """A loaded train state; tensors stay on CPU until applied."""

    step: int
    args: dict
    config: ModelConfig
    tokenizer_json: str
    tensors: dict[str, torch.Tensor]
    tokens_seen: int | None  # None for a state written before it was recorded

    def apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Restore weights, optimizer moments and RNG states exactly."""
        import torch

        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.tensors[f"model.{name}"])
        sd = optimizer.state_dict()
        state: dict[int, dict] = {}
        for key, value in self.tensors.items():
            if key.startswith("optim."):
                _, idx, field = key.split(".", 2)
                state.setdefault(int(idx), {})[field] = value
        sd["state"] = state
        optimizer.load_state_dict(sd)
        torch.set_rng_state(self.tensors["rng.torch"])
        generator.set_state(self.tensors["rng.data"])
        if "rng.cuda" in self.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.tensors["rng.cuda"])


def load_train_state(folder: Path) -> TrainState:
    """Read a run folder's train state with a clear error when it is missing or damaged."""
    from safetensors import safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        raise UsageError(f"{folder}: no {STATE_FILE} there, so nothing to resume; is it a `gen train` run?")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        config = ModelConfig.from_dict(json.loads(meta["config"]), source=str(path))
        seen = int(meta["tokens_seen"]) if "tokens_seen" in meta else None
        return TrainState(int(meta["step"]), json.loads(meta["args"]), config, meta["tokenizer"], tensors, seen)
    except GenError:
        raise
    except Exception as e:
        raise GenError(f"{path}: not a readable train state ({e})") from None


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a folder that already holds files (another run) unless --force, which clears our files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if any(out.iterdir()) and not force:
        what = "a different training run" if (out / STATE_FILE).exists() else "files"
        raise UsageError(f"{out} already holds {what}; pass --force to overwrite, or --resume {out} to continue")


def clear_run(out: Path) -> None:
    from gen_cli.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

    for name in (STATE_FILE, METRICS_FILE, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        (out / name).unlink(missing_ok=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed step (written after the last checkpoint by a killed run)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = [ln for ln in keep if _record_step(ln) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0
