"""GGUF files whose matrices are GGML blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, and others gen re-quantizes):
gen keeps them as blocks, its logits equal the dequantized fp32 model's and transformers' own GGUF loader's,
and the weights take the file's bytes in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_builders import byte_level_tokenizer, random_hf_model, write_gguf  # noqa: E402

from gen_cli.cli import app  # noqa: E402
from gen_cli.formats.gguf_file import GGUFFile  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.infer.optimize import optimize_for_decode  # noqa: E402
from gen_cli.model.info import weight_summary  # noqa: E402
from gen_cli.native.repack import repack_wanted  # noqa: E402
from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear, dequantize_modules  # noqa: E402
from gen_cli.quant.block_stack import BlockStack  # noqa: E402
from gen_cli.quant.blocks import dequantize, max_error, quantize  # noqa: E402

runner = CliRunner()
# hidden 256, MLP 512: every row is whole 256-weight super-blocks, so each type fits every matrix
SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """(arch, type) → path: llama (Q/K rows permuted, untied) and qwen2 (tied, q/k/v biases) per type."""
    root = tmp_path_factory.mktemp("gguf_blocks")
    out = {}
    for arch in ("llama", "qwen2"):
        model = random_hf_model(arch, **SHAPE)
        for qtype in TYPES:
            out[arch, qtype] = write_gguf(model, tok, arch, root / f"{arch}-{qtype}.gguf", qtype)
        out[arch, "hf"] = model
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def _reference(path: Path):
    """The same file loaded by gen with every block matrix replaced by its dequantized fp32 weight."""
    return dequantize_modules(load(path).model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_are_kept_and_logits_equal_the_dequantized_model(files, arch, qtype):
    path = files[arch, qtype]
    model = load(path).model
    q = qtype.lower()
    assert isinstance(model.tok_emb, BlockEmbedding) and model.tok_emb.qtype == q
    layer = model.layers[0]
    for lin in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w1, layer.mlp.w3, layer.mlp.w2, model.lm_head):
        assert isinstance(lin, BlockLinear) and lin.qtype == q
    # No float matrix anywhere: only norms and biases are floats.
    assert all(t.dim() == 1 for t in model.parameters()) and all(
        t.dtype == torch.uint8 for n, t in model.state_dict().items() if n.endswith(".blocks")
    )
    if arch == "qwen2":  # tied: the head reads the embedding's own blocks
        assert model.lm_head.blocks.data_ptr() == model.tok_emb.blocks.data_ptr()
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, _reference(path)(ids), rtol=0, atol=1e-5)
        # transformers dequantizes the file with the gguf package: the same weights, its own model code
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        assert (ours - theirs.eval()(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype", TYPES)
def test_weights_take_the_files_bytes_in_memory(files, qtype):
    path = files["llama", qtype]
    model = load(path).model
    file_bytes = sum(t.n_bytes for t in GGUFFile(path).tensors.values())
    held = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()] if t.dim() in (1, 2)}
    tables = sum(t.nbytes for n, t in model.named_buffers() if n.startswith("rope_"))  # derived, in no file
    assert sum(held.values()) - tables == file_bytes
    summary = weight_summary(model)
    assert summary["attn qkv"]["types"] == {qtype.lower(): 2}
    matrices = sum(e["bytes"] for e in summary.values())
    assert matrices == file_bytes - sum(t.nbytes for t in model.parameters())  # all but the norm vectors


def test_llama_q_k_rows_are_the_files_blocks_unpermuted(files):
    path = files["llama", "Q4_K"]
    f = GGUFFile(path)
    wqkv = load(path).model.layers[1].attn.wqkv
    q_rows = 4 * 64
    stored = torch.from_numpy(f.blocks("blk.1.attn_q.weight"))  # (rows, row_bytes) in llama.cpp's order
    # per head, stored row pairs (2j, 2j+1) are gen's rows (j, j + 32): whole rows of blocks move
    expected = stored.reshape(4, 32, 2, -1).transpose(1, 2).reshape(q_rows, -1)
    assert torch.equal(wqkv.blocks[:q_rows], expected)
    v = torch.from_numpy(f.blocks("blk.1.attn_v.weight"))
    assert torch.equal(wqkv.blocks[-v.shape[0] :], v)  # v is not permuted


def _mixed(name: str) -> str:
    """A Q4_K_M-like mix: v and down in Q6_K, the rest Q4_K; gate in Q8_0 and up in Q5_0."""
    if ".attn_v." in name or ".ffn_down." in name:
        return "Q6_K"
    if ".ffn_gate." in name:
        return "Q8_0"
    return "Q5_0" if ".ffn_up." in name else "Q4_K"


def test_mixed_parts_keep_their_own_types_and_info_says_so(files, tok, tmp_path):
    path = write_gguf(files["llama", "hf"], tok, "llama", tmp_path / "mixed.gguf", _mixed)
    loaded = load(path)
    model, f = loaded.model, GGUFFile(path)
    assert loaded.source == str(path)  # what messages and benchmarks name: the file, not the last stacked matrix
    wqkv = model.layers[0].attn.wqkv
    assert isinstance(wqkv, BlockStack) and wqkv.qtypes == ["q4_k", "q6_k"]  # q + k joined, v apart
    assert [p.out_features for p in wqkv.parts] == [256 + 128, 128] and wqkv.out_features == 512
    v = torch.from_numpy(f.blocks("blk.0.attn_v.weight"))
    assert torch.equal(wqkv.parts[1].blocks, v)  # v's bytes as stored
    k_file = torch.from_numpy(f.blocks("blk.0.attn_k.weight"))  # (128, row bytes), rows in llama.cpp's order
    k_gen = wqkv.parts[0].blocks[256:384]  # gen's k rows, un-permuted: whole rows of blocks moved, not changed
    assert torch.equal(k_gen.reshape(2, 2, 32, -1).transpose(1, 2).reshape(128, -1), k_file)
    up = model.layers[0].mlp.w3
    assert up.qtype == "q5_0"  # kept as stored
    assert torch.equal(up.blocks, torch.from_numpy(f.blocks("blk.0.ffn_up.weight")))
    assert model.layers[0].mlp.w1.qtype == "q8_0" and model.layers[0].mlp.w2.qtype == "q6_k"
    assert not any("re-quantized" in n for n in loaded.notes)
    # fusing gate (q8_0) and up (q5_0) for decoding keeps both as they are
    gate_blocks = model.layers[0].mlp.w1.blocks
    optimize_for_decode(model, native=False)
    w13 = model.layers[0].mlp.w13
    assert isinstance(w13, BlockStack) and w13.qtypes == ["q8_0", "q5_0"]
    assert torch.equal(w13.parts[0].blocks, gate_blocks) and torch.equal(w13.parts[1].blocks, up.blocks)
    info = runner.invoke(app, ["info", str(path), "--json"])
    assert info.exit_code == 0, info.output
    matrices = json.loads(info.stdout)["matrices"]
    assert matrices["attn qkv"]["held"] == {"q4_k + q6_k": 2} and matrices["attn qkv"]["converted"] == 0
    assert matrices["attn qkv"]["file"] == {"Q4_K": 4, "Q6_K": 2}
    file_bytes = sum(f.blocks(f"blk.{i}.attn_{p}.weight").nbytes for i in range(2) for p in "qkv")
    assert matrices["attn qkv"]["bytes"] == file_bytes
    assert matrices["mlp in"]["held"] == {"q8_0": 2, "q5_0": 2} and matrices["mlp in"]["converted"] == 0
    text = runner.invoke(app, ["info", str(path)])
    assert "attn qkv: q4_k + q6_k ×2 from Q4_K ×4 + Q6_K ×2," in " ".join(text.stdout.split())


def test_generate_runs_a_block_model_and_stats_report_its_weights(files):
    path = files["qwen2", "Q4_K"]
    out = runner.invoke(app, ["generate", "Hi", "--model", str(path), "--max-new-tokens", "3", "--json"])
    assert out.exit_code == 0, out.output
    weights = json.loads(out.stdout)["stats"]["weights"]
    assert weights["embedding"]["types"] == {"q4_k": 1} and weights["mlp in"]["types"] == {"q4_k": 2}  # fused w13
    if repack_wanted("q4_k", 16):  # this CPU's kernel streams q4_k rows interleaved: the tied head gets a copy
        assert weights["lm head"]["types"] == {"q4_k (16-row interleaved)": 1}
        assert weights["lm head"]["bytes"] == weights["embedding"]["bytes"]
    else:
        assert weights["lm head"]["types"] == {"q4_k (tied)": 1} and weights["lm head"]["bytes"] == 0


def test_float_model_quantized_to_blocks_matches_its_dequantized_self(files):
    reference = dequantize_modules(load(files["llama", "Q8_0"]).model)
    for qtype in ("q8_0", "q4_0", "q4_k"):
        float_model = dequantize_modules(load(files["llama", "Q8_0"]).model)
        optimize_for_decode(float_model, quantize=qtype, native=False)
        lins = [m for m in float_model.modules() if isinstance(m, BlockLinear)]
        assert len(lins) == 2 * 4 + 1 and {m.qtype for m in lins} == {qtype}  # 4 per layer, the head
        assert isinstance(float_model.tok_emb, nn.Embedding)  # the embedding keeps its float table
        w = reference.layers[0].attn.wo.weight
        got = float_model.layers[0].attn.wo
        assert torch.equal(got.blocks, quantize(w, qtype))
        assert ((dequantize(got.blocks, qtype, w.shape[1]) - w).abs() <= max_error(w, qtype)).all()


def test_types_without_a_kernel_go_to_the_nearest_block_type_with_as_many_bits():
    from gen_cli.formats.gguf_blocks import nearest_block_type

    assert nearest_block_type("Q8_1", 256) == "q8_0"
    assert nearest_block_type("Q2_K", 512) == "q4_k" and nearest_block_type("Q3_K", 256) == "q4_k"
    assert nearest_block_type("IQ4_XS", 256) == "q4_k" and nearest_block_type("IQ2_XXS", 256) == "q4_k"
    assert nearest_block_type("IQ4_NL", 96) == "q4_1"


def test_int8_leaves_block_matrices_as_they_are(files):
    model = load(files["qwen2", "Q4_0"]).model  # tied: the head is the embedding's blocks
    reference = dequantize_modules(load(files["qwen2", "Q4_0"]).model)
    optimize_for_decode(model, quantize="int8", native=False)
    assert {m.qtype for m in model.modules() if isinstance(m, BlockLinear)} == {"q4_0"}
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=1e-5)
