"""Imported values checked by type and range in one place per format: a schema maps each key to what it must
be, and a wrong value is one line naming the file, the key and the value.

Also the one way model files are opened for reading: regular files only (a link to /dev/zero or a FIFO is
refused, not read until memory runs out or forever), their size capped before a byte is read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_cli.errors import GenError

INT, NUMBER, BOOL, STR, DICT = "a whole number", "a number", "true or false", "a string", "an object"
LIST_STR, LIST_INT, LIST_NUMBER = "a list of strings", "a list of whole numbers", "a list of numbers"
TOKEN_IDS = "a token id or a list of them"  # HF's bos/eos_token_id: one id, or several (≥ 0)
_SCALARS = {
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    NUMBER: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    BOOL: lambda v: isinstance(v, bool),
    STR: lambda v: isinstance(v, str),
    DICT: lambda v: isinstance(v, dict),
}
_ELEMENTS = {LIST_STR: STR, LIST_INT: INT, LIST_NUMBER: NUMBER}


@dataclass(frozen=True)
class Key:
    """What one imported value must be: its kind, an inclusive range (numbers), whether a missing value is an
    error, and whether null (JSON) is accepted as "not given"."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    required: bool = False
    nullable: bool = True
    above: float | None = None  # exclusive lower bound (a positive epsilon, a positive factor)

    def describe(self) -> str:
        bounds = []
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.lo is not None:
            bounds.append(f"≥ {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"≤ {self.hi:g}")
        kind = "a finite number" if self.kind == NUMBER else self.kind
        return kind + (f" {' and '.join(bounds)}" if bounds else "")

    def fits(self, value: Any) -> bool:
        if self.kind == TOKEN_IDS:
            ids = value if isinstance(value, list) else [value]
            return all(_SCALARS[INT](i) and i >= 0 for i in ids)
        if self.kind in _ELEMENTS:
            if not isinstance(value, list):
                return False
            # A vocabulary is ~100k elements, checked on every load: the set of their types (C speed) settles
            # the usual case; another type (a bool among ints, a subclass) goes through the element check.
            types = set(map(type, value))
            exact = {LIST_STR: str, LIST_INT: int}.get(self.kind)
            if exact is not None and types <= {exact}:
                return True
            if self.kind == LIST_NUMBER and types <= {int, float}:
                return all(map(math.isfinite, value))
            return all(map(_SCALARS[_ELEMENTS[self.kind]], value))
        if not _SCALARS[self.kind](value):
            return False
        if self.kind in (INT, NUMBER):
            return (
                (self.lo is None or value >= self.lo)
                and (self.hi is None or value <= self.hi)
                and (self.above is None or value > self.above)
            )
        return True


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error line: its repr, cut short (a hostile value may be a million elements long)."""
    text = (
        repr(value)
        if not isinstance(value, list) or len(value) <= 8
        else f"[{repr(value[:3])[1:-1]}, … ({len(value):,} items)]"
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check(values: Any, schema: dict[str, Key], source: str, what: str = "") -> None:
    """Refuse the first value in `values` (a mapping, or a `get(key)` callable) that does not fit `schema`:
    one line naming the file, the key and the value. Keys not in the schema are not looked at."""
    get = values if callable(values) else values.get
    for key, rule in schema.items():
        value = get(key)
        if value is None and (rule.nullable or not rule.required):
            if rule.required:
                raise GenError(f"{source}: {what}{key} is missing; it must be {rule.describe()}")
            continue
        if not rule.fits(value):
            raise GenError(f"{source}: {what}{key} must be {rule.describe()}, got {shown(value)}")


# -- files


def regular_file_size(path: Path, max_bytes: int, what: str = "a model file") -> int:
    """The size of `path`, refused unless it is a regular file (links followed) of at most `max_bytes`."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise GenError(f"{path}: not readable ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise GenError(f"{path}: not a regular file (a device, FIFO or folder); {what} must be a regular file")
    if st.st_size > max_bytes:
        raise GenError(f"{path}: {st.st_size:,} bytes is too large for {what} (at most {max_bytes:,})")
    return st.st_size


def read_capped(path: Path, max_bytes: int, what: str = "a model file") -> bytes:
    """The bytes of a regular file, never more than `max_bytes` (a file that grows while read is cut there)."""
    regular_file_size(path, max_bytes, what)
    try:
        # O_NONBLOCK: a FIFO put in place after the stat is not waited on
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for something else since the stat
                raise GenError(f"{path}: not a regular file; {what} must be a regular file")
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise GenError(f"{path}: not readable ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise GenError(f"{path}: more than {max_bytes:,} bytes is too large for {what}")
    return data


def load_json(path: Path, max_bytes: int, what: str = "a JSON object") -> Any:
    """JSON from an untrusted regular file, its size capped; nesting too deep for Python is one line too."""
    data = read_capped(path, max_bytes, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenError(f"{path}: not readable JSON ({e})") from None
    except RecursionError:
        raise GenError(f"{path}: not readable JSON (nested too deeply for {what})") from None


def all_finite(data: Any, chunk_bytes: int = 1 << 20) -> bool:
    """No NaN or Inf in the float tensor (or numpy array) `data`: no element with every exponent bit set,
    checked a chunk at a time by numpy on the bits (one thread, small temporaries, any float type)."""
    import numpy as np

    if isinstance(data, np.ndarray):  # no torch needed (the torch-free path checks the file's floats)
        flat, half = np.ascontiguousarray(data).reshape(-1), data.dtype == np.float16
    else:  # a torch tensor: its bits (bf16 has no numpy dtype)
        import torch

        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()]
        flat, half = data.contiguous().view(bits).numpy().reshape(-1), data.dtype == torch.float16
    size = flat.itemsize
    exponent = {2: 0x7C00 if half else 0x7F80, 4: 0x7F800000, 8: 0x7FF0000000000000}[size]
    flat = flat.view({2: np.int16, 4: np.int32, 8: np.int64}[size])  # the same memory, as integers
    step = max(1, chunk_bytes // size)
    for i in range(0, flat.size, step):
        chunk = flat[i : i + step]
        if np.any(np.bitwise_and(chunk, exponent) == exponent):
            return False
    return True
