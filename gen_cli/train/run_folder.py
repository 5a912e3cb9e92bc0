"""The run folder: a model directory plus the one-file train state and metrics.jsonl.

The train state is ONE file holding everything a resume needs (fp32 weights, AdamW moments, RNG
states, step, arguments, config and the tokenizer JSON in its metadata), written by temp + rename,
so `kill -9` at any moment leaves either the previous state or the new one, never a mixture.
"""

from __future__ import annotations

import json
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
        raise UsageError(f"{out} is a file, not a folder")
    if any(out.iterdir()) and not force:
        what = "a different training run" if (out / STATE_FILE).exists() else "files"
        raise UsageError(
            f"{out} already holds {what}; pass force to overwrite, or resume {out} to continue",
            params=("force", "resume"),
        )


def clear_run(out: Path) -> None:
    from gen_cli.model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

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
