"""Hugging Face model folders: config.json + safetensors (one file or shards) + tokenizer.json → a gen model.

The HF ↔ gen mapping is data (ARCHITECTURES, the name tables) plus two transforms: q/k/v and gate/up
are concatenated into gen's fused wqkv / (w1, w3) layout, and GPT-2's Conv1D weights are transposed.
Every tensor's shape is checked against the config from the file headers before any is read.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError
from gen_cli.formats.checkpoint import read_json_object
from gen_cli.formats.hf_config import config_from_hf
from gen_cli.formats.schema import TOKEN_IDS, Key, all_finite, read_capped, shown
from gen_cli.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from gen_cli.formats.loaded import Loaded

# gen name → HF names concatenated (in order) along the output dimension; {i} is the layer index.
LLAMA_NAMES: dict[str, tuple[str, ...]] = {
    "tok_emb.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
    "layers.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "layers.{i}.attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight",),
    "layers.{i}.attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight",),
    "layers.{i}.mlp.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight",),
    "layers.{i}.mlp.w3.weight": ("model.layers.{i}.mlp.up_proj.weight",),
    "layers.{i}.mlp.w2.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    "layers.{i}.attn.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    **{
        f"layers.{{i}}.{gen}.{kind}": tuple(f"model.layers.{{i}}.{hf}.{kind}" for hf in hfs)
        for kind in ("weight", "bias")
        for gen, hfs in (
            ("attn.wqkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("attn.wo", ("self_attn.o_proj",)),
            ("mlp.w1", ("mlp.gate_proj",)),
            ("mlp.w3", ("mlp.up_proj",)),
            ("mlp.w2", ("mlp.down_proj",)),
        )
    },
}
GPT2_NAMES: dict[str, tuple[str, ...]] = {
    "tok_emb.weight": ("wte.weight",),
    "pos_emb.weight": ("wpe.weight",),
    "norm.weight": ("ln_f.weight",),
    "norm.bias": ("ln_f.bias",),
    "lm_head.weight": ("lm_head.weight",),
    **{
        f"layers.{{i}}.{gen}.{kind}": (f"h.{{i}}.{hf}.{kind}",)
        for kind in ("weight", "bias")
        for gen, hf in (
            ("attn_norm", "ln_1"),
            ("mlp_norm", "ln_2"),
            ("attn.wqkv", "attn.c_attn"),
            ("attn.wo", "attn.c_proj"),
            ("mlp.w1", "mlp.c_fc"),
            ("mlp.w2", "mlp.c_proj"),
        )
    },
}
# GPT-2's Conv1D stores (in, out): these are transposed into nn.Linear's (out, in).
GPT2_TRANSPOSED = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Tensors some checkpoints carry that hold nothing gen needs (derived buffers).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def is_hf_dir(path: Path) -> bool:
    """A folder whose config.json names an architecture or model type (a gen config.json has neither)."""
    try:
        data = read_json_object(path / "config.json", max_bytes=1 << 20)
    except GenError:
        return False
    return "architectures" in data or "model_type" in data


def read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config of an HF folder and what to tell about it (architecture, dtype, tokenizer); no weights read."""
    data = read_json_object(directory / "config.json")
    config, arch, notes = config_from_hf(data, str(directory / "config.json"))
    if (directory / "model.safetensors").exists() or (directory / "model.safetensors.index.json").exists():
        by_name, _handles = _open_all(directory)  # headers only: missing or extra tensors said as load says them
        _plan(by_name, config, arch, str(directory))
    details: dict[str, Any] = {"format": "Hugging Face safetensors", "architecture": arch}
    details["dtype"] = data.get("torch_dtype") or data.get("dtype") or "unknown"
    if (directory / "tokenizer.json").is_file():
        from gen_cli.text.tokenizer import load_tokenizer

        details["tokenizer"] = (
            f"tokenizer.json, {load_tokenizer(directory / 'tokenizer.json').get_vocab_size():,} tokens"
        )
    if stops := stop_ids(directory, data):
        details["stop_ids"] = list(stops)
    details["chat_template"] = "yes" if chat_template(directory)[0] else "no"
    return config, details | ({"notes": notes} if notes else {})


def _weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file holding it (from the shard index, or the single file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GenError(f"{index}: no weight_map")
        if outside := [f for f in set(weight_map.values()) if not isinstance(f, str) or Path(f).name != f]:
            raise GenError(f"{index}: shard {outside[0]!r} is not a file name in this folder")
        files = {name: directory / file for name, file in weight_map.items()}
        if missing := sorted({p.name for p in files.values() if not p.is_file()}):
            raise GenError(f"{directory}: missing shard(s) {', '.join(missing[:3])} named by {index.name}")
        return files
    single = directory / "model.safetensors"
    if not single.is_file():
        raise GenError(f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")
    return {"": single}  # names come from the file itself


def _open_all(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Memory-map every weight file; HF name → open file, and the open files (to close)."""
    from safetensors import SafetensorError, safe_open

    by_name: dict[str, Any] = {}
    handles: dict[Path, Any] = {}
    files = _weight_files(directory)
    for name, path in files.items():
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="pt")  # headers checked against the file size
            except (SafetensorError, OSError) as e:
                raise GenError(f"{path}: not a valid safetensors file ({e})") from None
        if name:
            by_name[name] = handles[path]
    if "" in files:
        handle = handles[files[""]]
        by_name = dict.fromkeys(handle.keys(), handle)
    else:
        for path, handle in handles.items():
            held = set(handle.keys())
            if stray := sorted(held - by_name.keys()):
                raise GenError(f"{path}: holds {stray[0]}, which the shard index does not list")
            if absent := [n for n, h in by_name.items() if h is handle and n not in held]:
                raise GenError(f"{path}: the shard index lists {absent[0]} in it, but the file lacks it")
    return by_name, handles


def source_names(gen_name: str, arch: str) -> tuple[str, ...]:
    """The HF tensor names one gen tensor is built from."""
    table = GPT2_NAMES if arch == "GPT2LMHeadModel" else LLAMA_NAMES
    layer = re.match(r"layers\.(\d+)\.", gen_name)
    key = gen_name if layer is None else gen_name.replace(layer.group(0), "layers.{i}.", 1)
    assert key in table, f"no HF name for {gen_name}"  # the tables cover every tensor Transformer makes
    return tuple(n.replace("{i}", layer.group(1)) if layer else n for n in table[key])


def _plan(by_name: dict[str, Any], config: ModelConfig, arch: str, source: str) -> dict[str, tuple[str, ...]]:
    """gen name → HF names, every shape checked against the config from the headers alone."""
    from gen_cli.model.info import state_shapes

    prefix = "transformer." if arch == "GPT2LMHeadModel" and any(n.startswith("transformer.") for n in by_name) else ""
    plan: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for gen_name, shape in state_shapes(config).items():  # expected_shapes, from one layer repeated
        if gen_name == "lm_head.weight" and config.tie_embeddings:
            continue
        names = tuple(n if n == "lm_head.weight" else prefix + n for n in source_names(gen_name, arch))
        if missing := [n for n in names if n not in by_name]:
            raise GenError(f"{source}: tensor {missing[0]} is missing (needed for {arch} as config.json describes it)")
        shapes = []
        for n in names:
            s = tuple(by_name[n].get_slice(n).get_shape())
            shapes.append(s[::-1] if GPT2_TRANSPOSED.search(n) else s)
        rows = sum(s[0] for s in shapes)
        if any(s[1:] != shape[1:] for s in shapes) or rows != shape[0]:
            got = " + ".join(str(s) for s in shapes)
            raise GenError(f"{source}: {' + '.join(names)} has shape {got}; config.json needs {shape}")
        plan[gen_name] = names
        used.update(names)
    if config.tie_embeddings:
        used.add("lm_head.weight")  # some checkpoints store the tied head too: the embedding is used
    if extra := sorted(n for n in set(by_name) - used if not IGNORED.search(n)):
        raise GenError(f"{source}: unexpected tensor {extra[0]} ({len(extra)} in all): not a plain {arch}?")
    return plan


def load_hf_weights(
    directory: Path,
    config: ModelConfig,
    arch: str,
    dtype: torch.dtype | None,
    copied: Counter[str] | None = None,
    arena: bool = False,
) -> dict[str, Any]:
    """gen's state dict from the folder's safetensors, tensor by tensor, in `dtype` or else the embedding's.

    safetensors maps each file copy-on-write: a tensor gen reads as stored stays a view of the map; fused
    q/k/v, GPT-2's transposed matrices and dtype changes are copied once (bytes by reason into `copied`).
    With `arena`, every matrix (2-D tensor) is written once, straight from the map, into one arena on 2 MB
    pages (gate and up side by side), and the file's pages it was read from are given back."""
    import torch

    from gen_cli.pages import PageReleaser, arena_slots, copy_rows, return_free_heap

    copied = Counter() if copied is None else copied
    by_name, _handles = _open_all(directory)
    plan = _plan(by_name, config, arch, str(directory))
    # One dtype for the whole model: the embedding's as stored (a file may keep its norms in fp32).
    emb = plan["tok_emb.weight"][0]
    want = dtype or getattr(torch, _DTYPES.get(by_name[emb].get_slice(emb).get_dtype(), "float16"))
    slots: dict[str, list[torch.Tensor]] = {}
    if arena and want in (torch.float32, torch.bfloat16):  # what the native step reads (fp16 runs as fp32)
        shapes = _shapes(by_name, plan)
        slots, copied["into 2 MB pages (decode layout)"] = arena_slots(
            {name: [(shape, want)] for name, shape in shapes.items() if len(shape) == 2}
        )
    pages = PageReleaser()
    tensors: dict[str, torch.Tensor] = {}
    for gen_name, names in plan.items():
        parts = []
        for n in names:
            try:
                t = by_name[n].get_tensor(n)
            except Exception as e:  # a file cut short after its header was read
                raise GenError(f"{directory}: cannot read tensor {n} ({e})") from None
            if not t.is_floating_point():
                raise GenError(f"{directory}: tensor {n} has dtype {t.dtype}; floating-point weights are needed")
            if gen_name not in slots and not all_finite(t):  # as read (else as copied, below): NaN logits
                _refuse_non_finite(directory, n)
            parts.append(t.T if GPT2_TRANSPOSED.search(n) else t)
        if len(parts) > 1:
            copied["q/k/v fused"] += sum(p.nbytes for p in parts)
        elif not parts[0].is_contiguous():
            copied["GPT-2 Conv1D transposed"] += parts[0].nbytes
        if gen_name in slots:  # q rows, k rows, v rows (or the one matrix) written straight into their place
            (t,) = slots[gen_name]
            row = 0
            for p, n in zip(parts, names, strict=True):
                check = partial(_check_chunk, directory, n)
                copy_rows(t[row : row + p.shape[0]], p, pages, each=check)  # the file's pages given back as it goes
                row += p.shape[0]
            tensors[gen_name] = t
            continue
        t = parts[0] if len(parts) == 1 else torch.cat(parts)  # (q rows + k rows + v rows, d_model) for wqkv
        tensors[gen_name] = _to(t.contiguous(), dtype or t.dtype, copied)
    stored = tensors["tok_emb.weight"].dtype
    tensors = {k: _to(t, stored, copied) for k, t in tensors.items()}  # a no-op for tensors already in it
    return_free_heap()  # the checks' and conversions' temporaries: glibc would keep them resident
    return tensors


# safetensors' dtype names for the floating-point dtypes gen loads
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _shapes(by_name: dict[str, Any], plan: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    """Each gen tensor's shape (rows of its parts summed; GPT-2's Conv1D weights as nn.Linear's), from headers."""
    shapes = {}
    for gen_name, names in plan.items():
        parts = [tuple(by_name[n].get_slice(n).get_shape()) for n in names]
        parts = [s[::-1] if GPT2_TRANSPOSED.search(n) else s for s, n in zip(parts, names, strict=True)]
        shapes[gen_name] = (sum(s[0] for s in parts), *parts[0][1:])
    return shapes


def _refuse_non_finite(directory: Path, name: str) -> None:
    raise GenError(f"{directory}: tensor {name} holds NaN or infinite values")


def _check_chunk(directory: Path, name: str, chunk: torch.Tensor) -> None:
    """Refuse tensor `name` when these rows of it, as copied, hold NaN or Inf."""
    if not all_finite(chunk):
        _refuse_non_finite(directory, name)


def _to(t: torch.Tensor, dtype: torch.dtype, copied: Counter[str]) -> torch.Tensor:
    if t.dtype != dtype:
        copied[f"{str(t.dtype).removeprefix('torch.')} → {str(dtype).removeprefix('torch.')}"] += t.nelement() * (
            dtype.itemsize
        )
    return t.to(dtype)


def stop_ids(directory: Path, data: dict[str, Any]) -> tuple[int, ...]:
    """Every end-of-sequence id config.json and generation_config.json declare."""
    found: list[int] = []
    sources = [data]
    if (gen_config := directory / "generation_config.json").is_file():
        sources.append(read_json_object(gen_config))
    for d, name in zip(sources, ("config.json", "generation_config.json"), strict=False):
        eos = d.get("eos_token_id")
        if eos is not None and not Key(TOKEN_IDS).fits(eos):
            raise GenError(f"{directory / name}: eos_token_id must be a token id or a list of them, got {shown(eos)}")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in found:
                found.append(i)
    return tuple(found)


def chat_template(directory: Path) -> tuple[str | None, dict[str, str]]:
    """The folder's chat template (chat_template.jinja or tokenizer_config.json) and the special-token
    spellings a template may use (bos_token, eos_token …)."""
    config_path = directory / "tokenizer_config.json"
    config = read_json_object(config_path) if config_path.is_file() else {}
    specials = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers writes them: [{name, template}, …]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):  # fmt: skip
            raise GenError(
                f"{config_path}: chat_template must be a string or a list of {{name, template}} objects, "
                f"got {shown(template)}"
            )
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif template is not None and not isinstance(template, str):
        raise GenError(f"{config_path}: chat_template must be a string, got {shown(template)}")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = read_capped(jinja, 1 << 20, "a chat template").decode("utf-8")
        except UnicodeDecodeError:
            raise GenError(f"{jinja}: not UTF-8 text") from None
    return template, specials


def load_hf(
    directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, arena: bool = False
) -> Loaded:
    """Load an HF model folder (architectures in ARCHITECTURES) with its tokenizer.json; `arena`: the
    matrices written once into 2 MB pages (load_hf_weights)."""
    from gen_cli.formats.loaded import Loaded
    from gen_cli.memory import check_tables_fit
    from gen_cli.model.transformer import model_from_tensors
    from gen_cli.text.tokenizer import load_tokenizer

    data = read_json_object(directory / "config.json")
    config, arch, notes = config_from_hf(data, str(directory / "config.json"))
    check_tables_fit(config, str(directory / "config.json"))
    if not (directory / "tokenizer.json").is_file():
        raise GenError(f"{directory}: no tokenizer.json (gen reads tokenizers in the `tokenizers` format)")
    tok = load_tokenizer(directory / "tokenizer.json")
    if tok.get_vocab_size() > config.vocab_size:
        raise GenError(
            f"{directory}: tokenizer.json has {tok.get_vocab_size()} tokens but the model's vocab_size is "
            f"{config.vocab_size}; they do not belong together"
        )
    copied: Counter[str] = Counter()
    tensors = load_hf_weights(directory, config, arch, dtype, copied, arena)
    model = model_from_tensors(config, tensors).to(device)
    # A prompt is encoded as the model's own tokenizer would (e.g. with BOS) when its post-processor adds one.
    add_special = tok.encode("a", add_special_tokens=True).ids != tok.encode("a", add_special_tokens=False).ids
    details = {"format": "Hugging Face safetensors", "architecture": arch, "tokenizer": "tokenizer.json",
               "copied at load": dict(copied)}  # fmt: skip
    template, specials = chat_template(directory)
    bos = data.get("bos_token_id")
    return Loaded(model, tok, str(directory), notes, stop_ids=stop_ids(directory, data),
                  add_special_tokens=add_special, details=details, chat_template=template,
                  special_tokens=specials, bos_id=bos if isinstance(bos, int) else None)  # fmt: skip
