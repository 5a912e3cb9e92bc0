"""Which form each matrix of a GGUF file is held in by gen, decided from the headers alone.

A matrix stored as Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K is kept as those blocks (no float copy).
One whose parts (q, k and v of wqkv) differ in type keeps each part in its own type (quant/block_stack.py): a
decode step reads no more bytes than the file holds. Any other
GGML quant type (Q3_K, Q2_K, IQ4_XS …) has no kernel here: it is dequantized at load and re-quantized to
the nearest block type with at least its bits per weight (q4_k up to 4.5 bits, q6_k up to 6.6, else q8_0;
q4_1 / q5_0 / q5_1 / q8_0 when the row is not whole 256-blocks), so memory stays near the file's size. F32, F16 and BF16
matrices stay floats. `gen info` and the load notes report the outcome per class of matrix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from gen_cli.model.info import matrix_class
from gen_cli.quant.formats import BLOCK_TYPES, can_interleave, most_precise, row_bytes

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_NAMES = {name.upper(): name for name in BLOCK_TYPES}  # GGML's spelling → ours


def nearest_block_type(ggml_type: str, cols: int) -> str:
    """The block type a matrix of another GGML quant type is re-quantized to: the smallest with at least
    its bits per weight, among those whose blocks fit a row of `cols`."""
    from gen_cli.formats.gguf_reader import GGML_TYPES

    _, elems, nbytes = GGML_TYPES[ggml_type]
    bits = 8 * nbytes / elems
    whole_k = cols % 256 == 0
    if bits <= 4.5:
        return "q4_k" if whole_k else "q4_1"
    if not whole_k and bits <= 6:
        return "q5_0" if bits <= 5.5 else "q5_1"
    if bits <= 6.5625:
        return "q6_k" if whole_k else "q8_0"
    return "q8_0"


@dataclass(frozen=True)
class Held:
    """How one gen matrix is held: the types its GGUF parts have, and per part the block type it is held in
    (`qtypes`; empty: a float tensor) with its rows."""

    gen_name: str
    file_types: tuple[str, ...]
    qtypes: tuple[str, ...] = ()
    part_rows: tuple[int, ...] = ()

    @property
    def qtype(self) -> str | None:
        """The one block type of the whole matrix (None: a float tensor, or parts in different types)."""
        return self.qtypes[0] if self.qtypes and len(set(self.qtypes)) == 1 else None

    @property
    def blocks(self) -> bool:
        return bool(self.qtypes)

    @property
    def label(self) -> str:
        """`q4_k`, or `q4_k + q6_k` for parts in different types."""
        return " + ".join(dict.fromkeys(self.qtypes))

    @property
    def converted(self) -> bool:
        """Whether any part is not held as the file stores it (re-quantized, or quantized from a float)."""
        return any(BLOCK_NAMES.get(t) != q for t, q in zip(self.file_types, self.qtypes, strict=False))

    @property
    def interleavable(self) -> bool:
        """Whether a native decode holds it in the 16-row interleaved layout (gen_cli/native/blocks_x16.h) on a CPU
        whose kernel has one: q4_0 / q4_1 / q4_k / q5_k / q8_0 parts in whole groups of 16 rows, not the embedding
        (read by rows)."""
        return (
            self.blocks
            and self.gen_name != "tok_emb.weight"
            and all(can_interleave(q, rows) for q, rows in zip(self.qtypes, self.part_rows, strict=True))
        )

    def nbytes(self, cols: int) -> int:
        """Bytes of the blocks held (the parts' rows in their own types)."""
        return sum(rows * row_bytes(q, cols) for rows, q in zip(self.part_rows, self.qtypes, strict=True))


def holding(f: Any, gen_name: str, parts: tuple[str, ...], cols: int) -> Held:
    """The decision for one gen tensor built from the GGUF tensors `parts` (rows concatenated) of the
    GGUFFile `f`: block parts in their own type (or the nearest block type gen has a kernel for); a float
    part of a block matrix in the most precise of the others' types."""
    types = tuple(f.type_name(n) for n in parts)
    if gen_name == "pos_emb.weight" or len(f.shape(parts[0])) != 2 or all(t in FLOAT_TYPES for t in types):
        return Held(gen_name, types)
    wanted = [None if t in FLOAT_TYPES else BLOCK_NAMES.get(t) or nearest_block_type(t, cols) for t in types]
    widest = most_precise([w for w in wanted if w is not None])
    return Held(gen_name, types, tuple(w or widest for w in wanted), tuple(f.shape(n)[0] for n in parts))


def summary(helds: list[Held], shapes: dict[str, tuple[int, ...]], float_bytes: int, tied: bool) -> dict[str, dict]:
    """Per class of matrix: the GGUF types, the types gen holds, bytes in memory, how many were converted and how
    many a native decode holds 16-row interleaved (where the CPU's kernel has that layout)."""
    out: dict[str, dict] = {}
    for h in helds:
        cls = matrix_class(h.gen_name)
        if cls is None:
            continue
        rows, cols = shapes[h.gen_name]
        entry = out.setdefault(cls, {"file": Counter(), "held": Counter(), "bytes": 0, "converted": 0})
        entry["file"].update(h.file_types)
        entry["held"][h.label or f"float ({float_bytes * 8} bit)"] += 1
        entry["bytes"] += h.nbytes(cols) if h.blocks else rows * cols * float_bytes
        entry["converted"] += h.converted
        if h.interleavable:
            entry["interleaved"] = entry.get("interleaved", 0) + 1
    if tied and "embedding" in out:
        out["lm head"] = {"file": {}, "held": {"tied to the embedding": 1}, "bytes": 0, "converted": 0}
    return {k: v | {"file": dict(v["file"]), "held": dict(v["held"])} for k, v in out.items()}


def summary_lines(matrices: dict[str, dict]) -> list[str]:
    """One line per class: `attn qkv: q6_k ×2 from Q4_K ×4 + Q6_K ×2 (2 re-quantized), 1.23 MB`; q4_0 / q4_1
    matrices a native decode interleaves say so: `mlp in: q4_0 ×2 from Q4_0 ×2 (native decode: 16-row
    interleaved ×2), …`."""

    def counts(c: dict[str, int]) -> str:
        return " + ".join(f"{k} ×{n}" for k, n in c.items())

    lines = []
    for cls, e in matrices.items():
        source = f" from {counts(e['file'])}" if e["file"] else ""
        changed = f" ({e['converted']} re-quantized)" if e["converted"] else ""
        packed = f" (native decode: 16-row interleaved ×{e['interleaved']})" if e.get("interleaved") else ""
        lines.append(f"{cls}: {counts(e['held'])}{source}{changed}{packed}, {e['bytes'] / 1e6:,.2f} MB")
    return lines
