"""Hostile imported models (GGUF files, HF folders): every wrong metadata value, non-finite weight, non-file
path, bad RoPE scaling and oversized header is one GenError line naming the file and the key or tensor,
the same from `gen info` as from a load; never a traceback, a NaN run or a hang."""

from __future__ import annotations

import functools
import json
import math
import os
import signal

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from hostile import DROP, cli, one_line, write_tiny_gguf, write_tiny_hf  # noqa: E402

from gen_cli.errors import GenError, UsageError  # noqa: E402
from gen_cli.formats.gguf_file import load_gguf, read_gguf_config  # noqa: E402
from gen_cli.formats.gguf_reader import GGUFFile  # noqa: E402
from gen_cli.formats.hf import chat_template, load_hf, read_config  # noqa: E402
from gen_cli.formats.loading import config_for, model_tokenizer  # noqa: E402
from gen_cli.model.config import ModelConfig, parse_rope_scaling  # noqa: E402

T = gguf.GGUFValueType


def _refused(fn, *args, match: str, error=GenError) -> str:
    with pytest.raises(error) as info:
        fn(*args)
    text = str(info.value)
    assert "\n" not in text and type(info.value).__name__ in ("GenError", "UsageError"), text
    assert match in text, text
    return text


# -- 1. metadata of the wrong type or value: one line naming the key (and the file)

GGUF_META = {
    "context_length a string": ({"llama.context_length": ("abc", T.STRING, None)}, "llama.context_length must be"),
    "context_length an array": ({"llama.context_length": ([64, 64], T.ARRAY, T.UINT32)}, "llama.context_length"),
    "rms epsilon a string": ({"llama.attention.layer_norm_rms_epsilon": ("x", T.STRING, None)}, "rms_epsilon must"),
    "rms epsilon 0": ({"llama.attention.layer_norm_rms_epsilon": (0.0, T.FLOAT32, None)}, "rms_epsilon must"),
    "rms epsilon NaN": ({"llama.attention.layer_norm_rms_epsilon": (math.nan, T.FLOAT32, None)}, "rms_epsilon"),
    "head_count 0": ({"llama.attention.head_count": (0, T.UINT32, None)}, "attention.head_count must"),
    "head_count_kv 0": ({"llama.attention.head_count_kv": (0, T.UINT32, None)}, "head_count_kv must"),
    "embedding_length negative": ({"llama.embedding_length": (-64, T.INT32, None)}, "embedding_length must"),
    "block_count missing": ({"llama.block_count": DROP}, "llama.block_count is missing"),
    "freq_base infinite": ({"llama.rope.freq_base": (math.inf, T.FLOAT32, None)}, "rope.freq_base must"),
    "architecture a number": ({"general.architecture": (7, T.UINT32, None)}, "architecture 7 is not supported"),
    "feed_forward_length 2**40": ({"llama.feed_forward_length": (2**40, T.UINT64, None)}, "d_ff"),
    "sliding_window a string": ({"llama.attention.sliding_window": ("16", T.STRING, None)}, "sliding_window must"),
    "key_length a float": ({"llama.attention.key_length": (16.0, T.FLOAT32, None)}, "key_length must"),
    "scaling type a number": ({"llama.rope.scaling.type": (5, T.UINT32, None)}, "rope.scaling.type must"),
    "bos id -1": ({"tokenizer.ggml.bos_token_id": (-1, T.INT32, None)}, "bos_token_id must be"),
    "tokens a string": ({"tokenizer.ggml.tokens": ("abc", T.STRING, None)}, "tokenizer.ggml.tokens must"),
    "merges numbers": ({"tokenizer.ggml.merges": ([1, 2], T.ARRAY, T.INT32)}, "tokenizer.ggml.merges must"),
    "add_bos_token a string": ({"tokenizer.ggml.add_bos_token": ("yes", T.STRING, None)}, "add_bos_token must"),
    "chat_template a number": ({"tokenizer.chat_template": (1, T.UINT32, None)}, "chat_template must"),
}


@pytest.mark.parametrize("case", GGUF_META)
def test_gguf_metadata_of_the_wrong_type_or_value_is_one_line_from_info_and_load(tmp_path, case):
    meta, match = GGUF_META[case]
    path = write_tiny_gguf(tmp_path / "m.gguf", meta=meta)
    info = _refused(read_gguf_config, path, match=match)
    assert info.startswith(str(path))
    assert _refused(load_gguf, path, match=match) == info


@pytest.mark.parametrize("key", ["bos", "eos", "unknown"])
@pytest.mark.parametrize("value", [99999, 320])
def test_gguf_token_ids_past_the_vocabulary_are_refused(tmp_path, key, value):
    meta = {
        f"tokenizer.ggml.{key}_token_id": (value, T.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL, None),
    }
    path = write_tiny_gguf(tmp_path / "m.gguf", meta=meta)
    _refused(load_gguf, path, match=f"tokenizer.ggml.{key}_token_id is {value}")
    _refused(model_tokenizer, path, match=f"tokenizer.ggml.{key}_token_id is {value}")


def _drop(name):
    return lambda t: t.pop(name)


TENSOR_TABLE = {
    "block_count 3, tensors for 2": (
        {"llama.block_count": (3, T.UINT32, None)},
        None,
        "blk.2.attn_norm.weight is missing",
    ),
    "blk.1.attn_v missing": ({}, _drop("blk.1.attn_v.weight"), "tensor blk.1.attn_v.weight is missing"),
    "an extra tensor": ({}, lambda t: t.update(extra=np.zeros(4, np.float32)), "unexpected tensor extra"),
    "a wrong shape": ({}, lambda t: t.update({"blk.0.ffn_up.weight": np.zeros((95, 64), np.float32)}), "expected"),
}


@pytest.mark.parametrize("case", TENSOR_TABLE)
def test_missing_or_extra_gguf_tensors_are_the_same_line_from_info_and_generate(tmp_path, case):
    meta, edit, match = TENSOR_TABLE[case]
    path = write_tiny_gguf(tmp_path / "m.gguf", meta=meta, tensors=edit)
    info, generate = cli(["info", str(path)]), cli(["generate", "Hi", "--model", str(path), "-n", "2"])
    assert info.exit_code == generate.exit_code == 1
    assert match in one_line(info) and one_line(info) == one_line(generate)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"),
            "tensor model.layers.1.self_attn.v_proj.weight is missing",
        ),
        (lambda t: t.update(extra=t["model.norm.weight"].clone()), "unexpected tensor extra"),
    ],
)
def test_missing_or_extra_hf_tensors_are_the_same_line_from_info_and_load(tmp_path, edit, match):
    folder = write_tiny_hf(tmp_path / "m", tensors=edit)
    assert _refused(read_config, folder, match=match) == _refused(load_hf, folder, match=match)


HF_CONFIG = {
    "architectures a dict": ({"architectures": {"a": 1}}, "architectures must be a list of strings"),
    "architectures nested": ({"architectures": [["LlamaForCausalLM"]]}, "architectures must be"),
    "model_type a list": ({"architectures": DROP, "model_type": ["llama"]}, "model_type must be a string"),
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads must be a whole number ≥ 1"),
    "num_attention_heads a string": ({"num_attention_heads": "4"}, "num_attention_heads must"),
    "rope_scaling a string": ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    "rope_scaling a list": ({"rope_scaling": ["linear", 2]}, "rope_scaling must be an object"),
    "rope_parameters a list": ({"rope_parameters": [1]}, "rope_parameters must be an object"),
    "rope_theta a string": ({"rope_theta": "1e4"}, "rope_theta must be a finite number > 0"),
    "rope_theta a list": ({"rope_theta": [10000]}, "rope_theta must"),
    "yarn factor a string": (
        {"rope_scaling": {"rope_type": "yarn", "factor": "4", "original_max_position_embeddings": 32}},
        "rope_scaling factor must",
    ),
    "yarn factor 0": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 0, "original_max_position_embeddings": 32}},
        "rope_scaling factor must",
    ),
    "yarn beta order": (
        {"rope_scaling": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 32, "beta_fast": 0.5}},
        "beta_slow < beta_fast",
    ),
    "llama3 low a string": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8,
                "low_freq_factor": "1",
                "high_freq_factor": 4,
                "original_max_position_embeddings": 16,
            }
        },
        "low_freq_factor must",
    ),
    "llama3 factor 0": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 0,
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 16,
            }
        },
        "rope_scaling factor must",
    ),
    "llama3 low NaN": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8,
                "low_freq_factor": math.nan,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 16,
            }
        },
        "rope_parameters low_freq_factor must",
    ),
    "llama3 bands equal": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8,
                "low_freq_factor": 4,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 16,
            }
        },
        "low_freq_factor < high_freq_factor",
    ),
    "sliding_window a string": ({"sliding_window": "16"}, "sliding_window must be a whole number"),
    "qwen2 layer_types 5": ({"architectures": ["Qwen2ForCausalLM"], "layer_types": 5}, "layer_types must be"),
    "qwen2 max_window_layers x": (
        {"architectures": ["Qwen2ForCausalLM"], "max_window_layers": "x"},
        "max_window_layers",
    ),
    "qwen2 layer_types too short": (
        {
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 16,
            "layer_types": ["sliding_attention"],
        },
        "layer_types must list 2",
    ),
    "rms_norm_eps negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps must"),
    "vocab_size missing": ({"vocab_size": DROP}, "vocab_size is missing"),
    "hidden_size huge": ({"hidden_size": 10**9}, "d_model"),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    "head_dim 0": ({"head_dim": 0}, "head_dim must"),
    "eos_token_id a string": ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
    "max_position_embeddings 0": ({"max_position_embeddings": 0}, "max_position_embeddings must"),
}


@pytest.mark.parametrize("case", HF_CONFIG)
def test_hf_config_of_the_wrong_type_or_value_is_one_line_from_info_and_load(tmp_path, case):
    changes, match = HF_CONFIG[case]
    folder = write_tiny_hf(tmp_path / "m", config=changes)
    info = _refused(read_config, folder, match=match)
    assert str(folder) in info
    assert _refused(load_hf, folder, match=match) == info


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_json_nested_past_pythons_recursion_limit_is_one_line(tmp_path, name):
    folder = write_tiny_hf(tmp_path / "m")
    (folder / name).write_text('{"weight_map": ' + DEEP + "}")
    _refused(config_for, str(folder), match="nested too deeply")


def test_chat_templates_as_named_lists_are_read_and_other_forms_refused(tmp_path):
    folder = write_tiny_hf(tmp_path / "m")
    config = folder / "tokenizer_config.json"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config.write_text(json.dumps({"chat_template": named}))
    assert chat_template(folder)[0] == "D"
    config.write_text(json.dumps({"chat_template": named[:1]}))
    assert chat_template(folder)[0] is None  # no default: transformers needs a name too
    for bad in (["a", "b"], [{"name": "default"}], 5, {"template": "x"}):
        config.write_text(json.dumps({"chat_template": bad}))
        _refused(chat_template, folder, match="chat_template must be")


# -- 2. non-finite weights: refused as they are read, naming the tensor


def _nan_at(name, value=math.nan, index=(0,)):
    def edit(tensors):
        tensors[name][index] = value

    return edit


def _q8_0_with_nan_scale(name):
    a = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    blocks[3, 34:36] = np.frombuffer(np.float16(math.inf).tobytes(), np.uint8)  # row 3's second block: d = Inf
    return {name: (blocks, "Q8_0")}


GGUF_NON_FINITE = {
    "embedding all NaN": (dict(tensors=lambda t: t["token_embd.weight"].fill(math.nan)), "token_embd.weight"),
    "norm +Inf": (dict(tensors=_nan_at("output_norm.weight", math.inf)), "output_norm.weight"),
    "q matrix NaN (F32)": (dict(tensors=_nan_at("blk.1.attn_q.weight", index=(3, 5))), "blk.1.attn_q.weight"),
    "q matrix NaN (F16)": (
        dict(raw={"blk.0.attn_q.weight": (np.full((64, 64), np.nan, np.float16), "F16")}),
        "blk.0.attn_q.weight",
    ),
    "Q8_0 scale Inf": (dict(qtype="Q8_0", raw=_q8_0_with_nan_scale("blk.0.attn_output.weight")), "attn_output"),
    "F32 bytes declared F16": (dict(retype={"token_embd.weight": "F16"}), "token_embd.weight"),
    "F32 bytes declared Q8_0": (dict(retype={"output.weight": "Q8_0"}), "output.weight"),
    "rope_freqs NaN": (
        dict(tensors=lambda t: t.update({"rope_freqs.weight": np.full(8, np.nan, np.float32)})),
        "freq_factors: factor #0 is nan",
    ),
    "rope_freqs 0": (
        dict(tensors=lambda t: t.update({"rope_freqs.weight": np.zeros(8, np.float32)})),
        "factor #0 is 0.0",
    ),
}


@pytest.mark.parametrize("arena", [False, True], ids=["in place", "into 2 MB pages"])
@pytest.mark.parametrize("case", GGUF_NON_FINITE)
def test_non_finite_gguf_weights_are_refused_at_load_naming_the_tensor(tmp_path, case, arena):
    kwargs, match = GGUF_NON_FINITE[case]
    path = write_tiny_gguf(tmp_path / "m.gguf", **kwargs)
    line = _refused(functools.partial(load_gguf, arena=arena), path, match=match)
    assert "rope_freqs" in case or "NaN or infinite" in line


def _torch_edit(name, value, dtype=None):
    def edit(tensors):
        if dtype is not None:
            tensors[name] = tensors[name].to(dtype)
        tensors[name].view(-1)[7] = value

    return edit


HF_NON_FINITE = {
    "embedding NaN": ("model.embed_tokens.weight", math.nan, None),
    "norm -Inf": ("model.norm.weight", -math.inf, None),
    "q_proj NaN": ("model.layers.1.self_attn.q_proj.weight", math.nan, None),
    "bf16 down_proj Inf": ("model.layers.0.mlp.down_proj.weight", math.inf, "bfloat16"),
}


@pytest.mark.parametrize("arena", [False, True], ids=["in place", "into 2 MB pages"])
@pytest.mark.parametrize("case", HF_NON_FINITE)
def test_non_finite_hf_weights_are_refused_at_load_naming_the_tensor(tmp_path, case, arena):
    import torch

    name, value, dtype = HF_NON_FINITE[case]
    folder = write_tiny_hf(tmp_path / "m", tensors=_torch_edit(name, value, dtype and getattr(torch, dtype)))
    _refused(functools.partial(load_hf, arena=arena), folder, match=f"tensor {name} holds NaN or infinite values")


# -- 3. paths that are not regular files: refused, never read until memory runs out or waited on


@pytest.fixture
def alarm():
    """A hang fails the test instead of stalling the suite."""

    def hung(*_):
        raise AssertionError("hung reading a model file")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json", "model.gguf"])
def test_devices_and_fifos_are_refused_not_read(tmp_path, alarm, kind, name):
    folder = write_tiny_hf(tmp_path / "m")
    path = folder / name
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    if name == "model.gguf":
        _refused(GGUFFile, path, match="not a regular file")
        result = cli(["info", str(path)])
        assert result.exit_code == 1 and "not a regular file" in one_line(result)
        return
    if name == "config.json":
        _refused(config_for, str(folder), match="not a regular file")
    else:  # optional files that are not regular files are not there for gen
        assert config_for(str(folder))[0].n_layer == 2


# -- 4. RoPE scaling values: checked in one place for the CLI and for files


@pytest.mark.parametrize(
    "spec, match",
    [
        ("linear:1e308", "beyond any context"),
        ("llama3:8,orig=512,low=0", "low_freq_factor must be a positive"),
        ("llama3:8,orig=512,low=nan", "low_freq_factor"),
        ("llama3:8,orig=512,high=inf", "high_freq_factor"),
        ("llama3:8,orig=512,low=4,high=4", "low_freq_factor < high_freq_factor"),
        ("yarn:4,orig=256,attn=nan", "attn"),
        ("yarn:4,orig=256,beta_fast=0.5", "beta_slow < beta_fast"),
        ("yarn:4,orig=0", "original_context_length"),
        ("ntk:nan", "positive number"),
    ],
)
def test_rope_scaling_specs_are_validated(spec, match):
    _refused(parse_rope_scaling, spec, match=match, error=UsageError)


def test_cli_rope_scaling_overflow_is_one_usage_line(model_dir):
    result = cli(["generate", "Hi", "--model", str(model_dir), "-n", "2", "--rope-scaling", "linear:1e308"])
    assert result.exit_code == 2 and "beyond any context" in one_line(result)


def test_a_gen_config_with_a_nan_llama3_band_is_refused(model_dir, tmp_path):
    from hostile import copy_model, edit_config

    from gen_cli.formats.checkpoint import load_config

    folder = copy_model(model_dir, tmp_path)
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": math.nan, "high_freq_factor": 4.0,
               "original_context_length": 16}  # fmt: skip
    edit_config(folder, rope_scaling=scaling)
    _refused(load_config, folder, match="low_freq_factor must be a positive finite number, got nan")
    with pytest.raises(UsageError, match="freq_factors: factor #1"):
        ModelConfig(8, 1, 2, 2, 16, 16, 8, rope_scaling={"type": "freq_factors", "factors": [1.0, -1.0, 1.0, 1.0]})


# -- 5. counts and lengths past gen's caps: refused before they cost minutes or gigabytes


def test_a_gguf_with_more_metadata_keys_than_the_cap_is_refused(tmp_path):
    from gen_cli.formats.gguf_reader import MAX_METADATA_KEYS

    meta = {f"junk.{i}": (1, T.UINT8, None) for i in range(MAX_METADATA_KEYS + 1)}
    path = write_tiny_gguf(tmp_path / "m.gguf", meta=meta)
    _refused(GGUFFile, path, match=f"gen reads at most {MAX_METADATA_KEYS:,} keys")


def test_a_metadata_array_longer_than_the_cap_is_refused(tmp_path):
    from gen_cli.formats.gguf_reader import MAX_ARRAY_ELEMENTS

    meta = {"junk.bytes": (np.zeros(MAX_ARRAY_ELEMENTS + 1, np.uint8).tolist(), T.ARRAY, T.UINT8)}
    path = write_tiny_gguf(tmp_path / "m.gguf", meta=meta)
    _refused(GGUFFile, path, match=f"gen reads at most {MAX_ARRAY_ELEMENTS:,}")


def test_sentencepiece_tokens_past_the_length_cap_are_refused_and_the_rebuild_is_unchanged():
    from gen_cli.formats.gguf_tokenizer import MAX_SCORED_TOKEN_CHARS, merges_from_scores

    tokens = ["a", "b", "ab", "ba", "aba", "abab", "b" * 40, "b" * 39]
    scores = [0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    # every split of every token, as transformers' generate_merges does
    ids = {t: i for i, t in enumerate(tokens)}
    naive = []
    for t, s in zip(tokens, scores, strict=True):
        local = [(t[:k], t[k:], s) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        naive += sorted(local, key=lambda m: (ids[m[0]], ids[m[1]]))
    naive.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    assert merges_from_scores(tokens, scores) == [(a, b) for a, b, _ in naive]
    long = ["a", "b", "x" * (MAX_SCORED_TOKEN_CHARS + 1)]
    _refused(merges_from_scores, long, [0.0, 0.0, 0.0], match="token #2 is 1,025 characters long")
    costly = ["a" * k for k in range(1, MAX_SCORED_TOKEN_CHARS + 1)]  # every length: every split is a candidate
    _refused(merges_from_scores, costly, [0.0] * len(costly), match="gen's limit is 268,435,456")
