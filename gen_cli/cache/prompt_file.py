"""Prompt-cache files: a prompt's KV (every layer, in its stored kind, scales included) and its token ids
in safetensors, written atomically, with metadata naming the model, tokenizer, KV kinds and dtype.

A file is untrusted input: its header is checked against the model (identity, shapes, dtypes) and the
file's size before any tensor is read, and a checksum over the tensors catches a damaged file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from gen_cli.atomic import atomic_path
from gen_cli.cache.kinds import KVSide
from gen_cli.cache.linear import KVCache
from gen_cli.errors import GenError

if TYPE_CHECKING:
    from gen_cli.model.config import ModelConfig
    from gen_cli.model.transformer import Transformer

FORMAT = "gen.prompt_cache"
VERSION = "1"
TOKENS = "tokens"
_MAX_HEADER = 100 * 2**20  # safetensors' own bound on a header's bytes
_ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int8: "I8", torch.uint8: "U8", torch.int64: "I64",
}  # fmt: skip
# What must match for a file's KV to be this run's: (metadata key, what the message calls it).
_IDENTITY = (
    ("model_sha256", "model (weights and config)"),
    ("tokenizer_sha256", "tokenizer"),
    ("weights", "weight quantization"),
    ("dtype", "compute dtype"),
    ("k_kind", "K cache kind"),
    ("v_kind", "V cache kind"),
)


def model_fingerprint(model: Transformer) -> str:
    """sha256 of the config and of every weight tensor's name, shape, dtype and all of its bytes: computed
    on the model as loaded, before any decode-time rewriting of its modules (~1 s per 2 GB of weights)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1).to("cpu").contiguous()  # (numel,): no copy for a CPU model's weights
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def identity(
    model: Transformer, tokenizer_sha256: str, weights: str, k_kind: str, v_kind: str, dtype: torch.dtype
) -> dict[str, str]:
    """The metadata a prompt-cache file must carry to be reused by this run."""
    return {
        "model_sha256": model_fingerprint(model),
        "tokenizer_sha256": tokenizer_sha256,
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "k_kind": k_kind,
        "v_kind": v_kind,
    }


@dataclass
class PromptCacheFile:
    """A validated file's token ids and its KV tensors (row 0 of each side, `len(ids)` tokens)."""

    ids: list[int]
    tensors: dict[str, torch.Tensor]
    nbytes: int


def _side_names(cache_like: KVCache) -> list[tuple[str, KVSide]]:
    names = [(f"k.{i}", s) for i, s in enumerate(cache_like.k_sides)]
    return names + [(f"v.{i}", s) for i, s in enumerate(cache_like.v_sides)]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def save_prompt_cache(path: Path, cache: KVCache, ids: list[int], ident: dict[str, str]) -> None:
    """Write row 0's KV for positions [0:len(ids)] (the prompt `ids`) to `path`, atomically."""
    from safetensors.torch import save_file

    n = len(ids)
    if not 1 <= n <= cache.max_tokens:
        raise GenError(f"a prompt cache holds 1 to {cache.max_tokens} tokens, got {n}")
    tensors = {TOKENS: torch.tensor(ids, dtype=torch.int64)}
    for name, side in _side_names(cache):
        for j, t in enumerate(side.tensors):
            tensors[f"{name}.{j}"] = t[:1, :, :n].to("cpu").contiguous()  # (1, n_kv_head, n, …)
    meta = {"format": FORMAT, "version": VERSION, "tokens": str(n), "sha256": _checksum(tensors), **ident}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_prompt_cache(
    path: Path, config: ModelConfig, ident: dict[str, str], max_tokens: int
) -> PromptCacheFile | None:
    """The file's ids and KV, checked against this run's identity (its kinds and dtype say the layout) and
    `config`, holding at most `max_tokens` tokens (None: no file).

    The file is opened once and everything is read through that one descriptor, so a writer replacing it
    meanwhile (an atomic rename) is never half seen: this read sees the old file whole. Every check on the
    header and the size runs before a tensor is read; a mismatch is one GenError line."""
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not block the open
    except OSError as e:
        raise GenError(f"{path}: cannot open the prompt-cache file ({e.strerror}); delete it") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GenError(f"{path}: not a regular file; give a prompt-cache file path")
        meta, header, offsets, start = _read_header(path, f, info.st_size)
        return _checked(path, f, config, ident, max_tokens, meta, header, offsets, start, info.st_size)


def _read_header(path: Path, f: BinaryIO, size: int) -> tuple[dict[str, str], dict, dict, int]:
    """The safetensors header: metadata, {name: (shape, dtype)}, {name: (begin, end)}, where the data starts."""
    damaged = f"{path}: not a readable prompt-cache file, truncated or damaged"
    try:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n}")
        raw = json.loads(f.read(n))
        meta = raw.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("metadata")
        header, offsets = {}, {}
        for name, entry in raw.items():
            shape, dtype, (begin, end) = tuple(entry["shape"]), entry["dtype"], entry["data_offsets"]
            if dtype not in _ST_DTYPES.values() or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"tensor {name} offsets")
            if end - begin != _numel(shape) * _dtype_of(dtype).itemsize:
                raise ValueError(f"tensor {name} size")
            header[name], offsets[name] = (shape, dtype), (begin, end)
    except (ValueError, TypeError, KeyError, RecursionError, OSError) as e:
        raise GenError(f"{damaged} ({e}); delete it") from None
    spans = sorted(offsets.values())
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)) or 8 + n + max((e for _, e in spans), default=0) != size:
        raise GenError(f"{damaged} (its tensors do not fill its {size:,} bytes); delete it")
    return meta, header, offsets, 8 + n


def _checked(
    path: Path, f: BinaryIO, config: ModelConfig, ident: dict[str, str], max_tokens: int,
    meta: dict[str, str], header: dict, offsets: dict, start: int, size: int,
) -> PromptCacheFile:  # fmt: skip
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise GenError(f"{path}: not a gen prompt-cache file (version {VERSION}); delete it or choose another")
    for key, what in _IDENTITY:
        if meta.get(key) != ident[key]:
            got, want = meta.get(key, "missing"), ident[key]
            detail = "" if key.endswith("sha256") else f": the file has {got}, this run uses {want}"
            raise GenError(f"{path}: saved with another {what}{detail}; delete it or choose another file")
    n = _token_count(path, meta, max_tokens)
    expected = _expected_header(config, ident, n)
    if header != expected:
        bad = sorted(set(header.items()) ^ set(expected.items()))[0][0]
        raise GenError(f"{path}: tensor {bad!r} does not match this model's KV layout for {n} tokens; delete it")
    data_bytes = sum(_numel(shape) * _dtype_of(dt).itemsize for shape, dt in header.values())
    if data_bytes > size:
        raise GenError(f"{path}: {size:,} bytes cannot hold the {data_bytes:,} its header declares: truncated")
    tensors = {}
    for name, (shape, dt) in header.items():
        begin, end = offsets[name]
        f.seek(start + begin)
        buffer = bytearray(end - begin)
        if f.readinto(buffer) != len(buffer):
            raise GenError(f"{path}: ends before tensor {name!r}: truncated; delete it")
        flat = torch.frombuffer(buffer, dtype=_dtype_of(dt)) if buffer else torch.empty(0, dtype=_dtype_of(dt))
        tensors[name] = flat.reshape(shape)  # the file's row-major layout
    if _checksum(tensors) != meta.get("sha256"):
        raise GenError(f"{path}: its tensors do not match their checksum: the file is damaged; delete it")
    ids = tensors.pop(TOKENS).tolist()
    if any(not 0 <= i < config.vocab_size for i in ids):
        raise GenError(f"{path}: holds token ids outside the vocabulary; delete it")
    return PromptCacheFile(ids, tensors, data_bytes)


def restore(cache: KVCache, saved: PromptCacheFile, n: int) -> None:
    """Copy the file's first `n` tokens of KV into row 0 of an empty `cache` and set its position to n."""
    if not 0 <= n <= len(saved.ids) or n > cache.max_tokens or cache.batch_size != 1:
        raise GenError(f"cannot restore {n} tokens of a {len(saved.ids)}-token prompt cache here")
    for name, side in _side_names(cache):
        for j, t in enumerate(side.tensors):
            t[:1, :, :n].copy_(saved.tensors[f"{name}.{j}"][:, :, :n])  # (1, n_kv_head, n, …)
    cache.pos = n


def _token_count(path: Path, meta: dict[str, Any], limit: int) -> int:
    try:
        n = int(meta.get("tokens", ""))
    except ValueError:
        n = 0
    if not 1 <= n <= limit:
        raise GenError(f"{path}: declares {meta.get('tokens')!r} tokens; this run's cache holds 1 to {limit}")
    return n


def _expected_header(config: ModelConfig, ident: dict[str, str], n: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, safetensors dtype) for n tokens in the identity's kinds: built on the meta
    device, so nothing is allocated for a header that may lie."""
    shape = (1, config.n_kv_head, n, config.head_dim)  # (1, n_kv_head, n, head_dim)
    out = {TOKENS: ((n,), "I64")}
    compute = getattr(torch, ident["dtype"])
    for prefix, kind in (("k", ident["k_kind"]), ("v", ident["v_kind"])):
        side = KVSide(kind, shape, compute, "meta")
        for i in range(config.n_layer):
            for j, t in enumerate(side.tensors):
                out[f"{prefix}.{i}.{j}"] = (tuple(t.shape), _ST_DTYPES[t.dtype])
    return out


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _dtype_of(name: str) -> torch.dtype:
    return next(dt for dt, st in _ST_DTYPES.items() if st == name)
