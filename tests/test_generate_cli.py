"""`gen generate` and `gen info` through the CLI: outputs, JSON keys, seeds, stops and clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gen_cli.cli import app
from gen_cli.commands import generate as gen_cmd
from gen_cli.text.stream import TextStream
from gen_cli.text.tokenizer import decode, encode

runner = CliRunner()
STATS_KEYS = {
    "prompt_tokens", "new_tokens", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
    "kv_cache_bytes", "kv_cache_bytes_analytic", "peak_memory_bytes", "device", "dtype", "threads", "machine_load",
}  # fmt: skip


def gen(*args, input=None):
    return runner.invoke(app, ["generate", *args], input=input)


def gen_json(model_dir, *args, prompt="The quick"):
    result = gen(prompt, "--model", str(model_dir), "--json", "--device", "cpu", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_text_and_stable_stats_keys(model_dir, tokenizer):
    data = gen_json(model_dir, "--max-new-tokens", "12", "--ignore-eot", "--temperature", "0")
    assert "texts" not in data
    assert data["stats"].keys() >= STATS_KEYS
    s = data["stats"]
    prompt = encode(tokenizer, "The quick")
    assert s["new_tokens"] == 12 and s["prompt_tokens"] == len(prompt)
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    # The text is the no-cache oracle's greedy continuation of the saved model, decoded.
    assert data["text"] == decode(tokenizer, _oracle_ids(model_dir, prompt, 12))
    # Cache bytes by the design's formula: 2 (K, V) × n_layer × n_kv_head × head_dim × tokens × batch × 4 B.
    n_layer, n_kv_head, head_dim = 2, 4, 32 // 4  # tiny_config: d_model 32, 4 heads
    analytic = 2 * n_layer * n_kv_head * head_dim * (len(prompt) + 12) * 1 * 4
    assert s["kv_cache_bytes"] == s["kv_cache_bytes_analytic"] == analytic
    # The native step's threads per step and why (11 decode steps after the prefill's token).
    if s["decode_path"] == "native":
        chosen = s["native_threads"]
        assert sum(chosen["steps_by_threads"].values()) == 11 and chosen["requested"] == s["threads"]
        assert all(1 <= int(n) <= s["threads"] for n in chosen["steps_by_threads"]) and chosen["reason"]


def _oracle_ids(model_dir, prompt: list[int], n: int) -> list[int]:
    """Greedy ids recomputing the whole sequence every step: no cache, no native step, no fusion."""
    import torch

    from gen_cli.formats.checkpoint import load_model
    from gen_cli.infer.generate import generate
    from gen_cli.infer.options import SamplingConfig

    model, _ = load_model(model_dir)
    steps = generate(model.eval(), torch.tensor([prompt]), n, SamplingConfig(temperature=0.0), None)
    return [int(t[0]) for t in steps]


def test_same_seed_same_output_and_cache_matches(model_dir):
    args = ("--max-new-tokens", "20", "--ignore-eot", "--temperature", "1.0")
    a = gen_json(model_dir, *args, "--seed", "3")["text"]
    assert a == gen_json(model_dir, *args, "--seed", "3")["text"]
    assert a == gen_json(model_dir, *args, "--seed", "3", "--no-kv-cache")["text"]
    assert a != gen_json(model_dir, *args, "--seed", "4")["text"]


def test_dtype_auto_is_float32_on_the_cpu_and_dash_m_names_the_model(model_dir):
    data = gen_json(model_dir, "-n", "4", "--ignore-eot", "--temperature", "0", "--dtype", "auto")
    assert data["stats"]["dtype"] == "float32" and data["stats"]["new_tokens"] == 4
    result = gen("The quick", "-m", str(model_dir), "-n", "4", "--json", "--device", "cpu", "--ignore-eot",
                 "--temperature", "0")  # fmt: skip
    assert result.exit_code == 0 and json.loads(result.stdout)["text"] == data["text"], result.output


def test_num_samples_gives_texts(model_dir):
    data = gen_json(model_dir, "--max-new-tokens", "8", "--num-samples", "3", "--temperature", "1.5")
    assert len(data["texts"]) == 3 and data["text"] == data["texts"][0]
    assert data["stats"]["batch"] == 3


def test_plain_and_streamed_output_agree_and_stats_go_to_stderr(model_dir):
    base = ["The quick", "--model", str(model_dir), "--max-new-tokens", "15", "--temperature", "0"]
    streamed = gen(*base, "--stats")
    plain = gen(*base, "--no-stream")
    assert streamed.exit_code == plain.exit_code == 0
    assert streamed.stdout == plain.stdout
    assert "time to first" in streamed.stderr and "KV cache" in streamed.stderr and "threads" in streamed.stderr
    assert "time to first" not in streamed.stdout
    assert "machine " in streamed.stderr and "no spread" in streamed.stderr  # one run: its noise is named
    assert "native threads" in streamed.stderr and "requested" in streamed.stderr


def test_stop_string_cuts_the_text(model_dir):
    text = gen_json(model_dir, "--max-new-tokens", "30", "--temperature", "0", "--ignore-eot")["text"]
    stop = text[8:11]
    cut = gen_json(model_dir, "--max-new-tokens", "30", "--temperature", "0", "--ignore-eot", "--stop", stop)
    assert cut["text"] == text[: text.index(stop)]
    assert cut["stats"]["new_tokens"] < 30


def test_an_empty_prompt_is_refused_without_a_bos_and_stdin_works(model_dir, tokenizer, tmp_path):
    # `gen generate "$(cat missing.txt)" --prompt-cache p.kv`: gen's models declare no BOS to start from.
    cache_file = tmp_path / "p.kv"
    result = gen("", "--model", str(model_dir), "--max-new-tokens", "3", "--prompt-cache", str(cache_file))
    assert result.exit_code == 2 and result.stdout == "" and not cache_file.exists()
    assert result.stderr.strip().splitlines() == [
        f"error: the prompt is empty and {model_dir} has no BOS token to start from; give text"
    ]
    result = gen("-", "--model", str(model_dir), "--max-new-tokens", "3", "--json", input="")
    assert result.exit_code == 2 and "the prompt is empty" in result.stderr
    result = gen("-", "--model", str(model_dir), "--max-new-tokens", "3", "--json", input="The quick brown")
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == len(encode(tokenizer, "The quick brown"))


def test_an_empty_prompt_starts_from_the_bos_of_a_model_that_has_one(tmp_path):
    pytest.importorskip("transformers")
    from hf_builders import build_hf_model, byte_level_tokenizer

    folder = tmp_path / "llama"
    build_hf_model("llama", folder, byte_level_tokenizer())  # bos_token_id 0 (<|endoftext|>)
    args = ["--model", str(folder), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    data = json.loads(gen("", *args, "--json").stdout)
    assert data["stats"]["prompt_tokens"] == 1
    result = gen("", *args, "--stats")
    assert result.exit_code == 0, result.output
    assert "prompt tokens    1 (empty prompt: starting from BOS)" in result.stderr
    assert "starting from BOS" not in gen("Hi", *args, "--stats").stderr


def test_invalid_utf8_exits_2_from_stdin_and_from_an_argument(model_dir):
    import os

    base = ["--model", str(model_dir), "--max-new-tokens", "3"]
    piped = gen("-", *base, input=b"caf\xe9")
    argv = gen(os.fsdecode(b"caf\xe9"), *base)  # an undecodable argv byte arrives as a lone surrogate
    assert piped.exit_code == argv.exit_code == 2
    assert "not valid UTF-8 (byte 0xe9 at offset 3)" in piped.stderr and "not valid UTF-8" in argv.stderr


def test_preset_random_weights_are_labelled(tokenizer_path):
    result = gen("hello", "--preset", "tiny", "--tokenizer", str(tokenizer_path), "--attention", "mqa",
                 "--pos", "sinusoidal", "--max-new-tokens", "5", "--stats")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stderr and "mqa" in result.stderr
    assert "vocab_size 4096 →" in result.stderr


def test_missing_default_model_suggests_preset(monkeypatch, tmp_path):
    monkeypatch.setattr(gen_cmd, "default_model_dir", lambda: tmp_path / "absent")
    result = gen("hi")
    assert result.exit_code == 2
    assert "--preset" in result.stderr and "gen train" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--min-p", "2"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "63"], "exceeds the context length of 64 tokens; use --max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--attention", "mqa"], "only apply with --preset"),
        (["--kv-heads", "2"], "only apply with --preset"),
        (["--pos", "learned"], "only apply with --preset"),
        (["--tokenizer", "x.json"], "--tokenizer only applies with --preset"),
        (["--preset", "tiny"], "not both"),
        (["--device", "tpu"], "unknown device"),
        (["--device", "cuda"], "--device cuda"),
        (["--dtype", "int3"], "unknown dtype"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on CPU"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_invalid_options_exit_2_with_a_clear_message(model_dir, args, message):
    import torch

    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = gen("hi there", "--model", str(model_dir), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown preset"),
        (["--preset", "tiny", "--pos", "xpos"], "--pos must be one of"),
        (["--preset", "tiny", "--attention", "sparse"], "unknown attention kind"),
        (["--preset", "tiny", "--kv-heads", "3"], "not divisible by 3 KV heads"),
        (["--preset", "tiny", "--attention", "mqa", "--kv-heads", "2"], "means 1 KV heads"),
        (["--model", "/nonexistent/model"], "no such directory"),
    ],
)
def test_invalid_model_choices_exit_2(tokenizer_path, args, message):
    extra = ["--tokenizer", str(tokenizer_path)] if "--preset" in args else []
    result = gen("hi", *args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_prompt_longer_than_context(model_dir):
    result = gen("word " * 80, "--model", str(model_dir))
    assert result.exit_code == 2
    assert "context length is 64 tokens" in result.stderr


def test_stream_never_splits_a_multibyte_character(tokenizer):
    text = "a 😀 é 中 b"
    ids = encode(tokenizer, text)
    assert len(ids) > len(text)  # the tiny tokenizer really splits these characters into byte tokens
    row = TextStream(tokenizer)
    pieces = []
    for i in ids:
        row.push(i)
        pieces.append(row.take())
    pieces.append(row.take(final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") > 0  # some steps had to hold back a partial character


def test_stream_holds_back_a_possible_stop_string(tokenizer):
    row = TextStream(tokenizer, stops=("END",))
    out = []
    for i in encode(tokenizer, "abc EN"):
        row.push(i)
        out.append(row.take())
    assert "".join(out) == "abc "  # "EN" may become "END"
    for i in encode(tokenizer, "D more"):
        row.push(i)
        out.append(row.take())
    assert row.done and "".join(out) == "abc " and row.text == "abc "


def test_stream_stops_at_end_of_text(tokenizer):
    from gen_cli.text.tokenizer import special_id

    eot = special_id(tokenizer)
    row = TextStream(tokenizer, eot_id=eot)
    for i in [*encode(tokenizer, "hi"), eot, *encode(tokenizer, "ignored")]:
        row.push(i)
    assert row.done and row.take() == "hi"


def test_info_preset_and_directory(model_dir):
    data = json.loads(runner.invoke(app, ["info", "tiny", "--json"]).stdout)
    assert data["attention_kind"] == "mha" and data["parameters"] > 0
    c = data["config"]
    per_token = 2 * c["n_layer"] * c["n_kv_head"] * (c["d_model"] // c["n_head"]) * 4
    assert data["kv_bytes_per_token"]["float32"] == per_token
    assert data["kv_bytes_full_context"]["bfloat16"] == per_token // 2 * c["context_length"]
    assert data["weight_bytes"]["float32"] == 4 * data["parameters"]
    result = runner.invoke(app, ["info", str(model_dir)])
    assert result.exit_code == 0 and "parameters" in result.stdout and "multi-head" in result.stdout
    bad = runner.invoke(app, ["info", "nothing-here"])
    assert bad.exit_code == 2 and "neither a model directory nor a preset" in bad.stderr


def test_info_defaults_to_the_shipped_model():
    from gen_cli.resources import default_model_dir

    data = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert data["source"] == f"model {default_model_dir()}"
