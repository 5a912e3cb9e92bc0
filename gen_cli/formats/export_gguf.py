"""A gen model as one GGUF file, written with the `gguf` package's GGUFWriter (the GGUF project's own writer).

gguf_file.py's name tables, inverted; llama.cpp's Q/K row permutation applied for the llama architecture;
the tokenizer as `tokenizer.ggml.model` gpt2 (byte-level BPE) with the split rule `tokenizer.ggml.pre`
names, checked by rebuilding it the way gen's GGUF loader does and encoding a probe text with both.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.atomic import atomic_path
from gen_cli.errors import GenError
from gen_cli.formats import gguf_file, gguf_tokenizer
from gen_cli.formats.export import (
    GGUF_TYPES,
    Exported,
    bos_id,
    check_vocab,
    drop_tensor,
    family,
    held_blocks,
    split_rows,
    stop_ids_of,
    tensors_of,
)
from gen_cli.formats.export_files import check_output
from gen_cli.model.transformer import scaled_frequencies
from gen_cli.pages import PageReleaser

if TYPE_CHECKING:
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from gen_cli.model.transformer import Transformer

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}  # family → general.architecture
# Text whose encoding must not change when the tokenizer is rebuilt from the metadata: digits, whitespace
# runs, contractions, accents, CJK, emoji, newlines.
PROBE = "The 12345 quick  brown\tfox's   jumps;\n\n  日本語 🙂 é ü x=3.14159 I'm  they'll\r\n end  "


def permute_qk(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's permute, the inverse of gguf_file's unpermute: per head, llama.cpp's interleaved
    RoPE wants rotate-half's pairs (j, j + head_dim/2) as adjacent rows (2j, 2j+1)."""
    shape = rows.shape
    # (n_head, 2, head_dim/2, …) → (n_head, head_dim/2, 2, …)
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class Slot:
    """One tensor of the file, known before its data: GGUF name, the array's shape and dtype, its type."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy's: float32, float16, uint16 (bf16 bits) or uint8 (block bytes, (rows, row_bytes))
    qtype: str  # f32, f16, bf16 or a block type

    @property
    def nbytes(self) -> int:
        import numpy as np

        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


_NP_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "uint16"}


def _stored(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """A float tensor as stored: f32, f16, bf16 bits (int16) or block bytes (rows, row_bytes)."""
    import torch

    from gen_cli.quant.blocks import quantize
    from gen_cli.quant.formats import BLOCK_TYPES

    if not t.is_floating_point():
        return t  # block bytes already
    if qtype in BLOCK_TYPES:
        return quantize(t, qtype)
    return {"f32": lambda: t.float(), "f16": lambda: t.half(), "bf16": lambda: t.bfloat16().view(torch.int16)}[qtype]()


def gguf_layout(model: Transformer, arch: str, kind: str = "f32") -> list[Slot]:
    """Every tensor gguf_tensors writes, in its order, from the model's shapes alone (no data read)."""
    import torch

    from gen_cli.model.transformer import expected_shapes
    from gen_cli.quant.formats import BLOCK_TYPES, row_bytes

    config = model.config
    blocks = held_blocks(model) if kind in BLOCK_TYPES else {}
    out = []
    for gen_name, shape in expected_shapes(config).items():
        if gen_name in blocks:
            t, qtype = blocks[gen_name][0].to("meta"), blocks[gen_name][1]
        else:
            t = torch.empty(shape, device="meta")
            qtype = _qtype(gen_name, t, kind)
            if qtype in BLOCK_TYPES:
                t = torch.empty(shape[0], row_bytes(qtype, shape[1]), dtype=torch.uint8, device="meta")
        names = gguf_file.source_names(gen_name, arch)
        for name, part in zip(names, split_rows(config, gen_name, t, len(names)), strict=True):
            dtype = "uint8" if qtype in BLOCK_TYPES else _NP_DTYPE[qtype]
            out.append(Slot(name, tuple(part.shape), dtype, qtype))
    if config.rope_scaling is not None:
        out.append(Slot("rope_freqs.weight", (config.head_dim // 2,), "float32", "f32"))
    return out


def gguf_tensors(
    model: Transformer, arch: str, kind: str = "f32", pages: PageReleaser | None = None, consume: bool = False
) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, array as stored, type) in gguf_layout's order, one tensor at a time, as llama.cpp's
    converter writes `arch`: f32/f16 arrays, bf16 bits as uint16, block types as uint8 (rows, row_bytes).

    With a block `kind`, matrices the model holds as blocks are written as they are (their bytes; rows split
    and permuted as floats' are), and float matrices are quantized with gen's own quantizer, the one
    `--quantize` runs, so the file holds exactly the blocks gen computes with. A float `kind` dequantizes.
    `pages` drops each source tensor's mapped pages once it is converted."""
    import numpy as np

    from gen_cli.model.transformer import expected_shapes
    from gen_cli.quant.formats import BLOCK_TYPES

    config = model.config
    blocks = held_blocks(model) if kind in BLOCK_TYPES else {}
    floats = tensors_of(model, blocks, consume)
    for gen_name in expected_shapes(config):  # the model's order, as the converter writes
        if gen_name in blocks:
            t, qtype = blocks[gen_name]
        else:
            float_name, t = next(floats)
            assert float_name == gen_name, (float_name, gen_name)
            qtype = _qtype(gen_name, t, kind)
        stored = _stored(t, qtype)
        names = gguf_file.source_names(gen_name, arch)
        for name, part in zip(names, split_rows(config, gen_name, stored, len(names)), strict=True):
            a = part.numpy()
            if qtype == "bf16":
                a = a.view(np.uint16)
            if arch in gguf_file.PERMUTED_QK and re.search(r"\.attn_[qk]\.", name):
                a = permute_qk(a, config.n_head if ".attn_q." in name else config.n_kv_head)  # whole rows
            yield name, np.ascontiguousarray(a), qtype
        if pages is not None:  # written: drop the source's mapped pages (`stored` may be a view of them)
            pages.release(t)
        if consume and gen_name in blocks:  # floats are dropped by tensors_of
            del blocks[gen_name], t, stored
            drop_tensor(model, gen_name)
    assert next(floats, None) is None  # and the stream's last step runs: with `consume`, it frees the last tensor
    if config.rope_scaling is not None:  # per-frequency divisors, as convert_hf_to_gguf stores Llama 3's scaling
        import torch

        inv = config.rope_base ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
        yield "rope_freqs.weight", (inv / scaled_frequencies(inv, config.rope_scaling)).float().numpy(), "f32"


def _pre(tokenizer: Tokenizer) -> str | None:
    """The `tokenizer.ggml.pre` name of a byte-level tokenizer's split rule, or None when llama.cpp has none."""
    data = json.loads(tokenizer.to_str())
    pre = data.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    if data.get("normalizer") or kinds[-1:] != ["ByteLevel"] or items[-1].get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling (convert_hf_to_gguf's); it reads an unknown name as another split
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        regex = (items[0].get("pattern") or {}).get("Regex")
        return next((n for n, r in gguf_tokenizer.PRE_TOKENIZER_REGEXES.items() if r == regex), None)
    return None


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> dict[str, Any]:
    """tokenizer.ggml.* for a byte-level BPE, padded to the embedding's rows with unused [PADn] tokens (as
    convert_hf_to_gguf does); refused when gen's own GGUF loader would rebuild it differently."""
    data = json.loads(tokenizer.to_str())
    model = data.get("model") or {}
    pre = _pre(tokenizer)
    if model.get("type") != "BPE" or pre is None or model.get("byte_fallback"):
        raise GenError("the tokenizer cannot be written to GGUF: only byte-level BPE tokenizers with a split rule "
                       f"llama.cpp names ({', '.join(gguf_tokenizer.PRE_TOKENIZERS)}) are supported")  # fmt: skip
    n = tokenizer.get_vocab_size()
    tokens: list[str | None] = [None] * n
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        tokens[i] = token
    if None in tokens:
        raise GenError(f"the tokenizer's ids are not contiguous (id {tokens.index(None)} has no token)")
    types = [gguf_tokenizer.NORMAL] * n
    for i, added in tokenizer.get_added_tokens_decoder().items():
        types[i] = gguf_tokenizer.CONTROL if added.special else gguf_tokenizer.USER_DEFINED
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [gguf_tokenizer.UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos = bos_id(tokenizer)
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                            "tokenizer.ggml.add_bos_token": bos is not None}  # fmt: skip
    stops = list(stop_ids)
    if bos is not None or stops:
        meta["tokenizer.ggml.bos_token_id"] = bos if bos is not None else stops[0]  # GPT-2: BOS = EOS
    for key, i in zip(("eos", "eot", "eom"), stops, strict=False):
        meta[f"tokenizer.ggml.{key}_token_id"] = i
    rebuilt, _stops, _add_bos = gguf_tokenizer.tokenizer_from_gguf(meta.get, "export")
    for add in (False, True):
        if rebuilt.encode(PROBE, add_special_tokens=add).ids != tokenizer.encode(PROBE, add_special_tokens=add).ids:
            raise GenError(f"the tokenizer cannot be written to GGUF: rebuilt as {pre!r} byte-level BPE it would "
                           "encode text differently")  # fmt: skip
    return meta


def _qtype(gen_name: str, t: torch.Tensor, kind: str) -> str:
    """The type a float tensor is stored in: norms, biases, position embeddings and RoPE factors stay f32 (as
    llama.cpp's converter keeps them); a block type needs rows of whole blocks (q4_k falls back to q4_0, as
    `--quantize` does), else f16."""
    from gen_cli.quant.formats import BLOCK_TYPES, block_type_for

    if kind == "f32" or t.dim() != 2 or gen_name == "pos_emb.weight":
        return "f32"
    if kind in BLOCK_TYPES:
        return block_type_for(kind, t.shape[1]) or "f16"
    return kind


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    out_file: str | Path,
    type: str = "f32",
    force: bool = False,
    stop_ids: Sequence[int] | None = None,
    chat_template: str | None = None,
    consume: bool = False,
) -> Exported:
    """Write one GGUF file (weights in `type` f32|f16|bf16 or a block type q8_0|q4_0|q4_k, metadata and the
    tokenizer llama.cpp reads); a model holding blocks keeps them under a block `type` (see gguf_tensors).
    `consume` frees the model's tensors as they are written (see tensors_of)."""
    import gguf
    import numpy as np

    from gen_cli.errors import UsageError

    out_file = Path(out_file)
    config = model.config
    arch = GGUF_ARCH[family(config, "gguf")]
    from gen_cli.quant.formats import BLOCK_TYPES

    if type not in GGUF_TYPES and type not in BLOCK_TYPES:  # q4_1/q5_x/q6_k: a loaded model's blocks
        raise UsageError(f"type {type!r} is not a GGUF type gen writes; choose {', '.join(GGUF_TYPES)}",
                         params=("type",))  # fmt: skip
    check_vocab(model, tokenizer)
    check_output(out_file, force, folder=False)
    meta = tokenizer_metadata(
        tokenizer, config.vocab_size, stop_ids if stop_ids is not None else stop_ids_of(tokenizer)
    )
    tensors_of(model)  # refuses a model with fused or optimised layers before the file is opened
    layout = gguf_layout(model, arch, type)
    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    file_type = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
                 "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1,
                 "q4_k": F.MOSTLY_Q4_K_S, "q5_k": F.MOSTLY_Q5_K_S, "q6_k": F.MOSTLY_Q6_K}[type]  # fmt: skip
    notes: list[str] = []
    with atomic_path(out_file) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(out_file.stem)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(config.context_length)
        w.add_embedding_length(config.d_model)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.d_ff)
        w.add_head_count(config.n_head)
        w.add_head_count_kv(config.n_kv_head)
        w.add_vocab_size(config.vocab_size)
        if arch == "gpt2":
            w.add_layer_norm_eps(config.norm_eps)
        else:
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
            w.add_rope_dimension_count(config.head_dim)
            w.add_rope_freq_base(config.rope_base)
            w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_tokenizer_model(meta.pop("tokenizer.ggml.model"))
        w.add_tokenizer_pre(meta.pop("tokenizer.ggml.pre"))
        w.add_token_list(meta.pop("tokenizer.ggml.tokens"))
        w.add_token_types(meta.pop("tokenizer.ggml.token_type"))
        w.add_token_merges(meta.pop("tokenizer.ggml.merges"))
        w.add_add_bos_token(meta.pop("tokenizer.ggml.add_bos_token"))
        for key, value in meta.items():  # the special ids
            w.add_uint32(key, value)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        for slot in layout:  # the tensor infos first, then each tensor's data streamed after them
            raw = None if slot.qtype in ("f32", "f16") else T[slot.qtype.upper()]
            w.add_tensor_info(slot.name, slot.shape, np.dtype(slot.dtype), slot.nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        slots = iter(layout)
        for name, a, _kind in gguf_tensors(model, arch, type, PageReleaser(), consume):
            slot = next(slots)
            assert (name, a.shape, a.dtype) == (slot.name, slot.shape, np.dtype(slot.dtype)), (name, slot)
            w.write_tensor_data(a)
        w.close()
    if type in BLOCK_TYPES:
        held = {qtype for _, qtype in held_blocks(model).values()}
        for kind, n in Counter(t.qtype for t in layout if len(t.shape) == 2 and t.qtype not in ("f32", type)).items():
            if kind in held:
                notes.append(f"{n} tensor(s) stored as {kind.upper()}: the model holds them so (not re-quantized)")
            else:
                size = BLOCK_TYPES[type].elems
                notes.append(f"{n} tensor(s) stored as {kind.upper()}: their rows are not whole {type.upper()} "
                             f"blocks of {size}")  # fmt: skip
    return Exported(str(out_file), "gguf", arch, type, out_file.stat().st_size, len(layout), notes)
