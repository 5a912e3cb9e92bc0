"""Export a gen model as a Hugging Face folder or a GGUF file: the inverse of hf.py and gguf_file.py.

The name tables are the importers' own (one place per format); the transforms are their inverses:
wqkv split back into q/k/v, GPT-2's Conv1D weights transposed, llama.cpp's Q/K row permutation applied.
A model neither format can express is refused with the reason before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError, UsageError
from gen_cli.formats import hf
from gen_cli.formats.export_files import check_output, write_files, write_safetensors
from gen_cli.model.config import ModelConfig
from gen_cli.pages import PageReleaser
from gen_cli.text.tokenizer import EOT

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from gen_cli.model.transformer import Transformer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "gpt2": "GPT2LMHeadModel"}  # fmt: skip
HF_TYPES = ("f32", "f16", "bf16")
HF_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k")
_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # gen MLP kind → GPT2Config.activation_function


@dataclass
class Exported:
    """What an export wrote: where, in which format and architecture, how big, and notes worth telling."""

    path: str
    format: str
    architecture: str
    type: str
    bytes: int
    tensors: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def family(config: ModelConfig, target: str) -> str:
    """llama, qwen2, qwen3 or gpt2: the family that expresses this model in `target` ("hf" or "gguf"),
    or a GenError that names what the format lacks."""
    where = "a Hugging Face folder" if target == "hf" else "GGUF"
    if config.pos_encoding == "sinusoidal":
        raise GenError(
            f"sinusoidal positions cannot be exported to {where}: Llama-family models use RoPE and GPT-2 learned "
            "positions, and neither adds a sinusoidal table; train with RoPE or learned positions"
        )
    if config.pos_encoding == "alibi":
        raise GenError(
            f"ALiBi positions cannot be exported to {where}: the Llama family rotates (RoPE) and GPT-2 adds learned "
            "positions, and neither biases attention by distance; train with RoPE or learned positions"
        )
    problems: list[str] = []
    if config.pos_encoding == "learned":  # GPT-2 is the one learned-position architecture both formats know
        name = "gpt2"
        gelus = ("gelu_tanh",) if target == "gguf" else tuple(_GPT2_ACT)  # llama.cpp's GPT-2 uses the tanh GELU
        if config.norm != "layernorm":
            problems.append(f"norm {config.norm} (GPT-2 uses layernorm)")
        if config.mlp not in gelus:
            problems.append(f"MLP {config.mlp} (GPT-2 uses {' or '.join(gelus)})")
        if not (config.qkv_bias and config.attn_out_bias and config.mlp_bias):
            problems.append("projections without biases (GPT-2 has them on every linear layer)")
        if config.n_kv_head != config.n_head:
            problems.append(f"{config.n_kv_head} KV heads for {config.n_head} query heads (GPT-2 is MHA)")
        if config.head_dim * config.n_head != config.d_model:
            problems.append(f"head size {config.head_dim} ≠ d_model / heads")
        if config.qk_norm:
            problems.append("q/k norm")
    else:
        name = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias and not config.attn_out_bias else "llama"
        if config.norm != "rmsnorm":
            problems.append(f"norm {config.norm} with RoPE (Llama-family models use rmsnorm)")
        if config.mlp != "swiglu":
            problems.append(f"MLP {config.mlp} with RoPE (Llama-family models use swiglu)")
        if config.attn_out_bias and not config.qkv_bias:
            problems.append("an output-projection bias without q/k/v biases")
        if name != "llama" and config.mlp_bias:
            problems.append(f"MLP biases ({name} has none)")
        if name == "qwen3" and target == "gguf" and config.qkv_bias:
            problems.append("q/k norm together with attention biases (llama.cpp's qwen3 has no biases)")
        scaling = (config.rope_scaling or {}).get("type")
        if scaling is not None and name != "llama":
            problems.append(f"RoPE scaling {scaling} in a {name} model")
        elif scaling not in (None, "llama3", "freq_factors"):
            problems.append(f"RoPE scaling {scaling} (only Llama 3's is exported)")
        elif scaling == "freq_factors" and target == "hf":
            problems.append("RoPE scaling as per-frequency factors (transformers knows the llama3 parameters only)")
    if config.sliding_window is not None:  # a Llama/Qwen/GPT-2 reader would attend past it: wrong, silently
        problems.append(f"a trained sliding window of {config.sliding_window} tokens")
    if problems:
        raise GenError(f"this model cannot be exported to {where} as {name}: {'; '.join(problems)}")
    return name


def split_rows(config: ModelConfig, gen_name: str, t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`t` split along its rows into the `n` tensors the target stores (q, k, v for a fused wqkv)."""
    if n == 1:
        return [t]
    assert ".wqkv." in gen_name and n == 3, gen_name  # the only gen tensor the tables build from several
    kv = config.n_kv_head * config.head_dim
    return list(t.split([config.n_head * config.head_dim, kv, kv]))  # q rows, k rows, v rows


def held_blocks(model: Transformer) -> dict[str, tuple[torch.Tensor, str]]:
    """gen name (`….weight`) → (uint8 blocks on the CPU, qtype) for every matrix the model holds as GGML
    blocks (a tied lm_head left out: it is the embedding's)."""
    from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear

    out = {}
    for name, module in model.named_modules():
        tied_head = name == "lm_head" and model.config.tie_embeddings
        part = ".parts." in name  # of a matrix in parts of different types: exported whole, dequantized
        if isinstance(module, BlockLinear | BlockEmbedding) and not tied_head and not part:
            stored = module.stored_blocks() if isinstance(module, BlockLinear) else module.blocks  # GGUF's layout
            out[f"{name}.weight"] = (stored.detach().to("cpu"), module.qtype)
    return out


def state_of(model: Transformer, blocks: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """gen name → tensor on the CPU, every name `expected_shapes` lists (a tied lm_head left out) except
    those in `blocks`; without `blocks`, block-held matrices are dequantized here (float32)."""
    return dict(tensors_of(model, blocks))


def tensors_of(
    model: Transformer, blocks: dict[str, Any] | None = None, consume: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """state_of, one tensor at a time in the model's order: a dequantized matrix exists only while its
    consumer holds it, so a streamed export never holds the whole model twice. A model that cannot be
    exported is refused here, at the call, before anything is written. `consume` empties each of the
    model's tensors once the next is asked for (a command's model, discarded after: copies the loader
    made, such as fused q/k/v, are freed as they are written)."""
    from gen_cli.model.transformer import expected_shapes
    from gen_cli.quant.blocks import dequantize

    held = held_blocks(model)
    # A matrix held in parts of different block types (quant/block_stack.py) is written dequantized, whole.
    stacks = {f"{n}.weight": m for n, m in model.named_modules() if hasattr(m, "parts") and hasattr(m, "qtypes")}
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".blocks") and ".parts." not in k}
    state |= {name: stack.dequantized() for name, stack in stacks.items()}
    shapes = expected_shapes(model.config)
    if sorted((state.keys() | held.keys()) - {"lm_head.weight"}) != sorted(shapes.keys() - {"lm_head.weight"}):
        raise GenError("a model with fused or optimised layers cannot be exported; export the model as loaded")

    skip = set(blocks or ())  # the names at the call: a consumer may pop them from its dict as it writes them

    def each() -> Iterator[tuple[str, torch.Tensor]]:
        for name in shapes:
            if name in skip:
                continue
            if name in held:
                b, qtype = held[name]
                yield name, dequantize(b, qtype, shapes[name][1])
            else:
                yield name, state[name].detach().to("cpu")
            if consume:
                state.pop(name, None)
                held.pop(name, None)
                drop_tensor(model, name)

    return each()


def drop_tensor(model: Transformer, name: str) -> None:
    """Replace the model's tensor `name` (a module's weight or bias, or a block layer's blocks) by an empty
    one, so its memory is freed when nothing else holds it; the model cannot run afterwards."""
    import torch

    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix)
    if attr == "weight" and "blocks" in module._buffers:
        attr = "blocks"
    if attr in module._parameters and module._parameters[attr] is not None:
        module._parameters[attr] = torch.nn.Parameter(module._parameters[attr].new_empty(0), requires_grad=False)
    elif attr in module._buffers and module._buffers[attr] is not None:
        module._buffers[attr] = module._buffers[attr].new_empty(0)


def stop_ids_of(tokenizer: Tokenizer) -> tuple[int, ...]:
    """gen's end of text (<|endoftext|>) when the tokenizer has it: what gen's own models stop at."""
    eot = tokenizer.token_to_id(EOT)
    return () if eot is None else (eot,)


def bos_id(tokenizer: Tokenizer) -> int | None:
    """The id the tokenizer's post-processor puts before a prompt, if it adds one."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1:] == plain else None


def check_vocab(model: Transformer, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the embedding has rows (an embedding may have spare rows)."""
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise GenError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's embedding only "
                       f"{model.config.vocab_size} rows; they do not belong together")  # fmt: skip


def _hf_config(config: ModelConfig, name: str, dtype: str, bos: int | None, eos: Sequence[int]) -> dict[str, Any]:
    """config.json as transformers' own save_pretrained writes it for this architecture (legacy rope keys,
    which transformers 4 and 5 both read)."""
    eos_id: int | list[int] | None = list(eos) if len(eos) > 1 else (eos[0] if eos else None)
    common = {"architectures": [HF_ARCHITECTURES[name]], "model_type": name, "vocab_size": config.vocab_size,
              "tie_word_embeddings": config.tie_embeddings, "bos_token_id": bos if bos is not None else eos_id,
              "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True, "initializer_range": 0.02}  # fmt: skip
    if name == "gpt2":
        return common | {
            "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
            "n_positions": config.context_length, "n_ctx": config.context_length,
            "activation_function": _GPT2_ACT[config.mlp], "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }  # fmt: skip
    scaling = None
    if config.rope_scaling is not None:  # llama3 (family() refused the rest)
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                   "high_freq_factor": s["high_freq_factor"],
                   "original_max_position_embeddings": int(s["original_context_length"])}  # fmt: skip
    data = common | {
        "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_scaling": scaling, "hidden_act": "silu", "attention_dropout": 0.0,
    }  # fmt: skip
    if name == "llama":
        data |= {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}
    elif name == "qwen3":
        data |= {"attention_bias": config.qkv_bias}
    if name != "llama":  # Qwen configs default to a sliding window in some versions: say there is none
        data |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return data


def hf_tensors(
    config: ModelConfig, name: str, dtype: torch.dtype, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensor name → tensor in `dtype`, laid out as transformers stores `name` (hf.py's tables, inverted),
    from gen's (name, tensor) pairs one at a time; meta tensors give the layout without any data."""
    arch = HF_ARCHITECTURES[name]
    for gen_name, t in tensors:
        names = hf.source_names(gen_name, arch)
        for hf_name, part in zip(names, split_rows(config, gen_name, t.to(dtype), len(names)), strict=True):
            if arch == "GPT2LMHeadModel":
                part = part.T if hf.GPT2_TRANSPOSED.search(hf_name) else part  # Conv1D stores (in, out)
                hf_name = hf_name if hf_name == "lm_head.weight" else "transformer." + hf_name
            yield hf_name, part


def export_hf(
    model: Transformer,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    dtype: str | None = None,
    force: bool = False,
    stop_ids: Sequence[int] | None = None,
    chat_template: str | None = None,
    consume: bool = False,
) -> Exported:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json into
    `out_dir`, so transformers' Auto classes load the model unchanged; `dtype` f32|f16|bf16 (default: the model's)."""
    out_dir = Path(out_dir)
    name = family(model.config, "hf")
    check_vocab(model, tokenizer)
    check_output(out_dir, force, folder=True)
    torch_dtype = _torch_dtype(dtype, model, HF_TYPES)
    dtype_name = str(torch_dtype).removeprefix("torch.")  # as config.json names it: float32, bfloat16 …
    eos = tuple(stop_ids if stop_ids is not None else stop_ids_of(tokenizer))
    bos = bos_id(tokenizer)
    import torch

    from gen_cli.model.transformer import expected_shapes

    meta = ((n, torch.empty(shape, device="meta")) for n, shape in expected_shapes(model.config).items())
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in hf_tensors(model.config, name, torch_dtype, meta)]

    def token(i: int | None) -> str | None:
        return tokenizer.id_to_token(i) if i is not None else None

    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                  "model_max_length": model.config.context_length,
                                  "bos_token": token(bos if bos is not None else (eos[0] if eos else None)),
                                  "eos_token": token(eos[0] if eos else None)}  # fmt: skip
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    else:
        # gen encodes a special token's spelling in text as text (only gen inserts <|endoftext|>); so does
        # transformers with this. A chat model keeps the default: its rendered template holds real specials.
        tok_config["split_special_tokens"] = True
    config = _hf_config(model.config, name, dtype_name, bos, eos)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}

    pages = PageReleaser()
    stream = tensors_of(model, consume=consume)  # refuses an unexportable model now, before any file is created

    def weights(path: Path) -> None:
        def released() -> Iterator[tuple[str, torch.Tensor]]:
            for gen_name, t in stream:
                yield gen_name, t
                pages.release(t)  # written (its parts were consumed before the next tensor is asked for)

        write_safetensors(path, layout, hf_tensors(model.config, name, torch_dtype, released()))

    def text(content: str) -> Callable[[Path], None]:
        return lambda path: path.write_text(content, encoding="utf-8")

    write_files(out_dir, force, {
        "model.safetensors": weights,
        "config.json": text(json.dumps(config, indent=2) + "\n"),
        "tokenizer.json": text(tokenizer.to_str(pretty=True)),
        "tokenizer_config.json": text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"),
        "generation_config.json": text(json.dumps(generation, indent=2) + "\n"),
    })  # fmt: skip
    size = sum((out_dir / n).stat().st_size for n in HF_FILES)
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype_name]
    return Exported(str(out_dir), "hf", HF_ARCHITECTURES[name], short, size, len(layout))


def _torch_dtype(kind: str | None, model: Transformer, allowed: tuple[str, ...]) -> torch.dtype:
    import torch

    if kind is None:  # the model's own half type, else float32
        stored = model.norm.weight.dtype  # the float tensors' dtype (an embedding may be blocks)
        return stored if stored in (torch.bfloat16, torch.float16) else torch.float32
    if kind not in allowed:
        raise UsageError(f"type {kind!r} is not one this format stores; choose {', '.join(allowed)}", params=("type",))
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
