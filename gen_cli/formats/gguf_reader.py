"""GGUF files read at C speed: header, metadata and tensor infos with struct and numpy, tensors as views of
a copy-on-write memory map.

The `gguf` package's GGUFReader builds Python objects for every element of every metadata array: seconds
for a real vocabulary and its merges. This reader makes one numpy array per numeric array and one string
per vocabulary entry, checks every length, count and offset against the file size before anything is
allocated (the file is untrusted), and is tested equal to GGUFReader on files gguf.GGUFWriter writes.
Only little-endian files of GGUF versions 2 and 3 are read (what llama.cpp writes).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gen_cli.errors import GenError
from gen_cli.formats.schema import regular_file_size

if TYPE_CHECKING:
    import torch

# GGUF value types (gguf.GGUFValueType): the scalar ones as struct formats, little-endian.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
# GGML tensor types as ggml.h numbers them, with (number, weights per block, bytes per block): the gguf
# package's GGMLQuantizationType and GGML_QUANT_SIZES, held here so that reading a header needs no import of
# that package (~50 ms of every command); tests check that the two agree.
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292),
    "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136),
    "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8),
    "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2), "TQ1_0": (34, 256, 54), "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17), "NVFP4": (40, 64, 36), "Q1_0": (41, 128, 18),
}  # fmt: skip
GGMLType = IntEnum("GGMLType", {name: number for name, (number, _, _) in GGML_TYPES.items()})
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a deep nest is a corrupt or hostile file
# Caps far above any file llama.cpp writes (tens of keys, a vocabulary of at most a few hundred thousand
# entries, a few thousand tensors), so a hostile header is refused before it costs minutes or gigabytes.
MAX_METADATA_KEYS = 1 << 14  # 16,384
MAX_TENSORS = 1 << 16  # 65,536
MAX_ARRAY_ELEMENTS = 1 << 22  # 4,194,304: gen's vocab_size limit
MAX_KEY_BYTES = 1 << 16  # GGUF's own limit on a key's length (65,535 bytes)
MAX_STRING_BYTES = 1 << 24  # 16 MiB: one metadata string (a chat template is tens of KiB)


class _Bad(Exception):
    """What is wrong at a place in the file; GGUFFile turns it into one GenError line."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header: GGML type, dimensions (fastest first, as stored), byte size and absolute offset."""

    name: str
    tensor_type: GGMLType  # equal to gguf.GGMLQuantizationType's member of its number
    dims: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    file: Any = field(repr=False, compare=False)  # the GGUFFile whose map holds the data

    @property
    def data(self) -> np.ndarray:
        """The stored data, a view of the file's map: F32/F16/BF16 as (rows, columns) numbers, every other type
        uint8 (rows, row_bytes)."""
        return self.file.view(self.name)


class GGUFFile:
    """An open GGUF file: metadata values by key and tensors by name, headers read at C speed (numpy and
    struct, no Python object per array element except strings); every failure is one GenError line.

    The file is memory-mapped copy-on-write: tensors are views of the map (pages read on first touch, shared
    with the page cache), and a write to a weight in memory never reaches the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        regular_file_size(self.path, 1 << 50, "a GGUF file")  # a FIFO or device is refused, not waited on
        try:
            with open(self.path, "rb") as fh:
                self.size = os.fstat(fh.fileno()).st_size
                if self.size < 24:
                    raise GenError(f"{path}: not a GGUF file ({self.size} bytes, shorter than a GGUF header)")
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise GenError(f"{path}: not readable ({e.strerror or e})") from None
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, ...]] = {}  # key → (type, element type, …) as GGUF numbers them
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._read()
        except _Bad as e:
            raise GenError(f"{path}: not a valid GGUF file: {e}") from None
        except (UnicodeDecodeError, struct.error, ValueError) as e:  # a decode past a check: still one line
            raise GenError(f"{path}: corrupt GGUF header ({e})") from None

    # -- header parsing: every length and count checked against the bytes left before anything is allocated

    def _need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.size:
            raise _Bad(f"{what} runs past the end of the file ({self.size:,} bytes): truncated or corrupt")

    def _unpack(self, fmt: str, pos: int, what: str) -> tuple[Any, int]:
        n = struct.calcsize("<" + fmt)
        self._need(pos, n, what)
        return struct.unpack_from("<" + fmt, self._map, pos)[0], pos + n

    def _string(self, pos: int, what: str, cap: int = MAX_STRING_BYTES) -> tuple[str, int]:
        n, pos = self._unpack("Q", pos, what)
        self._need(pos, n, what)
        if n > cap:
            raise _Bad(f"{what} is a string of {n:,} bytes; gen reads at most {cap:,}")
        try:
            return str(self._map[pos : pos + n], "utf-8"), pos + n
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not valid UTF-8") from None

    def _value(self, vtype: int, pos: int, what: str, depth: int = 0) -> tuple[Any, int, tuple[int, ...]]:
        """(value, next position, (type, element types…)) of one metadata value."""
        if vtype in _SCALAR:
            value, pos = self._unpack(_SCALAR[vtype], pos, what)
            return value, pos, (vtype,)
        if vtype == STRING:
            value, pos = self._string(pos, what)
            return value, pos, (vtype,)
        if vtype != ARRAY:
            raise _Bad(f"{what} has value type {vtype}, which GGUF does not define")
        if depth >= MAX_NESTING:
            raise _Bad(f"{what} nests arrays more than {MAX_NESTING} deep")
        etype, pos = self._unpack("I", pos, what)
        count, pos = self._unpack("Q", pos, what)
        if count > MAX_ARRAY_ELEMENTS and count * 1 <= self.size - pos:  # past the end: said as such below
            raise _Bad(f"{what} is an array of {count:,} elements; gen reads at most {MAX_ARRAY_ELEMENTS:,}")
        if etype in _NUMPY:  # one frombuffer for the whole array
            dtype = np.dtype(_NUMPY[etype])
            self._need(pos, count * dtype.itemsize, f"{what} ({count:,} elements)")
            values = np.frombuffer(self._map, dtype, count, pos)
            return values.tolist(), pos + count * dtype.itemsize, (ARRAY, etype)
        # strings and arrays take at least 8 bytes (a length or a type + count) each: a count the file cannot
        # hold is refused before the list is built
        self._need(pos, count * (8 if etype == STRING else 12), f"{what} ({count:,} elements)")
        if etype == STRING:
            return (*self._strings(pos, count, what), (ARRAY, STRING))
        items, sub = [], (etype,)
        for _ in range(count):
            item, pos, sub = self._value(etype, pos, what, depth + 1)
            items.append(item)
        return items, pos, (ARRAY, *sub)

    def _strings(self, pos: int, count: int, what: str) -> tuple[list[str], int]:
        """`count` strings from `pos` (the vocabulary, the merges): one pass finds where each length field is,
        then the whole region is decoded at once and split where the length fields were."""
        fields = array("q")  # where each string's 8-byte length is
        append, unpack, buf, size, start = fields.append, struct.unpack_from, self._map, self.size, pos
        for _ in range(count):
            if pos + 8 > size:
                self._need(pos, 8, f"{what} (element {len(fields):,})")
            append(pos)
            n = unpack("<Q", buf, pos)[0]
            if n > MAX_STRING_BYTES:
                raise _Bad(f"{what} (element {len(fields) - 1:,}) is a string of {n:,} bytes; gen reads at most "
                           f"{MAX_STRING_BYTES:,}")  # fmt: skip
            pos += 8 + n
        self._need(start, pos - start, what)
        if count == 0:
            return [], pos
        # The length fields become 8 NUL bytes each; where no string holds a NUL, one strict decode of the
        # region checks every string (NUL is ASCII, so no sequence spans two) and a split gives them back.
        region = np.frombuffer(bytearray(buf[start:pos]), np.uint8)
        at = np.frombuffer(fields, np.int64) - start
        region[(at[:, None] + np.arange(8)).ravel()] = 0  # (count × 8) byte indices
        if np.count_nonzero(region == 0) == 8 * count:
            try:
                return region.tobytes().decode("utf-8").split("\0" * 8)[1:], pos
            except UnicodeDecodeError:
                pass  # say which string below
        return self._each_string(start, count, what), pos

    def _each_string(self, pos: int, count: int, what: str) -> list[str]:
        """The strings one at a time (lengths already checked): when some string holds a NUL, or is not UTF-8."""
        out = []
        for i in range(count):
            n = struct.unpack_from("<Q", self._map, pos)[0]
            try:
                out.append(str(self._map[pos + 8 : pos + 8 + n], "utf-8"))
            except UnicodeDecodeError:
                raise _Bad(f"{what} (element {i:,}) is not valid UTF-8") from None
            pos += 8 + n
        return out

    def _read(self) -> None:
        if self._map[:4] != b"GGUF":
            raise _Bad("it does not start with the bytes GGUF")
        version, pos = self._unpack("I", 4, "the version")
        if version & 0xFFFF == 0 and version != 0:
            raise _Bad("a big-endian GGUF file; only little-endian files are supported")
        if version not in (2, 3):
            raise _Bad(f"GGUF version {version} is not supported; supported: 2, 3")
        self.version = version
        n_tensors, pos = self._unpack("Q", pos, "the tensor count")
        n_kv, pos = self._unpack("Q", pos, "the metadata count")
        # a key takes at least 12 bytes (length + type), a tensor info at least 24: counts the file cannot hold
        self._need(pos, n_kv * 12 + n_tensors * 24, f"{n_kv:,} metadata keys and {n_tensors:,} tensors")
        if n_kv > MAX_METADATA_KEYS or n_tensors > MAX_TENSORS:
            raise _Bad(f"{n_kv:,} metadata keys and {n_tensors:,} tensors: gen reads at most "
                       f"{MAX_METADATA_KEYS:,} keys and {MAX_TENSORS:,} tensors")  # fmt: skip
        for i in range(n_kv):
            key, pos = self._string(pos, f"metadata key #{i}", MAX_KEY_BYTES)
            vtype, pos = self._unpack("I", pos, f"metadata {key}")
            if key in self.metadata:
                raise _Bad(f"metadata {key} appears twice")
            self.metadata[key], pos, self.value_types[key] = self._value(vtype, pos, f"metadata {key}")
        infos = []
        for i in range(n_tensors):
            name, pos = self._string(pos, f"tensor info #{i}", MAX_KEY_BYTES)
            what = f"tensor {name}"
            n_dims, pos = self._unpack("I", pos, what)
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Bad(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS} are valid)")
            self._need(pos, 8 * n_dims, what)
            dims = tuple(struct.unpack_from(f"<{n_dims}Q", self._map, pos))
            pos += 8 * n_dims
            raw_type, pos = self._unpack("I", pos, what)
            offset, pos = self._unpack("Q", pos, what)
            infos.append((name, dims, raw_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if self.value_types.get("general.alignment", (4,)) != (4,) or alignment <= 0 or alignment & (alignment - 1):
            raise _Bad(f"general.alignment {alignment!r} is not a power of two (a uint32)")
        self.alignment = alignment
        self.data_offset = pos + (-pos) % alignment
        for name, dims, raw_type, offset in infos:
            what = f"tensor {name}"
            try:
                kind = GGMLType(raw_type)
            except ValueError:
                raise _Bad(f"{what} has GGML type {raw_type}, which the gguf package does not know") from None
            _, block, type_size = GGML_TYPES[kind.name]
            if dims[0] % block:
                raise _Bad(f"{what}: its rows of {dims[0]} are not whole {kind.name} blocks of {block}")
            n_elements = math.prod(dims)
            n_bytes = n_elements // block * type_size
            if offset % alignment:
                raise _Bad(f"{what} starts at offset {offset}, not a multiple of the alignment {alignment}")
            self._need(self.data_offset + offset, n_bytes, f"{what} ({n_bytes:,} bytes at {offset:,})")
            if name in self.tensors:
                raise _Bad(f"tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, kind, dims, n_elements, n_bytes, self.data_offset + offset, self)

    # -- values and tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GenError(f"{self.path}: metadata {key} is missing")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch order (rows, columns): GGUF lists dimensions fastest first."""
        return tuple(reversed(self.tensors[name].dims))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def view(self, name: str) -> np.ndarray:
        """The stored tensor as a view of the map (no copy): F32/F16/BF16 numbers in PyTorch order (BF16 as
        uint16 bits), every other type its bytes, uint8 (rows, row_bytes)."""
        t = self.tensors[name]
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(t.tensor_type.name)
        if dtype is None:
            shape = (*self.shape(name)[:-1], t.n_bytes // max(1, math.prod(t.dims[1:])))
            return np.frombuffer(self._map, np.uint8, t.n_bytes, t.data_offset).reshape(shape)
        return np.frombuffer(self._map, dtype, t.n_elements, t.data_offset).reshape(self.shape(name))

    def array(self, name: str) -> np.ndarray:
        """The tensor (rows, columns) as numbers: F32 and F16 as stored (a view of the map), every other type
        dequantized to a new float32 array."""
        import gguf

        t = self.tensors[name]
        if t.tensor_type.name in ("F32", "F16"):
            return self.view(name)
        kind = gguf.GGMLQuantizationType(int(t.tensor_type))
        return gguf.quants.dequantize(self.view(name), kind).reshape(self.shape(name))

    def blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes, uint8 (rows, row_bytes): a view of the map, not a copy."""
        return self.view(name).reshape(self.shape(name)[0], -1)

    def torch_view(self, name: str) -> torch.Tensor:
        """`view(name)` as a torch tensor sharing the map's pages (writable: the map is copy-on-write)."""
        import torch

        t = self.tensors[name]
        shape = self.view(name).shape
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
            t.tensor_type.name, torch.uint8
        )
        if t.n_bytes == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=t.n_bytes // dtype.itemsize, offset=t.data_offset)
        return flat.view(shape)
