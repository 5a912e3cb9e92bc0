"""Seeded fuzzing of imported files: mutations of a valid GGUF file (its bytes and its metadata values) and of
an HF config.json. Every case ends in a result or one GenError line: never another exception, and never a
hang (an alarm per case fails it). A failure names the seed and the mutation, so it can be replayed."""

from __future__ import annotations

import json
import math
import random
import signal
import struct

import pytest

gguf = pytest.importorskip("gguf")

from hostile import DROP, gguf_metadata, hf_config_dict, write_tiny_gguf, write_tiny_hf  # noqa: E402

from gen_cli.errors import GenError  # noqa: E402
from gen_cli.formats.gguf_file import load_gguf, read_gguf_config  # noqa: E402
from gen_cli.formats.hf import read_config  # noqa: E402
from gen_cli.formats.hf_config import config_from_hf  # noqa: E402

T = gguf.GGUFValueType
HANG_S = 30  # far above any case (tens of milliseconds): only a hang reaches it
HOSTILE = [None, "", "x", "16", "llama", -1, 0, 1, 2, 3, 7, 2**31, 2**63, 0.0, 0.5, -2.5, 1e308, math.nan,
           math.inf, -math.inf, True, False, [], [1], [0, 0, 0], ["a", "b"], [[1]], {}, {"a": 1},
           {"rope_type": "yarn", "factor": 4}, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
           "high_freq_factor": 1, "original_max_position_embeddings": 16}, {"type": "linear", "factor": 1e308},
           {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 0}]  # fmt: skip


class _Hung(Exception):
    pass


@pytest.fixture
def outcome():
    """Runs one case under an alarm: its result, or the GenError line; anything else fails with `what`."""

    def hung(*_):
        raise _Hung

    old = signal.signal(signal.SIGALRM, hung)
    tally = {"result": 0, "refused": 0}

    def run(fn, what):
        signal.alarm(HANG_S)
        try:
            fn()
            tally["result"] += 1
        except GenError as e:
            assert str(e) and "\n" not in str(e), f"{what}: {e!r}"
            tally["refused"] += 1
        except _Hung:
            pytest.fail(f"{what}: still running after {HANG_S} s")
        except Exception as e:  # the property under test: nothing but GenError escapes
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        finally:
            signal.alarm(0)

    run.tally = tally
    yield run
    print(f"fuzz cases: {tally['result']} results, {tally['refused']} refused in one line")  # shown with -s
    signal.signal(signal.SIGALRM, old)


def _gguf_value(rng: random.Random):
    """A hostile metadata value with a GGUF type that can hold it."""
    value = rng.choice(HOSTILE)
    if value is None:
        return DROP
    if isinstance(value, bool):
        return value, T.BOOL, None
    if isinstance(value, int):
        kind = T.INT32 if -(2**31) <= value < 2**31 else T.UINT64
        return value, rng.choice([kind, T.UINT64 if value >= 0 else T.INT64]), None
    if isinstance(value, float):
        return value, rng.choice([T.FLOAT32, T.FLOAT64]) if not 3e38 < abs(value) < math.inf else T.FLOAT64, None
    if isinstance(value, str):
        return value, T.STRING, None
    if isinstance(value, list) and value and isinstance(value[0], int):
        return value, T.ARRAY, T.INT32
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value, T.ARRAY, T.STRING
    return "x", T.STRING, None  # a dict or nested list has no GGUF form: a string stands in


GGUF_KEYS = [*gguf_metadata(), "general.architecture", "llama.attention.key_length", "llama.rope.dimension_count",
             "llama.attention.sliding_window", "llama.rope.scaling.type", "tokenizer.ggml.scores",
             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix"]  # fmt: skip


def test_gguf_metadata_mutations_give_a_model_or_one_line(tmp_path, outcome):
    for seed in range(40):
        rng = random.Random(seed)
        meta = {key: _gguf_value(rng) for key in rng.sample(GGUF_KEYS, rng.choice([1, 1, 2]))}
        if rng.random() < 0.2:  # a SentencePiece vocabulary: its merges rebuilt from scores
            scores = [-float(i) for i in range(len(gguf_metadata()["tokenizer.ggml.tokens"][0]))]
            meta |= {"tokenizer.ggml.model": ("llama", T.STRING, None), "tokenizer.ggml.merges": DROP,
                     "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32)}  # fmt: skip
        path = write_tiny_gguf(tmp_path / f"{seed}.gguf", meta=meta)
        what = f"seed {seed}: metadata {meta!r:.300}"
        outcome(lambda p=path: read_gguf_config(p), what)
        outcome(lambda p=path: load_gguf(p).tokenizer.encode("Hi there"), what)
        path.unlink()
    assert outcome.tally["refused"] > 0 and outcome.tally["result"] > 0  # both kinds of case were reached


INTERESTING = [0, 1, 7, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1]


def _mutate(data: bytes, rng: random.Random, header_end: int) -> tuple[bytes, str]:
    out = bytearray(data)
    kind = rng.choice(["bytes", "u32", "u64", "truncate", "data"])
    if kind == "truncate":
        n = rng.randrange(len(data))
        return bytes(out[:n]), f"truncated to {n}"
    if kind == "data":  # tensor bytes: a run of 0xFF is NaN in F32, F16 and the fp16 block scales
        at = rng.randrange(header_end, len(data) - 8)
        out[at : at + 8] = b"\xff" * 8
        return bytes(out), f"NaN bytes at {at}"
    at = rng.randrange(0, header_end - 8)
    if kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(header_end)] = rng.randrange(256)
        return bytes(out), "random header bytes"
    value = rng.choice(INTERESTING)
    struct.pack_into("<Q" if kind == "u64" else "<I", out, at, value % (2**64 if kind == "u64" else 2**32))
    return bytes(out), f"{kind} {value} at {at}"


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_byte_mutations_give_a_model_or_one_line(tmp_path, outcome, qtype):
    from gen_cli.formats.gguf_reader import GGUFFile

    base = write_tiny_gguf(tmp_path / "base.gguf", qtype=qtype)
    data, header_end = base.read_bytes(), GGUFFile(base).data_offset
    path = tmp_path / "m.gguf"
    for seed in range(60):
        mutated, how = _mutate(data, random.Random(seed), header_end)
        path.write_bytes(mutated)
        outcome(lambda: load_gguf(path), f"{qtype} seed {seed}: {how}")
    assert outcome.tally["refused"] > 0 and outcome.tally["result"] > 0


GPT2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 320, "n_layer": 2, "n_embd": 64, "n_head": 4,
        "n_positions": 64, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}  # fmt: skip
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}  # fmt: skip
EXTRA_KEYS = ["head_dim", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "rope_scaling",
              "rope_parameters", "architectures", "model_type", "n_inner", "attention_bias", "mlp_bias"]  # fmt: skip


def _config_case(rng: random.Random) -> dict:
    base = rng.choice([hf_config_dict(), GPT2, hf_config_dict() | {"rope_scaling": dict(ROPE)},
                       hf_config_dict() | {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                                           "sliding_window": 16, "max_window_layers": 1}])  # fmt: skip
    data = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        if isinstance(data.get("rope_scaling"), dict) and rng.random() < 0.3:
            data["rope_scaling"][rng.choice([*ROPE, "type", "beta_fast", "mscale"])] = rng.choice(HOSTILE)
            continue
        key = rng.choice([*data, *EXTRA_KEYS])
        if rng.random() < 0.15:
            data.pop(key, None)
        else:
            data[key] = rng.choice(HOSTILE)
    return data


def test_config_json_mutations_give_a_config_or_one_line(tmp_path, outcome):
    for seed in range(400):
        data = _config_case(random.Random(seed))
        outcome(lambda d=data: config_from_hf(d, "config.json"), f"seed {seed}: {json.dumps(data)[:300]}")
    assert outcome.tally["refused"] > 0 and outcome.tally["result"] > 0
    # through the folder reader too (JSON as written, then the tensors' headers checked against the config)
    folder = write_tiny_hf(tmp_path / "m")
    for seed in range(400, 440):
        data = _config_case(random.Random(seed))
        (folder / "config.json").write_text(json.dumps(data))
        outcome(lambda: read_config(folder), f"seed {seed}: {json.dumps(data)[:300]}")
