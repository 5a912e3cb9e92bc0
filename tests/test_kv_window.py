"""Window KV cache (sinks + ring, StreamingLLM) and models trained with a sliding window.

Oracle: a no-cache forward written here, query by query, that applies the same sinks-plus-window mask
and the same positions within the cache (sinks 0…S-1, then the window in order, the query last).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen_cli.cache.linear import KVCache
from gen_cli.cache.spec import CacheSpec
from gen_cli.cache.window import WindowKVCache
from gen_cli.errors import UsageError
from gen_cli.infer.generate import decode_step, greedy_steps, new_cache, prefill, run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.positions import alibi_slopes, apply_rope, rope_tables
from gen_cli.model.transformer import Transformer
from tests.conftest import tiny_config

CONFIG = tiny_config(n_kv_head=2, context_length=32)
GREEDY = SamplingConfig(temperature=0.0)


def sharp_model(config) -> Transformer:
    """Random weights larger than the init's, so attention is peaked and logits spread (greedy ties are rare)."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


MODELS = {kind: sharp_model(CONFIG.replace(pos_encoding=kind)) for kind in ("rope", "alibi", "learned")}


@torch.no_grad()
def reference_logits(model: Transformer, ids: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """(T, V) logits for ids (1, T) without a cache: at every layer, query t attends to the keys p ≤ t that
    are sinks (p < S) or among its last `window` (p > t − window), at positions 0…L-1 in that order."""
    cfg = model.config
    T = ids.shape[1]
    x = model.tok_emb(ids)  # (1, T, d)
    if cfg.pos_encoding == "learned":
        x = x + model.pos_emb.weight[:T]
    elif cfg.pos_encoding == "sinusoidal":
        x = x + model.sin_table[:T]
    cos, sin = rope_tables(T, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    slopes = torch.tensor(alibi_slopes(cfg.n_head))
    group = cfg.n_head // cfg.n_kv_head
    for layer in model.layers:
        q, k, v = layer.attn.project(layer.attn_norm(x), None)  # un-rotated: (1, H, T, hd), (1, Hkv, T, hd)
        outs = []
        for t in range(T):
            keys = torch.tensor([p for p in range(t + 1) if p < sinks or p > t - window])
            L = len(keys)
            kk, vv, qq = k[:, :, keys], v[:, :, keys], q[:, :, t : t + 1]
            if cfg.pos_encoding == "rope":
                qq = apply_rope(qq, cos[L - 1 : L], sin[L - 1 : L])
                kk = apply_rope(kk, cos[:L], sin[:L])
            kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)  # (1, H, L, hd)
            logits = qq @ kk.transpose(-1, -2) / math.sqrt(cfg.head_dim)  # (1, H, 1, L)
            if cfg.pos_encoding == "alibi":
                logits = logits - slopes[:, None, None] * (L - 1 - torch.arange(L)).float()
            outs.append(logits.softmax(-1) @ vv)  # (1, H, 1, hd)
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, T, -1)  # (1, T, H × hd)
        x = x + layer.attn.wo(y)
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.lm_head(model.norm(x))[0]


def kv_bytes(config, slots: int, batch: int = 1, bytes_per_element: int = 4) -> int:
    """2 (K and V) × n_layer × n_kv_head × head_dim × slots × batch × bytes, written out (plain kinds)."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * slots * batch * bytes_per_element


def windowed_greedy(model, prompt, n, window, sinks, kinds=(None, None), forced=None):
    cache = new_cache(model, prompt, n, spec=CacheSpec(*kinds, window, sinks))
    steps = list(greedy_steps(model, prompt, n, cache, forced))
    return torch.stack([lg[0] for lg, _ in steps]), torch.stack([t[0] for _, t in steps]), cache


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal"])
def test_reference_with_a_wide_window_is_the_model(pos_encoding):
    model = sharp_model(CONFIG.replace(pos_encoding=pos_encoding))
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reference_logits(model, ids, 100, 0), model(ids)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal"])
def test_window_at_least_the_sequence_is_bit_identical_to_the_full_cache(pos_encoding):
    model = sharp_model(CONFIG.replace(pos_encoding=pos_encoding))
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    full = list(greedy_steps(model, prompt, 12, new_cache(model, prompt, 12)))
    logits, tokens, _ = windowed_greedy(model, prompt, 12, window=19 - 3, sinks=3)  # S + N = 19 = length
    for (lg, tok), lw, tw in zip(full, logits, tokens, strict=True):
        assert torch.equal(lg[0], lw) and torch.equal(tok[0], tw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    window=st.integers(2, 9),
    sinks=st.integers(0, 4),
    prompt_len=st.integers(1, 20),
    new=st.integers(1, 30),
    pos_encoding=st.sampled_from(["rope", "alibi"]),
)
def test_window_equals_the_masked_no_cache_reference(window, sinks, prompt_len, new, pos_encoding):
    if sinks >= window:
        return  # refused (tested below); sinks past the prompt are the first generated tokens
    model = MODELS[pos_encoding]
    prompt = torch.randint(0, 300, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    logits, tokens, cache = windowed_greedy(model, prompt, new, window, sinks)
    ids = torch.cat([prompt[0], tokens])[None, :-1]  # (1, prompt + new - 1): every position that was fed
    ref = reference_logits(model, ids, window, sinks)[prompt_len - 1 :]  # (new, V)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref.argmax(-1))  # greedy tokens identical
    assert cache.pos == prompt_len + new - 1


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("prompt_len", [1, 3])
def test_sinks_are_the_first_tokens_even_when_generated(pos_encoding, prompt_len):
    """Sinks longer than the prompt: the first generated tokens become sinks, kept past every eviction."""
    model = MODELS[pos_encoding]
    prompt = torch.randint(0, 300, (1, prompt_len), generator=torch.Generator().manual_seed(11))
    logits, tokens, cache = windowed_greedy(model, prompt, 25, window=6, sinks=4)
    ids = torch.cat([prompt[0], tokens])[None, :-1]  # (1, prompt + 24): every position that was fed
    ref = reference_logits(model, ids, 6, 4)[prompt_len - 1 :]  # (25, V)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref.argmax(-1))
    assert cache.pos == prompt_len + 24 > cache.max_tokens == 10


def test_learned_positions_stay_absolute_and_refuse_past_the_context():
    model = MODELS["learned"]  # context 32
    prompt = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    logits, tokens, _ = windowed_greedy(model, prompt, 20, 6, 2)  # window 6 < 29 positions, all within 32
    ref = reference_logits(model, torch.cat([prompt[0], tokens])[None, :-1], 6, 2)[9:]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="context length"):
        new_cache(model, prompt, 40, spec=CacheSpec(window=6, sinks=2))


def test_rope_generates_far_past_the_context_with_constant_bytes():
    model = MODELS["rope"]  # context 32
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    cache = new_cache(model, prompt, 200, spec=CacheSpec(window=8, sinks=2))
    before = cache.nbytes
    assert before == kv_bytes(CONFIG, 10) == 2 * 2 * 2 * 8 * 10 * 4  # S + N slots, however long the run
    n = sum(1 for _ in greedy_steps(model, prompt, 200, cache))
    assert n == 200 and cache.pos == 204 and cache.nbytes == before
    stats = run_generation(model, prompt, 200, SamplingConfig(temperature=0), spec=CacheSpec(window=8, sinks=2)).stats
    assert stats.kv_cache_bytes == stats.kv_cache_bytes_analytic == before
    assert (stats.kv_window, stats.kv_sinks, stats.new_tokens) == (8, 2, 200)


@pytest.mark.parametrize("kinds", [("int8", "int8"), ("bf16", "fp32")])
def test_quantized_kinds_combine_with_a_window(kinds):
    """The window cache stores K before RoPE, so its int8 differs from the linear cache's: compare it to
    the fp32 window it approximates on the same tokens (KL of the next-token distribution), and the bytes."""
    model = sharp_model(CONFIG.replace(d_model=64, n_head=2, n_kv_head=1))  # head_dim stays 8
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    ref, tokens, _ = windowed_greedy(model, prompt, 30, 8, 2)
    got, _, cache = windowed_greedy(model, prompt, 30, 8, 2, kinds=kinds, forced=tokens[None])  # same tokens
    # Per head and token (head_dim 8): int8 8 values + an fp32 scale; bf16 2 bytes, fp32 4 bytes a value.
    assert model.config.head_dim == 8
    per_head = {"int8": 8 + 4, "bf16": 8 * 2, "fp32": 8 * 4}
    assert cache.nbytes == 2 * 1 * (per_head[kinds[0]] + per_head[kinds[1]]) * 10  # layers × KV heads × … × slots
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 0.05


def test_prompt_longer_than_the_window_is_prefilled_in_chunks():
    model = MODELS["rope"]
    prompt = torch.randint(0, 300, (1, 27), generator=torch.Generator().manual_seed(6))
    cache = WindowKVCache(model.config, 1, 5, 1)
    logits = model(prompt, cache=cache)  # one call: the model splits it into chunks of ≤ 5
    torch.testing.assert_close(logits[0], reference_logits(model, prompt, 5, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}])
def test_chunk_frames_past_the_context_use_the_models_own_rope_rows(scaling):
    """Context 32, window 20 + 4 sinks: a chunk of 20 after the first eviction puts queries at frame positions
    up to S + 2N − 2 = 42, past the model's tables; the longer rows follow its base and scaling."""
    model = sharp_model(CONFIG.replace(rope_scaling=scaling))
    prompt = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(12))
    cache = WindowKVCache(model.config, 1, 20, 4)
    logits = model(prompt, cache=cache)  # chunks of 20
    torch.testing.assert_close(logits[0], reference_logits(model, prompt, 20, 4), atol=1e-4, rtol=1e-4)


def test_several_samples_share_one_windowed_prefill():
    model = MODELS["rope"]
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(7))
    spec = CacheSpec(window=6, sinks=1)
    one = run_generation(model, prompt, 15, SamplingConfig(temperature=0), spec=spec).tokens
    three = run_generation(model, prompt, 15, SamplingConfig(temperature=0), num_samples=3, spec=spec).tokens
    assert torch.equal(three, one.expand(3, -1))


@pytest.mark.parametrize(
    ("window", "sinks", "prompt_len", "match"),
    [
        (4, 4, 10, "larger than sinks"),
        (4, 6, 10, "larger than sinks"),
        (0, 0, 10, "window must be"),
        (30, 4, 10, "pass the model's context"),
    ],
)
def test_bad_windows_are_refused_in_one_line(window, sinks, prompt_len, match):
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    with pytest.raises(UsageError, match=match) as e:
        new_cache(MODELS["rope"], prompt, 5, spec=CacheSpec(window=window, sinks=sinks))
    assert "\n" not in str(e.value)


def test_a_window_needs_the_cache_on():
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UsageError, match="needs the cache on"):
        run_generation(MODELS["rope"], prompt, 3, SamplingConfig(), use_cache=False, spec=CacheSpec(window=4))


# Models trained with a sliding window ----------------------------------------------------------------


def test_trained_window_is_a_config_field_saved_only_when_set():
    assert "sliding_window" not in CONFIG.to_dict()
    cfg = CONFIG.replace(sliding_window=6)
    assert cfg.to_dict()["sliding_window"] == 6
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="sliding_window"):
        CONFIG.replace(sliding_window=0)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
def test_trained_window_cache_ring_and_no_cache_agree(pos_encoding):
    """A model trained with window W: the no-cache mask, a full linear cache and the automatic ring of W
    slots give the same logits (RoPE/ALiBi depend on distance only, so the ring's positions are exact)."""
    model = sharp_model(CONFIG.replace(sliding_window=6, pos_encoding=pos_encoding))
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(8))
    ring = new_cache(model, prompt, 15)
    assert isinstance(ring, WindowKVCache) and (ring.window, ring.sinks) == (6, 0)
    steps = list(greedy_steps(model, prompt, 15, ring))
    tokens = torch.stack([t[0] for _, t in steps])
    ids = torch.cat([prompt[0], tokens])[None, :-1]
    no_cache = model(ids)[0, 8:]
    linear = KVCache(model.config, 1, 24)
    cached = torch.cat([model(prompt, cache=linear)[0, -1:]] + [model(ids[:, i : i + 1], cache=linear)[0] for i in
                                                                range(9, ids.shape[1])])  # fmt: skip
    torch.testing.assert_close(torch.stack([lg[0] for lg, _ in steps]), no_cache, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, no_cache, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(no_cache, reference_logits(model, ids, 6, 0)[8:], atol=1e-4, rtol=1e-4)


def test_run_time_window_wider_than_the_trained_one_is_refused():
    model = sharp_model(CONFIG.replace(sliding_window=6))
    with pytest.raises(UsageError, match="trained to attend to its last 6 tokens"):
        new_cache(model, torch.zeros(1, 4, dtype=torch.long), 5, spec=CacheSpec(window=6, sinks=1))


@pytest.mark.parametrize(
    ("arch", "changes", "window"),
    [
        ("mistral", {"sliding_window": 5}, 5),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}, 5),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}, None),  # mixed
    ],
)
def test_trained_window_equals_transformers(tmp_path, arch, changes, window):
    """transformers' Mistral/Qwen2 with a tiny sliding window, on a sequence 4× longer: the no-cache path, a
    linear cache and the ring cache all equal its logits (mixed layers: the context is capped at the window)."""
    transformers = pytest.importorskip("transformers")
    from hf_builders import build_hf_model, byte_level_tokenizer

    from gen_cli.formats.loading import load

    build_hf_model(arch, tmp_path, byte_level_tokenizer())
    cfg = json.loads((tmp_path / "config.json").read_text()) | changes
    cfg.pop("layer_types", None)  # recomputed from the window settings by transformers, and by gen
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    model = load(tmp_path).model
    assert model.config.sliding_window == window
    if window is None:
        assert model.config.context_length == 5
        return
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf(ids).logits[0]  # (20, V)
    torch.testing.assert_close(model(ids)[0], ref, atol=1e-4, rtol=1e-4)
    ring = new_cache(model, ids[:, :8], 12)
    assert isinstance(ring, WindowKVCache) and ring.nbytes == kv_bytes(model.config, 5)
    # On the decode path gen runs (the native C step where it can): a linear cache past the window must
    # not be decoded without the mask.
    model = optimize_for_decode(model, native=True)
    for cache in (ring, KVCache(model.config, 1, 20)):
        got = [prefill(model, ids[:, :8], cache)[0]] + [decode_step(model, ids[:, t : t + 1], cache)[0]
                                                        for t in range(8, 20)]  # fmt: skip
        torch.testing.assert_close(torch.stack(got), ref[7:], atol=1e-4, rtol=1e-4)


def test_gguf_sliding_window_is_read(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from hf_builders import build_hf_model, byte_level_tokenizer, write_gguf

    from gen_cli.formats.loading import load

    tok = byte_level_tokenizer()
    hf = build_hf_model("mistral", tmp_path, tok)
    add_name = gguf.GGUFWriter.add_name
    monkeypatch.setattr(gguf.GGUFWriter, "add_name", lambda w, n: (add_name(w, n), w.add_sliding_window(5)))
    write_gguf(hf, tok, "mistral", tmp_path / "m.gguf")
    model = load(tmp_path / "m.gguf").model
    assert model.config.sliding_window == 5


def test_chat_goes_on_past_the_window_as_a_fresh_windowed_run_would(tmp_path):
    """A conversation on a window cache: every reply equals greedy on a fresh window cache of the whole
    rendered conversation (the cache is reused while it can be, re-prefilled where a roll-back is needed)."""
    pytest.importorskip("transformers")
    from test_chat import CHATML, _session, chat_dir, loaded  # noqa: F401  (fixtures)

    model_dir = chat_dir.__wrapped__(_TmpFactory(tmp_path))
    chat = loaded.__wrapped__(model_dir)
    session = _session(chat, spec=CacheSpec(window=24, sinks=4))
    for message in ("Hello there, fox!", "And 12345?", "Tell me more about the dog.", "Why?"):
        turn = session.say(message, 12, GREEDY)
        prompt = torch.tensor([session._last_prompt])  # (1, T): the conversation as rendered for this turn
        cache = new_cache(chat.model, prompt, 12, spec=CacheSpec(window=24, sinks=4))
        expected = []
        for _, t in greedy_steps(chat.model, prompt, 12, cache):
            expected.append(int(t[0]))
            if expected[-1] in chat.stop_ids:
                break
        assert turn.token_ids == expected
    assert session.cache.pos > 24 + 4 and session.cache.nbytes == kv_bytes(chat.model.config, 28)


class _TmpFactory:
    def __init__(self, path):
        self.path = path

    def mktemp(self, name):
        (self.path / name).mkdir()
        return self.path / name


def test_cli_generate_runs_past_the_context_on_a_window(model_dir):
    """The tiny model's context is 64: 150 new tokens on a window of 16 + 4 sinks, flat bytes, one-line refusals."""
    from typer.testing import CliRunner

    from gen_cli.cli import app

    runner = CliRunner()
    args = ["generate", "The quick brown fox", "--model", str(model_dir), "--device", "cpu", "--ignore-eot"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "150", "--window", "16", "--sinks", "4", "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)["stats"]
    assert s["new_tokens"] == 150 and (s["kv_window"], s["kv_sinks"]) == (16, 4) and s["decode_path"] == "torch"
    assert s["kv_cache_bytes"] == s["kv_cache_bytes_analytic"] == 2 * 2 * 4 * 8 * 20 * 4  # K+V, layers, heads, hd
    short = runner.invoke(app, ["generate", "Hi", *args[2:], "--max-new-tokens", "40", "--window", "16", "--sinks",
                                "8", "--json"])  # fmt: skip  # sinks past the prompt: generated tokens
    assert short.exit_code == 0, short.output
    assert json.loads(short.stdout)["stats"]["new_tokens"] == 40
    for extra, message in (
        (["--window", "4", "--sinks", "4"], "--window must be larger than --sinks, got 4 ≤ 4"),
        (["--window", "0"], "window must be a whole number ≥ 1"),
        (["--sinks", "2"], "--sinks goes with --window"),
        (["--window", "60", "--sinks", "8"], "positions pass the model's context of 64"),
        (["--window", "8", "--no-kv-cache"], "--window is a kind of KV cache"),
    ):
        bad = runner.invoke(app, [*args, "--max-new-tokens", "5", *extra])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) <= 2, extra


def test_compare_grid_crosses_windows_and_sinks_and_runs_past_the_context():
    from gen_cli.lab import compare

    def grid(**axes):
        args = dict(attention=["mha"], kv_heads=[], pos=["rope"], kv_cache=["on"], prompt_len=[8], gen_len=[40],
                    batch=[1], dtype=["float32"], repeats=1, warmup=0, threads=1)  # fmt: skip
        return compare.expand_grid(CONFIG, **(args | axes))  # context 32: 48 tokens only with a window

    specs = grid(window=[8, 12], sinks=[0, 2])
    assert [(s.window, s.sinks) for s in specs] == [(8, 0), (8, 2), (12, 0), (12, 2)]
    with pytest.raises(UsageError, match="exceeds the model's context"):
        grid(window=[0, 8])  # the full cache cannot hold 48 tokens
    with pytest.raises(UsageError, match="exceeds the model's context"):
        grid(window=[8], pos=["learned"])
    assert [(s.window, s.sinks) for s in grid(window=[8], sinks=[4], prompt_len=[2])] == [(8, 4)]  # sinks > prompt
    with pytest.raises(UsageError, match="larger than sinks"):
        grid(window=[4], sinks=[4], gen_len=[4])
    row = compare.measure(grid(window=[8], sinks=[2], gen_len=[6])[0])
    assert (row["kv_window"], row["kv_sinks"]) == (8, 2) and row[
        "kv_cache_bytes_measured"
    ] == 2 * 2 * 4 * 8 * 10 * 4  # MHA: 4 KV heads
    assert row["kv_top1_agreement"] is not None and row["greedy_match"] is None  # KL against the full cache


@pytest.mark.parametrize("target", ["hf", "gguf"])
def test_export_refuses_a_trained_window_it_cannot_write(target):
    from gen_cli.errors import GenError
    from gen_cli.formats.export import family

    with pytest.raises(GenError, match="trained sliding window of 6 tokens"):
        family(CONFIG.replace(sliding_window=6), target)
