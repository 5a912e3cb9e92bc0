"""GGUF files → a gen model, read with the `gguf` package's GGUFReader (memory-mapped; never hand-parsed).

Architectures: llama (Llama, Mistral, SmolLM …), qwen2, qwen3 and gpt2. The GGUF ↔ gen mapping is data
(GGUF_NAMES) plus the transforms that matter: llama.cpp stores llama's Q/K rows permuted for its
interleaved RoPE, undone here so gen's rotate-half RoPE gives transformers' logits (on whole rows, so on
blocks too); matrices in GGML's block formats stay blocks (gguf_blocks.py decides, block_linear.py runs
them); a missing output.weight means tied embeddings.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError, UsageError
from gen_cli.formats.gguf_blocks import BLOCK_NAMES, FLOAT_TYPES, Held, holding, summary, summary_lines
from gen_cli.model.config import ModelConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gen_cli.formats.loaded import Loaded

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


class GGUFFile:
    """An open GGUF file: metadata values by key and tensors by name; every failure is one GenError line."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))  # memory-maps; offsets past the file end fail here
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            raise GenError(f"{path}: not a readable GGUF file, truncated or corrupt ({reason})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise GenError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise GenError(f"{self.path}: metadata {key} is unreadable ({e})") from None
        return value

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GenError(f"{self.path}: metadata {key} is missing")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch order (rows, columns): GGUF lists dimensions fastest first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def array(self, name: str) -> np.ndarray:
        """The tensor in memory (not a view of the file), (rows, columns): F32 and F16 as stored, every other
        type dequantized to float32."""
        import gguf
        import numpy as np

        t = self.tensors[name]
        kind = t.tensor_type
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(t.data)  # a copy: the memory map is read-only and must not back the weights
        else:
            data = gguf.quants.dequantize(np.asarray(t.data), kind)  # a new float32 array
        return data.reshape(self.shape(name))

    def blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes in memory (a copy, not the map), uint8 (rows, row_bytes)."""
        import numpy as np

        rows = self.shape(name)[0]
        return np.array(self.tensors[name].data).reshape(rows, -1)


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def _arch(f: GGUFFile) -> str:
    arch = f.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise GenError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _config(f: GGUFFile) -> tuple[ModelConfig, str]:
    arch = _arch(f)
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


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute: per head, llama.cpp interleaves the two RoPE halves' rows."""
    shape = rows.shape
    # (n_head, head_dim/2, 2, …) → (n_head, 2, head_dim/2, …): pairs (2j, 2j+1) back to (j, j + head_dim/2)
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _dtype_of(f: GGUFFile, names: list[str]) -> torch.dtype:
    """The dtype that keeps the stored matrices: BF16/F16 when all are, else float32 (F32 or dequantized)."""
    import torch

    kinds = Counter(f.type_name(n) for n in names if len(f.shape(n)) == 2)
    if set(kinds) == {"BF16"}:
        return torch.bfloat16
    return torch.float16 if set(kinds) == {"F16"} else torch.float32


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """transformer.expected_shapes, from one layer repeated: seconds faster for a model of 80 layers."""
    from gen_cli.model.info import state_shapes

    shapes = state_shapes(config)
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _plan(config: ModelConfig, arch: str) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    return {name: (shape, source_names(name, arch)) for name, shape in _expected_shapes(config).items()}


def holdings(f: GGUFFile, config: ModelConfig, arch: str) -> list[Held]:
    """How gen holds each tensor of the file (blocks as stored, re-quantized, or float); headers only."""
    return [holding(f, name, names, shape[-1]) for name, (shape, names) in _plan(config, arch).items()]


def load_gguf_weights(
    f: GGUFFile, config: ModelConfig, arch: str, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, str]], list[Held]]:
    """gen's float tensors and block-quantized matrices (uint8 blocks, qtype) by state_dict name, checked
    against the config before reading, built one tensor at a time; and how each was held."""
    import gguf
    import numpy as np
    import torch

    from gen_cli.quant.blocks import quantize

    plan = _plan(config, arch)
    for shape, names in plan.values():
        if missing := [n for n in names if n not in f.tensors]:
            raise GenError(f"{f.path}: tensor {missing[0]} is missing (needed for {arch} as its metadata describes)")
        shapes = [f.shape(n) for n in names]
        if any(s[1:] != shape[1:] for s in shapes) or sum(s[0] for s in shapes) != shape[0]:
            raise GenError(f"{f.path}: {' + '.join(names)} has shape {' + '.join(map(str, shapes))}; expected {shape}")
        for n in names:
            kind = f.tensors[n].tensor_type
            if kind.name not in FLOAT_TYPES and kind.name not in BLOCK_NAMES and kind not in gguf.quants._type_traits:
                raise GenError(f"{f.path}: tensor {n} has type {kind.name}, which the gguf package cannot dequantize")
    all_names = [n for _, names in plan.values() for n in names]
    if extra := sorted(set(f.tensors) - set(all_names) - set(DERIVED)):
        raise GenError(f"{f.path}: unexpected tensor {extra[0]} ({len(extra)} in all): not a plain {arch} model?")
    helds = holdings(f, config, arch)
    dtype = dtype or _dtype_of(f, [n for h in helds if h.qtype is None for n in plan[h.gen_name][1]])
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, tuple[torch.Tensor, str]] = {}
    for held in helds:
        parts = []
        for n in plan[held.gen_name][1]:
            if held.qtype is None:
                a = f.array(n)
            elif BLOCK_NAMES.get(f.type_name(n)) == held.qtype:
                a = f.blocks(n)  # the file's bytes: (rows, row_bytes), never a float copy
            else:  # another type: through float32 one tensor at a time, into the type this matrix is held in
                a = quantize(torch.from_numpy(f.array(n)).float(), held.qtype).numpy()
            if arch in PERMUTED_QK and re.search(r"\.attn_[qk]\.", n):
                # whole rows move (a row of blocks is a row of weights), so blocks un-permute as floats do
                a = _unpermute(a, config.n_head if ".attn_q." in n else config.n_kv_head)
            parts.append(torch.from_numpy(np.ascontiguousarray(a)))  # shares a's memory: no second copy
        t = parts[0] if len(parts) == 1 else torch.cat(parts)  # (q rows + k rows + v rows, …) for wqkv
        if held.qtype is None:
            tensors[held.gen_name] = t.to(dtype).contiguous()
        else:
            blocks[held.gen_name] = (t.contiguous(), held.qtype)
        del parts  # one tensor's parts alive at a time besides the model's own
    return tensors, blocks, helds


def read_gguf_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and descriptive details (architecture, tensor types, tokenizer) of a GGUF file; no weights read."""
    f = GGUFFile(path)
    config, arch = _config(f)
    return config, _details(f, arch, config)


def _details(f: GGUFFile, arch: str, config: ModelConfig, helds: list[Held] | None = None) -> dict[str, Any]:
    types = Counter(f.type_name(n) for n in f.tensors)
    helds = helds if helds is not None else holdings(f, config, arch)
    floats = [n for h in helds if h.qtype is None for n in source_names(h.gen_name, arch)]
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


def load_gguf(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """Load a .gguf file and rebuild its tokenizer from the metadata."""
    from gen_cli.formats.gguf_tokenizer import tokenizer_from_gguf
    from gen_cli.formats.loaded import Loaded
    from gen_cli.memory import check_tables_fit
    from gen_cli.model.transformer import model_from_tensors
    from gen_cli.quant.block_linear import block_layers

    f = GGUFFile(path)
    config, arch = _config(f)
    check_tables_fit(config, str(path))
    tok, stop_ids, add_bos = tokenizer_from_gguf(f.get, str(path))
    if tok.get_vocab_size() > config.vocab_size:
        raise GenError(
            f"{path}: the tokenizer has {tok.get_vocab_size()} tokens but the embedding has {config.vocab_size} rows"
        )
    tensors, blocks, helds = load_gguf_weights(f, config, arch, dtype)
    in_dims = {name: shape[1] for name, shape in _expected_shapes(config).items() if name in blocks}
    model = model_from_tensors(config, tensors, block_layers(blocks, tensors, in_dims)).to(device)
    details = _details(f, arch, config, helds)
    notes = [f"{line} (GGUF types gen has no kernel for, or parts of one matrix in different types)"
             for line in summary_lines(details["matrices"]) if "re-quantized" in line]  # fmt: skip
    specials = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and tok.id_to_token(i) is not None:
            specials[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = tok.id_to_token(i)
    template = f.get("tokenizer.chat_template")
    bos = f.get("tokenizer.ggml.bos_token_id")
    return Loaded(model, tok, str(path), notes, stop_ids=stop_ids, add_special_tokens=add_bos, details=details,
                  chat_template=template if isinstance(template, str) else None, special_tokens=specials,
                  bos_id=bos if isinstance(bos, int) else None)  # fmt: skip
