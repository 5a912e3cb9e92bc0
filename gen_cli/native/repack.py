"""Q4_0 / Q4_1 / Q4_K / Q5_K / Q8_0 matrices repacked at load into the 16-row interleaved layout the decode kernel reads
fastest (blocks_x16.h, blocks_k16.h, blocks_q8x16.h; quant/blocks.py's `interleave` is the reference): where this
machine's kernel has a vector product for it, for matrices in whole groups of 16 rows. `GEN_REPACK=0` keeps the
stored layout (an A/B switch)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gen_cli.native.abi import ACT_DEFAULT, INTEGER_ACTS, MATRIX_TYPES
from gen_cli.native.build import library
from gen_cli.quant.formats import BLOCK_TYPES, can_interleave

if TYPE_CHECKING:
    import torch


# The interleaved types with a float-activation product of their own (blocks_x16.h; block_types.h's x16_float_paths
# names the same two). The others' float products read
# each row back in the stored layout, a gather per word: their decode with bf16 or fp32 activations ran 4-20x slower
# interleaved than stored (2026-12-07), so with those activations they stay stored.
FLOAT_PRODUCTS = ("q4_0", "q4_1")


def repack_wanted(qtype: str, rows: int, act: str | None = None) -> bool:
    """Whether a `qtype` matrix of `rows` rows that the native step streams with `act` activations (None: the
    default, ACT_DEFAULT) is held interleaved here."""
    if os.environ.get("GEN_REPACK", "1") == "0" or not can_interleave(qtype, rows):
        return False
    if (act or ACT_DEFAULT) not in INTEGER_ACTS and qtype not in FLOAT_PRODUCTS:
        return False
    lib = library()
    return not isinstance(lib, str) and lib.gen_block_interleaved(MATRIX_TYPES[qtype]) >= 0


def repack_into(dst: torch.Tensor, src: torch.Tensor, qtype: str, threads: int = 0) -> None:
    """dst (rows, row_bytes) = src's stored blocks interleaved (rows a multiple of 16; any memory, a file's map
    included, read once): the C kernel's threads where it is built, else torch."""
    import torch

    from gen_cli.quant.blocks import interleave

    rows, rb = src.shape
    if isinstance(library(), str) or not src.is_contiguous() or not dst.is_contiguous():
        dst.copy_(interleave(src, qtype))
        return
    repack_rows(src.data_ptr(), dst.data_ptr(), qtype, rows, rb, threads or torch.get_num_threads())


def repack_rows(src: int, dst: int, qtype: str, rows: int, row_bytes: int, threads: int) -> None:
    """The C kernel's repack of `rows` stored rows at address src into the interleaved layout at dst (rows a
    multiple of 16, the kernel built): the one call both loaders make, torch's and the torch-free one."""
    cols = row_bytes // BLOCK_TYPES[qtype].nbytes * BLOCK_TYPES[qtype].elems
    lib = library()
    if isinstance(lib, str) or lib.gen_block_repack(src, MATRIX_TYPES[qtype], rows, cols, dst, threads):
        raise AssertionError(f"{qtype} blocks ({rows}, {row_bytes}) cannot be repacked")
