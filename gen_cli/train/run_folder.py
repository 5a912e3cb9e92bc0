"""The run folder: a model directory plus the one-file train state and metrics.jsonl.

The train state is ONE file holding everything a resume needs (fp32 weights, AdamW moments, RNG
states, step, arguments, config and the tokenizer JSON in its metadata), written by temp + rename,
so `kill -9` at any moment leaves either the previous state or the new one, never a mixture. A length
and sha256 over every tensor's bytes and the other metadata are stored with it and checked on resume: a
flipped bit is refused, not trained on (a state written before the checksum is read unchecked).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gen_cli.atomic import atomic_path
from gen_cli.errors import GenError, UsageError
from gen_cli.model.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_FORMAT = "gen-train-state/1"
CHECKSUM_KEY = "checksum"  # "<bytes>:<sha256>" over the tensors and the other metadata
LOCK_FILE = ".gen-train.lock"  # held (flock) by the one process training into the folder


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
    metadata[CHECKSUM_KEY] = state_checksum(tensors, metadata)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def state_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """'<bytes>:<sha256>' over every tensor (name, dtype, shape, bytes) and metadata entry, in name order."""
    import hashlib

    import torch

    h, size = hashlib.sha256(), 0
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        h.update(f"{key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)  # (numel,)
        data = memoryview(t.view(torch.uint8).numpy())
        h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}\0".encode())
        h.update(data)
        size += data.nbytes
    return f"{size}:{h.hexdigest()}"


@dataclass
class TrainState:
    """A loaded train state; tensors stay on CPU until applied."""

    step: int
    args: dict
    config: ModelConfig
    tokenizer_json: str
    tensors: dict[str, torch.Tensor]
    tokens_seen: int | None  # None for a state written before it was recorded
    path: Path = Path(STATE_FILE)

    def apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Restore weights, optimizer moments and RNG states exactly; GenError when an entry is damaged."""
        try:
            self._apply(model, optimizer, generator)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            # A missing RNG state, a weight of the wrong shape…: one line naming the file, not a traceback.
            raise GenError(f"{self.path}: damaged train state ({e.__class__.__name__}: {e})") from None

    def _apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
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
        _check_moments(model, optimizer, state)
        sd["state"] = state
        optimizer.load_state_dict(sd)
        torch.set_rng_state(self.tensors["rng.torch"])
        generator.set_state(self.tensors["rng.data"])
        if "rng.cuda" in self.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.tensors["rng.cuda"])


def _check_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[int, dict]) -> None:
    """Each saved AdamW moment has its weight's shape (torch would only fail at the first step), named."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's index order
    for idx, fields in sorted(state.items()):
        if not 0 <= idx < len(params):
            raise ValueError(f"optim.{idx}.* names parameter {idx}; the model has {len(params)}")
        p = params[idx]
        for field, value in fields.items():
            want = () if field == "step" else tuple(p.shape)
            if tuple(value.shape) != want:
                raise ValueError(
                    f"optim.{idx}.{field} (of {names.get(id(p), '?')}) has shape {tuple(value.shape)}, "
                    f"the weight needs {want}"
                )


def _check_state_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight at its shape and both RNG states present: checked before a resume tokenizes anything."""
    import torch

    from gen_cli.model.info import parameter_shapes

    shapes = {f"model.{n}": shape for n, shape in parameter_shapes(config).items()}
    for name in ("rng.torch", "rng.data"):
        if name not in tensors or tensors[name].dtype != torch.uint8:
            raise ValueError(f"{name} is missing or not a byte tensor")
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, the config needs {shape}")


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
        if CHECKSUM_KEY in meta and state_checksum(tensors, meta) != meta[CHECKSUM_KEY]:
            raise GenError(
                f"{path}: the train state is damaged (its checksum does not match its content); resume from a "
                "copy or start the run again"
            )
        config = ModelConfig.from_dict(json.loads(meta["config"]), source=str(path))
        seen = int(meta["tokens_seen"]) if "tokens_seen" in meta else None
        _check_state_tensors(config, tensors)
        step, args = int(meta["step"]), json.loads(meta["args"])
        if step < 0 or not isinstance(args, dict) or not isinstance(meta["tokenizer"], str):
            raise ValueError("bad step, arguments or tokenizer entry")
        return TrainState(step, args, config, meta["tokenizer"], tensors, seen, path)
    except GenError:
        raise
    except Exception as e:
        raise GenError(f"{path}: not a readable train state ({e})") from None


def _run_files() -> tuple[str, ...]:
    from gen_cli.formats.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

    return STATE_FILE, METRICS_FILE, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE


def _is_orphan(name: str) -> bool:
    """A temporary file `atomic_path` makes for one of a run's files (`.NAME.xxxx.tmp`)."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in _run_files())


def sweep_orphans(folder: Path) -> list[Path]:
    """Delete gen's own half-written temporary files (left by kill -9 during a save); the removed paths."""
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if _is_orphan(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder (creating it) for the whole run; refuse a second user.

    The lock file records the holder's pid for the message; gen's orphan temp files are swept once
    the lock is held (nobody else can be writing them then). A folder this call created and nothing
    else wrote into is removed again on exit, so a refused or failed start leaves nothing behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; run unguarded
        yield
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenError(f"cannot create run folder {folder}: {e.strerror or e}") from None
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise GenError(
                f"{folder} is in use by another gen train (pid {holder}); wait for it to end or use another folder"
            ) from None
        # The previous holder may have unlinked the file between our open and flock: lock the live one.
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        sweep_orphans(folder)
        yield
    finally:
        # Unlink while still holding it, so a waiter never locks a file that is about to vanish.
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty: a failed start left nothing


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a folder that already holds files (another run) unless --force, which clears our files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder")
    if any(p.name != LOCK_FILE and not _is_orphan(p.name) for p in out.iterdir()) and not force:
        what = "a different training run" if (out / STATE_FILE).exists() else "files"
        raise UsageError(
            f"{out} already holds {what}; pass force to overwrite, or resume {out} to continue",
            params=("force", "resume"),
        )


def clear_run(out: Path) -> None:
    for name in _run_files():
        (out / name).unlink(missing_ok=True)
    sweep_orphans(out)


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
