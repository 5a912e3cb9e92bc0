"""Block weights' activation precision (--act int8|bf16|fp32): the float-activation dot products of blocks_float.h
against dequantize-then-fp32, in the few-token kernel, the native step and a prompt's tiles; the flag in the CLI.

fp32 activations multiply the blocks' exact values, so a product equals dequantize-then-fp32 to fp32 rounding
(1e-5 of Σ|w x|). bf16 activations are x rounded to bf16 (relative error ≤ 2⁻⁹) times the exact weights: the product
equals dequantize-then-fp32 applied to the rounded x, to fp32 rounding. int8 keeps test_native_blocks' bound.
"""

from __future__ import annotations

import json
import platform

import pytest
import torch
import torch.nn.functional as F
from test_native_blocks import (
    QTYPES,
    _block_model,
    _bound,
    _group,
    _random_blocks,
    _reference,
    _steps,
)
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.infer.optimize import activations, set_act
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.block_matmul import block_matmul, use_block_kernel
from gen_cli.quant.block_linear import BlockLinear
from gen_cli.quant.blocks import quantize

pytestmark = pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel")
ACTS = ("int8", "int8x2", "bf16", "fp32")


def _rounded(x: torch.Tensor, act: str) -> torch.Tensor:
    """The activations a float mode multiplies: x itself, or x rounded to bf16 (round to nearest even)."""
    return x.bfloat16().double() if act == "bf16" else x.double()


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, qtype: str, act: str) -> None:
    """`got` (n, rows) within the stated tolerance of x Wᵀ for precision `act`."""
    if act in ("int8", "int8x2"):
        bound = _bound(w, x, qtype, terms=2 if act == "int8x2" else 1)
        assert ((got.double() - x.double() @ w.T).abs() <= bound).all(), (got.double() - x.double() @ w.T).abs().max()
        return
    want = _rounded(x, act) @ w.T
    tol = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((got.double() - want).abs() <= tol).all(), (got.double() - want).abs().max()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("n", "blocks_per_row"), [(1, 1), (3, 5), (5, 16)])  # odd counts: the four chains' tail
def test_few_token_products_equal_dequantize_then_fp32(qtype, act, n, blocks_per_row):
    cols = blocks_per_row * _group(qtype)
    torch.manual_seed(n)
    blocks = _random_blocks(qtype, 37, cols, seed=n)
    x = torch.randn(n, cols) * torch.rand(1, cols) * 3
    _check(block_matmul(x, BlockLinear(blocks, qtype, cols), act), x, _reference(blocks, qtype, cols), qtype, act)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("act", ["fp32", "int8x2"])
def test_a_prompts_tiles_take_fp32_in_fp32_and_int8x2_modes(qtype, act):
    """A long prompt (the GEMM on dequantized row tiles) multiplies fp32 tiles in fp32 mode, not bf16 ones; int8x2
    too, unless the integer kernel takes the prompt in lanes (Q6_K on AVX-512 VNNI), there on twice the rows."""
    cols = 512
    layer = BlockLinear(quantize(torch.randn(40, cols), qtype), qtype, cols)
    x = torch.randn(48, cols)  # ≥ TILE_MIN_TOKENS: the tiled GEMM
    w = _reference(layer.blocks, qtype, cols)
    got, want = block_matmul(x, layer, act).double(), x.double() @ w.T
    tol = _bound(w, x, qtype, terms=2) if act == "int8x2" else 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((got - want).abs() <= tol).all()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_int8x2_takes_a_wide_output_a_band_of_rows_at_a_time(qtype):
    """40 activation rows (80 int8 rows) against 26,224 weight rows: the products' 8 MiB scratch holds 26,208 of
    them, so the last 16 go in a second band. Every row within int8x2's bound, and each band's rows the same bits
    as their 16-row matrix alone (the band's weights and outputs found at its offset). q4_k: interleaved."""
    from test_native_batch import _matmul

    from gen_cli.quant.blocks import interleave

    rows, cols, first = 26224, 256, 26208
    stored = quantize(torch.randn(rows, cols), qtype)
    blocks, native_type = (interleave(stored, qtype), qtype + "x16") if qtype == "q4_k" else (stored, qtype)
    x = torch.randn(40, cols)
    got = _matmul(x, blocks, native_type, rows, act="int8x2")
    _check(got, x, _reference(stored, qtype, cols), qtype, "int8x2")
    for r0 in (0, first - 16, first):  # the first band's ends, the second band
        alone = _matmul(x, blocks[r0 : r0 + 16].contiguous(), native_type, 16, act="int8x2")
        assert torch.equal(alone, got[:, r0 : r0 + 16]), r0


def _plain_fp32(x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
    return F.linear(x.float(), layer.dequantized())


def _bf16_inputs(x: torch.Tensor, layer: BlockLinear) -> torch.Tensor:
    return F.linear(x.float().bfloat16().float(), layer.dequantized())


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("act", ["fp32", "int8x2", "bf16"])
def test_native_step_logits_equal_pytorch_on_dequantized_weights(qtype, act):
    """The native step (and the few-token prompt kernel) in fp32 mode against PyTorch on the dequantized weights:
    fp32 rounding apart, the same logits. int8x2 within 1e-4 of the logits' scale (measured 2-3e-5, int8 alone
    5-8e-3). bf16 mode against PyTorch with each matrix input rounded to bf16: the same until the two fp32 paths
    round an input to different sides of a bf16 tie (that element moves by 2⁻⁸ of itself, the logits by far less
    than 1%)."""
    ids = torch.randint(0, 300, (2, 12))
    oracle, fast = _block_model(qtype), _block_model(qtype)
    for m in oracle.modules():
        if isinstance(m, BlockLinear):
            m.kernel = _bf16_inputs if act == "bf16" else _plain_fp32
    assert native.NativeDecoder.attach(fast) is None
    use_block_kernel(fast)
    set_act(fast, act)
    assert activations(fast) == act
    want, got = _steps(oracle, ids, 4), _steps(fast, ids, 4)
    scale = want.abs().max()
    assert (got - want).abs().max() <= (1e-2 if act == "bf16" else 1e-4) * scale


def test_the_precision_switches_both_ways_and_refuses_unknown_names():
    model = _block_model("q4_0")
    native.NativeDecoder.attach(model)
    use_block_kernel(model)
    ids = torch.randint(0, 300, (1, 8))
    first = _steps(model, ids, 3)
    set_act(model, "fp32")
    assert not torch.equal(_steps(model, ids, 3), first)  # int8 activations round, fp32 ones do not
    set_act(model, "int8")
    assert torch.equal(_steps(model, ids, 3), first)
    from gen_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown activation precision 'fp8'; choose int8, int8x2, bf16, fp32"):
        set_act(model, "fp8")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])  # AVX2, then no vector ISA (portable C)
def test_the_avx2_and_portable_float_products_equal_the_native_ones(march, fresh_library, monkeypatch, kernel_builds):
    x = torch.randn(3, 512)
    layers = {q: BlockLinear(_random_blocks(q, 37, 512, seed=2), q, 512) for q in QTYPES}
    want = {(q, a): block_matmul(x, layer, a) for q, layer in layers.items() for a in ("bf16", "fp32")}
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    for (q, a), expected in want.items():
        got, w = block_matmul(x, layers[q], a), _reference(layers[q].blocks, q, 512)
        tol = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6  # the same products, summed in another order
        assert ((got - expected).double().abs() <= tol).all(), (q, a)
        _check(got, x, w, q, a)
        _check(block_matmul(x, layers[q], "int8x2"), x, w, q, "int8x2")  # these builds' integer kernels, twice


def test_act_quality_measures_against_fp32_activations():
    from gen_cli.lab.act_quality import act_quality

    model = _block_model("q4_0")
    native.NativeDecoder.attach(model)
    use_block_kernel(model)
    ids = torch.randint(0, 300, (1, 12))
    figures = {q.act: q for q in act_quality(model, ids, ["int8", "fp32"], greedy_tokens=6)}
    assert figures["fp32"].kl_mean == 0 and figures["fp32"].top1_agreement == 1 and figures["fp32"].greedy_agree == 6
    assert figures["int8"].kl_mean > 0 and figures["int8"].positions == 11
    assert activations(model) == "int8"  # the model's own precision is back


runner = CliRunner()


def test_the_flag_shows_in_stats_and_json(model_dir):
    args = ["generate", "The", "--model", str(model_dir), "--device", "cpu", "-n", "3", "--quantize", "q8_0"]
    for act in ("fp32", "int8x2"):
        result = runner.invoke(app, [*args, "--act", act, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["stats"]["activations"] == act
    result = runner.invoke(app, [*args, "--act", "bf16", "--stats"])
    assert result.exit_code == 0, result.output
    assert "activations      bf16 in block weights' products" in result.stderr
    plain = runner.invoke(app, ["generate", "The", "--model", str(model_dir), "--device", "cpu", "-n", "2", "--json"])
    assert json.loads(plain.stdout)["stats"]["activations"] is None  # no block weights: nothing to say


def test_an_unknown_precision_is_one_clear_error(model_dir):
    result = runner.invoke(app, ["generate", "The", "--model", str(model_dir), "--act", "fp16"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown activation precision 'fp16'; choose int8, int8x2, bf16, fp32" in lines[0]


def test_bench_modes_take_a_precision_only_on_block_weights():
    from gen_cli.errors import UsageError
    from gen_cli.lab.decode_bench import checked_modes, with_acts

    modes = with_acts(("fp32", "q4_0", "file"), ("int8", "fp32"))
    assert modes == ("fp32", "q4_0@int8", "q4_0@fp32", "file@int8", "file@fp32")
    assert with_acts(("q4_0", "file"), ("int8", "fp32"), file_blocks=False) == ("q4_0@int8", "q4_0@fp32", "file")
    cpu = torch.device("cpu")
    assert checked_modes(("q8_0@bf16",), 4, cpu) == ("q8_0@bf16",)
    with pytest.raises(UsageError, match="applies to block weights"):
        checked_modes(("fp32@int8",), 4, cpu)
    with pytest.raises(UsageError, match="unknown activation precision"):
        checked_modes(("q8_0@fp16",), 4, cpu)


def test_bench_decode_reports_each_precision_against_fp32_activations(model_dir):
    from gen_cli.lab.model_bench import bench_model_decode

    rows, _ = bench_model_decode(model_dir, ("q8_0",), 1, 4, "cpu", prompt_len=8, acts=("int8", "fp32"))
    by_mode = {r.mode: r for r in rows}
    assert set(by_mode) == {"q8_0@int8", "q8_0@fp32"}
    fp32, int8 = by_mode["q8_0@fp32"].extra["act_quality"], by_mode["q8_0@int8"].extra["act_quality"]
    assert fp32["kl_mean"] == 0 and fp32["top1_agreement"] == 1 and fp32["positions"] > 10
    assert int8["kl_mean"] > 0  # real text through the model's own tokenizer: the rounding shows


def test_bench_runs_a_files_own_blocks_in_each_precision(tmp_path, model_dir):
    from gen_cli.infer.optimize import activations
    from gen_cli.lab.model_bench import build_mode

    path = tmp_path / "m.gguf"
    result = runner.invoke(
        app, ["export", "--model", str(model_dir), "--to", "gguf", "--type", "q8_0", "-o", str(path)]
    )
    assert result.exit_code == 0, result.output
    model = build_mode(None, "file@bf16", torch.device("cpu"), path)  # the file as stored, not a dequantized copy
    assert activations(model) == "bf16"


def test_without_the_kernel_the_blocks_multiply_in_the_models_dtype():
    from gen_cli.infer.optimize import optimize_for_decode

    torch.manual_seed(0)
    model = optimize_for_decode(_block_model("q8_0"), native=False, act="int8")  # PyTorch: blocks dequantized per call
    assert activations(model) == "fp32"
    assert activations(model.to(torch.bfloat16)) == "bf16"
