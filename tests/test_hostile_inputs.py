"""Hostile files and absurd values: each gives one clear line and an exit code, never a traceback or a
huge allocation (size attacks run under an address-space limit). Run folders and caches: test_hostile_runs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_kernel
from hostile import REPO, cli, copy_model, edit_config, one_line, refused, rewrite_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# Model directories from outside: checked against the weights header before anything is built


CONFIG_ATTACKS = {
    "n_layer": ({"n_layer": 1_000_000}, r"n_layer 1000000 is above gen's limit of 1,024; set GEN_NO_SIZE_LIMITS=1"),
    "d_model": ({"d_model": 10**9}, r"d_model 1000000000 is above gen's limit"),
    "context": ({"context_length": 10**12}, r"context_length 1000000000000 is above gen's limit"),
    "layers-in-bounds": ({"n_layer": 1000}, r"weights do not match config.json: missing layers\.\d+\."),
    "tie-yes": ({"tie_embeddings": "yes"}, r"tie_embeddings must be true or false, got 'yes'"),
    "rope-inf": ({"rope_base": float("inf")}, r"rope_base must be a positive finite number, got inf"),
    "norm-list": ({"norm": ["rmsnorm"]}, r"norm must be a string"),
    "huge-file": (
        {"padding": "x" * (2 << 20)},
        r"config\.json: [\d,]+ bytes is too large for a JSON object of model settings",
    ),
}


@pytest.mark.parametrize("attack", CONFIG_ATTACKS)
def test_hostile_config_json_is_refused_in_one_line(model_dir, tmp_path, attack):
    changes, pattern = CONFIG_ATTACKS[attack]
    folder = copy_model(model_dir, tmp_path)
    edit_config(folder, **changes)
    generate = ["generate", "hi", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"]
    refused(generate, pattern)
    if attack != "layers-in-bounds":  # info reads only config.json, which is fine there
        started = time.perf_counter()
        refused(["info", str(folder)], pattern)
        assert time.perf_counter() - started < 5


WEIGHT_ATTACKS = {
    "int32": (lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.int32)}), r"floating point.*norm\.weight"),
    "bool": (lambda t: t.update({"norm.weight": t["norm.weight"] > 0}), r"floating point.*norm\.weight \(BOOL\)"),
    "nan": (lambda t: t["layers.0.attn.wo.weight"].view(-1)[3].fill_(math.nan),
            r"tensor layers\.0\.attn\.wo\.weight holds NaN"),
    "inf": (lambda t: t["tok_emb.weight"].view(-1)[0].fill_(math.inf), r"tensor tok_emb\.weight holds NaN or infinite"),
    "shape": (lambda t: t.update({"norm.weight": t["norm.weight"][:-1]}),
              r"norm\.weight has shape \(31,\), config needs \(32,\)"),
}  # fmt: skip


@pytest.mark.parametrize("attack", WEIGHT_ATTACKS)
def test_bad_weights_are_refused_naming_the_tensor(model_dir, tmp_path, attack):
    change, pattern = WEIGHT_ATTACKS[attack]
    folder = copy_model(model_dir, tmp_path)
    rewrite_weights(folder, change)
    refused(["generate", "hi", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"], pattern)


def test_a_swapped_tokenizer_is_refused_and_old_dirs_without_a_digest_still_load(model_dir, tmp_path):
    from gen_cli.formats.checkpoint import TOKENIZER_DIGEST_KEY, load_model

    folder = copy_model(model_dir, tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[280:282]  # two ordinary tokens: same size, other meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    refused(["generate", "hi", "--model", str(folder), "--device", "cpu"], r"tokenizer\.json is not the tokenizer")
    refused(["eval", str(folder), str(folder / "tokenizer.json")], r"tokenizer\.json is not the tokenizer")
    old = copy_model(model_dir, tmp_path, "old")
    rewrite_weights(old, lambda t: None, metadata={"format": "pt"})  # as gen wrote them before the digest
    load_model(old)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert TOKENIZER_DIGEST_KEY in f.metadata()


# ---------------------------------------------------------------------------------------------
# Ordinary input that used to give tracebacks


def test_invalid_utf8_prompts_are_refused(model_dir, tokenizer_path):
    base = ["--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    refused(["generate", "-", *base], r"text on stdin is not valid UTF-8 \(byte 0xff at offset 3\)", 2, b"abc\xff")
    refused(["tokenize", "-", "--tokenizer", str(tokenizer_path)], r"not valid UTF-8", 2, b"\xc3(")
    argv = os.fsdecode(b"caf\xe9")  # an undecodable argv byte arrives as a lone surrogate
    refused(["generate", argv, *base], r"text argument is not valid UTF-8 \(byte 0xe9 at offset 3\)", 2)
    refused(["tokenize", argv, "--tokenizer", str(tokenizer_path)], r"text argument is not valid UTF-8", 2)


def test_a_huge_stdin_prompt_is_refused_before_tokenizing(model_dir, monkeypatch):
    from tokenizers import Tokenizer

    encoded = []
    real = Tokenizer.encode
    monkeypatch.setattr(
        Tokenizer, "encode", lambda self, text, **kw: encoded.append(len(text)) or real(self, text, **kw)
    )
    big = b"word " * 2_000_000  # 10 MB for a 64-token context
    refused(
        ["generate", "-", "--model", str(model_dir), "--device", "cpu"], r"text on stdin is over [\d,]+ bytes", 2, big
    )
    assert encoded == []


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("--seed", str(2**64), r"--seed must fit in 64 bits"),
        ("--seed", str(-(2**63) - 1), r"--seed must fit in 64 bits"),
        ("--temperature", "inf", r"--temperature must be a finite number"),
        ("--repetition-penalty", "inf", r"--repetition-penalty must be a finite number"),
        ("--max-new-tokens", str(-(2**70)), r"--max-new-tokens must be at least 1"),
        ("--threads", "1000000000", r"--threads must be between 1 and 1024"),
        ("--threads", str(2**70), r"--threads must be between 1 and 1024"),
    ],
)
def test_out_of_range_generation_options(model_dir, option, value, pattern):
    refused(["generate", "hi", "--model", str(model_dir), "--device", "cpu", option, value], pattern, 2)


@pytest.mark.parametrize("option", ["--temperature", "--repetition-penalty"])
def test_subnormal_temperature_and_penalty_give_text_not_nan(model_dir, option):
    args = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--json", "--seed", "1"]
    args += ["--max-new-tokens", "8", "--ignore-eot", option, "1e-45"]
    result = cli(args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["new_tokens"] == 8


def test_num_samples_beyond_memory_is_refused_with_the_estimate(model_dir, monkeypatch):
    from gen_cli import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 50 * 2**20)
    argv = ["generate", "hi", "--model", str(model_dir), "--device", "cpu", "--num-samples", "100000"]
    argv += ["--max-new-tokens", "8"]
    refused(argv, r"KV cache for 100,000 sequence\(s\) of \d+ tokens needs about [\d.]+ [GM]iB but only 50 MiB "
             r"of memory is available; use fewer --num-samples")  # fmt: skip


def test_vocab_size_and_special_tokens_are_checked_up_front(tmp_path, monkeypatch):
    from gen_cli import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 2**30)  # as on a laptop
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    out = tmp_path / "tok.json"
    refused(["train-tokenizer", str(corpus), "--vocab-size", "1000000000", "--out", str(out)],
             r"(vocab_size|--vocab-size) 1000000000 is above gen's limit", 2)  # fmt: skip
    refused(["train", str(corpus), "--vocab-size", "1000000000", "--out", str(tmp_path / "run")],
             r"--vocab-size 1000000000 is above gen's limit", 2)  # fmt: skip
    refused(["train-tokenizer", str(corpus), "--special-token", "", "--out", str(out)],
             r"special token cannot be the empty string", 2)  # fmt: skip
    refused(["train", str(corpus), "--context", "100000", "--out", str(tmp_path / "run2")],
             r"training [\d,]+ parameters on batches of 16 × 100000 tokens needs about [\d.]+ GiB")  # fmt: skip
    assert not out.exists() and not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_eval_context_0_is_refused(model_dir, tokenizer_path):
    refused(["eval", str(model_dir), str(tokenizer_path), "--context", "0"], r"context 0 is outside", 2)


# ---------------------------------------------------------------------------------------------
# Size attacks: each in its own process under a 4 GB address-space limit, so a regression that
# allocates first fails this test instead of eating the machine; peak RSS must stay small.

AS_LIMIT = 4 << 30
_UNDER_LIMIT = (
    "import atexit, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))\n"
    "out = sys.argv[2]\n"
    # VmHWM, not ru_maxrss: the latter inherits the parent's peak across fork + exec.
    "hwm = lambda: next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
    "atexit.register(lambda: open(out, 'w').write(hwm()))\n"
    "sys.argv = ['gen', *sys.argv[3:]]\n"
    "from gen_cli.cli import main\n"
    "main()\n"
)


def _under_limit(tmp_path, argv, stdin=b""):
    """(exit code, stderr, peak RSS in MiB) of `gen argv` in a process limited to AS_LIMIT bytes."""
    rss_file = tmp_path / "rss.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("GEN_DEBUG", None)
    cmd = [sys.executable, "-c", _UNDER_LIMIT, str(AS_LIMIT), str(rss_file), *argv]
    done = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=120)
    rss = int(rss_file.read_text()) / 1024 if rss_file.exists() else math.inf
    return done.returncode, done.stderr.decode(errors="replace").strip(), rss


def _size_attacks(model_dir, tmp_path):
    absurd = copy_model(model_dir, tmp_path, "absurd")
    edit_config(absurd, n_layer=1_000_000)
    in_bounds = copy_model(model_dir, tmp_path, "in-bounds")
    edit_config(in_bounds, n_layer=1000, d_model=4096, n_head=32, n_kv_head=32, d_ff=16384)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    run = ["--device", "cpu", "--max-new-tokens", "8"]
    return {
        "info n_layer 1e6": (["info", str(absurd)], b"", r"n_layer 1000000 is above gen's limit"),
        "generate n_layer 1e6": (["generate", "hi", "--model", str(absurd), *run], b"", r"above gen's limit"),
        "generate 1000 wide layers, small weights": (
            ["generate", "hi", "--model", str(in_bounds), *run],
            b"",
            r"weights do not match config\.json",
        ),
        "50 MB stdin prompt": (
            ["generate", "-", "--model", str(model_dir), *run],
            b"word " * 10_000_000,
            r"text on stdin is over",
        ),
        "num-samples 1e9": (
            ["generate", "hi", "--model", str(model_dir), "--num-samples", "1000000000", *run],
            b"",
            r"KV cache for 1,000,000,000 sequence\(s\).*needs about",
        ),
        "train-tokenizer vocab 1e9": (
            ["train-tokenizer", str(corpus), "--vocab-size", "1000000000", "--out", str(tmp_path / "t.json")],
            b"",
            r"vocab-size 1000000000 is above gen's limit",
        ),
        "train context 1e5": (
            ["train", str(corpus), "--context", "100000", "--batch-size", "1024", "--out", str(tmp_path / "r")],
            b"",
            r"training [\d,]+ parameters on batches of 1024 × 100000 tokens needs about",
        ),
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize(
    "attack",
    ["info n_layer 1e6", "generate n_layer 1e6", "generate 1000 wide layers, small weights", "50 MB stdin prompt",
     "num-samples 1e9", "train-tokenizer vocab 1e9", "train context 1e5"],
)  # fmt: skip
def test_size_attacks_are_refused_before_allocating(model_dir, tmp_path, attack, default_kernel):
    argv, stdin, pattern = _size_attacks(model_dir, tmp_path)[attack]
    if default_kernel is not None:  # the home a first run leaves: the attack runs, not a 20 s kernel build
        copy_kernel(default_kernel, tmp_path / "home")
    started = time.perf_counter()
    code, stderr, rss = _under_limit(tmp_path, argv, stdin)
    lines = stderr.splitlines()
    assert code in (1, 2) and "Traceback" not in stderr and re.search(pattern, lines[-1]), (code, stderr)
    assert len(lines) == 1, stderr
    assert time.perf_counter() - started < 60
    print(f"peak RSS {attack}: {rss:.0f} MiB")
    assert rss < 1024, f"{attack}: peak RSS {rss:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Any generation options: a valid result or one clear error, never a traceback

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e-300),  # subnormals and other tiny values
    st.sampled_from([0.0, -0.0, 5e-324, 1e-45, 1.0, 1e308]),
)
BIG_INTS = st.one_of(st.integers(-5, 6), st.integers(-(2**80), 2**80))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=FLOATS,
    repetition_penalty=FLOATS,
    top_p=st.none() | FLOATS,
    min_p=st.none() | FLOATS,
    top_k=st.none() | BIG_INTS,
    seed=BIG_INTS,
    max_new_tokens=BIG_INTS,
    num_samples=st.one_of(st.integers(-3, 3), st.integers(10**9, 2**80)),
)
def test_any_generation_options_give_a_result_or_one_clear_error(
    model_dir, temperature, repetition_penalty, top_p, min_p, top_k, seed, max_new_tokens, num_samples
):
    argv = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--json"]
    options = {"--temperature": temperature, "--repetition-penalty": repetition_penalty, "--top-p": top_p,
               "--min-p": min_p, "--top-k": top_k, "--seed": seed, "--max-new-tokens": max_new_tokens,
               "--num-samples": num_samples}  # fmt: skip
    for flag, value in options.items():
        if value is not None:
            argv += [f"{flag}={value!r}"]
    result = cli(argv)
    if result.exit_code == 0:
        data = json.loads(result.stdout)
        assert 0 <= data["stats"]["new_tokens"] <= max_new_tokens
        return
    line = one_line(result)
    assert result.exit_code in (1, 2) and line.startswith("error: "), (result.exit_code, line)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-38])
def test_a_vanishing_temperature_samples_the_argmax(temperature):
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.infer.sampling import sample_next

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9999]])
    cfg = SamplingConfig(temperature=temperature, repetition_penalty=1e-45)
    for seed in range(5):
        assert sample_next(logits, torch.tensor([[2]]), cfg, torch.Generator().manual_seed(seed)).item() == 1


def test_train_seed_beyond_64_bits_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    refused(
        ["train", str(corpus), "--seed", str(2**64), "--out", str(tmp_path / "r")], r"--seed must fit in 64 bits", 2
    )
    assert not (tmp_path / "r").exists()


def test_compare_batch_beyond_memory_is_refused_before_the_grid_runs(monkeypatch):
    from test_compare import FAST

    from gen_cli.commands import compare as compare_cmd

    monkeypatch.setattr(compare_cmd, "_run", lambda *a: pytest.fail("the grid ran"))
    argv = ["compare", *FAST, "--attention", "mha", "--pos", "rope", "--in-process", "--batch-size", "1,10000000"]
    refused(argv, r"the largest configuration \(10,000,000 sequences of 9 tokens\) needs about [\d.]+ GiB but only "
            r".* available; use a smaller --batch-size or shorter --prompt-len / --max-new-tokens")  # fmt: skip


def test_a_temperature_beyond_float32_samples_uniformly_among_the_tokens_left():
    # The penalty sends the seen negative logit to -inf; a temperature that overflows fp32 once gave NaN.
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.infer.sampling import sample_next

    # The penalty sends the seen negative logit to -inf; a temperature that overflows fp32 once gave NaN.
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9999]])
    cfg = SamplingConfig(temperature=1e308, repetition_penalty=1e308)
    picks = {sample_next(logits, torch.tensor([[2]]), cfg, torch.Generator().manual_seed(s)).item() for s in range(60)}
    assert picks == {0, 1, 3}
