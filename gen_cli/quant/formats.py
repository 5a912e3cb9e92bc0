"""GGML's block formats as a table, and the rules that choose among them: no torch, so a header can be read
and a matrix's bytes sized without it (quant/blocks.py quantizes and dequantizes them in torch)."""

from __future__ import annotations

from dataclasses import dataclass

from gen_cli.errors import GenError


@dataclass(frozen=True)
class BlockType:
    """One format: `elems` weights per block stored in `nbytes` bytes; `ggml_id` is GGML's type number."""

    name: str
    elems: int
    nbytes: int
    ggml_id: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.elems


BLOCK_TYPES: dict[str, BlockType] = {
    "q8_0": BlockType("q8_0", 32, 34, 8),  # fp16 d, 32 × int8: x = q·d
    "q4_0": BlockType("q4_0", 32, 18, 2),  # fp16 d, 16 bytes of nibbles: x = (q − 8)·d
    "q4_1": BlockType("q4_1", 32, 20, 3),  # fp16 d, fp16 m, 16 bytes of nibbles: x = q·d + m
    "q5_0": BlockType("q5_0", 32, 22, 6),  # fp16 d, 4 bytes of 5th bits, 16 bytes of nibbles: x = (q − 16)·d
    "q5_1": BlockType("q5_1", 32, 24, 7),  # fp16 d, fp16 m, 4 bytes of 5th bits, 16 bytes of nibbles: x = q·d + m
    "q4_k": BlockType("q4_k", 256, 144, 12),  # fp16 d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes nibbles
    "q5_k": BlockType("q5_k", 256, 176, 13),  # as q4_k, with 32 bytes of 5th bits before the nibbles
    "q6_k": BlockType("q6_k", 256, 210, 14),  # 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, fp16 d
}
# Most precise first: where parts of one matrix differ, the matrix takes the first of their types here.
PRECISION_ORDER = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0")

# Where a matrix's rows are not whole super-blocks: the 32-weight type with the same bits of codes (q6_k: 8).
_SMALL_BLOCK = {"q4_k": "q4_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def block_type(qtype: str) -> BlockType:
    if qtype not in BLOCK_TYPES:
        raise GenError(f"unknown block type {qtype!r}; known: {', '.join(BLOCK_TYPES)}")
    return BLOCK_TYPES[qtype]


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes one row of `cols` weights takes; cols must be a multiple of the block size."""
    t = block_type(qtype)
    if cols <= 0 or cols % t.elems:
        raise GenError(f"a {qtype} row needs a positive multiple of {t.elems} columns, not {cols}")
    return cols // t.elems * t.nbytes


def most_precise(qtypes: list[str] | tuple[str, ...]) -> str:
    """The most precise of these block types (for a matrix fused from parts stored in different types)."""
    return min(qtypes, key=PRECISION_ORDER.index)


def block_type_for(qtype: str, cols: int) -> str | None:
    """The block type a float matrix of `cols` columns is quantized to when `qtype` is asked for (by
    `--quantize` and by GGUF export alike): `qtype`, else (q4_k) q4_0 where rows are whole 32-blocks but
    not 256-blocks; None where no block fits (the matrix stays float)."""
    for candidate in (qtype, _SMALL_BLOCK.get(qtype)):
        if candidate is not None and cols % BLOCK_TYPES[candidate].elems == 0:
            return candidate
    return None


# The 16-row interleaved layout (quant/blocks.py `interleave`): the types that have it.
INTERLEAVE_ROWS = 16
# The types that have the layout: their fp16 fields' bytes.
INTERLEAVED = {"q4_0": 2, "q4_1": 4, "q4_k": 4, "q5_k": 4, "q8_0": 2}


def can_interleave(qtype: str, rows: int) -> bool:
    """Whether a `qtype` matrix of `rows` rows has the interleaved layout (INTERLEAVED's types, whole groups of 16)."""
    return qtype in INTERLEAVED and rows > 0 and rows % INTERLEAVE_ROWS == 0
