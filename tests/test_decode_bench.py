"""The decode benchmark library on the tiny preset: rows, byte accounting, HF parity (when installed)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gen_cli.errors import UsageError
from gen_cli.lab.ceilings import weight_bytes_by_class, weight_bytes_per_token
from gen_cli.lab.decode_bench import (
    DEFAULT_GPU_MODES,
    DEFAULT_MODES,
    MODES,
    bench_shape,
    build_gen,
    kv_bytes_read,
)
from gen_cli.lab.transformers_peer import hf_available
from gen_cli.model.transformer import Transformer
from gen_cli.native.build import native_status


def test_bytes_per_token_follow_the_stored_dtype():
    config = tiny_config()
    fp32 = weight_bytes_per_token(build_gen(config, "fp32", torch.device("cpu")))
    int8 = weight_bytes_per_token(build_gen(config, "int8", torch.device("cpu")))
    linear = sum(p.numel() for n, p in Transformer(config).named_parameters() if "norm" not in n and "emb" not in n)
    linear += config.vocab_size * config.d_model  # the tied head is read once per token
    assert fp32 == linear * 4 + config.d_model * 4
    by_class = weight_bytes_by_class(build_gen(config, "fp32", torch.device("cpu")))
    assert sum(by_class.values()) == fp32 and by_class["embedding"] == config.d_model * 4
    assert set(by_class) == {"embedding", "attn qkv", "attn out", "mlp in", "mlp out", "lm head"}
    assert by_class["lm head"] == config.vocab_size * config.d_model * 4
    qkv_rows = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    assert by_class["attn qkv"] == config.n_layer * qkv_rows * config.d_model * 4
    assert int8 < fp32 / 3
    assert kv_bytes_read(config, torch.float32, 8, 4) == config.kv_bytes_per_token(4) * 10


def test_one_run_each_has_no_spread_to_judge_a_ratio_by():
    if not hf_available():
        pytest.skip("the ratio to transformers needs transformers")
    rows = bench_shape("tiny", ("fp32",), 1, 4, torch.device("cpu"), True, 1e10)
    assert all(r.vs_hf_note for r in rows if r.mode != "transformers")


def test_bench_shape_rows_and_deviation():
    runs = []
    rows = bench_shape(
        "tiny", ("fp32", "int8"), 3, 4, torch.device("cpu"), hf_available(), 1e10, on_run=lambda: runs.append(1)
    )
    assert len(runs) == 3 * len(rows)  # one progress tick per timed run
    assert all({"others_cores", "busy"} <= set(r.machine_load) for r in rows)
    by_mode = {r.mode: r for r in rows}
    assert {"fp32", "int8"} <= by_mode.keys()
    fp32 = by_mode["fp32"]
    assert fp32.max_logit_diff < 1e-4 and fp32.greedy_agree == 4
    for r in rows:  # three real runs each: the reported rates are their middle values
        assert len(r.decode_runs) == len(r.prefill_runs) == 3
        assert r.decode_tok_s == sorted(r.decode_runs)[1] and r.prefill_tok_s == sorted(r.prefill_runs)[1]
    assert fp32.ceiling_tok_s == pytest.approx(1e10 / fp32.bytes_per_token)
    if hf_available():
        hf = by_mode["transformers"]
        assert hf.max_logit_diff < 1e-4 and hf.greedy_agree == 4  # same weights, same math
        assert fp32.vs_hf == pytest.approx(fp32.decode_tok_s / hf.decode_tok_s)


@pytest.mark.skipif(native_status() != "ready", reason="needs the native step (a C compiler)")
def test_bf16_decodes_natively_and_closer_to_fp32_than_through_pytorch():
    rows = {r.mode: r for r in bench_shape("tiny", ("bf16", "bf16-torch"), 1, 8, torch.device("cpu"), False, 1e10)}
    native, pytorch = rows["bf16"], rows["bf16-torch"]
    assert (native.path, pytorch.path) == ("native", "torch")
    assert native.bytes_per_token == pytorch.bytes_per_token  # both stream bf16 weights
    # The native step sums in fp32 between the bf16 reads; PyTorch rounds every activation to bf16.
    assert 0 < native.max_logit_diff < pytorch.max_logit_diff < 0.05


def test_default_modes_exist_and_the_cli_help_names_them():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    assert set(DEFAULT_MODES) | set(DEFAULT_GPU_MODES) <= MODES.keys()
    # The command spells its defaults out (importing decode_bench would import torch at CLI start).
    help_text = "".join(CliRunner().invoke(app, ["bench", "decode", "--help"], env={"COLUMNS": "400"}).output.split())
    assert ",".join(DEFAULT_MODES) in help_text and ",".join(DEFAULT_GPU_MODES) in help_text


def test_the_c_reference_applies_only_to_its_shapes_and_settings(monkeypatch):
    from gen_cli.lab.decode_bench import vs_c_reference

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert vs_c_reference("small", 425.0, cpu, 256) == pytest.approx(0.5)
    assert vs_c_reference("base", 210.0, cpu, 256) == pytest.approx(2.0)
    assert vs_c_reference("tiny", 1e4, cpu, 256) is None
    assert vs_c_reference("small", 425.0, cpu, 128) is None
    assert vs_c_reference("small", 425.0, torch.device("cuda"), 256) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert vs_c_reference("small", 425.0, cpu, 256) is None


def test_unknown_mode_is_refused():
    from gen_cli.lab.decode_bench import bench_decode

    with pytest.raises(UsageError, match="unknown mode"):
        bench_decode(("tiny",), ("fp64",))


def test_prefill_flops_follow_the_matmul_count():
    from gen_cli.lab.ceilings import prefill_flops_per_token

    config = tiny_config()
    model = Transformer(config)
    c = config
    per_layer = c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.d_model
    per_layer += 3 * c.d_model * c.d_ff  # SwiGLU: gate, up, down
    expected = 2 * c.n_layer * per_layer + 2 * c.n_layer * c.n_head * c.head_dim * 9 + 2 * c.vocab_size * c.d_model / 8
    assert prefill_flops_per_token(model, 8) == pytest.approx(expected)


def test_peak_flops_and_context_report_both_dtypes():
    from gen_cli.lab.ceilings import measure_peak_flops

    assert measure_peak_flops(torch.device("cpu"), torch.float32, n=64) > 0
    rows = bench_shape("tiny", ("fp32",), 2, 4, torch.device("cpu"), False, 1e10, prompt_len=8, profile=True)
    (row,) = rows
    assert row.prefill_prompt == 8 and len(row.prefill_runs) == 2 and row.prefill_flops_per_token > 0
    assert row.peak_dtype == "fp32" and row.peak_gflops > 0
    (bf16,) = bench_shape("tiny", ("bf16-torch",), 1, 4, torch.device("cpu"), False, 1e10, prompt_len=8)
    assert bf16.peak_dtype == "bf16"  # a bf16 prefill is measured against the bf16 GEMM rate
    assert row.extra["profile"]["steps"] == 3


def test_blended_peak_is_the_whole_over_the_parts_times():
    from gen_cli.lab.ceilings import blended_peak

    peaks = {"int8": 900.0, "fp32": 100.0}
    # 90 ops at 900/s and 10 at 100/s take 0.1 s each: 100 ops in 0.2 s
    assert blended_peak({"int8": 90.0, "fp32": 10.0}, peaks) == pytest.approx(500.0)
    assert blended_peak({"int8x2": 45.0}, peaks) == pytest.approx(450.0)  # two int8 rows per row: half the rate
    assert blended_peak({"bf16": 1.0}, peaks) == 0.0  # a kind not measured: no ceiling, rather than a wrong one


def test_int8_peak_is_timed_on_integer_products():
    from gen_cli.lab.ceilings import measure_peak_flops

    assert measure_peak_flops(torch.device("cpu"), torch.int8, n=64) > 0


@pytest.mark.skipif(native_status() != "ready", reason="needs the compiled kernel")
@pytest.mark.parametrize("in_lanes", [True, False])
def test_a_block_prefill_is_measured_against_what_its_products_compute_in(in_lanes, monkeypatch):
    import gen_cli.native.block_matmul as bm
    from gen_cli.infer.optimize import set_act
    from gen_cli.lab.ceilings import prefill_flops_by_kind, prefill_flops_per_token

    monkeypatch.setattr(bm, "prompt_in_lanes", lambda lib, layer: in_lanes)
    config = tiny_config()
    model = build_gen(config, "q8_0", torch.device("cpu"))
    c, prompt = config, bm.TILE_MIN_TOKENS
    per_layer = c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.d_model
    blocks = 2 * c.n_layer * (per_layer + 3 * c.d_model * c.d_ff)  # the layers' matrices, two ops a weight
    total = prefill_flops_per_token(Transformer(config), prompt)  # counted on float weights, as the bench does
    tiles = "bf16" if bm.tile_dtype() == torch.bfloat16 else "fp32"
    mix = prefill_flops_by_kind(model, total, prompt)
    assert sum(mix.values()) == pytest.approx(total)
    assert mix.get("int8" if in_lanes else tiles, 0.0) >= blocks
    assert mix["fp32"] == pytest.approx(total - blocks) if in_lanes or tiles == "bf16" else mix == {"fp32": total}
    # a few tokens go to the integer kernel whatever the layout; fp32 activations multiply in fp32
    assert prefill_flops_by_kind(model, total, 8)["int8"] == pytest.approx(blocks)
    set_act(model, "fp32")
    assert prefill_flops_by_kind(model, total, prompt) == {"fp32": pytest.approx(total)}
    set_act(model, "int8x2")
    assert prefill_flops_by_kind(model, total, prompt).get("int8x2", 0.0) == (pytest.approx(blocks) if in_lanes else 0)


@pytest.mark.skipif(native_status() != "ready", reason="needs the compiled kernel")
def test_a_block_mode_row_names_its_int8_peak():
    (row,) = bench_shape("tiny", ("q8_0",), 1, 4, torch.device("cpu"), False, 1e10, prompt_len=8)
    assert row.peak_dtype.startswith("int8 ") and "fp32" in row.peak_dtype  # "int8 NN% + fp32 NN%"
    assert set(row.extra["peaks_gflops"]) == {"int8", "fp32"} and row.peak_gflops > 0


def test_between_runs_after_each_round_of_repeats():
    events = []
    bench_shape("tiny", ("fp32", "fp32-torch"), 2, 4, torch.device("cpu"), False, 1e10,
                on_run=lambda: events.append("gen"), between=lambda r: events.append(f"peer{r}"))  # fmt: skip
    assert events == ["gen", "gen", "peer0", "gen", "gen", "peer1"]


def test_block_modes_read_their_blocks_and_deviate_a_little():
    from gen_cli.infer.optimize import QUANTIZE_MODES
    from gen_cli.lab.decode_bench import checked_modes

    assert {"q8_0", "q4_0", "q4_1", "q4_k"} <= MODES.keys()
    modes = tuple(m for m in ("q8_0", "q4_0", "q4_1", "q4_k") if m in QUANTIZE_MODES)
    for m in {"q8_0", "q4_0", "q4_1", "q4_k"} - set(modes):
        with pytest.raises(UsageError, match="no such weight format"):
            checked_modes((m,), 4, torch.device("cpu"))
    from gen_cli.model.config import load_preset

    config = load_preset("tiny")
    rows = {r.mode: r for r in bench_shape("tiny", ("fp32", *modes), 1, 4, torch.device("cpu"), False, 1e10)}
    fp32 = rows["fp32"].bytes_per_token
    bits = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.5}  # bits per weight of each block format
    for m in modes:
        # every matrix in blocks (the tied head too), one embedding row, and the same fp32 KV cache
        kv = kv_bytes_read(config, torch.float32, 8, 4)
        weights = (fp32 - kv - 4 * config.d_model) / 4
        expected = weights * bits[m] / 8 + config.d_model * bits[m] / 8 + kv
        assert rows[m].bytes_per_token == pytest.approx(expected, rel=0.02), m
        assert 0 < rows[m].max_logit_diff < 0.5, m


def test_dash_o_is_not_the_format_and_counts_are_refused_before_any_run():
    from typer.testing import CliRunner

    from gen_cli.cli import app

    runner = CliRunner()
    short = runner.invoke(app, ["bench", "decode", "-o", "json"])
    assert short.exit_code == 2 and "No such option: -o" in short.output  # -o is --out everywhere; no file here
    for args, message in ((["-n", "1"], "--max-new-tokens must be at least 2, got 1"),
                          (["-r", "0"], "--repeats must be at least 1, got 0"),
                          (["-p", "0"], "--prompt-len must be at least 1, got 0")):  # fmt: skip
        result = runner.invoke(app, ["bench", "decode", *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
