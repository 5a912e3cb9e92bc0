"""The file side of export: files written beside their targets and renamed into place, a safetensors file
streamed one tensor at a time, the refusal to write over the model being exported, and dropping a mapped
model's pages once written (so a streamed export holds about one tensor's pages at a time)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError, UsageError

if TYPE_CHECKING:
    import torch


def check_output(path: Path, force: bool, folder: bool) -> None:
    """Refuse an output that exists (unless `force`) or is of the wrong kind, before any work."""
    if folder and path.is_file():
        raise UsageError(f"{path} is a file; a Hugging Face export is a folder")
    if not folder and path.is_dir():
        raise UsageError(f"{path} is a directory; a GGUF export is one file")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; set force to overwrite it", params=("force",))


def check_not_source(out: str | Path, source: str | Path) -> None:
    """Refuse an output that would write over the model being exported: the source file or folder itself,
    or one of the files a model folder is read from (other files in a shared folder are not the model's)."""
    out, source = Path(out).resolve(), Path(source).resolve()
    inside = source.parent if source.is_file() else source
    if (
        out == source
        or (out.parent == inside and out.name in SOURCE_FILES)
        or (out == inside and source.name in SOURCE_FILES)
    ):
        raise UsageError(f"{out} is the model being exported (or holds its files); export to another path")


# Files a model folder is read from (gen's own, Hugging Face's): an export must never write over them.
SOURCE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json", "chat_template.jinja")  # fmt: skip


def write_files(out_dir: Path, force: bool, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each `writers[name](tmp)` to a temporary beside `out_dir/name`, then rename them all into place:
    an existing folder keeps every other file (--force replaces only these), and a failed export leaves the
    old files untouched."""
    check_output(out_dir, force, folder=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenError(f"cannot write {out_dir}: {e.strerror or e}") from e
    temps: dict[str, Path] = {}
    try:
        umask = os.umask(0)
        os.umask(umask)
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            os.close(fd)
            temps[name] = Path(tmp)
            write(temps[name])
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; give it the permissions open() would
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for name, tmp in temps.items():  # renames only: the window with a mix of old and new files is tiny
            os.replace(tmp, out_dir / name)
    except OSError as e:
        raise GenError(f"cannot write {out_dir}: {e.strerror or e}") from e
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def safetensors_header(tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """A safetensors header (length + JSON, padded to 8 bytes) for tensors stored one after the other."""
    names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    at = 0
    for name, dtype, shape in tensors:
        n = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": names[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [at, at + n]}  # fmt: skip
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Stream `tensors` (in `layout`'s order, names, dtypes and shapes) into one safetensors file: only
    the tensor being written is held."""
    import torch

    with open(path, "wb") as f:
        f.write(safetensors_header(layout))
        expected = iter(layout)
        for name, t in tensors:
            want = next(expected)
            assert (name, t.dtype, tuple(t.shape)) == want, (name, t.dtype, t.shape, want)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as stored
        assert next(expected, None) is None, "fewer tensors than the header lists"
