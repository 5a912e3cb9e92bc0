"""`eager` attention (scores materialized) and `fused` (SDPA) agree for every attention kind, mask, position
encoding and cache, forward and backward; fused runs PyTorch's flash kernel on CPU wherever gen asks it to."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.generate import new_cache
from gen_cli.model.attention import eager_attention
from gen_cli.model.transformer import Transformer, set_attention_impl
from gen_cli.native import decoder as native
from tests.conftest import tiny_config

KINDS = {"mha": 4, "gqa": 2, "mqa": 1}
POSITIONS = ("rope", "sinusoidal", "learned", "alibi")
FP32 = {"atol": 5e-5, "rtol": 1e-5}  # same products summed in another order: fp32 rounding (logits reach ~10)


def _model(pos: str, kv_heads: int, **changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(pos_encoding=pos, n_kv_head=kv_heads, context_length=32, **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # sharp attention: a wrong mask or bias shows in the logits
    return model


def _both(model: Transformer, run) -> tuple[torch.Tensor, torch.Tensor]:
    out = {}
    for impl in ("fused", "eager"):
        set_attention_impl(model, impl)
        out[impl] = run(model)
    set_attention_impl(model, "fused")
    return out["fused"], out["eager"]


def _ids(T: int, B: int = 2) -> torch.Tensor:
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_cache_forward_agrees(pos, kind):
    model, ids = _model(pos, KINDS[kind]), _ids(20)
    with torch.no_grad():
        fused, eager = _both(model, lambda m: m(ids))
    torch.testing.assert_close(eager, fused, **FP32)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_cached_prefix_then_shifted_chunk_then_steps_agree(pos, kind):
    model, ids = _model(pos, KINDS[kind]), _ids(16)

    def run(m):
        cache = new_cache(m, ids[:, :6], 10)
        # A prefix, a chunk after it (the causal mask shifted by the prefix), then single tokens.
        parts = [m(ids[:, :6], cache), m(ids[:, 6:11], cache)] + [m(ids[:, t : t + 1], cache) for t in range(11, 16)]
        return torch.cat(parts, dim=1)  # (B, 16, vocab)

    with torch.no_grad():
        fused, eager = _both(model, run)
        torch.testing.assert_close(eager, fused, **FP32)
        torch.testing.assert_close(eager, model(ids), **FP32)  # and both are the model


@pytest.mark.parametrize("pos", ("rope", "alibi"))
@pytest.mark.parametrize("kind", ("mha", "gqa"))
def test_window_cache_with_sinks_agrees(pos, kind):
    # Positions past the context run through re-assigned frames (RoPE's two frames for sink keys).
    model, ids = _model(pos, KINDS[kind]), _ids(12)

    def run(m):
        cache = new_cache(m, ids, 30, spec=CacheSpec(window=5, sinks=2))
        parts = [m(ids, cache)]
        token = ids[:, -1:]
        for _ in range(30):  # past the window and past the 32-token context
            logits = m(token, cache)
            parts.append(logits)
            token = logits[:, -1:].argmax(-1)  # (B, 1)
        return torch.cat(parts, dim=1)

    with torch.no_grad():
        fused, eager = _both(model, run)
    torch.testing.assert_close(eager, fused, **FP32)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("kind", ("mha", "mqa"))
def test_training_gradients_agree(pos, kind):
    model, ids = _model(pos, KINDS[kind]), _ids(24)
    model.train()

    def grads(m):
        m.zero_grad()
        logits = m(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    fused, eager = _both(model, grads)
    assert fused.abs().max() > 0
    torch.testing.assert_close(eager, fused, atol=1e-5, rtol=1e-4)


def test_sliding_window_model_and_bf16_agree():
    model, ids = _model("rope", 2, sliding_window=5), _ids(20)
    with torch.no_grad():
        fused, eager = _both(model, lambda m: m(ids))
        torch.testing.assert_close(eager, fused, **FP32)
        model = model.to(torch.bfloat16)
        fused16, eager16 = _both(model, lambda m: m(ids).float())
    # bf16 keeps 8 bits of mantissa (logits here reach ~7: steps of 1/32): eager's rounding error against
    # fp32 stays within 1.5× the fused kernel's own.
    assert (eager16 - fused).abs().max() <= 1.5 * (fused16 - fused).abs().max()


def test_eager_matches_the_written_out_softmax_with_an_additive_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 4, 5, 8, generator=g),
        torch.randn(1, 2, 7, 8, generator=g),
        torch.randn(1, 2, 7, 8, generator=g),
    )
    bias = torch.randn(4, 5, 7, generator=g)
    bias[:, 0, 3:] = float("-inf")
    want = ((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5 + bias).softmax(-1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(eager_attention(q, k, v, bias, False), want, atol=1e-6, rtol=0)


def _sdpa_kernels(model: Transformer, ids: torch.Tensor, cache=None) -> set[str]:
    with torch.no_grad(), profile() as prof:
        model(ids, cache)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("pos", ("rope", "alibi"))
def test_fused_runs_the_cpu_flash_kernel_and_eager_no_sdpa(pos):
    # A 3-d additive (ALiBi) mask would send SDPA to its math path, which materializes the scores.
    model, ids = _model(pos, 2), _ids(12)
    flash = {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    assert _sdpa_kernels(model, ids) == flash
    cache = new_cache(model, ids[:, :4], 8)
    model(ids[:, :4], cache)
    assert _sdpa_kernels(model, ids[:, 4:], cache) == flash  # the shifted causal mask too
    set_attention_impl(model, "eager")
    assert _sdpa_kernels(model, ids) == set()


def test_unknown_impl_is_refused():
    with pytest.raises(UsageError, match="eager"):
        set_attention_impl(_model("rope", 4), "flash3")


@pytest.fixture
def home(tmp_path, monkeypatch):
    from tests.test_train import write_corpus

    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    write_corpus(tmp_path / "corpus.txt")
    return tmp_path


def test_train_flag_threads_the_impl_and_both_train_alike(home, monkeypatch):
    import gen_cli.model.attention as attention
    from gen_cli.train.loop import train
    from tests.test_train import tiny_args

    calls = []
    monkeypatch.setattr(attention, "eager_attention", lambda *a: calls.append(1) or eager_attention(*a))
    losses, eager_calls = {}, {}
    for impl in ("fused", "eager"):
        args = tiny_args(home, steps=4, attn_impl=impl, pos="alibi", out=str(home / impl))
        losses[impl] = train(args).loss
        eager_calls[impl], calls[:] = len(calls), []
    assert eager_calls["fused"] == 0 and eager_calls["eager"] >= 4 * 2  # every step, every layer
    assert losses["eager"] == pytest.approx(losses["fused"], abs=1e-4)
    with pytest.raises(UsageError, match="attn_impl"):
        train(tiny_args(home, attn_impl="flash"))
    # gen eval's path: the same held-out loss either way, and eager really ran
    from gen_cli.train.evaluate import evaluate_model

    scored = {impl: evaluate_model(home / "eager", device="cpu", attn_impl=impl).loss for impl in ("fused", "eager")}
    assert len(calls) > 0 and scored["eager"] == pytest.approx(scored["fused"], abs=1e-5)


def test_compare_axis_runs_both_and_checks_eager_against_the_fused_oracle():
    from gen_cli.lab import compare
    from gen_cli.lab.report import columns

    specs = compare.expand_grid(tiny_config(), attention=["mha"], kv_heads=[], pos=["rope"], kv_cache=["off", "on"],
                                prompt_len=[6], gen_len=[4], batch=[1], dtype=["float32"], repeats=1, warmup=0,
                                threads=1, attn_impl=["fused", "eager"])  # fmt: skip
    assert [(s.kv_cache, s.attn_impl) for s in specs] == [(False, "fused"), (False, "eager"), (True, "fused"),
                                                          (True, "eager")]  # fmt: skip
    rows, _ = compare.run_grid(specs, in_process=True)
    eager_off = rows[1]
    assert eager_off["attn_impl"] == "eager" and eager_off["greedy_match"] is True
    assert eager_off["max_logit_diff"] < 1e-4
    assert rows[3]["speedup_vs_no_cache"] is not None  # its cache-off twin is the eager row
    assert "attention impl" in [head for head, _ in columns(rows)]
    with pytest.raises(UsageError, match="attn_impl"):
        compare.expand_grid(tiny_config(), attention=["mha"], kv_heads=[], pos=["rope"], kv_cache=["off"],
                            prompt_len=[4], gen_len=[4], batch=[1], dtype=["float32"], attn_impl=["flash"])  # fmt: skip


def test_bench_attention_cli_measures_each_point_in_its_own_process():
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    runner = CliRunner()
    # One prompt length: each point is a process of its own (seconds each); fused prompts under
    # KERNEL_MIN_QUERIES keep SDPA, which tests/test_prompt_attention.py checks in process.
    args = ["bench", "attention", "--preset", "tiny", "--lengths", "130", "--train-lengths", "24", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    points = {(p["phase"], p["impl"], p["tokens"]): p for p in data["points"]}
    prefill = {("prefill", impl, 130) for impl in ("eager", "fused", "sdpa")}
    assert set(points) == prefill | {("train", "eager", 24), ("train", "fused", 24)}  # sdpa: prefill only
    flash = "_scaled_dot_product_flash_attention_for_cpu"
    # gen's kernel from KERNEL_MIN_QUERIES queries (where it builds); PyTorch's as `sdpa`
    assert points["prefill", "fused", 130]["kernel"] == (
        "gen_causal_attention (gen's C kernel)" if native.native_status() == "ready" else flash
    )
    assert points["prefill", "sdpa", 130]["kernel"] == flash and "no SDPA" in points["prefill", "eager", 130]["kernel"]
    assert points["prefill", "eager", 130]["score_bytes"] == 1 * 4 * 130 * 130 * 4  # tiny: 4 heads, fp32
    assert len({p["seconds"][0] for p in data["points"]}) == 5 and all(p["threads"] == 1 for p in data["points"])
    summary = {(r["phase"], r["tokens"]): r for r in data["summary"]}
    assert set(summary) == {("prefill", 130), ("train", 24)}
    assert summary["prefill", 130]["sdpa_over_fused"] > 0 and "sdpa_over_fused" not in summary["train", 24]
    bad = runner.invoke(app, [*args, "--attn-impl", "flash"])
    assert bad.exit_code == 2 and "flash" in bad.output


def test_generate_flag_gives_the_same_greedy_text_either_way():
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    runner = CliRunner()
    args = ["generate", "The for statement", "-n", "12", "--temperature", "0", "--no-native", "--json"]
    texts = {}
    for impl in ("fused", "eager"):
        result = runner.invoke(app, [*args, "--attn-impl", impl])
        assert result.exit_code == 0, result.output
        texts[impl] = json.loads(result.stdout)["text"]
    assert texts["fused"] == texts["eager"] and texts["fused"]
    bad = runner.invoke(app, [*args, "--attn-impl", "flash"])
    assert bad.exit_code == 2 and "flash" in bad.output
