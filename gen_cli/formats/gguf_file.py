"""GGUF files → a gen model. gguf_reader.py reads the file (tested equal to the `gguf` package's reader); the
weights are views of its memory map wherever gen runs the stored layout.

Architectures: llama (Llama, Mistral, SmolLM …), qwen2, qwen3 and gpt2. The GGUF ↔ gen mapping is data
(GGUF_NAMES) plus the transforms that matter: llama.cpp stores llama's Q/K rows permuted for its
interleaved RoPE, undone here so gen's rotate-half RoPE gives transformers' logits (on whole rows, so on
blocks too); matrices in GGML's block formats stay blocks (gguf_blocks.py decides, block_linear.py runs
them); a missing output.weight means tied embeddings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError, UsageError
from gen_cli.formats.gguf_blocks import BLOCK_NAMES, FLOAT_TYPES, Held, holding, summary, summary_lines
from gen_cli.formats.gguf_reader import GGUFFile
from gen_cli.formats.gguf_tokenizer import TOKENIZER_SCHEMA
from gen_cli.formats.schema import INT, NUMBER, STR, Key, all_finite, check
from gen_cli.model.config import ModelConfig
from gen_cli.pages import PageReleaser, arena_slots, copy_into, copy_rows, return_free_heap

if TYPE_CHECKING:
    import torch

    from gen_cli.formats.loaded import Loaded
    from gen_cli.text.conventions import TextConventions

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")
PERMUTED_QK = ("llama",)  # written with llama.cpp's interleaved RoPE layout (qwen2/3 use NEOX = rotate-half)

# gen name → GGUF names concatenated along the output dimension; {i} is the layer index.
_LAYER = {
    "attn_norm": ("blk.{i}.attn_norm",),
    "mlp_norm": ("blk.{i}.ffn_norm",),
    "attn.wo": ("blk.{i}.attn_output",),
    "attn.q_norm": ("blk.{i}.attn_q_norm",),
    "attn.k_norm": ("blk.{i}.attn_k_norm",),
    "mlp.w2": ("blk.{i}.ffn_down",),
}
LLAMA_NAMES = {"attn.wqkv": ("blk.{i}.attn_q", "blk.{i}.attn_k", "blk.{i}.attn_v"),
               "mlp.w1": ("blk.{i}.ffn_gate",), "mlp.w3": ("blk.{i}.ffn_up",), **_LAYER}  # fmt: skip
GPT2_NAMES = {"attn.wqkv": ("blk.{i}.attn_qkv",), "mlp.w1": ("blk.{i}.ffn_up",), **_LAYER}
GLOBAL_NAMES = {"tok_emb": "token_embd", "pos_emb": "position_embd", "norm": "output_norm", "lm_head": "output"}
DERIVED = ("rope_freqs.weight",)  # read into the config (RoPE scaling), not a weight
# Where each in-place block type keeps its fp16 scales (d, and m/dmin) in a block: a NaN/Inf there is a NaN
# weight, found from those bytes alone (the exponent bits, in each fp16's high byte), never a dequantization.
SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2),
                 "q5_k": (0, 2), "q6_k": (208,)}  # fmt: skip


def metadata_schema(arch: str) -> dict[str, Key]:
    """Every GGUF metadata value gen reads for `arch`: its type, range and whether it must be there."""
    a, gpt2 = arch + ".", arch == "gpt2"
    size = Key(INT, lo=1, required=True)
    return {
        "general.name": Key(STR),
        a + "context_length": size, a + "embedding_length": size, a + "block_count": size,
        a + "feed_forward_length": size, a + "attention.head_count": size,
        a + "attention.head_count_kv": Key(INT, lo=1), a + "attention.key_length": Key(INT, lo=1),
        a + "rope.dimension_count": Key(INT, lo=1), a + "rope.freq_base": Key(NUMBER, above=0),
        a + "rope.scaling.type": Key(STR), a + "attention.sliding_window": Key(INT, lo=0),
        a + "attention.layer_norm_rms_epsilon": Key(NUMBER, above=0, required=not gpt2),
        a + "attention.layer_norm_epsilon": Key(NUMBER, above=0, required=gpt2),
        **TOKENIZER_SCHEMA,
    }  # fmt: skip


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def _arch(f: GGUFFile) -> str:
    arch = f.need("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise GenError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def gguf_config(f: GGUFFile) -> tuple[ModelConfig, str]:
    arch = _arch(f)
    check(f.get, metadata_schema(arch), str(f.path), "metadata ")
    a = arch + "."
    n_head = int(f.need(a + "attention.head_count"))
    d_model = int(f.need(a + "embedding_length"))
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise GenError(f"{f.path}: tensor token_embd.weight is missing")
    fields: dict[str, Any] = dict(
        vocab_size=f.shape("token_embd.weight")[0], n_layer=int(f.need(a + "block_count")), n_head=n_head,
        n_kv_head=int(f.get(a + "attention.head_count_kv", n_head)), d_model=d_model,
        d_ff=int(f.need(a + "feed_forward_length")), context_length=int(f.need(a + "context_length")),
        tie_embeddings="output.weight" not in f.tensors,
        attn_out_bias="blk.0.attn_output.bias" in f.tensors, mlp_bias="blk.0.ffn_down.bias" in f.tensors,
    )  # fmt: skip
    if arch == "gpt2":
        eps = _f32(f.need(a + "attention.layer_norm_epsilon"))
        fields |= dict(pos_encoding="learned", norm="layernorm", norm_eps=eps,
                       qkv_bias="blk.0.attn_qkv.bias" in f.tensors, mlp="gelu_tanh")  # fmt: skip
    else:
        head_dim = int(f.get(a + "attention.key_length", d_model // n_head))
        if int(f.get(a + "rope.dimension_count", head_dim)) != head_dim:
            raise GenError(f"{f.path}: partial RoPE (rope.dimension_count ≠ head size) is not supported")
        if (scaling := f.get(a + "rope.scaling.type", "none")) != "none":
            raise GenError(f"{f.path}: RoPE scaling {scaling!r} is not supported; supported: none, llama3 (rope_freqs)")
        rope_scaling = None
        if "rope_freqs.weight" in f.tensors:  # Llama 3.x: per-frequency divisors, stored as a tensor
            if (n := f.tensors["rope_freqs.weight"].n_elements) != head_dim // 2:
                raise GenError(f"{f.path}: tensor rope_freqs.weight has {n:,} factors; head_dim/2 = {head_dim // 2}")
            rope_scaling = {"type": "freq_factors", "factors": [float(x) for x in f.array("rope_freqs.weight").ravel()]}
        fields |= dict(rope_base=_f32(f.get(a + "rope.freq_base", 10000.0)), head_dim=head_dim,
                       norm_eps=_f32(f.need(a + "attention.layer_norm_rms_epsilon")),
                       qkv_bias="blk.0.attn_q.bias" in f.tensors, qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
                       rope_scaling=rope_scaling)  # fmt: skip
        window = f.get(a + "attention.sliding_window")  # Mistral-style sliding-window attention, every layer
        if window and int(window) < fields["context_length"]:
            fields["sliding_window"] = int(window)
    try:
        return ModelConfig(**fields), arch
    except UsageError as e:
        raise GenError(f"{f.path}: {e}") from None


def source_names(gen_name: str, arch: str) -> tuple[str, ...]:
    """The GGUF tensor names one gen tensor is built from."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", gen_name)
    if m is None:
        module, kind = gen_name.rsplit(".", 1)
        return (f"{GLOBAL_NAMES[module]}.{kind}",)
    table = GPT2_NAMES if arch == "gpt2" else LLAMA_NAMES
    return tuple(f"{n.format(i=m.group(1))}.{m.group(3)}" for n in table[m.group(2)])


def _unpermute_into(out: torch.Tensor, rows: torch.Tensor, n_head: int) -> None:
    """Copy `rows` into `out` undoing convert_hf_to_gguf's permute: per head, llama.cpp interleaves the two
    RoPE halves' rows; whole rows move, so block rows un-permute as float rows do."""
    shape = rows.shape
    # stored (n_head, head_dim/2, 2, …) → gen's (n_head, 2, head_dim/2, …): pairs (2j, 2j+1) back to (j, j + half)
    stored = rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
    copy_into(out.view(n_head, 2, shape[0] // n_head // 2, *shape[1:]), stored.transpose(1, 2))


def _dtype_of(f: GGUFFile, names: list[str]) -> torch.dtype:
    """The dtype that keeps the stored matrices: BF16/F16 when all are, else float32 (F32 or dequantized)."""
    import torch

    kinds = Counter(f.type_name(n) for n in names if len(f.shape(n)) == 2)
    if set(kinds) == {"BF16"}:
        return torch.bfloat16
    return torch.float16 if set(kinds) == {"F16"} else torch.float32


_SHAPES: list[tuple[ModelConfig, dict[str, tuple[int, ...]]]] = []  # the last config's, reused within a load


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """transformer.expected_shapes, from one layer repeated (seconds faster for a model of 80 layers), computed
    once per config: a load asks for them several times."""
    from gen_cli.model.info import state_shapes

    if not _SHAPES or _SHAPES[0][0] != config:
        shapes = state_shapes(config)
        if config.tie_embeddings:
            del shapes["lm_head.weight"]
        _SHAPES[:] = [(config, shapes)]
    return dict(_SHAPES[0][1])


def _plan(config: ModelConfig, arch: str) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    return {name: (shape, source_names(name, arch)) for name, shape in _expected_shapes(config).items()}


def check_tensors(f: GGUFFile, config: ModelConfig, arch: str) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The file's tensors against the architecture's table for this config (names, shapes, types), from the
    headers alone: the same refusal for `gen info` as for a load. Returns the plan (gen name → shape, parts)."""
    plan = _plan(config, arch)
    for shape, names in plan.values():
        if missing := [n for n in names if n not in f.tensors]:
            raise GenError(f"{f.path}: tensor {missing[0]} is missing (needed for {arch} as its metadata describes)")
        shapes = [f.shape(n) for n in names]
        if any(s[1:] != shape[1:] for s in shapes) or sum(s[0] for s in shapes) != shape[0]:
            raise GenError(f"{f.path}: {' + '.join(names)} has shape {' + '.join(map(str, shapes))}; expected {shape}")
        for n in names:
            kind = f.tensors[n].tensor_type
            if kind.name not in FLOAT_TYPES and kind.name not in BLOCK_NAMES and not _dequantizable(kind):
                raise GenError(f"{f.path}: tensor {n} has type {kind.name}, which the gguf package cannot dequantize")
    all_names = [n for _, names in plan.values() for n in names]
    if extra := sorted(set(f.tensors) - set(all_names) - set(DERIVED)):
        raise GenError(f"{f.path}: unexpected tensor {extra[0]} ({len(extra)} in all): not a plain {arch} model?")
    return plan


def _unpermute_heads(out: torch.Tensor, rows: torch.Tensor, unit: int) -> None:
    """_unpermute_into for whole heads of `unit` rows each (a chunk of a Q or K matrix)."""
    _unpermute_into(out, rows, rows.shape[0] // unit)


def _refuse_chunk(f: GGUFFile, name: str, qtype: str | None, chunk: torch.Tensor) -> None:
    """_refuse_non_finite on rows of tensor `name` as copied (blocks checked as numpy bytes)."""
    refuse_non_finite(f, name, chunk if qtype is None else chunk.numpy(), qtype)


def _dequantizable(kind: int) -> bool:
    """Whether the gguf package dequantizes GGML type `kind` (imported only for a type gen does not read itself)."""
    import gguf

    return gguf.GGMLQuantizationType(int(kind)) in gguf.quants._type_traits


def refuse_non_finite(f: GGUFFile, name: str, data: Any, qtype: str | None = None) -> None:
    """Refuse a tensor holding NaN or Inf as it is read: floats checked whole, in-place blocks by the exponent
    bits of their fp16 scales only (one strided pass over those bytes, vectorised)."""

    if qtype is None:
        finite = all_finite(data)
    else:
        from gen_cli.quant.formats import BLOCK_TYPES

        per_block = data.reshape(-1, BLOCK_TYPES[qtype].nbytes)  # (n_blocks, nbytes) uint8, still a view
        # fp16 is little-endian: the high byte holds the 5 exponent bits as 0x7C; all set = Inf or NaN
        finite = not any(bool(((per_block[:, at + 1] & 0x7C) == 0x7C).any()) for at in SCALE_OFFSETS[qtype])
    if not finite:
        raise GenError(f"{f.path}: tensor {name} holds NaN or infinite values")


def holdings(f: GGUFFile, config: ModelConfig, arch: str) -> list[Held]:
    """How gen holds each tensor of the file (blocks as stored, re-quantized, or float); headers only."""
    return [holding(f, name, names, shape[-1]) for name, (shape, names) in _plan(config, arch).items()]


def _runs(held: Held, n_parts: int) -> list[list[int]]:
    """The parts of one matrix held as one tensor: all of a float matrix; runs of one block type."""
    runs: list[list[int]] = []
    for i in range(n_parts):
        if runs and (not held.blocks or held.qtypes[i] == held.qtypes[runs[-1][0]]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def qtype_of(held: Held, i: int) -> str | None:
    """The block type part `i` of a matrix is held in (None: a float tensor)."""
    return held.qtypes[i] if held.blocks else None


def _arena_shapes(
    plan: dict[str, tuple[tuple[int, ...], tuple[str, ...]]], helds: list[Held], dtype: torch.dtype
) -> dict[str, list[tuple[tuple[int, ...], torch.dtype]]]:
    """The tensors each matrix a decode step streams is held in (one per run of a mixed-type matrix), for
    pages.arena_slots: floats (rows, cols) in `dtype`, blocks (rows, row_bytes) uint8."""
    import torch

    from gen_cli.quant.formats import BLOCK_TYPES

    shapes: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {}
    for held in helds:
        shape = plan[held.gen_name][0]
        if len(shape) != 2:  # norms and biases: read per step from wherever they are
            continue
        if not held.blocks:
            shapes[held.gen_name] = [(shape, dtype)]
            continue
        shapes[held.gen_name] = []
        for run in _runs(held, len(plan[held.gen_name][1])):
            kind = BLOCK_TYPES[held.qtypes[run[0]]]
            rows = sum(held.part_rows[i] for i in run)
            shapes[held.gen_name].append(((rows, shape[1] // kind.elems * kind.nbytes), torch.uint8))
    return shapes


def load_gguf_weights(
    f: GGUFFile, config: ModelConfig, arch: str, dtype: torch.dtype | None, arena: bool = False, act: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[Held], dict[str, int], set[tuple[str, int]]]:
    """gen's float tensors and block-quantized matrices (uint8 blocks, qtype; a list of those, in row order, for
    a matrix whose parts keep different types) by state_dict name, checked
    against the config before reading; how each was held; and the bytes copied out of the map, by reason.

    A tensor gen reads in the stored layout (a block matrix of its own type, an F32 tensor run in float32)
    is a view of the file's map, never copied; a fused q/k/v (llama: with its Q/K rows un-permuted) is
    copied once into its place, and a type change (F16 → float32, a re-quantization) is a new tensor. With
    `arena`, every matrix a decode step streams is written once, straight from the map, into one arena on
    2 MB pages (fused q/k/v and gate/up included), and the file's pages it was read from are given back; q4_0 /
    q4_1 / q4_k / q5_k / q8_0 matrices there (not the embedding) in the native kernel's 16-row interleaved layout
    where it has one for `act` activations: the last value lists those as (gen name, run of parts)."""
    import torch

    from gen_cli.native.repack import repack_wanted
    from gen_cli.quant.blocks import quantize

    plan = check_tensors(f, config, arch)
    helds = holdings(f, config, arch)
    dtype = dtype or _dtype_of(f, [n for h in helds if not h.blocks for n in plan[h.gen_name][1]])
    if arena and dtype == torch.float16:  # the CPU runs fp16 as fp32 anyway: convert once, into the arena
        dtype = torch.float32
    slots: dict[str, list[torch.Tensor]] = {}
    copied: Counter[str] = Counter()
    if arena:  # float32 or bfloat16 now: what the native step reads
        slots, copied["into 2 MB pages (decode layout)"] = arena_slots(_arena_shapes(plan, helds, dtype))
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, Any] = {}
    pages = PageReleaser()
    interleaved: set[tuple[str, int]] = set()  # (gen name, run): the runs written in the interleaved layout
    for held in helds:
        names = plan[held.gen_name][1]
        places = slots.get(held.gen_name)
        parts, unchecked = [], [False] * len(names)  # unchecked: checked chunk by chunk as copied (below)
        for i, n in enumerate(names):
            qtype = held.qtypes[i] if held.blocks else None
            if qtype is None:  # a float tensor: the stored numbers in place, or dequantized (new)
                parts.append(f.torch_view(n) if f.type_name(n) in FLOAT_TYPES else torch.from_numpy(f.array(n)))
                unchecked[i] = places is not None and f.type_name(n) in FLOAT_TYPES
                if not unchecked[i]:
                    refuse_non_finite(f, n, parts[-1])
            elif BLOCK_NAMES.get(f.type_name(n)) == qtype:
                parts.append(f.torch_view(n))  # the file's bytes in place: (rows, row_bytes), never a float copy
                unchecked[i] = places is not None
                if not unchecked[i]:
                    refuse_non_finite(f, n, f.view(n), qtype)
            else:  # another type: through float32 one tensor at a time, into the type this part is held in
                floats = torch.from_numpy(f.array(n)).float()
                refuse_non_finite(f, n, floats)
                parts.append(quantize(floats, qtype))
                del floats
                copied[f"{f.type_name(n)} re-quantized to {qtype}"] += parts[-1].nbytes
        want = dtype if not held.blocks else torch.uint8
        permuted = [arch in PERMUTED_QK and re.search(r"\.attn_[qk]\.", n) is not None for n in names]
        # Runs of parts held in one type become one tensor; parts in different types stay apart (a BlockStack).
        runs = _runs(held, len(names))
        fused = []
        for r, run in enumerate(runs):
            if places is None and len(run) == 1 and not permuted[run[0]]:
                t = parts[run[0]].to(want)  # the view itself when the stored type is the one gen runs
                if t.dtype != parts[run[0]].dtype:
                    copied[f"{f.type_name(names[run[0]])} → {str(want).removeprefix('torch.')}"] += t.nbytes
            else:  # q, k, v rows one after another (rows, row_bytes or cols), Q/K un-permuted on the way: one copy
                rows = sum(parts[i].shape[0] for i in run)
                t = places[r] if places is not None else torch.empty((rows, *parts[run[0]].shape[1:]), dtype=want)
                # Streamed q4_0 / q4_1 / q4_k / q5_k / q8_0 rows go into the arena in the decode kernel's interleaved
                # layout, each part in whole groups of 16 rows (the embedding, read a row at a time, keeps the stored
                # one).
                qtype = qtype_of(held, run[0])
                packed = places is not None and qtype is not None and held.gen_name != "tok_emb.weight"
                packed = packed and all(repack_wanted(qtype, parts[i].shape[0], act) for i in run)  # type: ignore[arg-type]
                row = 0
                for i in run:
                    place, part = t[row : row + parts[i].shape[0]], parts[i]
                    heads = config.n_head if ".attn_q." in names[i] else config.n_kv_head
                    unit = part.shape[0] // heads if permuted[i] else 1  # rows that move together: a head's
                    move = partial(_unpermute_heads, unit=unit) if permuted[i] else None
                    check = partial(_refuse_chunk, f, names[i], qtype_of(held, i)) if unchecked[i] else None
                    if packed:  # the stored bytes checked, (un-permuted,) repacked into place: still one pass
                        unit = math.lcm(unit, 16)
                        move, check = partial(_repack_chunk, move=move, check=check, qtype=qtype), None
                    # a dtype change too, straight into its place; the file's pages given back as it goes
                    copy_rows(place, part, pages, unit, move=move, each=check)
                    row += part.shape[0]
                if packed:
                    interleaved.add((held.gen_name, r))
                if len(run) > 1 or any(permuted[i] for i in run):
                    copied["q/k/v fused" + (" (Q/K rows un-permuted)" if any(permuted) else "")] += t.nbytes
            fused.append(t)
        if not held.blocks:
            (tensors[held.gen_name],) = fused
        elif len(fused) == 1:
            blocks[held.gen_name] = (fused[0], held.qtypes[0])
        else:  # parts in different types: (blocks, qtype) per run, in row order
            blocks[held.gen_name] = [(t, held.qtypes[run[0]]) for t, run in zip(fused, runs, strict=True)]
        del parts, fused  # one tensor's parts alive at a time besides the model's own
    return_free_heap()  # the checks' and conversions' temporaries: glibc would keep them resident
    return tensors, blocks, helds, dict(copied), interleaved


def _repack_chunk(
    dst: torch.Tensor,
    src: torch.Tensor,
    move: Callable[[torch.Tensor, torch.Tensor], None] | None,
    check: Callable[[torch.Tensor], None] | None,
    qtype: str,
) -> None:
    """copy_rows' `move` for rows held interleaved: `src` (whole groups of 16 rows, stored layout) checked as
    stored, re-ordered by `move` when given (llama's Q/K heads, through a chunk-sized buffer), then repacked."""
    import torch

    from gen_cli.native.repack import repack_into

    if check is not None:
        check(src)
    if move is not None:
        ordered = torch.empty_like(src)
        move(ordered, src)
        src = ordered
    # One thread, like copy_into: splitting each 1 MB chunk between two threads took a 135M load from 0.27 to 0.38 s.
    repack_into(dst, src, qtype, threads=1)


def read_gguf_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and descriptive details (architecture, tensor types, tokenizer) of a GGUF file; no weights read."""
    f = GGUFFile(path)
    config, arch = gguf_config(f)
    check_tensors(f, config, arch)
    return config, _details(f, arch, config)


def _details(f: GGUFFile, arch: str, config: ModelConfig, helds: list[Held] | None = None) -> dict[str, Any]:
    types = Counter(f.type_name(n) for n in f.tensors)
    helds = helds if helds is not None else holdings(f, config, arch)
    floats = [n for h in helds if not h.blocks for n in source_names(h.gen_name, arch)]
    float_bytes = _dtype_of(f, floats).itemsize
    matrices = summary(helds, _expected_shapes(config), float_bytes, config.tie_embeddings)
    return {
        "format": "GGUF",
        "architecture": arch,
        "name": f.get("general.name"),
        "tensor_types": dict(types.most_common()),
        "tokenizer": f"GGUF {f.get('tokenizer.ggml.model')} ({f.get('tokenizer.ggml.pre', 'default')}), "
        f"{len(f.get('tokenizer.ggml.tokens') or []):,} tokens",
        "chat_template": "yes" if f.get("tokenizer.chat_template") else "no",
        "matrices": matrices,
    }


def load_gguf(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    arena: bool = False,
    opened: GGUFFile | None = None,
    act: str | None = None,
) -> Loaded:
    """Load a .gguf file (`opened`: its header already read) and rebuild its tokenizer from the metadata;
    `arena`: the streamed matrices written once into 2 MB pages (load_gguf_weights)."""
    from gen_cli.formats.loaded import Loaded
    from gen_cli.memory import check_tables_fit
    from gen_cli.model.transformer import model_from_tensors
    from gen_cli.quant.block_linear import BlockLinear, block_layers
    from gen_cli.quant.block_stack import BlockStack

    f = opened if opened is not None else GGUFFile(path)
    config, arch = gguf_config(f)
    check_tables_fit(config, str(path))
    text = text_conventions(f, config)
    tensors, blocks, helds, copied, interleaved = load_gguf_weights(f, config, arch, dtype, arena, act)
    in_dims = {name: shape[1] for name, shape in _expected_shapes(config).items() if name in blocks}
    whole = frozenset(name for name, run in interleaved if isinstance(blocks[name], tuple))
    layers = block_layers({k: v for k, v in blocks.items() if isinstance(v, tuple)}, tensors, in_dims, whole)
    for name, runs in blocks.items():
        if isinstance(runs, list):  # parts in different types, each kept in its own
            layer = name.removesuffix(".weight")
            parts = [
                BlockLinear(t, q, in_dims[name], interleaved=(name, r) in interleaved) for r, (t, q) in enumerate(runs)
            ]
            layers[layer] = BlockStack(parts, tensors.pop(layer + ".bias", None))
    model = model_from_tensors(config, tensors, layers).to(device)
    details = _details(f, arch, config, helds)
    details["copied at load"] = copied  # bytes by reason; every other weight is a view of the file's map
    notes = [f"{line} (GGUF types gen has no kernel for)"
             for line in summary_lines(details["matrices"]) if "re-quantized" in line]  # fmt: skip
    return Loaded(model, text.tokenizer, str(path), notes, stop_ids=text.stop_ids,
                  add_special_tokens=text.add_special_tokens, details=details, chat_template=text.chat_template,
                  special_tokens=text.special_tokens, bos_id=text.bos_id)  # fmt: skip


def text_conventions(f: GGUFFile, config: ModelConfig) -> TextConventions:
    """The file's tokenizer rebuilt from its metadata, its BOS and end-of-turn ids, chat template and special
    tokens (no torch: the torch-free path reads them too)."""
    from gen_cli.formats.gguf_tokenizer import tokenizer_from_gguf
    from gen_cli.text.conventions import TextConventions

    path = f.path
    tok, stop_ids, add_bos = tokenizer_from_gguf(f.get, str(path))
    if tok.get_vocab_size() > config.vocab_size:
        raise GenError(
            f"{path}: the tokenizer has {tok.get_vocab_size()} tokens but the embedding has {config.vocab_size} rows"
        )
    specials = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and tok.id_to_token(i) is not None:
            specials[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = tok.id_to_token(i)
    template = f.get("tokenizer.chat_template")
    bos = f.get("tokenizer.ggml.bos_token_id")
    return TextConventions(tok, str(path), stop_ids, bos if isinstance(bos, int) else None, add_bos,
                           template if isinstance(template, str) else None, specials)  # fmt: skip
