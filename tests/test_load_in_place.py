"""Weights are used from the file's memory map in place: a GGUF matrix gen runs as stored (its blocks, F32)
lies in the file's mapping, only fused q/k/v (llama: Q/K rows un-permuted) and type changes are copied, once,
and the logits equal transformers' on the same file (it dequantizes with the gguf package) for every type."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_builders import build_hf_model, byte_level_tokenizer, random_hf_model, write_gguf  # noqa: E402

from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.quant.formats import row_bytes  # noqa: E402

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
# hidden 256, MLP 512: every row is whole 256-weight super-blocks, so each type fits every matrix
SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
QKV_ROWS = (4 + 2 + 2) * 64


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("in_place")
    model = random_hf_model("llama", **SHAPE)
    return {qtype: write_gguf(model, tok, "llama", root / f"llama-{qtype}.gguf", qtype) for qtype in TYPES}


def _mapped(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at (Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    ranges = []
    for line in maps.read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _in_map(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in ranges)


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def _matrices(model) -> list[torch.Tensor]:
    """Every matrix but the fused q/k/v, as gen holds it (blocks or float weight)."""
    layer = model.layers[1]
    mods = [layer.attn.wo, layer.mlp.w1, layer.mlp.w2, layer.mlp.w3, model.tok_emb, model.lm_head]
    return [m.blocks if hasattr(m, "blocks") else m.weight for m in mods]


@pytest.mark.parametrize("qtype", TYPES)
def test_matrices_are_the_files_pages_and_logits_equal_transformers(files, qtype):
    path = files[qtype]
    loaded = load(path)
    model, ranges = loaded.model, _mapped(path)
    assert ranges, "the file is not mapped"
    norms = [model.norm.weight, model.layers[0].attn_norm.weight]
    if qtype == "F16":  # run in float32 on the CPU: converted (one copy); F16 asked for, used in place
        assert not any(_in_map(t, ranges) for t in _matrices(model))
        half = load(path, dtype=torch.float16).model
        assert all(_in_map(t, _mapped(path)) for t in _matrices(half))
    else:
        assert all(_in_map(t, ranges) for t in [*_matrices(model), *norms])
    wqkv = model.layers[0].attn.wqkv
    qkv = wqkv.blocks if hasattr(wqkv, "blocks") else wqkv.weight
    assert not _in_map(qkv, ranges)  # fused from three tensors, Q/K rows un-permuted: a copy
    per_layer = QKV_ROWS * (
        row_bytes(qtype.lower(), 256) if qtype not in ("F32", "F16") else 256 * (4 >> (qtype == "F16"))
    )
    copied = loaded.details["copied at load"]  # bytes by reason
    assert copied.pop("q/k/v fused (Q/K rows un-permuted)") == 2 * per_layer
    if qtype == "F16":  # the F32 norms join the matrices' float16, then all run in float32 on the CPU
        assert copied.pop("F32 → float16") > 0 and copied.pop("float16 → float32") > 0
    assert copied == {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        if qtype == "F16":  # gen runs one dtype, the matrices': its F32 norms are the float16-rounded ones
            for p in theirs.parameters():
                p.copy_(p.half().float()) if p.dim() == 1 else None
        torch.testing.assert_close(model(_ids()), theirs.eval()(_ids()).logits, rtol=0, atol=1e-4)


def test_the_map_outlives_the_loader_and_writes_never_reach_the_file(files):
    path = files["Q4_0"]
    before = path.read_bytes()
    model = load(path).model
    gc.collect()  # the loader's file object is gone: the tensors keep the map alive
    with torch.no_grad():
        expected = model(_ids())
        model.layers[1].mlp.w2.blocks.zero_()  # copy-on-write: this process's pages change, not the file
        assert not torch.equal(model(_ids()), expected)
    assert path.read_bytes() == before
    with torch.no_grad():
        torch.testing.assert_close(load(path).model(_ids()), expected, rtol=0, atol=0)


def test_hf_folders_use_the_safetensors_map_and_copy_only_fused_qkv(tmp_path, tok):
    theirs = build_hf_model("llama", tmp_path, tok)
    loaded = load(tmp_path)
    ranges = _mapped(tmp_path / "model.safetensors")
    assert all(_in_map(t, ranges) for t in _matrices(loaded.model))
    qkv_bytes = 2 * (4 + 2 + 2) * 16 * 64 * 4  # 2 layers, 8 heads of 16 × hidden 64, float32
    assert loaded.details["copied at load"] == {"q/k/v fused": qkv_bytes}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_ids()), theirs(_ids()).logits, rtol=0, atol=1e-4)


def test_gen_dirs_use_the_safetensors_map_and_stay_trainable(tmp_path, tok):
    from gen_cli.formats.checkpoint import load_model, save_model
    from gen_cli.model.config import ModelConfig
    from gen_cli.model.transformer import random_model

    config = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         context_length=32)  # fmt: skip
    saved = random_model(config)
    save_model(tmp_path, saved, tok)
    model, _ = load_model(tmp_path)
    ranges = _mapped(tmp_path / "model.safetensors")
    assert all(_in_map(p, ranges) for p in model.parameters())  # no random init, no copy: the file's pages
    assert all(p.requires_grad for p in model.parameters()) and model.lm_head.weight is model.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), saved.eval()(_ids()), rtol=0, atol=0)
    model(_ids()).sum().backward()  # trainable as before: `gen train --init` starts from it
    assert model.tok_emb.weight.grad is not None


def _resident_kb(path: Path) -> int:
    """kB of `path`'s mapping resident in this process (Linux smaps)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("needs /proc/self/smaps")
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.endswith(str(path.resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_copies_out_of_the_map_give_its_pages_back(files):
    # After the decode layout (fused w13, the native step's arena) every matrix was copied out of the file:
    # the map's resident pages were given back, so the model is held once, not file + copy.
    from gen_cli.infer.optimize import optimize_for_decode
    from gen_cli.native.decoder import NativeDecoder

    path = files["Q8_0"]
    with open(path, "rb+") as f:  # a user's file is clean in the page cache; dirty pages are not paged out at once
        os.fsync(f.fileno())
    loaded = load(path)
    touched = _resident_kb(path)
    model = optimize_for_decode(loaded.model)
    if not isinstance(model.native_decoder, NativeDecoder):
        pytest.skip("the native step is unavailable here: weights stay in the map")
    assert touched > 0  # loading read the blocks' scales through the map
    # MADV_PAGEOUT is advice: the norms stay in the map, and the kernel may keep a few pages (1148 → 48 kB idle)
    assert _resident_kb(path) <= max(16, touched // 4)
