"""Export: tiny gen models written as HF folders and GGUF files load in transformers with the same logits,
come back through gen's own loaders with identical weights, and inexpressible models are refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_builders import byte_level_tokenizer  # noqa: E402

from gen_cli.cli import app  # noqa: E402
from gen_cli.errors import GenError  # noqa: E402
from gen_cli.formats.checkpoint import save_model  # noqa: E402
from gen_cli.formats.export import HF_FILES, export_hf  # noqa: E402
from gen_cli.formats.export_gguf import export_gguf  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.model.config import ModelConfig  # noqa: E402
from gen_cli.model.transformer import Transformer  # noqa: E402
from gen_cli.quant.block_linear import dequantize_modules  # noqa: E402
from gen_cli.text.tokenizer import configure, encode  # noqa: E402

runner = CliRunner()
TOL = 1e-4
TEXT = "The quick brown fox 2024, 日本 🙂  spaces\n\tand tabs. def f(x): return x ** 2"
BASE = dict(n_layer=2, d_model=64, d_ff=96, context_length=64, norm_eps=1e-5)
SHAPES = {
    # GQA (4 query / 2 KV heads), tied embeddings, a vocabulary larger than the tokenizer's
    "llama": dict(vocab_size=320, n_head=4, n_kv_head=2, tie_embeddings=True),
    # untied, biases everywhere, Llama 3 RoPE scaling, explicit head size
    "llama3": dict(vocab_size=300, n_head=4, n_kv_head=1, tie_embeddings=False, qkv_bias=True, attn_out_bias=True,
                   mlp_bias=True, head_dim=32, rope_base=500000.0,
                   rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_context_length=16)),
    "qwen2": dict(vocab_size=300, n_head=4, n_kv_head=2, qkv_bias=True),
    "qwen3": dict(vocab_size=300, n_head=4, n_kv_head=2, qk_norm=True, head_dim=32, tie_embeddings=False),
    "gpt2": dict(vocab_size=300, n_head=4, n_kv_head=4, pos_encoding="learned", norm="layernorm", mlp="gelu_tanh",
                 qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
}  # fmt: skip
HF_ARCH = {"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return configure(byte_level_tokenizer())  # byte-level BPE with GPT-2's split, as gen trains them


def gen_model(kind: str, seed: int = 0, **changes) -> Transformer:
    """A gen model of `kind` with weights large enough, and norms and biases far enough from 1 and 0,
    that a wrong layout changes the logits."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **SHAPES[kind], **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(batch))  # (B, T)


def _same_weights(a: Transformer, b: Transformer) -> float:
    """The largest |difference| over every tensor; the names must agree."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_hf_export_loads_in_transformers_with_the_same_logits(kind, tok, tmp_path):
    model = gen_model(kind)
    result = export_hf(model, tok, tmp_path / "hf")
    assert result.architecture == HF_ARCH[kind]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        delta = (model(ids) - theirs(ids).logits).abs().max().item()
    assert delta < TOL, delta


@pytest.mark.parametrize("kind", list(SHAPES))
def test_hf_export_round_trips_through_gen_with_identical_weights(kind, tok, tmp_path):
    model = gen_model(kind)
    export_hf(model, tok, tmp_path / "hf")
    back = load(tmp_path / "hf")
    assert back.model.config == model.config
    assert _same_weights(model, back.model) == 0.0
    assert back.stop_ids == (tok.token_to_id("<|endoftext|>"),)


def test_auto_tokenizer_from_the_export_encodes_like_gen(tok, tmp_path):
    export_hf(gen_model("llama"), tok, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, "12345   日本 🙂", " leading space", "x\n\n\ny", "", "a<|endoftext|>b"):
        assert theirs(text)["input_ids"] == encode(tok, text), text
        assert theirs.decode(encode(tok, text)) == text
    assert theirs.eos_token == "<|endoftext|>"


def test_bf16_hf_export_keeps_bf16(tok, tmp_path):
    model = gen_model("llama")
    export_hf(model, tok, tmp_path / "hf", dtype="bf16")
    back = load(tmp_path / "hf").model
    assert back.tok_emb.weight.dtype == torch.bfloat16
    assert _same_weights(model.to(torch.bfloat16), back) == 0.0


@pytest.mark.parametrize("kind", list(SHAPES))
def test_gguf_f32_round_trips_through_gen_with_identical_weights(kind, tok, tmp_path):
    model = gen_model(kind)
    result = export_gguf(model, tok, tmp_path / "m.gguf")
    back = load(tmp_path / "m.gguf")
    assert result.type == "f32" and back.details["architecture"] == result.architecture
    if kind == "llama3":  # stored as llama.cpp does: per-frequency divisors of the plain RoPE frequencies
        assert back.model.config.rope_scaling["type"] == "freq_factors"
        assert (back.model.rope_cos - model.rope_cos).abs().max().item() < 1e-6
        assert back.model.config.replace(rope_scaling=None) == model.config.replace(rope_scaling=None)
    else:
        assert back.model.config == model.config
    assert _same_weights(model, back.model) == 0.0  # Q/K permuted on export, unpermuted on load: exact
    assert encode(back.tokenizer, TEXT) == encode(tok, TEXT)
    with torch.no_grad():
        assert (back.model(_ids()) - model(_ids())).abs().max().item() < TOL


@pytest.mark.parametrize("qtype", ["f16", "bf16"])
def test_gguf_half_types_hold_the_rounded_weights(tok, tmp_path, qtype):
    model = gen_model("llama")
    export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    back = load(tmp_path / "m.gguf").model
    half = {"f16": torch.float16, "bf16": torch.bfloat16}[qtype]
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}  # as llama.cpp keeps them
    # gen runs a model in one dtype, the matrices' (f16 then as f32 on the CPU): every tensor is the rounded one
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name].float(), t.to(half).float()), name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gguf_q8_0_is_within_the_quantization_error(kind, tok, tmp_path):
    model = gen_model(kind)
    result = export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    back = dequantize_modules(load(tmp_path / "m.gguf").model)  # gen holds the blocks; compare their values
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} - {"F32"} == {"Q8_0"}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in model.state_dict().items():
        got = back.state_dict()[name]
        if t.dim() == 2 and name != "pos_emb.weight":  # position embeddings stay F32, as llama.cpp's converter
            # Q8_0 blocks run along a row, and the llama Q/K permutation moves whole rows: the file holds exactly
            # the gguf package's own quantization of gen's matrix.
            want = gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q8), q8)
            assert torch.equal(got, torch.from_numpy(want)), name
            # one scale max|block| / 127 per 32 values (stored as f16): half a step, plus the scale's own rounding
            assert (got - t).abs().max().item() <= t.abs().max().item() * (1 / 254 + 2**-11), name
        else:
            assert torch.equal(got, t), name
    with torch.no_grad():
        logits = model(_ids())
        delta = (back(_ids()) - logits).abs().max().item()
    assert delta < 0.05 * logits.abs().max().item(), delta
    assert result.bytes == (tmp_path / "m.gguf").stat().st_size


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_transformers_loads_the_exported_gguf(kind, qtype, tok, tmp_path):
    # transformers' GGUF reader assumes GPT-2's own d_ff = 4 d_model and 1024 positions: give it those
    model = gen_model(kind, **({"d_ff": 256, "context_length": 1024} if kind == "gpt2" else {}))
    export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = model if qtype == "f32" else load(tmp_path / "m.gguf").model  # q8_0: the same dequantized weights
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - theirs.eval()(ids).logits).abs().max().item() < TOL


def test_gguf_metadata_is_what_llama_cpp_reads(tok, tmp_path):
    export_gguf(gen_model("llama"), tok, tmp_path / "m.gguf", "q8_0")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"]) == (64, 64, 2)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.feed_forward_length"] == 96 and f["llama.rope.freq_base"] == 10000.0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert f["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert f["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert "output.weight" not in {t.name for t in r.tensors}  # tied: llama.cpp reuses token_embd


def test_inexpressible_mixes_are_refused_with_the_reason(tok, tmp_path):
    cases = {
        "sinusoidal": ModelConfig(**BASE, vocab_size=300, n_head=4, n_kv_head=4, pos_encoding="sinusoidal"),
        "norm layernorm with RoPE": ModelConfig(**BASE, vocab_size=300, n_head=4, n_kv_head=4, norm="layernorm"),
        "GPT-2 is MHA": ModelConfig(**{**BASE, **SHAPES["gpt2"], "n_kv_head": 2}),
        "ALiBi positions": ModelConfig(**BASE, vocab_size=300, n_head=4, n_kv_head=4, pos_encoding="alibi"),
        "RoPE scaling linear": ModelConfig(
            **BASE, vocab_size=300, n_head=4, n_kv_head=4, rope_scaling={"type": "linear", "factor": 2.0}
        ),
    }
    for fragment, config in cases.items():
        for export in (export_hf, export_gguf):
            with pytest.raises(GenError, match=fragment):
                export(Transformer(config), tok, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def _gen_dir(tmp_path, kind: str, tok, **changes):
    model = gen_model(kind, vocab_size=tok.get_vocab_size(), **changes)  # a gen directory's vocab is its tokenizer's
    save_model(tmp_path / kind, model, tok)
    return tmp_path / kind, model


def _one_line_error(args: list[str], *fragments: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output and result.stdout == ""
    assert len(lines) <= 2 and all(f in " ".join(lines) for f in fragments), lines


def test_cli_exports_a_gen_model_directory(tok, tmp_path):
    directory, model = _gen_dir(tmp_path, "gpt2", tok)
    result = runner.invoke(app, ["export", str(directory), "--to", "gguf", "--out", str(tmp_path / "g.gguf"),
                                 "--type", "q8_0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == "gpt2" and data["type"] == "q8_0" and data["format"] == "gguf"
    result = runner.invoke(app, ["export", str(directory), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0 and "GPT2LMHeadModel" in result.stderr, result.output
    assert _same_weights(model, load(tmp_path / "hf").model) == 0.0
    # an imported model exports too: the HF folder just written, back out as GGUF
    result = runner.invoke(app, ["export", str(tmp_path / "hf"), "--to", "gguf", "--out", str(tmp_path / "b.gguf")])
    assert result.exit_code == 0, result.output
    assert _same_weights(model, load(tmp_path / "b.gguf").model) == 0.0


def test_cli_refuses_sinusoidal_and_writes_nothing(tok, tmp_path):
    directory, _ = _gen_dir(tmp_path, "llama", tok, pos_encoding="sinusoidal")
    for to, out in (("hf", "hf"), ("gguf", "m.gguf")):
        _one_line_error(["export", str(directory), "--to", to, "--out", str(tmp_path / "o" / out)], "sinusoidal")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no temporary left behind either


def test_cli_refuses_an_existing_output_without_force(tok, tmp_path):
    directory, model = _gen_dir(tmp_path, "llama", tok)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    (tmp_path / "m.gguf").write_bytes(b"old")
    _one_line_error(["export", str(directory), "--to", "hf", "--out", str(tmp_path / "hf")], "exists", "--force")
    _one_line_error(["export", str(directory), "--to", "gguf", "--out", str(tmp_path / "m.gguf")], "--force")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine" and (tmp_path / "m.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "llama", "m.gguf"]
    for to, out in (("hf", "hf"), ("gguf", "m.gguf")):
        result = runner.invoke(app, ["export", str(directory), "--to", to, "--out", str(tmp_path / out), "--force"])
        assert result.exit_code == 0, result.output
        assert _same_weights(model, load(tmp_path / out).model) == 0.0
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"  # --force replaces only the exported files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "llama", "m.gguf"]


def test_force_replaces_only_the_exported_files(tok, tmp_path):
    directory, model = _gen_dir(tmp_path, "llama", tok)
    out = tmp_path / "d"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    (out / "config.json").write_text("{}")  # an exported file: replaced
    result = runner.invoke(app, ["export", str(directory), "--to", "hf", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep" and (out / "sub").is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "sub", *HF_FILES])  # no temporary left
    assert _same_weights(model, load(out).model) == 0.0


def test_exporting_onto_the_source_is_refused_even_with_force(tok, tmp_path):
    directory, _ = _gen_dir(tmp_path, "llama", tok)
    (directory / "train_state.safetensors").write_bytes(b"state")
    (directory / "metrics.jsonl").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    _one_line_error(["export", str(directory), "--to", "hf", "--out", str(directory), "--force"], "being exported")
    _one_line_error(["export", str(directory), "--to", "gguf", "--out", str(directory / "model.safetensors"),
                     "--force"], "being exported")  # fmt: skip
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    runner.invoke(app, ["export", str(directory), "--to", "gguf", "--out", str(tmp_path / "m.gguf")])
    _one_line_error(["export", str(tmp_path / "m.gguf"), "--to", "gguf", "--out", str(tmp_path / "m.gguf"),
                     "--force"], "being exported")  # fmt: skip
    # a GGUF file beside the folder's own files may be written into it
    result = runner.invoke(app, ["export", str(directory), "--to", "gguf", "--out", str(directory / "m.gguf")])
    assert result.exit_code == 0, result.output


def test_streamed_export_writes_what_a_dict_writer_would(tok, tmp_path):
    """The safetensors streamed one tensor at a time read back through safetensors' own reader unchanged."""
    from safetensors.torch import load_file

    model = gen_model("gpt2")  # transposed Conv1D weights: non-contiguous parts
    export_hf(model, tok, tmp_path / "hf", dtype="bf16")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert _same_weights(model.to(torch.bfloat16), load(tmp_path / "hf").model) == 0.0


def test_cli_bad_flags_are_one_line(tok, tmp_path):
    directory, _ = _gen_dir(tmp_path, "llama", tok)
    _one_line_error(["export", str(directory), "--to", "onnx", "--out", str(tmp_path / "x")], "--to", "hf", "gguf")
    _one_line_error(["export", str(directory), "--to", "hf", "--out", str(tmp_path / "x"), "--type", "q8_0"], "q8_0")
    _one_line_error(["export", str(tmp_path / "nope"), "--to", "hf", "--out", str(tmp_path / "x")], "nope")
    under_a_file = directory / "config.json" / "out"
    for to in ("hf", "gguf"):
        _one_line_error(["export", str(directory), "--to", to, "--out", str(under_a_file)], "cannot write")
    assert not (tmp_path / "x").exists()


def test_untied_gpt2_with_exact_gelu_exports_to_hf_only(tok, tmp_path):
    model = gen_model("gpt2", tie_embeddings=False, mlp="gelu")
    export_hf(model, tok, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (model(_ids()) - theirs(_ids()).logits).abs().max().item() < TOL
    assert _same_weights(model, load(tmp_path / "hf").model) == 0.0
    with pytest.raises(GenError, match="MLP gelu"):  # llama.cpp's GPT-2 has the tanh GELU only
        export_gguf(model, tok, tmp_path / "m.gguf")


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tok, tmp_path):
    model = gen_model("llama", d_ff=80)  # ffn_down's rows hold 80 values: not whole blocks of 32
    result = export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert "2 tensor(s) stored as F16" in result.notes[0]


def test_stop_ids_and_chat_template_travel_with_the_export(tok, tmp_path):
    template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    model = gen_model("qwen2")
    export_hf(model, tok, tmp_path / "hf", stop_ids=[0, 5], chat_template=template)
    export_gguf(model, tok, tmp_path / "m.gguf", stop_ids=[0, 5], chat_template=template)
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        back = load(path)
        assert back.stop_ids == (0, 5) and back.chat_template == template, path
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "split_special_tokens" not in config  # a chat template's specials must stay special


def test_releasing_pages_never_changes_a_tensor_in_memory_or_in_a_map(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gen_cli.pages import PageReleaser

    anonymous = torch.randn(1 << 20)
    save_file({"w": anonymous}, str(tmp_path / "w.safetensors"))
    mapped = safe_open(str(tmp_path / "w.safetensors"), "pt").get_tensor("w")
    keep = anonymous.clone()
    pages = PageReleaser()
    for t in (anonymous, mapped):
        pages.release(t)
        assert torch.equal(t, keep)  # a mapped page dropped is read again from the file
    pages.release_files(tmp_path)
    assert torch.equal(mapped, keep)


def test_an_optimised_model_is_refused_before_anything_is_written(tok, tmp_path):
    from gen_cli.infer.optimize import optimize_for_decode

    model = optimize_for_decode(gen_model("llama"), quantize="int8", native=False)
    with pytest.raises(GenError, match="fused or optimised"):
        export_hf(model, tok, tmp_path / "new" / "hf")
    with pytest.raises(GenError, match="fused or optimised"):
        export_gguf(model, tok, tmp_path / "new" / "m.gguf")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("to", ["hf", "gguf-q8_0", "gguf-f32", "blocks-q8_0"])
def test_consume_writes_the_same_bytes_and_frees_the_model(tok, tmp_path, to):
    """The command's mode: each tensor of the model is emptied once written; the file is unchanged."""
    source = tmp_path / "src" / "m.gguf"
    export_gguf(gen_model("llama3"), tok, source, "q8_0")

    def model():  # untied, biases, RoPE factors; "blocks": loaded back from Q8_0, holding its blocks
        return load(source).model if to.startswith("blocks") else gen_model("llama3")

    def export(m, out, consume):
        if to == "hf":
            export_hf(m, tok, out, consume=consume)
            return (out / "model.safetensors").read_bytes()
        export_gguf(m, tok, out / "m.gguf", to.split("-")[1], consume=consume)
        return (out / "m.gguf").read_bytes()

    kept = export(model(), tmp_path / "a", consume=False)
    consumed = model()
    assert export(consumed, tmp_path / "b", consume=True) == kept
    left = [n for n, t in consumed.state_dict().items() if t.numel() and not n.startswith("rope_")]
    assert left == [], left
