"""The native step reading bf16/int8/int4 K/V: same stored bytes as KVSide.write, same logits and greedy
tokens as the PyTorch path with the same cache kinds, and the CLI routing such caches to it."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gen_cli.cache.kinds import KVSide
from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.generate import decode_step, generate, new_cache, prefill, run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer
from gen_cli.native import build

pytestmark = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
GREEDY = SamplingConfig(temperature=0.0)
PAIRS = list(itertools.product(("fp32", "bf16", "int8", "int4"), repeat=2))
# head_dim 32 and 64 (int4 needs whole groups of 32), GQA: two query heads per KV head.
SHAPES = {
    32: {"d_model": 64, "n_head": 2, "n_kv_head": 1, "context_length": 64},
    64: {"d_model": 256, "n_head": 4, "n_kv_head": 2, "d_ff": 128, "context_length": 64},
}
# Relative to the largest logit. Both paths dequantize the same stored values and differ only in the
# order of fp32 sums: typically 1e-6 apart (measured), fp32 caches always within TOL. A quantized cache can
# also hold a value that sat on a rounding boundary, which the two paths' k/v (equal within fp32 rounding)
# round one step apart: seen up to 4e-5 here, hence TOL_QUANT. Identical inputs quantize to identical
# bytes (test_native_writes_the_bytes_kvside_writes).
TOL, TOL_QUANT = 2e-5, 2e-4


def _tol(*kinds: str) -> float:
    return TOL if set(kinds) == {"fp32"} else TOL_QUANT


def _models(**changes) -> tuple[Transformer, Transformer]:
    """(the same seeded model through PyTorch, and through the native step)."""
    models = []
    for use_native in (False, True):
        torch.manual_seed(0)
        models.append(optimize_for_decode(Transformer(tiny_config(**changes)).eval(), native=use_native))
    assert models[1].native_decoder is not None, build.native_status()
    return models[0], models[1]


def _steps(model: Transformer, ids: torch.Tensor, prompt_len: int, kinds: tuple[str, str]) -> torch.Tensor:
    """fp32 logits (B, steps, V): PyTorch prefills ids[:, :prompt_len], then one decode step per token."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], k_kind=kinds[0], v_kind=kinds[1])
    assert model.native_decoder is None or model.native_decoder.accepts(ids.shape[0], cache)
    with torch.inference_mode():
        prefill(model, ids[:, :prompt_len], cache)
        return torch.stack([decode_step(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])], 1)


@pytest.mark.parametrize("hd", sorted(SHAPES))
@pytest.mark.parametrize(("k_kind", "v_kind"), PAIRS)
def test_native_quantized_kv_equals_pytorch(hd, k_kind, v_kind):
    torch_model, native_model = _models(**SHAPES[hd])
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    want = _steps(torch_model, ids, 5, (k_kind, v_kind))
    got = _steps(native_model, ids, 5, (k_kind, v_kind))
    assert (got - want).abs().max() <= _tol(k_kind, v_kind) * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize(
    "shape",
    [
        {"d_model": 192, "n_head": 3, "n_kv_head": 1},  # head_dim 64, three query heads a KV head
        {"d_model": 384, "n_head": 6, "n_kv_head": 1},  # six: taken four, then two
        {"d_model": 256, "n_head": 2, "n_kv_head": 2},  # head_dim 128
        {"d_model": 192, "n_head": 2, "n_kv_head": 1},  # head_dim 96: the copy with run-time loops
    ],
)
@pytest.mark.parametrize(
    ("k_kind", "v_kind"), [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int8"), ("fp32", "int4")]
)
def test_every_head_grouping_and_size(shape, k_kind, v_kind):
    torch_model, native_model = _models(**shape, d_ff=128, context_length=64)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(6))
    want = _steps(torch_model, ids, 5, (k_kind, v_kind))
    got = _steps(native_model, ids, 5, (k_kind, v_kind))
    assert (got - want).abs().max() <= _tol(k_kind, v_kind) * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize(
    "shape",
    [
        {"d_model": 64, "n_head": 4, "n_kv_head": 2},  # head_dim 16
        {"d_model": 96, "n_head": 2, "n_kv_head": 1},  # head_dim 48
    ],
)
@pytest.mark.parametrize(("k_kind", "v_kind"), [("int8", "int8"), ("int8", "fp32")])
def test_int8_k_at_head_sizes_that_end_in_half_a_vnni_step(shape, k_kind, v_kind):
    """With AVX-512 VNNI, int8 K is dotted 32 values a step: a head of 16 (mod 32) values ends in half a step,
    whose last 16 values count and whose next token's bytes do not."""
    torch_model, native_model = _models(**shape, d_ff=128, context_length=64)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(6))
    want = _steps(torch_model, ids, 5, (k_kind, v_kind))
    got = _steps(native_model, ids, 5, (k_kind, v_kind))
    assert (got - want).abs().max() <= _tol(k_kind, v_kind) * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("k_kind", "v_kind"), [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"), ("int8", "int4")]
)
def test_long_contexts_split_into_chunks_and_merge(threads, k_kind, v_kind, monkeypatch):
    """Past 256 positions each KV head's tokens are split into chunks across threads, then merged."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch_model, native_model = _models(**{**SHAPES[64], "context_length": 1100})
    ids = torch.randint(0, 300, (1, 1030), generator=torch.Generator().manual_seed(2))
    want = _steps(torch_model, ids, 1027, (k_kind, v_kind))
    got = _steps(native_model, ids, 1027, (k_kind, v_kind))
    assert (got - want).abs().max() <= _tol(k_kind, v_kind) * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("hd", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_native_writes_the_bytes_kvside_writes(hd, kind):
    """One layer, so each new token's k/v depends on the token alone, not on earlier attention: the
    fp32 values the native step stores in an fp32 cache, quantized by KVSide.write, must be exactly the
    bytes (values, scales, zero points) it stores in a bf16/int8/int4 cache."""
    _, native_model = _models(**{**SHAPES[hd], "n_layer": 1})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    plain = KVCache(native_model.config, 2, 24)
    quant = KVCache(native_model.config, 2, 24, k_kind=kind, v_kind=kind)
    with torch.inference_mode():
        for cache in (plain, quant):
            prefill(native_model, ids[:, :4], cache)
            for t in range(4, 24):
                decode_step(native_model, ids[:, t : t + 1], cache)
    for values, stored in ((plain.k_sides[0], quant.k_sides[0]), (plain.v_sides[0], quant.v_sides[0])):
        oracle = KVSide(kind, tuple(values.data.shape), torch.float32, "cpu")
        oracle.write(4, values.data[:, :, 4:24])
        for want, got in zip(oracle.tensors, stored.tensors, strict=True):
            assert torch.equal(got[:, :, 4:24], want[:, :, 4:24])


@pytest.mark.parametrize(
    "kinds", [("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"), ("int8", "int4"), ("int4", "fp32")]
)
def test_native_greedy_tokens_equal_pytorch_over_32_steps(kinds):
    torch_model, native_model = _models(**SHAPES[32])
    prompt = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(4))
    runs = []
    for model in (torch_model, native_model):
        cache = new_cache(model, prompt, 32, spec=CacheSpec(*kinds))
        assert (model.native_decoder is not None) == (model is native_model)
        runs.append(torch.stack(list(generate(model, prompt, 32, GREEDY, cache)), 1))
    assert runs[0].shape == (2, 32) and torch.equal(runs[1], runs[0])
    stats = run_generation(native_model, prompt, 4, GREEDY, spec=CacheSpec(*kinds)).stats
    assert stats.decode_path == "native" and stats.decode_path_reason == ""


def test_what_the_kernel_does_not_read_goes_to_pytorch():
    _, native_model = _models(**SHAPES[32])
    native = native_model.native_decoder

    ring = CacheSpec(window=6, sinks=2).allocate(native_model.config, 1, 8, torch.float32, "cpu")
    assert not native.accepts(1, ring)  # un-rotated keys in a ring: not the layout the kernel reads
    assert "reads the linear KV cache layout; this cache is fp32/fp32, window 6 + 2 sinks" in native.refusal(1, ring)
    fp16 = KVCache(native_model.config, 1, 8, k_kind="fp16", v_kind="int8")
    assert not native.accepts(1, fp16) and "K fp16, V int8" in native.refusal(1, fp16)
    torch.manual_seed(0)
    bf16 = optimize_for_decode(Transformer(tiny_config(**SHAPES[32])).eval().bfloat16())
    assert bf16.native_decoder is not None
    assert bf16.native_decoder.accepts(1, KVCache(bf16.config, 1, 8, torch.bfloat16))
    int8 = KVCache(bf16.config, 1, 8, torch.bfloat16, k_kind="int8", v_kind="int8")
    assert not bf16.native_decoder.accepts(1, int8)  # a bf16 model reads only its plain bf16 cache


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for other x86-64 targets")
@pytest.mark.parametrize(
    "target",
    ["x86-64-v2", "skylake-avx512"],  # no AVX-512: the plain C loops; AVX-512 without VNNI: K dequantized to fp32
)
def test_the_portable_loops_equal_the_vector_paths(target, monkeypatch, kernel_builds):
    if target != "x86-64-v2" and not {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX-512 build")
    _, vector = _models(**SHAPES[32])
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={target}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    try:
        _, portable = _models(**SHAPES[32])
        for kinds in (("int8", "int4"), ("int4", "int8"), ("bf16", "fp32")):
            want, got = _steps(vector, ids, 5, kinds), _steps(portable, ids, 5, kinds)
            assert (got - want).abs().max() <= _tol(*kinds) * want.abs().max()
    finally:
        build.library.cache_clear()


def test_cli_kv_dtype_decodes_natively(model_dir):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    def run(*args: str):
        result = CliRunner().invoke(app, ["generate", "hi", "--model", str(model_dir), "--max-new-tokens", "4", *args])
        assert result.exit_code == 0, result.output
        return result

    # The saved tiny model has head_dim 8: int8 fits, int4 (groups of 32) does not.
    stats = json.loads(run("--kv-dtype", "int8", "--json").stdout)["stats"]
    assert stats["decode_path"] == "native" and stats["kv_dtype_k"] == stats["kv_dtype_v"] == "int8"
    assert json.loads(run("--kv-dtype-k", "int8", "--kv-dtype-v", "fp32", "--json").stdout)["stats"]["decode_path"] == (
        "native"
    )
    text = " ".join(run("--kv-dtype", "int8", "--stats").stderr.split())
    assert "decode path native" in text and "PyTorch decodes" not in text
    text = " ".join(run("--kv-dtype", "fp16", "--stats").stderr.split())
    assert "decode path torch" in text and "PyTorch decodes: the native step reads fp32, bf16, int8 or int4" in text
    assert json.loads(run("--kv-dtype", "bf16", "--json").stdout)["stats"]["decode_path"] == "native"
