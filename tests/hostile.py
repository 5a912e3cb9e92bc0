"""Helpers for the hostile-input tests: run the CLI, assert one clean line, build damaged model dirs."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

from typer.testing import CliRunner

from gen_cli.cli import app

REPO = Path(__file__).resolve().parent.parent


def cli(argv, stdin=None):
    return CliRunner().invoke(app, argv, input=stdin)


def one_line(result) -> str:
    """The command's stderr, asserted to be one line and no traceback."""
    text = result.stderr.strip()
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(text.splitlines()) == 1, text
    return text


def copy_model(model_dir, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # json.dumps writes float("inf") as Infinity, as a hostile file would


def rewrite_weights(folder, change, metadata=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})


def refused(argv, pattern, code=1, stdin=None):
    result = cli(argv, stdin)
    line = one_line(result)
    assert result.exit_code == code, (result.exit_code, line)
    assert re.search(pattern, line), line
    return line


# -- tiny imported models (a llama GGUF file, a llama HF folder) built without transformers, for hostile edits

TINY = dict(n_layer=2, d=64, n_head=4, n_kv=2, d_ff=96, ctx=64)
DROP = object()  # a metadata key or config.json key to leave out


def tiny_llama_tensors(prefix_layer: str, names: dict[str, str], vocab: int, seed: int = 0) -> dict:
    """Random float32 tensors (rows, cols) of the tiny llama shape under the format's names."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, kv, ff = TINY["d"], TINY["d"] // TINY["n_head"] * TINY["n_kv"], TINY["d_ff"]
    shapes = {"emb": (vocab, d), "norm": (d,), "head": (vocab, d)}
    layer = {"attn_norm": (d,), "ffn_norm": (d,), "q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d),
             "gate": (ff, d), "up": (ff, d), "down": (d, ff)}  # fmt: skip
    out = {}
    for key, shape in shapes.items():
        out[names[key]] = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) == 2 else 1)
    for i in range(TINY["n_layer"]):
        for key, shape in layer.items():
            a = rng.standard_normal(shape).astype(np.float32)
            out[prefix_layer.format(i=i) + names[key]] = a * 0.1 if len(shape) == 2 else 1 + 0.1 * a
    return out


GGUF_NAMES = {"emb": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
              "attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight", "q": "attn_q.weight",
              "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight", "gate": "ffn_gate.weight",
              "up": "ffn_up.weight", "down": "ffn_down.weight"}  # fmt: skip


def gguf_metadata():
    """key → (value, GGUF type, element type) of the tiny llama GGUF, tokenizer included."""
    import gguf
    from hf_builders import VOCAB, byte_level_tokenizer

    t = gguf.GGUFValueType
    data = json.loads(byte_level_tokenizer().to_str())
    tokens = [None] * len(data["model"]["vocab"])
    for tok, i in data["model"]["vocab"].items():
        tokens[i] = tok
    types = [1] * len(tokens)
    for added in data["added_tokens"]:
        if added["id"] >= len(tokens):
            tokens += [None] * (added["id"] + 1 - len(tokens))
            types += [1] * (added["id"] + 1 - len(types))
        tokens[added["id"]], types[added["id"]] = added["content"], 3
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    types += [5] * (VOCAB - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "general.name": ("tiny", t.STRING, None),
        "llama.context_length": (TINY["ctx"], t.UINT32, None),
        "llama.embedding_length": (TINY["d"], t.UINT32, None),
        "llama.block_count": (TINY["n_layer"], t.UINT32, None),
        "llama.feed_forward_length": (TINY["d_ff"], t.UINT32, None),
        "llama.attention.head_count": (TINY["n_head"], t.UINT32, None),
        "llama.attention.head_count_kv": (TINY["n_kv"], t.UINT32, None),
        "llama.rope.freq_base": (10000.0, t.FLOAT32, None),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, t.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", t.STRING, None),
        "tokenizer.ggml.pre": ("gpt2", t.STRING, None),
        "tokenizer.ggml.tokens": (tokens, t.ARRAY, t.STRING),
        "tokenizer.ggml.token_type": (types, t.ARRAY, t.INT32),
        "tokenizer.ggml.merges": (merges, t.ARRAY, t.STRING),
        "tokenizer.ggml.bos_token_id": (0, t.UINT32, None),
        "tokenizer.ggml.eos_token_id": (0, t.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, t.BOOL, None),
    }


def write_tiny_gguf(path, meta=None, tensors=None, qtype="F32", raw=None, retype=None):
    """A tiny llama GGUF: `meta` changes metadata (key → (value, type, element type) or DROP, the architecture
    included), `tensors(dict)` edits the float tensors in place, 2-D ones are written as `qtype`, `raw`
    (name → (numpy array, GGML type name)) writes those bytes as that type, and `retype` (name → GGML type
    name) then changes a tensor's declared type in the header, its bytes unchanged, as a hostile file may."""
    import gguf
    from gguf.gguf_writer import GGUFValue
    from hf_builders import VOCAB

    values = gguf_metadata() | (meta or {})
    arrays = tiny_llama_tensors("blk.{i}.", GGUF_NAMES, VOCAB)
    if tensors is not None:
        tensors(arrays)
    w = gguf.GGUFWriter(str(path), "llama")
    if (arch := values.pop("general.architecture", None)) is not None:
        del w.kv_data[0]["general.architecture"]
        if arch is not DROP:
            w.kv_data[0]["general.architecture"] = GGUFValue(*arch)
    for key, value in values.items():
        if value is not DROP:
            w.kv_data[0][key] = GGUFValue(*value)
    for name, a in arrays.items():
        if raw and name in raw:
            data, kind = raw[name]
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        elif a.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, kind in (retype or {}).items():
        data = bytearray(path.read_bytes())
        at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, gguf.GGMLQuantizationType[kind].value)
        path.write_bytes(data)
    return path


HF_NAMES = {"emb": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight",
            "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight"}  # fmt: skip


def hf_config_dict():
    from hf_builders import VOCAB

    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "num_hidden_layers": TINY["n_layer"], "hidden_size": TINY["d"], "num_attention_heads": TINY["n_head"],
            "num_key_value_heads": TINY["n_kv"], "intermediate_size": TINY["d_ff"],
            "max_position_embeddings": TINY["ctx"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 0, "bos_token_id": 0,
            "torch_dtype": "float32"}  # fmt: skip


def write_tiny_hf(folder, config=None, tensors=None):
    """A tiny llama HF folder: `config` changes config.json (DROP leaves a key out), `tensors(dict)` edits the
    torch tensors before they are saved."""
    import torch
    from hf_builders import VOCAB, byte_level_tokenizer
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    data = hf_config_dict() | (config or {})
    data = {k: v for k, v in data.items() if v is not DROP}
    (folder / "config.json").write_text(json.dumps(data))
    arrays = {k: torch.from_numpy(v) for k, v in tiny_llama_tensors("model.layers.{i}.", HF_NAMES, VOCAB).items()}
    if tensors is not None:
        tensors(arrays)
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder
