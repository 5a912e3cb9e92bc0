"""A model to run: a gen model directory or random weights of a preset shape, with its tokenizer.

Returns what it built and notes for the caller to show; prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import UsageError
from gen_cli.model.config import ModelConfig, kv_heads_for, load_preset, preset_names
from gen_cli.resources import default_model_dir, work_dir
from gen_cli.text.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.model.transformer import Transformer


@dataclass
class Loaded:
    """A model ready to run, its tokenizer, where it came from, and notes worth telling the user."""

    model: Transformer
    tokenizer: Tokenizer
    source: str
    notes: list[str] = field(default_factory=list)
    random_weights: bool = False


def default_tokenizer_path() -> Path:
    """Where `gen train-tokenizer` writes by default."""
    return work_dir() / "tokenizer.json"


def resolve_tokenizer_path(path: Path | None) -> Path:
    """The given path, else the default model's tokenizer, else the one `gen train-tokenizer` wrote."""
    if path is not None:
        return path
    for candidate in (default_model_dir() / "tokenizer.json", default_tokenizer_path()):
        if candidate.is_file():
            return candidate
    raise UsageError("no tokenizer found; give a tokenizer.json or train one with `gen train-tokenizer`")


def preset_model(
    preset: str,
    tokenizer_path: Path | None = None,
    attention: str | None = None,
    kv_heads: int | None = None,
    pos: str | None = None,
) -> Loaded:
    """Random weights (seed WEIGHT_SEED) of a preset shape, its attention and positions changed as asked;
    the vocabulary follows the tokenizer."""
    from gen_cli.model.transformer import random_model

    config = load_preset(preset)
    changes: dict[str, Any] = {"n_kv_head": kv_heads_for(config.n_head, attention, kv_heads)}
    if pos is not None:
        changes["pos_encoding"] = pos
    path = resolve_tokenizer_path(tokenizer_path)
    tok = load_tokenizer(path)
    notes = []
    if tok.get_vocab_size() != config.vocab_size:
        notes.append(f"preset {preset}: vocab_size {config.vocab_size} → {tok.get_vocab_size()} to match {path}")
        changes["vocab_size"] = tok.get_vocab_size()
    config = config.replace(**changes)
    notes.append(
        f"random weights: preset {preset} ({config.attention_kind}, {config.n_kv_head} KV heads, "
        f"{config.pos_encoding}); the text will be gibberish"
    )
    return Loaded(random_model(config), tok, f"preset {preset} (random weights)", notes, random_weights=True)


def load(
    model_dir: Path | None = None,
    preset: str | None = None,
    tokenizer: Path | None = None,
    attention: str | None = None,
    kv_heads: int | None = None,
    pos: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Loaded:
    """A preset's random weights, or a model directory (default: the shipped model), on `device` in `dtype`."""
    import torch

    dtype = dtype or torch.float32
    if preset is not None:
        loaded = preset_model(preset, tokenizer, attention, kv_heads, pos)
        loaded.model = loaded.model.to(device=device, dtype=dtype).eval()
        return loaded
    from gen_cli.model.checkpoint import load_model

    directory = model_dir if model_dir is not None else default_model_dir()
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory; a model directory is made by `gen train`")
    model, tok = load_model(directory, device=device, dtype=dtype)
    return Loaded(model, tok, str(directory))


def config_for(target: str) -> tuple[ModelConfig, str]:
    """The shape of a model directory or a preset name, and a label saying which it was."""
    from gen_cli.model.checkpoint import load_config

    path = Path(target)
    if path.is_dir():
        return load_config(path), f"model {path}"
    if target in preset_names():
        return load_preset(target), f"preset {target}"
    raise UsageError(f"{target!r} is neither a model directory nor a preset; presets: {', '.join(preset_names())}")
