"""A fused matrix whose parts have different GGML types (a Q4_K_M file's Q4_K q/k and Q6_K v) keeps each part in
its own type: logits equal transformers' on the same file, the native step equals PyTorch on the same blocks,
and a decode step reads exactly the file's matrix bytes (plus one embedding row), per matrix class."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from conftest import tiny_config  # noqa: E402
from hf_builders import byte_level_tokenizer, random_hf_model, write_gguf  # noqa: E402
from test_native_blocks import _set_kernel, _simulated, _steps  # noqa: E402

from gen_cli.formats.gguf_file import GGUFFile  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.infer.optimize import fuse_mlp, optimize_for_decode  # noqa: E402
from gen_cli.lab.ceilings import weight_bytes_by_class, weight_bytes_per_token  # noqa: E402
from gen_cli.model.transformer import Transformer  # noqa: E402
from gen_cli.native import decoder as native  # noqa: E402
from gen_cli.native.block_matmul import use_block_kernel  # noqa: E402
from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear  # noqa: E402
from gen_cli.quant.block_stack import BlockStack, stack_rows  # noqa: E402
from gen_cli.quant.blocks import quantize  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)


def _q4_k_m(name: str) -> str:
    """As llama.cpp's Q4_K_M: v and down in Q6_K, the rest in Q4_K; here up in Q6_K too, so w13 is mixed."""
    return "Q6_K" if any(k in name for k in (".attn_v.", ".ffn_down.", ".ffn_up.")) else "Q4_K"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "q4_k_m.gguf"
    return write_gguf(random_hf_model("llama", **SHAPE), byte_level_tokenizer(), "llama", path, _q4_k_m)


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_parts_keep_their_types_and_logits_equal_transformers(mixed):
    loaded = load(mixed)
    model = loaded.model
    for layer in model.layers:
        assert isinstance(layer.attn.wqkv, BlockStack) and layer.attn.wqkv.qtypes == ["q4_k", "q6_k"]
        assert layer.mlp.w1.qtype == "q4_k" and layer.mlp.w3.qtype == "q6_k"
    assert not any("q/k/v" in k and "re-quantized" in k for k in loaded.details["copied at load"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(mixed.parent, gguf_file=mixed.name, dtype=torch.float32)
    with torch.no_grad():
        want = theirs.eval()(_ids()).logits
        torch.testing.assert_close(model(_ids()), want, rtol=0, atol=1e-4)
        optimize_for_decode(model, native=False)  # w13 fused: q4_k gate and q6_k up stay apart
        assert isinstance(model.layers[0].mlp.w13, BlockStack) and model.layers[0].mlp.w13.qtypes == ["q4_k", "q6_k"]
        torch.testing.assert_close(model(_ids()), want, rtol=0, atol=1e-4)


def test_a_decode_step_reads_the_files_matrix_bytes(mixed):
    f = GGUFFile(mixed)
    model = optimize_for_decode(load(mixed).model)  # the native layout where this machine builds the kernel
    by_class = weight_bytes_by_class(model)
    matrices = sum(f.blocks(n).nbytes for n in f.tensors if len(f.shape(n)) == 2 and n != "token_embd.weight")
    row = f.blocks("token_embd.weight").nbytes // f.shape("token_embd.weight")[0]
    assert weight_bytes_per_token(model) == matrices + row == sum(by_class.values())
    qkv = sum(f.blocks(f"blk.{i}.attn_{p}.weight").nbytes for i in range(2) for p in "qkv")
    mlp_in = sum(f.blocks(f"blk.{i}.ffn_{p}.weight").nbytes for i in range(2) for p in ("gate", "up"))
    assert by_class["attn qkv"] == qkv and by_class["mlp in"] == mlp_in and by_class["embedding"] == row


def _mixed_block_model() -> Transformer:
    """A tiny fp32 model of block matrices, its wqkv q4_k (q, k) + q6_k (v) and its w13 q8_0 + q5_0."""
    torch.manual_seed(0)
    config = tiny_config(d_model=256, d_ff=512, n_head=4, n_kv_head=2, tie_embeddings=True)
    model = Transformer(config).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))  # away from the activations' rounding ties (test_native_blocks)
    qk = (config.n_head + config.n_kv_head) * config.head_dim
    for block in model.layers:
        fuse_mlp(block.mlp)
        w, w13 = block.attn.wqkv.weight, block.mlp.w13.weight
        block.attn.wqkv = stack_rows([BlockLinear.from_weight(w[:qk], "q4_k"), BlockLinear.from_weight(w[qk:], "q6_k")])
        half = config.d_ff
        block.mlp.w13 = stack_rows(
            [BlockLinear.from_weight(w13[:half], "q8_0"), BlockLinear.from_weight(w13[half:], "q5_0")]
        )
        block.attn.wo = BlockLinear.from_weight(block.attn.wo.weight, "q4_k")
        block.mlp.w2 = BlockLinear.from_weight(block.mlp.w2.weight, "q6_k")
    model.tok_emb = BlockEmbedding(quantize(model.tok_emb.weight, "q8_0"), "q8_0", config.d_model)
    model.lm_head = model.tok_emb.tied_head()
    return model


@pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel")
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_on_parts_equals_pytorch(batch):
    ids = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(batch))
    oracle, fast = _mixed_block_model(), _mixed_block_model()
    _set_kernel(oracle, _simulated)  # the kernel's activation quantization, per part, in PyTorch
    assert native.NativeDecoder.attach(fast) is None
    assert use_block_kernel(fast) == 2 * (2 + 2 + 2) + 1  # the prompt through the same kernels: every part, the head
    layer = fast.native_decoder._layers[0]
    assert (layer.wqkv.rows, layer.wqkv_rest[0].rows, layer.wqkv_rest[1].rows) == (384, 128, 0)
    assert (layer.w13.rows, layer.w13_rest.rows) == (512, 512)
    want, got = _steps(oracle, ids, 4), _steps(fast, ids, 4)
    per_row = (got - want).abs().amax(-1) / want.abs().max()  # (B, steps)
    assert (per_row[:, 0] <= 1e-5).any(), per_row  # the same sums: equal to rounding until a tie flips
    assert per_row.max() <= 0.03, per_row


@pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel")
@pytest.mark.parametrize("act", ["fp32", "bf16"])
def test_native_step_on_parts_with_float_activations_writes_each_rows_own_columns(act):
    # Several rows, float activations: each part's product lands in its own columns of every row (a part once
    # wrote row b at b × its own rows, into the next row's q columns).
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(7))
    oracle, fast = _mixed_block_model(), _mixed_block_model()  # oracle: dequantized weights, fp32 activations
    assert native.NativeDecoder.attach(fast) is None
    fast.native_decoder.set_act(act)
    use_block_kernel(fast, act)
    want, got = _steps(oracle, ids, 4), _steps(fast, ids, 4)
    tol = 1e-4 if act == "fp32" else 0.02  # bf16: the activations rounded to 8 bits of mantissa
    assert (got - want).abs().max() <= tol * want.abs().max()


def test_stack_rows_joins_neighbours_of_one_type():
    w = torch.randn(96, 256)
    a, b, c = (BlockLinear.from_weight(w[i : i + 32], q) for i, q in ((0, "q4_k"), (32, "q4_k"), (64, "q6_k")))
    joined = stack_rows([a, b])
    assert isinstance(joined, BlockLinear) and torch.equal(joined.blocks, torch.cat([a.blocks, b.blocks]))
    stack = stack_rows([a, b, c])
    assert isinstance(stack, BlockStack) and stack.qtypes == ["q4_k", "q6_k"] and stack.out_features == 96
    x = torch.randn(3, 256)
    torch.testing.assert_close(stack(x), torch.cat([a(x), b(x), c(x)], -1))
    torch.testing.assert_close(stack.weight, torch.cat([a.dequantized(), b.dequantized(), c.dequantized()]))
    assert stack.weight_bytes == a.weight_bytes + b.weight_bytes + c.weight_bytes


def test_a_model_in_parts_exports_whole(mixed, tmp_path):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(mixed), "--to", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(mixed.parent, gguf_file=mixed.name, dtype=torch.float32)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(_ids()).logits, theirs.eval()(_ids()).logits, rtol=0, atol=1e-4)
