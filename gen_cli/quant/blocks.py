"""GGML's block-quantized weight formats, as GGUF stores them: quantize and dequantize in pure torch.

A matrix (rows = out_features, cols = in_features) is a uint8 tensor (rows, row_bytes): each row is
cols / elems blocks of `nbytes` bytes, in GGML's own byte layout, so a GGUF file's tensor data is such a
tensor as it is. The `gguf` package's `gguf.quants.dequantize` is the reference: `dequantize` here equals
it bit for bit, and `quantize` equals its quantizer for q8_0, q4_0, q4_1, q5_0 and q5_1. It has none for q4_k, q5_k
and q6_k: ours picks each sub-block's scale (and min) from its range, rounded up to the 6-bit (8-bit) grid so
no value clips; the error of a value is then at most half a step, bounded in `max_error`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gen_cli.errors import GenError
from gen_cli.quant.formats import INTERLEAVED, block_type, can_interleave, row_bytes

# Elements per quantize/dequantize chunk: bounds the temporaries to a few times this many floats.
_CHUNK = 1 << 22


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """(N, 1) float32: the little-endian fp16 at byte `at` (even) of each contiguous (N, nbytes) block, as
    GGML stores d and m; read through a view of the whole block, so nothing is copied first."""
    return b.view(torch.float16)[:, at // 2 : at // 2 + 1].float()


def _i8(b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes start…stop of each block as int8 codes, (N, stop − start) float32."""
    return b.view(torch.int8)[:, start:stop].float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(N, 1) float32 → (N, 2) uint8: rounded to fp16 (nearest even, as numpy's astype)."""
    return x.to(torch.float16).view(torch.uint8)


def _f16_up(x: torch.Tensor) -> torch.Tensor:
    """x ≥ 0 rounded to an fp16 value ≥ x (as float32): a scale so rounded never makes a value clip."""
    h = x.to(torch.float16)
    bumped = (h.view(torch.int16) + 1).view(torch.float16)  # the next fp16 up, for h ≥ 0
    return torch.where(h.float() < x, bumped, h).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, k) uint8 → (N, 2, k): low nibbles, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=1)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, exactly as ggml's roundf (and gguf's np_roundf): floor(x + 0.5) is wrong
    for x just under 0.5, where x + 0.5 rounds up to 1 in float32."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


# ---- dequantize: (N, nbytes) uint8 blocks → (N, elems) float32, the gguf package's arithmetic order ----


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _i8(b, 2, 34) * _f16(b, 0)


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).reshape(len(b), 32).to(torch.int8) - 8  # (N, 32): elements 0-15 low, 16-31 high
    return _f16(b, 0) * q.float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:]).reshape(len(b), 32).float()  # (N, 32)
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k's 12 scale bytes (N, 12) → 6-bit scales and mins, each (N, 8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) uint8, a little-endian uint32 whose bit i is bit 4 of element i → (N, 32) uint8 of 0 or 16."""
    bits = (qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (N, 4 bytes, 8 bits): element 8·byte + bit
    return bits.reshape(len(qh), 32) << 4


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:]).reshape(len(b), 32) | _fifth_bits(b[:, 2:6])).to(torch.int8) - 16  # (N, 32)
    return _f16(b, 0) * q.float()


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 8:]).reshape(len(b), 32) | _fifth_bits(b[:, 4:8])).float()  # (N, 32)
    return _f16(b, 0) * q + _f16(b, 2)


def _deq_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k: d·sc·q − dmin·m per sub-block of 32, from the block's fp16 d, dmin and 12 scale bytes and
    its codes q (N, 8, 32)."""
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float())[:, :, None]  # (N, 8, 1)
    dm = (_f16(b, 2) * mn.float())[:, :, None]  # (N, 8, 1)
    return (d * q.float() - dm).reshape(len(b), 256)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 nibble bytes (N, 128) → (N, 8 sub-blocks, 32): sub-block 2c+s is nibble s of chunk c's 32 bytes."""
    n = len(qs)
    return _nibbles(qs.reshape(n * 4, 32)).reshape(n, 8, 32)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    return _deq_k(b, _k_nibbles(b[:, 16:]))


_BITS8 = torch.arange(8, dtype=torch.uint8)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    high = (b[:, None, 16:48] >> _BITS8[None, :, None]) & 1  # (N, 8, 32): bit j of qh byte l, sub-block j's
    return _deq_k(b, _k_nibbles(b[:, 48:]) | (high << 4))


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    ql, qh = b[:, :128].reshape(n * 2, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    d = (_f16(b, 208) * _i8(b, 192, 208))[:, :, None]  # (N, 16, 1): fp16 d × int8 scales
    low = _nibbles(ql).reshape(n, 2, 4, 32)  # element h·128 + s·64 + j ← nibble s of ql[h·64 + j]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 0x03  # (N, 2, 4, 32): element h·128 + k·32 + j ← bits 2k of qh[h·32 + j]
    q = (low | (high << 4)).to(torch.int8) - 32  # (N, 2, 4, 32) in −32 … 31
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


# ---- quantize: (N, elems) float32 → (N, nbytes) uint8 ----


def _q_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _pack_nibbles(q: torch.Tensor, chunks: int) -> torch.Tensor:
    """(N, chunks·2·k) uint8 in 0…15 → (N, chunks·k): within each chunk, the first k low, the next k high."""
    n = len(q)
    q = q.reshape(n, chunks, 2, -1)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _q_q4_0(x: torch.Tensor) -> torch.Tensor:
    imax = x.abs().argmax(dim=1, keepdim=True)  # the first largest |x|: its sign sets d's
    d = x.gather(1, imax) / -8
    q = (x * _inverse(d) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q, 1)], dim=1)


def _q_q4_1(x: torch.Tensor) -> torch.Tensor:
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q, 1)], dim=1)


def _pack_q5(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) uint8 codes in 0…31 → (N, 20): 4 bytes of 5th bits (element i at bit i), 16 bytes of nibbles."""
    high = (q >> 4).reshape(len(q), 4, 8)  # (N, 4 bytes, 8 bits)
    qh = (high << torch.arange(8, dtype=torch.uint8)).sum(dim=2, dtype=torch.uint8)  # distinct bits: sum = or
    return torch.cat([qh, _pack_nibbles(q & 0x0F, 1)], dim=1)


def _q_q5_0(x: torch.Tensor) -> torch.Tensor:
    imax = x.abs().argmax(dim=1, keepdim=True)  # the first largest |x|: its sign sets d's
    d = x.gather(1, imax) / -16
    q = (x * _inverse(d) + 16.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_q5(q)], dim=1)


def _q_q5_1(x: torch.Tensor) -> torch.Tensor:
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (hi - lo) / 31
    q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_q5(q)], dim=1)


def _grid_scales(need: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per super-block, an fp16 `d` and integer multipliers in 0…steps with d·m ≥ need (N, S) for each
    sub-block, each as small as the grid allows: rounded up, so no value falls outside its range."""
    d = _f16_up(need.amax(dim=1, keepdim=True) / steps)  # (N, 1)
    m = (need * _inverse(d)).ceil().clamp(0, steps)  # float32 rounding may touch steps + 1: clamped
    return d, m


def _q_k(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k (top 15) / q5_k (top 31): the fp16 d, dmin and 12 scale bytes (N, 16), and the codes (N, 8, 32) in
    0 … top."""
    n = len(x)
    sub = x.reshape(n, 8, 32)
    lo = sub.amin(dim=2).clamp(max=0)  # (N, 8): the format's min is ≤ 0 (x = d·sc·q − dmin·m)
    dmin, mn = _grid_scales(-lo, 63)
    offset = dmin * mn  # (N, 8) ≥ −lo
    d, sc = _grid_scales((sub.amax(dim=2) + offset).clamp(min=0) / top, 63)
    step = d * sc  # (N, 8): `top` steps cover [−offset, max]
    q = ((sub + offset[:, :, None]) * _inverse(step)[:, :, None]).round().clamp(0, top).to(torch.uint8)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    scales = torch.cat(
        [
            (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        dim=1,
    )  # (N, 12): the layout `_k_scales` unpacks
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales], dim=1), q


def _q_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _q_k(x, 15)
    qs = _pack_nibbles(q.reshape(len(x), 256), 4)  # (N, 128): chunk c holds sub-blocks 2c (low) and 2c+1 (high)
    return torch.cat([head, qs], dim=1)


def _q_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _q_k(x, 31)
    fifth = (q >> 4) << _BITS8[None, :, None]  # (N, 8, 32): sub-block j's fifth bits at bit j
    qh = fifth.sum(dim=1, dtype=torch.int32).to(torch.uint8)  # (N, 32): the bits of different sub-blocks or-ed
    qs = _pack_nibbles((q & 0x0F).reshape(len(x), 256), 4)
    return torch.cat([head, qh, qs], dim=1)


def _q_q6_k(x: torch.Tensor) -> torch.Tensor:
    n = len(x)
    sub = x.reshape(n, 16, 16)
    d, sc = _grid_scales(sub.abs().amax(dim=2) / 31, 127)  # symmetric: q in −31 … 31 of −32 … 31
    step = (d * sc)[:, :, None]  # (N, 16, 1)
    q = ((sub * _inverse(step)).round().clamp(-32, 31) + 32).to(torch.uint8).reshape(n, 2, 4, 32)
    # (N, 128): byte h·64 + j holds element h·128 + j (low nibble) and h·128 + 64 + j (high), low 4 bits each
    ql = _pack_nibbles((q & 0x0F).reshape(n, 256), 2)
    high = (q >> 4).to(torch.uint8)  # (N, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (N, 2, 32)
    scales = sc.to(torch.int8).view(torch.uint8)  # (N, 16), 0 … 127
    return torch.cat([ql, qh.reshape(n, 64), scales, _f16_bytes(d)], dim=1)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q8_0": _deq_q8_0, "q4_0": _deq_q4_0, "q4_1": _deq_q4_1, "q5_0": _deq_q5_0, "q5_1": _deq_q5_1,
    "q4_k": _deq_q4_k, "q5_k": _deq_q5_k, "q6_k": _deq_q6_k,
}  # fmt: skip
_QUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1, "q5_0": _q_q5_0, "q5_1": _q_q5_1,
    "q4_k": _q_q4_k, "q5_k": _q_q5_k, "q6_k": _q_q6_k,
}  # fmt: skip


def _by_chunks(fn: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, per_block: int) -> torch.Tensor:
    """fn over (N, ·) blocks, a bounded number of blocks at a time, concatenated."""
    step = max(1, _CHUNK // per_block)
    if len(blocks) <= step:
        return fn(blocks)
    return torch.cat([fn(blocks[i : i + step]) for i in range(0, len(blocks), step)])


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w (rows, cols) float → uint8 (rows, row_bytes) in GGML's layout for `qtype`."""
    t = block_type(qtype)
    rows, cols = w.shape
    nb = row_bytes(qtype, cols)
    x = w.detach().to(device="cpu", dtype=torch.float32).reshape(rows * cols // t.elems, t.elems)  # (N, elems)
    if not torch.isfinite(x).all():
        raise GenError(f"cannot quantize to {qtype}: the matrix holds inf or NaN")
    out = _by_chunks(_QUANTIZE[qtype], x, t.elems)  # (N, nbytes)
    return out.reshape(rows, nb).to(w.device)


def dequantize(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """uint8 blocks (rows, row_bytes) → float32 (rows, cols), bit for bit what gguf.quants.dequantize gives."""
    t = block_type(qtype)
    rows = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(qtype, cols):
        raise GenError(f"{qtype} blocks of shape {tuple(blocks.shape)} do not hold rows of {cols} columns")
    b = blocks.contiguous().reshape(rows * cols // t.elems, t.nbytes)  # (N, nbytes)
    return _by_chunks(_DEQUANTIZE[qtype], b, t.elems).reshape(rows, cols)


def max_error(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """An upper bound on |w − dequantize(quantize(w))| per weight (rows, cols), from each block's range:
    half a quantization step, with the steps our quantizer can pick at worst (plus fp16 slack)."""
    t = block_type(qtype)
    rows, cols = w.shape
    x = w.detach().float().reshape(-1, t.elems)  # (N, elems)
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    a = torch.maximum(hi.abs(), lo.abs())
    tiny = 2.0**-24  # fp16's smallest subnormal: the absolute grain of every stored scale
    f16 = a * 2**-10 + 128 * tiny  # what rounding d (and m) to fp16 moves a value by, at most
    if qtype == "q8_0":
        half = a / 127 / 2 + f16
    elif qtype == "q4_0":
        half = a / 8 + f16  # the largest |x| maps to −8; one of the other sign clips at +7: a whole step
    elif qtype == "q4_1":
        half = (hi - lo) / 15 / 2 + f16
    elif qtype == "q5_0":
        half = a / 16 + f16  # as q4_0: a value of the other sign may clip at +15, a whole step
    elif qtype == "q5_1":
        half = (hi - lo) / 31 / 2 + f16
    elif qtype in ("q4_k", "q5_k"):
        levels = 15 if qtype == "q4_k" else 31
        span = hi.clamp(min=0) - lo.clamp(max=0)  # the super-block's range with 0 inside
        # dmin ≤ span/63 (+grain) raises the top by at most that; d adds at most one grid step to a step
        top = span * (1 + 1 / 63) * (1 + 2**-9) + 64 * tiny
        half = (top / levels + top / (levels * 63) * (1 + 2**-9) + 2 * tiny) / 2
    else:  # q6_k: d·sc ≥ a/31, at most one grid step d ≈ a/(31·127) more
        half = (a / 31 + a / (31 * 127) * (1 + 2**-9) + 2 * tiny) / 2
    return (half * (1 + 1e-5) + 1e-30).expand(-1, t.elems).reshape(rows, cols)


# ---- the 16-row interleaved layout of INTERLEAVED's types (gen_cli/native/blocks_x16.h, blocks_k16.h, blocks_q8x16.h)
#
# A block is some fp16 fields (q4_0, q8_0: d; q4_1: d, m; q4_k, q5_k: d, dmin), then 32-bit words (q4_0 / q4_1: 16
# nibble bytes; q4_k: 12 bytes of packed scales and mins, 128 of nibbles; q5_k: the same with 32 of fifth bits
# between; q8_0: 32 codes). For each group of 16 rows and block index b: each fp16 field of the 16 rows in turn
# (32 bytes), then each word i as a 64-byte chunk holding row l's word at bytes 4l … 4l + 3. A group takes the
# bytes its 16 rows take stored, so rows [16g, 16g + 16) stay where they were as a whole: a matrix is sliced,
# joined or split at multiples of 16 rows in either layout alike.


def _head(qtype: str, rows: int) -> int:
    """The bytes of a block's fp16 fields, once `rows` is checked to have the layout."""
    if not can_interleave(qtype, rows):
        raise GenError(
            f"{qtype} rows {rows} have no interleaved layout ({' / '.join(INTERLEAVED)} in whole groups of 16)"
        )
    return INTERLEAVED[qtype]


def interleave(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Stored blocks (rows, row_bytes) → the same bytes in the 16-row interleaved layout (rows, row_bytes)."""
    rows, rb = blocks.shape
    t = block_type(qtype)
    nb, head = rb // t.nbytes, _head(qtype, rows)
    words = (t.nbytes - head) // 4
    b = blocks.contiguous().view(rows // 16, 16, nb, t.nbytes)  # (G, l, block, bytes)
    halves = b[..., :head].reshape(rows // 16, 16, nb, head // 2, 2).permute(0, 2, 3, 1, 4)  # (G, b, field, l, 2)
    chunks = b[..., head:].reshape(rows // 16, 16, nb, words, 4).permute(0, 2, 3, 1, 4)  # (G, b, word, l, 4 bytes)
    out = torch.cat([halves.reshape(rows // 16, nb, -1), chunks.reshape(rows // 16, nb, -1)], dim=2)
    return out.reshape(rows, rb)


def deinterleave(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """The 16-row interleaved layout (rows, row_bytes) → the stored blocks, byte for byte as before `interleave`."""
    rows, rb = blocks.shape
    t = block_type(qtype)
    nb, head = rb // t.nbytes, _head(qtype, rows)
    words = (t.nbytes - head) // 4
    g = blocks.contiguous().view(rows // 16, nb, 16 * t.nbytes)  # (G, block, interleaved bytes)
    halves = g[..., : 16 * head].reshape(rows // 16, nb, head // 2, 16, 2).permute(0, 3, 1, 2, 4)  # (G, l, b, ·, 2)
    chunks = g[..., 16 * head :].reshape(rows // 16, nb, words, 16, 4).permute(0, 3, 1, 2, 4)  # (G, l, b, word, 4)
    out = torch.cat([halves.reshape(rows // 16, 16, nb, head), chunks.reshape(rows // 16, 16, nb, 4 * words)], dim=3)
    return out.reshape(rows, rb)
