"""The native C decode step against the PyTorch model: same logits, same greedy tokens, same refusals."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import kernel_path, loaded_kernel, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_cli.cache.linear import KVCache
from gen_cli.errors import UsageError
from gen_cli.infer.generate import decode_step, generate, new_cache, prefill, run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.pages import HUGE_PAGE
from gen_cli.quant.linear import OneDNNLinear, mkldnn_ok

pytestmark = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
GREEDY = SamplingConfig(temperature=0.0)


def _unit_scale(model: Transformer) -> Transformer:
    """Matrices redrawn at unit scale (std 1/sqrt(fan_in), wqkv doubled; seeded): attention peaks and greedy
    picks are clear, where the training init (std 0.02) gives near-uniform attention that hides a wrong score."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2 if "wqkv" in name else 1) / math.sqrt(p.shape[1]))
    return model


def _models(
    quantize: str = "none", dtype: torch.dtype = torch.float32, unit: bool = False, **changes
) -> tuple[Transformer, Transformer]:
    """(the same seeded model through PyTorch's fast path, and through the native step); `unit`: `_unit_scale`d."""
    models = []
    for use_native in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(**changes)).eval().to(dtype)
        if unit:
            _unit_scale(model)
        models.append(optimize_for_decode(model, quantize, native=use_native))
    torch_model, native_model = models
    assert torch_model.native_decoder is None
    assert native_model.native_decoder is not None, build.native_status()
    return torch_model, native_model


def _step_logits(model: Transformer, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """fp32 logits (B, steps, V) of a prefill, then one decode step per remaining token of ids (B, T)."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], model.tok_emb.weight.dtype)
    with torch.inference_mode():
        prefill(model, ids[:, :prompt_len], cache)
        steps = [decode_step(model, ids[:, t : t + 1], cache).float() for t in range(prompt_len, ids.shape[1])]
        return torch.stack(steps, 1)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_equals_pytorch(pos, norm, kv, batch):
    torch_model, native_model = _models(pos_encoding=pos, norm=norm, n_kv_head=kv)
    ids = torch.randint(0, 300, (batch, 16))  # to the end of the 16-token context
    want, got = _step_logits(torch_model, ids, 3), _step_logits(native_model, ids, 3)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("prompt_len", [1, 7, 14])  # 14: one native step (at 15 the prefill picks the only token)
def test_native_greedy_equals_the_no_cache_oracle(threads, prompt_len, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # rows and heads split across threads
    # Untied: with a unit-scale embedding as the head every token would predict itself.
    torch_model, native_model = _models(n_kv_head=2, unit=True, tie_embeddings=False)
    prompt = torch.randint(0, 300, (2, prompt_len))
    n = 16 - prompt_len
    oracle = torch.stack(list(generate(torch_model, prompt, n, GREEDY, None)), 1)
    cache = new_cache(native_model, prompt, n)
    assert torch.equal(torch.stack(list(generate(native_model, prompt, n, GREEDY, cache)), 1), oracle)


@functools.cache
def _argmax_decoder():
    """One native step for every example (building the models each time was most of the test's time)."""
    return _models()[1].native_decoder


# Few distinct values, so rows are full of ties; infinities and NaN, which torch.argmax ranks highest.
LOGIT = st.sampled_from([-1.5, 0.0, 0.25, 2.0, float("inf"), float("-inf"), float("nan")])


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 3), vocab=st.integers(1, 200), data=st.data(), shared=st.booleans())
def test_native_argmax_picks_as_torch_does(rows, vocab, data, shared):
    values = data.draw(st.lists(LOGIT, min_size=rows * vocab, max_size=rows * vocab))
    logits = torch.tensor(values, dtype=torch.float32).view(rows, vocab)
    if shared:  # one prompt's logits expanded to every sample: rows 0 floats apart
        logits = logits[:1].expand(rows, vocab)
    ids = torch.full((rows, 5), -1)
    assert _argmax_decoder().argmax_into(logits, ids[:, 3])  # a column of an id buffer
    assert torch.equal(ids[:, 3], logits.argmax(-1))
    assert (ids[:, [0, 1, 2, 4]] == -1).all()  # nothing written beside the column


def test_native_argmax_leaves_what_it_cannot_take_to_torch():
    _, native_model = _models()
    pick = native_model.native_decoder.argmax_into
    out = torch.empty(2, dtype=torch.long)
    assert not pick(torch.randn(2, 8, dtype=torch.float64), out)
    assert not pick(torch.randn(8, 2).t(), out)  # vocabulary not contiguous
    assert not pick(torch.randn(2, 8), torch.empty(2, dtype=torch.int32))


@pytest.mark.parametrize(
    ("sampling", "in_c"),
    [(GREEDY, True), (SamplingConfig(temperature=0.0, repetition_penalty=1.3), False), (SamplingConfig(), False)],
)
def test_only_plain_greedy_picks_in_c(sampling, in_c, monkeypatch):
    torch_model, native_model = _models()
    calls = []
    real = native_model.native_decoder.argmax_into
    monkeypatch.setattr(native_model.native_decoder, "argmax_into", lambda *a: calls.append(1) or real(*a))
    prompt = torch.randint(0, 300, (2, 3))

    def run(model, n, stop=None):
        return generate(model, prompt, n, sampling, new_cache(model, prompt, n), _seeded(), stop_token_id=stop)

    stop = int(next(run(torch_model, 1))[0])  # row 0's first token
    want = torch.stack(list(run(torch_model, 8, stop)), 1)
    got = torch.stack(list(run(native_model, 8, stop)), 1)
    assert torch.equal(got, want) and (got[0] == stop).all()
    assert len(calls) == (8 if in_c else 0)


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_native_int8_matches_pytorch_int8():
    torch_model, native_model = _models("int8", n_kv_head=2)
    ids = torch.randint(0, 300, (2, 16))
    want, got = _step_logits(torch_model, ids, 4), _step_logits(native_model, ids, 4)
    # The same int8 weights; the native step also rounds each input to int16 (relative error ≤ 2^-16).
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_decode_path_is_reported_and_batch_limits_hold():
    _, native_model = _models()
    prompt = torch.randint(0, 300, (1, 4))
    assert run_generation(native_model, prompt, 4, GREEDY).stats.decode_path == "native"
    assert run_generation(native_model, prompt, 4, GREEDY, use_cache=False).stats.decode_path == "torch"
    big = KVCache(native_model.config, native.MAX_BATCH + 1, 8)
    assert not native_model.native_decoder.accepts(native.MAX_BATCH + 1, big)


def test_native_step_refuses_past_the_context():
    _, native_model = _models()
    cache = KVCache(native_model.config, 1, 32)  # a cache larger than the 16-token context
    cache.pos = 16
    with pytest.raises(UsageError, match="context length of 16"):
        decode_step(native_model, torch.tensor([[1]]), cache)


@pytest.mark.parametrize(("pos", "kv"), [("rope", 4), ("sinusoidal", 2), ("learned", 1)])
def test_native_bf16_reads_bf16_and_computes_in_fp32(pos, kv):
    """A bf16 model's step: bf16 weights and KV cache, fp32 activations and sums in between."""
    torch_bf16, native_bf16 = _models(dtype=torch.bfloat16, pos_encoding=pos, n_kv_head=kv)
    assert native_bf16.native_decoder.dtype == torch.bfloat16
    torch.manual_seed(0)  # the same weights rounded to bf16, computed in fp32 throughout
    rounded = optimize_for_decode(Transformer(tiny_config(pos_encoding=pos, n_kv_head=kv)).eval().bfloat16().float())
    ids = torch.randint(0, 300, (2, 16))
    want = _step_logits(rounded, ids, 3)
    got, torch_got = _step_logits(native_bf16, ids, 3), _step_logits(torch_bf16, ids, 3)
    # Only the KV cache (and PyTorch's bf16 prompt pass) is rounded, so the step stays within 1e-3 of the
    # fp32 product of the same weights, closer than PyTorch's bf16 path, which rounds every activation.
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert (got - want).abs().max() < (torch_got - want).abs().max()


def test_native_bf16_rounds_the_kv_cache_as_torch_does():
    _, native_bf16 = _models(dtype=torch.bfloat16)
    torch.manual_seed(0)
    rounded = Transformer(tiny_config()).eval().bfloat16().float()  # the same weights, computed in fp32
    ids = torch.randint(0, 300, (2, 4))
    caches = []
    for model, dtype in ((rounded, torch.float32), (native_bf16, torch.bfloat16)):
        cache = KVCache(model.config, 2, 4, dtype)
        with torch.inference_mode():
            prefill(model, ids[:, :3], cache)
            decode_step(model, ids[:, 3:], cache)
        caches.append(cache)
    # Layer 0's k and v at the new position depend only on its token: equal in fp32 up to summation
    # order, so rounding to nearest even agrees but for rare near-ties (truncating would miss half).
    for want, got in ((caches[0].k[0], caches[1].k[0]), (caches[0].v[0], caches[1].v[0])):
        assert (got[:, :, 3] != want[:, :, 3].bfloat16()).float().mean() < 0.05


def test_unsupported_models_keep_pytorch():
    torch.manual_seed(0)
    mixed = optimize_for_decode(Transformer(tiny_config()).to(torch.bfloat16).eval(), quantize="int8")
    assert mixed.native_decoder is None  # int8 matrices in a bf16 model
    assert "fp32 models (matrices fp32, int8 or GGML blocks) or all-bf16" in native.supports(mixed)


def test_without_a_compiler_generation_falls_back(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-gen")
    assert "FileNotFoundError" in build.native_status()
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(tiny_config()).eval())
    assert model.native_decoder is None
    stats = run_generation(model, torch.randint(0, 300, (1, 4)), 4, GREEDY).stats
    assert stats.decode_path == "torch" and stats.new_tokens == 4


@pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel")
def test_a_struct_layout_mismatch_is_refused_before_any_struct_is_filled(fresh_library, monkeypatch):
    from gen_cli.native import abi

    assert abi.bind(build.library()) is None  # this build and the mirrors agree
    build.library.cache_clear()
    real = abi._expected
    monkeypatch.setattr(abi, "_expected", lambda: [*real()[:5], real()[5] + 8, *real()[6:]])  # a field added
    assert build.native_status().startswith("the native library's struct layout")
    model = optimize_for_decode(Transformer(tiny_config()).eval())
    assert model.native_decoder is None  # PyTorch decodes instead


def test_a_library_without_an_abi_description_is_refused():
    from gen_cli.native import abi

    class Foreign:  # a shared object that is not gen's kernel: no gen_abi symbol
        pass

    assert "exports no ABI description" in abi.bind(Foreign())


def test_an_unwritable_cache_falls_back(fresh_library, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GEN_HOME", str(blocker))  # the kernel cannot be built under a file
    assert build.native_status().startswith("no native kernel")


def test_a_failing_compile_names_the_compiler(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("GEN_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "cc -DGEN_NO_SUCH_HEADER -include no_such_header_gen.h")
    assert build.native_status().startswith("cc failed")
    assert not list((tmp_path / "cache" / "kernels").glob("*.so*")), "a failed build leaves nothing behind"


def test_runs_started_at_once_build_the_kernel_once(tmp_path):
    # A fake compiler that logs each call and takes a second per object, so the two runs overlap; its
    # "library" does not load, which is fine: only how often it compiled is counted.
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake-cc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {shlex.quote(str(log))}\n'
        'case "$*" in *--version*) echo fake-cc 1; exit 0;; esac\n'
        'case "$*" in *" -c "*) sleep 1;; esac\n'
        'while [ "$#" -gt 1 ]; do [ "$1" = -o ] && echo stub > "$2"; shift; done\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "CC": str(fake), "GEN_HOME": str(tmp_path / "home")}
    code = "from gen_cli.native.build import native_status; print(native_status())"
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    statuses = [r.communicate(timeout=120)[0] for r in runs]
    assert all(s.startswith("no native kernel") for s in statuses), statuses  # the stub is not a library
    compiles = [line for line in log.read_text().splitlines() if " -c " in f" {line} "]
    assert len(compiles) == len(build.SOURCES), compiles  # one build's objects, not one per run


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for a plain x86-64 target")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3"])  # the plain C loops; AVX2 (fp32 K/V's 8-lane path)
@pytest.mark.parametrize(
    ("quantize", "dtype"), [("none", torch.float32), ("int8", torch.float32), ("none", torch.bfloat16)]
)
def test_the_portable_loops_equal_the_vector_paths(march, quantize, dtype, fresh_library, monkeypatch, kernel_builds):
    _, vector = _models(quantize, dtype, n_kv_head=2)  # the native step built for this CPU
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    _, portable = _models(quantize, dtype, n_kv_head=2)  # no AVX-512
    assert loaded_kernel() == kernel_path(kernel_builds)  # the build for that target, not this CPU's
    ids = torch.randint(0, 300, (2, 16))
    want, got = _step_logits(vector, ids, 4), _step_logits(portable, ids, 4)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # the same sums, in another order


def test_cli_native_and_no_native(model_dir):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    def path(*args: str) -> str:
        result = CliRunner().invoke(
            app, ["generate", "hi", "--model", str(model_dir), "--max-new-tokens", "4", "--json", *args]
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["stats"]["decode_path"]

    assert path() == "native"
    assert path("--no-native") == "torch"
    assert path("--quantize", "int8") == "native"  # int8 weights, fp32 activations
    assert path("--dtype", "bfloat16") == "native"
    mixed = ["--quantize", "int8", "--dtype", "bfloat16", "--stats"]
    stats = CliRunner().invoke(app, ["generate", "hi", "--model", str(model_dir), "--max-new-tokens", "2", *mixed])
    assert stats.exit_code == 0
    assert "native step unavailable: the native kernel runs fp32 models" in " ".join(stats.stderr.split())


def test_streamed_weights_move_to_huge_pages_unchanged():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_decode(model)
    head = model.lm_head.weight
    assert head is model.tok_emb.weight and head.data_ptr() % 64 == 0  # tied: moved once, both see it
    assert model.layers[0].attn.wqkv.weight.data_ptr() % HUGE_PAGE == 0  # the arena's first tensor
    fused = torch.cat([before["layers.0.mlp.w1.weight"], before["layers.0.mlp.w3.weight"]])
    assert torch.equal(model.layers[0].mlp.w13.weight, fused)
    assert torch.equal(head, before["tok_emb.weight"])


def test_a_model_moved_after_attaching_runs_in_pytorch():
    torch_model, native_model = _models()
    native_model.to(torch.bfloat16)  # the C structs still point at the fp32 weights, kept alive
    torch_model.to(torch.bfloat16)  # the same bf16 weights, never attached
    ids = torch.randint(0, 300, (2, 8))
    # Bit for bit PyTorch's bf16 steps, not the stale fp32 structs (whose logits differ by ~3e-3).
    assert torch.equal(_step_logits(native_model, ids, 3), _step_logits(torch_model, ids, 3))
    assert not native_model.native_decoder.accepts(1, KVCache(native_model.config, 1, 8, torch.bfloat16))


def test_native_steps_after_onednn_prompts_on_a_wide_model():
    """d_model 256 crosses the oneDNN threshold: prompts use prompt_gemm, steps the C kernel, same weights."""
    wide = {"d_model": 256, "d_ff": 512, "n_head": 4, "n_kv_head": 2}
    torch.manual_seed(0)
    plain = Transformer(tiny_config(**wide)).eval()
    torch.manual_seed(0)
    fast = optimize_for_decode(Transformer(tiny_config(**wide)).eval())
    assert fast.native_decoder is not None
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules()) == mkldnn_ok()
    ids = torch.randint(0, 300, (1, 16))
    with torch.inference_mode():
        want = plain(ids)[0, 12:]  # (4, V): positions 12..15 of a full forward
    got = _step_logits(fast, ids, 12)[0]  # a 12-token prompt (its k/v from the GEMM), then 4 native steps
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_the_build_key_covers_the_compilers_own_flags(monkeypatch):
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "cc 1.0\n", ""))
    assert build._build_key(["cc"]) != build._build_key(["cc", "-mno-avx512f"])  # same --version, another binary
    assert build._build_key(["cc"]) == build._build_key(["cc"])


def test_a_compiler_that_never_returns_is_given_up_on(fresh_library, monkeypatch, tmp_path):
    hang = tmp_path / "hang-cc"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setenv("GEN_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(hang))
    monkeypatch.setattr(build, "VERSION_TIMEOUT_S", 0.5)
    assert "did not answer within 0.5 s" in build.native_status()
    assert any("PyTorch path" in note for note in build.take_notes())
    build.library.cache_clear()
    hang.write_text('#!/bin/sh\ncase "$1" in --version) echo hang-cc 1;; *) exec sleep 60;; esac\n')
    monkeypatch.setattr(build, "BUILD_TIMEOUT_S", 0.5)
    assert "did not finish building the native kernel within 0.5 s" in build.native_status()
    build.take_notes()
