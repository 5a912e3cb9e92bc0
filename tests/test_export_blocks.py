"""`gen export --to gguf --type q8_0|q4_0|q4_k`: the file holds the blocks `--quantize` runs; transformers'
GGUF reader gets gen's dequantized values; a model loaded from a quantized GGUF exports its blocks as read."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_builders import byte_level_tokenizer  # noqa: E402

from gen_cli.cli import app  # noqa: E402
from gen_cli.formats.checkpoint import save_model  # noqa: E402
from gen_cli.formats.export_gguf import export_gguf  # noqa: E402
from gen_cli.formats.gguf_file import GGUFFile  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.infer.optimize import optimize_for_decode  # noqa: E402
from gen_cli.model.config import ModelConfig  # noqa: E402
from gen_cli.model.transformer import Transformer  # noqa: E402
from gen_cli.quant.block_linear import BlockLinear  # noqa: E402
from gen_cli.text.tokenizer import configure  # noqa: E402

runner = CliRunner()
# rows of whole 256-weight super-blocks (q4_k) everywhere; untied, so the head is its own matrix
CONFIG = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=512, context_length=64,
              tie_embeddings=False)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return configure(byte_level_tokenizer())


def gen_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**CONFIG, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def _blocks(model) -> dict[str, tuple[str, torch.Tensor]]:
    return {n: (m.qtype, m.blocks) for n, m in model.named_modules() if isinstance(m, BlockLinear)}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k"])
def test_export_holds_the_blocks_quantize_runs(qtype, tok, tmp_path):
    model = gen_model()
    export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    ran = optimize_for_decode(gen_model(), quantize=qtype, native=False)  # what `generate --quantize` runs
    back = load(tmp_path / "m.gguf").model
    optimize_for_decode(back, native=False)  # fuses w1/w3 as blocks: comparable layer by layer
    ran_blocks, back_blocks = _blocks(ran), _blocks(back)
    assert ran_blocks.keys() == back_blocks.keys() and len(ran_blocks) == 2 * 4 + 1
    for name, (q, b) in ran_blocks.items():
        assert back_blocks[name][0] == q == qtype and torch.equal(back_blocks[name][1], b), name
    # transformers' reader dequantizes the file with the gguf package: gen's dequantized values, its own code
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    layer, mine = theirs.model.layers[1], back.layers[1]
    q_rows = 4 * 64
    assert torch.equal(layer.self_attn.q_proj.weight, mine.attn.wqkv.dequantized()[:q_rows])  # un-permuted alike
    assert torch.equal(layer.mlp.down_proj.weight, mine.mlp.w2.dequantized())
    assert torch.equal(theirs.lm_head.weight, back.lm_head.dequantized())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids) - theirs.eval()(ids).logits).abs().max().item() < 1e-4


def test_a_quantized_gguf_exports_its_blocks_unchanged(tok, tmp_path):
    export_gguf(gen_model(), tok, tmp_path / "a.gguf", "q4_k")
    loaded = load(tmp_path / "a.gguf")
    export_gguf(loaded.model, loaded.tokenizer, tmp_path / "b.gguf", "q4_k")
    a, b = GGUFFile(tmp_path / "a.gguf"), GGUFFile(tmp_path / "b.gguf")
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():  # Q/K rows re-permuted for llama.cpp: the very bytes read
        assert t.tensor_type == b.tensors[name].tensor_type and (t.data == b.tensors[name].data).all(), name
    # asked for another block type, the blocks the model holds are still written as they are (not re-quantized)
    result = export_gguf(loaded.model, loaded.tokenizer, tmp_path / "c.gguf", "q8_0")
    c = GGUFFile(tmp_path / "c.gguf")
    assert c.type_name("blk.0.ffn_down.weight") == "Q4_K" and any("Q4_K" in n for n in result.notes)


def test_q4_k_falls_back_to_q4_0_where_rows_are_not_super_blocks(tok, tmp_path):
    model = gen_model(d_model=64, d_ff=256, n_head=4, n_kv_head=2)  # rows of 64 (wqkv, w13) or 256 (w2)
    result = export_gguf(model, tok, tmp_path / "m.gguf", "q4_k")
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.type_name("blk.0.attn_q.weight") == "Q4_0" and f.type_name("blk.0.ffn_down.weight") == "Q4_K"
    assert any("not whole Q4_K blocks of 256" in n for n in result.notes)
    ran = optimize_for_decode(gen_model(d_model=64, d_ff=256), quantize="q4_k", native=False)
    assert ran.layers[0].attn.wqkv.qtype == "q4_0" and ran.layers[0].mlp.w2.qtype == "q4_k"


def test_cli_exports_q4_0_and_generate_runs_it(tok, tmp_path):
    model_dir = tmp_path / "model"
    save_model(model_dir, gen_model(), tok)
    out = runner.invoke(app, ["export", str(model_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf"),
                              "--type", "q4_0", "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    gen = runner.invoke(app, ["generate", "Hi", "--model", str(tmp_path / "m.gguf"), "--max-new-tokens", "2",
                              "--json"])  # fmt: skip
    assert gen.exit_code == 0, gen.output
    hf = runner.invoke(app, ["export", str(model_dir), "--to", "hf", "--out", str(tmp_path / "hf"), "--type", "q4_k"])
    assert hf.exit_code == 2 and "--type q4_k is for --to gguf" in hf.output


def test_cli_generate_quantize_q4_k_reports_the_blocks(tok, tmp_path):
    save_model(tmp_path / "model", gen_model(), tok)
    out = runner.invoke(app, ["generate", "Hi", "--model", str(tmp_path / "model"), "--quantize", "q4_k",
                              "--max-new-tokens", "2", "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    weights = json.loads(out.stdout)["stats"]["weights"]
    assert weights["attn qkv"]["types"] == {"q4_k": 2} and weights["lm head"]["types"] == {"q4_k": 1}
    assert weights["embedding"]["types"] == {"float32": 1}  # the embedding keeps its table
    assert weights["mlp out"]["bytes"] == 2 * 256 * (512 // 256 * 144)  # 2 layers × rows × super-blocks
    bad = runner.invoke(app, ["generate", "Hi", "--model", str(tmp_path / "model"), "--quantize", "q5_k"])
    assert bad.exit_code == 2 and "q4_k" in bad.output


@pytest.mark.parametrize("qtype", ["q5_0", "q5_1"])
def test_q5_blocks_round_trip_through_gguf_as_stored(qtype, tok, tmp_path):
    # what llama.cpp's Q4_K_M writes for rows that are not whole 256-blocks: gen reads and writes them unchanged
    export_gguf(gen_model(), tok, tmp_path / "a.gguf", qtype)
    a = GGUFFile(tmp_path / "a.gguf")
    assert a.type_name("blk.0.ffn_down.weight") == qtype.upper()
    loaded = load(tmp_path / "a.gguf")
    w2 = loaded.model.layers[0].mlp.w2
    assert w2.qtype == qtype and torch.equal(w2.blocks, torch.from_numpy(a.blocks("blk.0.ffn_down.weight")))
    export_gguf(loaded.model, loaded.tokenizer, tmp_path / "b.gguf", qtype)
    b = GGUFFile(tmp_path / "b.gguf")
    for name, t in a.tensors.items():
        assert t.tensor_type == b.tensors[name].tensor_type and (t.data == b.tensors[name].data).all(), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="a.gguf", dtype=torch.float32)
    assert torch.equal(theirs.model.layers[0].mlp.down_proj.weight, w2.dequantized())
