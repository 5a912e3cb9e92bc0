"""A model to run: a gen model directory, a Hugging Face folder, a GGUF file, or random weights of a
preset shape, with its tokenizer.

Returns what it built and notes for the caller to show; prints nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import UsageError
from gen_cli.formats.loaded import Loaded
from gen_cli.model.config import ModelConfig, kv_heads_for, load_preset, preset_names
from gen_cli.resources import default_model_dir, work_dir
from gen_cli.text.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer


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
    rope_scaling: str | None = None,
    arena: Callable[[ModelConfig], bool] | None = None,
    act: str | None = None,
) -> Loaded:
    """A preset's random weights, a gen model directory (default: the shipped model), a Hugging Face folder
    or a GGUF file, on `device` in `dtype` (default: float32 for gen's models, the stored dtype for imported);
    `rope_scaling`, a spec such as `yarn:4,orig=256` or `none`, replaces the model's own RoPE scaling.
    `arena(config)`: whether an imported model's streamed matrices go straight into 2 MB pages (the native
    decode layout, for `act` activations), each copied once from the file, instead of being views of its map."""
    loaded = _load(model_dir, preset, tokenizer, attention, kv_heads, pos, device, dtype, arena, act)
    if rope_scaling is not None:
        rescale(loaded, rope_scaling)
    return loaded


def rescale(loaded: Loaded, spec: str) -> None:
    """Run the loaded model with the RoPE scaling `spec` instead of its own; a note says what changed."""
    from gen_cli.memory import check_tables_fit
    from gen_cli.model.config import parse_rope_scaling, with_rope_scaling
    from gen_cli.model.transformer import apply_rope_scaling

    scaling = parse_rope_scaling(spec)
    before = loaded.model.config.context_length
    try:
        scaled = with_rope_scaling(loaded.model.config, scaling)
    except UsageError as e:  # the config's own check (a size limit, a non-RoPE model): name the spec too
        why = str(e).removeprefix("rope_scaling ")
        raise UsageError(f"rope_scaling {spec!r}: {why}", params=("rope_scaling",)) from None
    check_tables_fit(scaled, loaded.source)
    apply_rope_scaling(loaded.model, scaling)
    after = loaded.model.config.context_length
    grown = f", context {before:,} → {after:,} tokens" if after != before else ""
    loaded.notes.append(f"RoPE scaling {spec}{grown}")


def _load(
    model_dir: Path | None,
    preset: str | None,
    tokenizer: Path | None,
    attention: str | None,
    kv_heads: int | None,
    pos: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None,
    arena: Callable[[ModelConfig], bool] | None = None,
    act: str | None = None,
) -> Loaded:
    import torch

    directory = model_dir if model_dir is not None else default_model_dir()
    kind = None if preset is not None else model_kind(directory)
    if kind in ("hf", "gguf"):
        return _load_imported(directory, kind, torch.device(device), dtype, arena, act)
    dtype = dtype or torch.float32
    if preset is not None:
        loaded = preset_model(preset, tokenizer, attention, kv_heads, pos)
        loaded.model = loaded.model.to(device=device, dtype=dtype).eval()
        return loaded
    from gen_cli.formats.checkpoint import load_model

    require_model_kind(directory)  # a .gguf file or an HF folder went to the importers before here
    model, tok = load_model(directory, device=device, dtype=dtype)
    return Loaded(model, tok, str(directory))


def require_model_kind(path: Path) -> str:
    """`model_kind`, or a one-line refusal when the path is neither a folder nor a .gguf file.

    The message names the path, not a value: params would turn every "model" in it into a flag."""
    kind = model_kind(path)
    if kind is None:
        raise UsageError(
            f"{path}: no such directory or .gguf file; a model is a gen model directory, a Hugging Face folder "
            "or a .gguf file"
        )
    return kind


def model_kind(path: Path) -> str | None:
    """'gguf' for a .gguf file, 'hf' for a Hugging Face folder, 'gen' for another folder, None if neither."""
    if path.suffix.lower() == ".gguf" and path.exists() and not path.is_dir():
        return "gguf"  # a device or FIFO named .gguf too: the reader refuses it in one line, unread
    if path.is_dir():
        from gen_cli.formats.hf import is_hf_dir

        return "hf" if is_hf_dir(path) else "gen"
    return None


def _load_imported(
    path: Path,
    kind: str,
    device: torch.device,
    dtype: torch.dtype | None,
    arena: Callable[[ModelConfig], bool] | None,
    act: str | None = None,
) -> Loaded:
    """An HF folder or GGUF file; fp16 weights run in float32 on the CPU (PyTorch's CPU fp16 is slow)."""
    import torch

    config, opened = _check_fits(path, kind) if device.type == "cpu" else (None, None)
    in_arena = device.type == "cpu" and arena is not None and config is not None and arena(config)
    if kind == "hf":
        from gen_cli.formats.hf import load_hf

        loaded = load_hf(path, device, dtype, in_arena)
    else:
        from gen_cli.formats.gguf_file import load_gguf

        loaded = load_gguf(path, device, dtype, in_arena, opened, act)
    stored = loaded.model.norm.weight.dtype  # the float tensors' dtype (an embedding may be blocks)
    if dtype is None and stored == torch.float16 and device.type == "cpu":
        halves = sum(t.nelement() for t in loaded.model.state_dict().values() if t.dtype == torch.float16)
        loaded.model.float()
        if loaded.model.config.pos_encoding == "rope":  # tables built in float16 would stay rounded: recompute
            loaded.model.set_rope_tables(loaded.model.config)
        loaded.notes.append("float16 weights run in float32 on the CPU")
        copied = loaded.details.setdefault("copied at load", {})
        copied["float16 → float32"] = copied.get("float16 → float32", 0) + 4 * halves
    return loaded


def _check_fits(path: Path, kind: str) -> tuple[ModelConfig, Any]:
    """Refuse, from the config alone, a model whose weights and a KV cache will not fit (memory.check_load_fits);
    the config, and the open GGUFFile (None for a folder) so the load reads its header no second time."""
    from gen_cli.memory import check_load_fits

    check_load_fits(path)  # the weights alone first: reading a GGUF's config maps the whole file
    if kind == "hf":
        from gen_cli.formats.checkpoint import read_json_object
        from gen_cli.formats.hf import config_from_hf

        config = config_from_hf(read_json_object(path / "config.json"), str(path / "config.json"))[0]
        opened = None
    else:
        from gen_cli.formats.gguf_file import GGUFFile, gguf_config

        opened = GGUFFile(path)
        config = gguf_config(opened)[0]
    check_load_fits(path, config)
    return config, opened


def config_for(target: str) -> tuple[ModelConfig, str, dict[str, Any]]:
    """The shape of a model (gen directory, HF folder, GGUF file) or a preset, a label saying which it
    was, and details of imported models (format, architecture, tokenizer); reads no weights."""
    from gen_cli.formats.checkpoint import load_config

    path = Path(target)
    kind = model_kind(path)
    if kind == "hf":
        from gen_cli.formats.hf import read_config

        config, details = read_config(path)
        return config, f"model {path}", details
    if kind == "gguf":
        from gen_cli.formats.gguf_file import read_gguf_config

        config, details = read_gguf_config(path)
        return config, f"model {path}", details
    if kind == "gen":
        return load_config(path), f"model {path}", {}
    if target in preset_names():
        return load_preset(target), f"preset {target}", {}
    raise UsageError(
        f"{target!r} is neither a model directory nor a preset (nor a .gguf file); model directories are gen's "
        f"or Hugging Face folders; presets: {', '.join(preset_names())}"
    )


def model_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model (gen directory, HF folder, or a GGUF file's rebuilt one); no weights read."""
    if require_model_kind(path) == "gguf":
        from gen_cli.formats.gguf_file import GGUFFile
        from gen_cli.formats.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(GGUFFile(path).get, str(path))[0]
    return load_tokenizer(path / "tokenizer.json")
