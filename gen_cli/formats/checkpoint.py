"""A model is a directory: config.json, model.safetensors, tokenizer.json; written atomically.

Weights are safetensors only (never pickle). A tied lm_head is stored once, as the embedding, and
re-tied on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_cli.atomic import atomic_path, write_text_atomic
from gen_cli.errors import GenError, UsageError
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.text.tokenizer import load_tokenizer, save_tokenizer, tokenizer_digest

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_TIED = "lm_head.weight"
TOKENIZER_DIGEST_KEY = "gen.tokenizer_sha256"  # in the weights' metadata: which tokenizer they were trained with
# Weights are stored in a float type; an integer or bool tensor would be cast silently into nonsense.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_CONFIG_BYTES = 1 << 20


def save_model(
    directory: str | Path, model: Transformer, tokenizer: Tokenizer, dtype: torch.dtype | None = None
) -> None:
    """Write config.json, model.safetensors (in `dtype`, default the model's) and tokenizer.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise GenError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; they must match"
        )
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == _TIED and model.config.tie_embeddings:
            continue  # the same storage as tok_emb.weight; safetensors refuses shared tensors anyway
        t = tensor.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", TOKENIZER_DIGEST_KEY: tokenizer_digest(tokenizer)})
    write_text_atomic(directory / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_tokenizer(tokenizer, directory / TOKENIZER_FILE)


def read_json_object(path: Path, what: str = "a JSON object", max_bytes: int = 64 << 20) -> dict[str, Any]:
    """A JSON object from an untrusted regular file, its size checked before it is read; one-line errors."""
    from gen_cli.formats.schema import load_json

    data = load_json(path, max_bytes, what)
    if not isinstance(data, dict):
        raise GenError(f"{path}: expected {what}")
    return data


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig in DIR/config.json, with clear errors for a missing or broken file."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():  # a device or FIFO is there, not missing: read_json_object refuses it
        raise GenError(f"{path}: missing; a model directory holds {CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE}")
    # A model config is a few hundred bytes; never read a huge one.
    data = read_json_object(path, "a JSON object of model settings", MAX_CONFIG_BYTES)
    try:
        return ModelConfig.from_dict(data, source=str(path))
    except UsageError as e:
        # A bad value in a file is not a command-line mistake: report it as a plain GenError.
        raise GenError(f"{path}: {e}") from None
    except TypeError as e:
        raise GenError(f"{path}: invalid model config ({e})") from None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape for this config (nothing allocated); a tied head is not stored."""
    from gen_cli.model.info import state_shapes

    return {k: v for k, v in state_shapes(config).items() if not (k == _TIED and config.tie_embeddings)}


def check_weights_header(directory: Path, config: ModelConfig, tokenizer: Tokenizer) -> None:
    """Compare the safetensors header (names, shapes, dtypes, tokenizer digest) with config.json and
    the tokenizer before any weight is read or any model is built."""
    from safetensors import SafetensorError, safe_open

    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise GenError(f"{path}: not a valid safetensors file ({e})") from None
    expected = _expected_shapes(config)
    problems = []
    if missing := sorted(expected.keys() - header.keys()):
        problems.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if unexpected := sorted(header.keys() - expected.keys()):
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    for name in sorted(expected.keys() & header.keys()):
        if header[name][0] != expected[name]:
            problems.append(f"{name} has shape {header[name][0]}, config needs {expected[name]}")
    if problems:
        raise GenError(f"{directory}: weights do not match config.json: {'; '.join(problems[:6])}")
    if bad := [f"{k} ({dt})" for k, (_, dt) in sorted(header.items()) if dt not in _FLOAT_DTYPES]:
        raise GenError(f"{path}: weights must be floating point, but {', '.join(bad[:3])} is not")
    digest = meta.get(TOKENIZER_DIGEST_KEY)
    if digest is not None and digest != tokenizer_digest(tokenizer):
        raise GenError(
            f"{directory}: {TOKENIZER_FILE} is not the tokenizer these weights were trained with; restore the original"
        )


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer]:
    """Load a model directory; the model is in eval mode on `device`, cast to `dtype`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gen_cli.memory import check_fits, parameter_count

    directory = Path(directory)
    if not directory.is_dir():
        raise GenError(
            f"{directory}: no such model directory; train one with `gen train` or use random weights of a preset shape"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise GenError(f"{directory}: {name} is missing; a model directory needs all of "
                           f"{CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE}")  # fmt: skip
    config = load_config(directory)
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise GenError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens but config.json says "
            f"vocab_size {config.vocab_size}; they must match"
        )
    check_weights_header(directory, config, tokenizer)
    # The file's pages plus, at most, a converted copy of every weight in `dtype` (none when it is the stored one).
    need = (directory / WEIGHTS_FILE).stat().st_size + dtype.itemsize * parameter_count(config)
    check_fits(need, f"loading {directory}", "free some memory or use a smaller model")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise GenError(f"{directory / WEIGHTS_FILE}: not a valid safetensors file ({e})") from None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise GenError(f"{directory / WEIGHTS_FILE}: tensor {name} holds NaN or infinite values")
    from gen_cli.model.transformer import model_from_tensors

    # The file's tensors become the weights (safetensors maps the file copy-on-write): no random init and
    # no copy unless the dtype changes; in `dtype` before the model computes its RoPE tables in it.
    model = model_from_tensors(config, {name: t.to(dtype) for name, t in tensors.items()})
    model.to(device=device)
    return model, tokenizer
