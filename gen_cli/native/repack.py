"""Q4_0 / Q4_1 / Q4_K matrices repacked at load into the 16-row interleaved layout the decode kernel reads
fastest (blocks_x16.h, blocks_k16.h; quant/blocks.py's `interleave` is the reference): where this machine's kernel
has a vector product for it, for matrices in whole groups of 16 rows. `GEN_REPACK=0` keeps the stored layout (an
A/B switch)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gen_cli.native.abi import MATRIX_TYPES
from gen_cli.native.build import library
from gen_cli.quant.blocks import BLOCK_TYPES, can_interleave, interleave

if TYPE_CHECKING:
    import torch


def repack_wanted(qtype: str, rows: int) -> bool:
    """Whether a `qtype` matrix of `rows` rows that the native step streams is held interleaved here."""
    if os.environ.get("GEN_REPACK", "1") == "0" or not can_interleave(qtype, rows):
        return False
    lib = library()
    return not isinstance(lib, str) and lib.gen_block_interleaved(MATRIX_TYPES[qtype]) >= 0


def repack_into(dst: torch.Tensor, src: torch.Tensor, qtype: str, threads: int = 0) -> None:
    """dst (rows, row_bytes) = src's stored blocks interleaved (rows a multiple of 16; any memory, a file's map
    included, read once): the C kernel's threads where it is built, else torch."""
    import torch

    rows, rb = src.shape
    lib = library()
    if isinstance(lib, str) or not src.is_contiguous() or not dst.is_contiguous():
        dst.copy_(interleave(src, qtype))
        return
    cols = rb // BLOCK_TYPES[qtype].nbytes * BLOCK_TYPES[qtype].elems
    failed = lib.gen_block_repack(
        src.data_ptr(), MATRIX_TYPES[qtype], rows, cols, dst.data_ptr(), threads or torch.get_num_threads()
    )
    if failed:
        raise AssertionError(f"{qtype} blocks ({rows}, {rb}) cannot be repacked")
