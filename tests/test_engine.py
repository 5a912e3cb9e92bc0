"""open_model: one way to open a model for inference; what the engine holds and what its methods return."""

from __future__ import annotations

import pytest
import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer.engine import open_model
from gen_cli.infer.generate import generate
from gen_cli.infer.options import EngineOptions, Preset, SamplingConfig
from gen_cli.text.tokenizer import EOT, encode

GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return open_model(model_dir, EngineOptions(device="cpu"))


def test_a_gen_model_stops_at_end_of_text_and_has_no_bos(engine, tokenizer):
    assert engine.stop_ids == (tokenizer.token_to_id(EOT),) and engine.bos_id is None
    assert engine.encode("The quick") == encode(tokenizer, "The quick")
    with pytest.raises(UsageError, match=r"the prompt is empty .* no BOS token"):
        engine.encode("")
    with pytest.raises(UsageError, match="no chat template"):
        engine.chat_ids("Hi")
    with pytest.raises(UsageError, match=r"the prompt is not valid UTF-8 \(at character 3\)"):
        engine.encode("caf\udce9")  # an undecodable command-line byte
    assert engine.load_s > 0 and engine.device == torch.device("cpu")


def test_generate_equals_the_no_cache_oracle_on_the_unoptimised_model(engine, model_dir):
    from gen_cli.formats.checkpoint import load_model

    ids = engine.encode("The quick")
    got = engine.generate(ids, 10, GREEDY, stop_ids=())
    plain, _ = load_model(model_dir)
    oracle = [int(t[0]) for t in generate(plain.eval(), torch.tensor([ids]), 10, GREEDY, None)]
    assert got.tokens[0].tolist() == oracle
    no_cache = engine.generate(ids, 10, GREEDY, cache=None, stop_ids=())
    assert no_cache.tokens[0].tolist() == oracle and no_cache.stats.kv_cache_bytes == 0


def test_a_cache_spec_sizes_the_cache(engine):
    config = engine.model.config
    spec = CacheSpec("int8", "int8", window=8, sinks=2)
    cache = engine.new_cache(spec, prompt_len=5, max_new_tokens=30)
    assert cache.nbytes == spec.nbytes(config, 35, 1, 4)
    # int8 K and V: one byte per element plus one fp32 scale per head and token, 10 slots (sinks + window).
    head_dim = config.d_model // config.n_head
    assert cache.nbytes == 2 * config.n_layer * config.n_kv_head * (head_dim + 4) * 10
    result = engine.generate(engine.encode("The quick"), 4, GREEDY, cache=spec, stop_ids=())
    assert (result.stats.kv_dtype_k, result.stats.kv_window, result.stats.kv_sinks) == ("int8", 8, 2)


def test_options_pick_the_layout(model_dir):
    bf16 = open_model(model_dir, EngineOptions(device="cpu", dtype="bf16", native=False))
    assert bf16.model.norm.weight.dtype == torch.bfloat16 and bf16.model.native_decoder is None
    int8 = open_model(model_dir, EngineOptions(device="cpu", quantize="int8", native=False))
    assert int8.source.endswith(", int8 weights")
    with pytest.raises(UsageError, match="unknown quantize mode 'q3'"):
        open_model(model_dir, EngineOptions(device="cpu", quantize="q3"))


def test_a_preset_is_random_weights_and_says_so(tokenizer_path):
    engine = open_model(Preset("tiny", tokenizer_path, attention="mqa"), EngineOptions(device="cpu"))
    assert engine.random_weights and engine.model.config.n_kv_head == 1
    assert any("random weights" in note for note in engine.notes)


def test_before_layout_sees_the_weights_as_stored(model_dir):
    seen = []
    engine = open_model(
        model_dir, EngineOptions(device="cpu"), lambda loaded: seen.append(loaded.model.state_dict().keys())
    )
    assert any(k.endswith("mlp.w1.weight") for k in seen[0])  # not yet fused into w13
    assert not any(k.endswith("mlp.w1.weight") for k in engine.model.state_dict())
