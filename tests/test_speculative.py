"""Speculative decoding: greedy ids equal plain greedy ids; sampled tokens follow the target's distribution.

Exactness is checked against `generate` on the same model and cache kind (ngram and draft proposers, fp32 and
int8 K/V, MHA/GQA/MQA, the C step on and off). The sampler is checked by a chi-square test of the first tokens
over fixed seeds against the target's exact distribution (enumerated on a 4-token vocabulary); the same test
run on a mutated sampler that keeps every guess must fail it.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
import torch
from conftest import fit, tiny_config

from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import UsageError
from gen_cli.infer import proposers as pr
from gen_cli.infer import speculative as sp
from gen_cli.infer.generate import generate, new_cache
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.planner import Planner
from gen_cli.infer.sampling import distribution
from gen_cli.model.transformer import Transformer

GREEDY = SamplingConfig(temperature=0.0)
N_NEW = 40
# Repetition in the prompt, so prompt lookup finds matches and proposes long runs.
PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 3, 4, 5, 6, 7, 8]


def _trained(seed: int, **changes) -> Transformer:
    """A tiny model fitted briefly to a repeating id pattern: sharp greedy choices that copy the prompt."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(context_length=96, **changes))
    data = torch.tensor(([5, 6, 7, 8, 9, 10, 11] * 30 + [3, 4] + list(range(12, 40))) * 4)
    return fit(model, data, steps=60)


_MODELS: dict[tuple, Transformer] = {}


def _model(kv_heads: int, native: bool, seed: int = 0, n_layer: int = 2) -> Transformer:
    key = (kv_heads, native, seed, n_layer)
    if key not in _MODELS:
        model = _trained(seed, n_kv_head=kv_heads, n_layer=n_layer)
        _MODELS[key] = optimize_for_decode(model, native=native)
    return _MODELS[key]


def _plain(model: Transformer, prompt: list[int], n: int, spec: CacheSpec) -> list[int]:
    ids = torch.tensor([prompt])  # (1, T)
    cache = new_cache(model, ids, n, 1, spec)
    return torch.stack(list(generate(model, ids, n, GREEDY, cache)), 1)[0].tolist()


def _speculate(model, prompt, n, spec, speculation, sampling=GREEDY, seed=0, stop=None):
    cache = new_cache(model, torch.tensor([prompt]), n, 1, spec)
    g = torch.Generator().manual_seed(seed)
    return sp.speculative_run(model, prompt, n, sampling, cache, speculation, g, stop)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("kv", ["fp32", "int8"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_greedy_ids_equal_plain_greedy(proposer, kv_heads, kv, native):
    model = _model(kv_heads, native)
    spec = CacheSpec(kv, kv)
    want = _plain(model, PROMPT, N_NEW, spec)
    if proposer == "ngram":
        guesser = pr.NgramProposer()
    else:  # another, shallower model: it guesses right often, but not always
        guesser = pr.DraftProposer(_model(1, native, seed=1, n_layer=1), spec)
    got, stats, _ = _speculate(model, PROMPT, N_NEW, spec, sp.Speculation(guesser, 4, adaptive=False))
    assert got == want
    assert stats.accepted > 0 and stats.accepted + stats.rounds == N_NEW - 1  # guesses were kept, ids add up
    assert stats.verify_rounds > 0


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_greedy_with_a_repetition_penalty_equals_plain_greedy(proposer):
    # The penalty makes each position's choice depend on the guesses before it: the per-row path.
    model, penalised = _model(2, True), SamplingConfig(temperature=0.0, repetition_penalty=1.3)
    ids = torch.tensor([PROMPT])  # (1, T)
    want = torch.stack(list(generate(model, ids, N_NEW, penalised, new_cache(model, ids, N_NEW))), 1)[0].tolist()
    guesser = pr.NgramProposer() if proposer == "ngram" else pr.DraftProposer(_model(1, True, seed=1, n_layer=1))
    got, stats, _ = _speculate(model, PROMPT, N_NEW, CacheSpec(), sp.Speculation(guesser, 4, adaptive=False), penalised)
    assert got == want and stats.verify_rounds > 0


def test_every_guess_is_kept_when_the_draft_is_the_target():
    model = _model(2, True)
    got, stats, _ = _speculate(
        model, PROMPT, N_NEW, CacheSpec(), sp.Speculation(pr.DraftProposer(model), 3, adaptive=False)
    )
    assert got == _plain(model, PROMPT, N_NEW, CacheSpec())
    assert stats.accepted == stats.proposed > 0
    assert stats.to_dict()["tokens_per_forward"] > 3


@pytest.mark.parametrize("k", [1, 4, 9])
def test_fixed_k_and_a_stop_id_end_where_plain_greedy_does(k):
    model = _model(4, True)
    want = _plain(model, PROMPT, N_NEW, CacheSpec())
    stop = want[12]
    got, stats, _ = _speculate(
        model, PROMPT, N_NEW, CacheSpec(), sp.Speculation(pr.NgramProposer(), k, False), stop=stop
    )
    assert got == want[: want.index(stop) + 1]
    assert stats.proposed <= k * stats.verify_rounds


def _planner(costs: dict[int, float], rate: float | None = None) -> Planner:
    planner = Planner({n: deque([c] * Planner.SURE) for n, c in costs.items()}, 8)
    if rate is not None:  # every position measured at this acceptance
        planner.rate, planner.tried = [rate] * 8, [1] * 8
    return planner


def test_the_planner_picks_the_k_with_the_most_tokens_per_second():
    # A staircase: 2-3 rows cost one step, 4 rows 2.5 steps. All kept: K=2 (3 tokens per step) beats K=3.
    planner = _planner({1: 1.0, 2: 1.0, 3: 1.0, 4: 2.5}, rate=1.0)
    assert planner.expected(2) == 3.0 and planner.choose(room=10) == 2
    assert planner.choose(room=1) == 1  # no more guesses than the run has room for
    # Half kept: K=1 yields 1.5 tokens for one step, K=2 1.75; the third row is free, so K=2 still wins.
    assert _planner({1: 1.0, 2: 1.0, 3: 1.0, 4: 2.5}, rate=0.5).choose(room=10) == 2


def test_the_planner_grows_k_one_row_past_what_it_measured():
    planner = _planner({1: 1.0})
    assert planner.choose(room=10) == 1  # only a plain step measured: one guess (two rows) first
    planner.measured(2, 1.0)
    planner.verified(1, 1, 0.0)
    assert planner.choose(room=10) == 2


def test_the_planner_holds_back_when_no_k_beats_a_plain_step_and_probes_later():
    planner = _planner({1: 1.0, 2: 1.8, 3: 2.6}, rate=0.3)  # 1.3 tokens for 1.8 steps: plain is faster
    chosen = [planner.choose(room=10) for _ in range(12)]
    assert chosen == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # probes after 4, then 8 held rounds
    assert planner.probes == 2
    planner.verified(1, 1, 0.0)
    for _ in range(6):
        planner.verified(2, 2, 0.0)  # the guesses came back: all kept
    assert planner.choose(room=10) > 0  # guessing again


def test_a_forward_cost_is_bounded_by_cheaper_wider_ones():
    # One reading of 3 rows inflated by another process: the 4-row figure below it overrules it.
    planner = _planner({1: 1.0, 2: 1.1, 3: 9.0, 4: 1.3}, rate=1.0)
    assert planner.choose(room=10) == 4
    for seconds in (1.2,) * 5 + (100.0,):  # one slow reading among faster ones does not move the median
        planner.measured(3, seconds)
    assert planner.costs[3] == 1.2


def test_a_cost_read_once_is_no_dearer_than_the_trend_below_it():
    planner = Planner({1: deque([1.0] * 3), 2: deque([1.2] * 3), 3: deque([9.0])}, 8)
    planner.rate, planner.tried = [1.0] * 8, [1] * 8
    assert planner._table(3)[3] == pytest.approx(1.4)  # 1.0, 1.2, then the line: 1.4, not 9.0
    assert planner.choose(room=10) == 3  # three guesses: four rows, hoped on the trend (1.6)
    planner.measured(3, 9.0)
    planner.measured(3, 9.0)  # read three times: taken as read
    assert planner._table(3)[3] == 9.0 and planner.choose(room=10) == 1


def test_an_adaptive_run_reports_what_it_chose():
    model = _model(2, True)
    got, stats, _ = _speculate(model, PROMPT, N_NEW, CacheSpec(), sp.Speculation(pr.NgramProposer()))
    assert got == _plain(model, PROMPT, N_NEW, CacheSpec())
    out = stats.to_dict()
    assert sum(out["k_counts"].values()) == stats.verify_rounds
    assert stats.held + stats.verify_rounds <= stats.rounds  # rounds without a match guess nothing either
    assert set(out["verify_steps"]) <= {str(n) for n in range(2, sp.MAX_K + 2)}


def test_ngram_proposes_the_continuation_of_the_latest_longest_match():
    guesser = pr.NgramProposer()
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 0, 2, 3]
    guesser.start(ids, 40)
    # "0 2 3" occurs nowhere earlier; "2 3" does, at 1-2 and at 6-7: the latest one's continuation is guessed.
    assert guesser.propose(ids, 3, GREEDY, None) == ([4, 5, 6], None)
    assert guesser.propose([7, 8], 3, GREEDY, None) == ([], None)


@pytest.mark.parametrize(("ids", "guess"), [([4, 4, 4, 4], [4, 4, 4, 4]), ([1, 2, 1, 2, 1], [2, 1, 2, 1])])
def test_ngram_guesses_a_loop_that_reaches_the_end_for_all_k_tokens(ids, guess):
    guesser = pr.NgramProposer()
    guesser.start(ids, 40)
    assert guesser.propose(ids, 4, GREEDY, None) == (guess, None)


def test_a_window_cache_is_refused_with_a_reason():
    with pytest.raises(UsageError, match=r"window cache .* cannot be rolled back"):
        sp.check_cache(CacheSpec(window=8), True, 1)
    with pytest.raises(UsageError, match="needs the cache on"):
        sp.check_cache(None, False, 1)
    with pytest.raises(UsageError, match="one sample"):
        sp.check_cache(CacheSpec(), True, 2)


def test_speculate_values_and_draft_tokenizers_are_checked():
    assert pr.parse_speculate("ngram") == ("ngram", None)
    assert pr.parse_speculate("draft:6") == ("draft", 6)
    for bad in ("lookup", "ngram:0", "ngram:x"):
        with pytest.raises(UsageError):
            pr.parse_speculate(bad)
    pr.check_draft(300, "abc", 300, "abc", "d")
    with pytest.raises(UsageError, match="vocabulary"):
        pr.check_draft(300, "abc", 512, "abc", "d")
    with pytest.raises(UsageError, match="different tokenizer"):
        pr.check_draft(300, "abc", 300, "abd", "d")


# --- sampling: the distribution of the first tokens over many seeds -------------------------------------------

V = 4
N_SEEDS = 1200
SAMPLE = SamplingConfig(temperature=1.0)
SHORT = [1, 2, 3, 1, 2]  # prompt lookup finds "1 2" and guesses "3 1 2"


def _peaked(seed: int, n_layer: int) -> Transformer:
    """A random 4-token model with its head scaled up: distributions far from uniform, different per seed."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=V, n_layer=n_layer, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return optimize_for_decode(model, native=False)


def _exact(model: Transformer, prompt: list[int], n: int, sampling: SamplingConfig) -> dict[tuple[int, ...], float]:
    """P(first n tokens) under plain sampling, by enumerating every sequence without a cache."""
    seqs = list(itertools.product(range(V), repeat=n))
    ids = torch.tensor([prompt + list(s) for s in seqs])  # (V^n, T + n)
    with torch.inference_mode():
        logits = model(ids)  # (V^n, T + n, V)
    probs = torch.ones(len(seqs), dtype=torch.float64)
    T = len(prompt)
    for i in range(n):
        p = distribution(logits[:, T + i - 1], ids[:, : T + i], sampling).double()  # (V^n, V)
        probs *= p.gather(1, ids[:, T + i : T + i + 1])[:, 0]
    return dict(zip(seqs, probs.tolist(), strict=True))


def _p_value(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, prob in expected.items():
        e, o = prob * n, counts.get(key, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


_SAMPLING_MODELS: list[Transformer] = []


def _fit(proposer: str, sampling: SamplingConfig = SAMPLE) -> float:
    """The chi-square p-value of the first 3 sampled tokens over N_SEEDS seeds (K = 2: guesses, a rejection
    or a bonus token all happen within them)."""
    if not _SAMPLING_MODELS:
        _SAMPLING_MODELS.extend([_peaked(0, 2), _peaked(1, 1)])
    target, draft = _SAMPLING_MODELS
    n = 3
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(N_SEEDS):
        guesser = pr.NgramProposer() if proposer == "ngram" else pr.DraftProposer(draft)
        cache = new_cache(target, torch.tensor([SHORT]), n, 1)
        g = torch.Generator().manual_seed(seed)
        out, _, _ = sp.speculative_run(target, SHORT, n, sampling, cache, sp.Speculation(guesser, 2, False), g)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return _p_value(counts, _exact(target, SHORT, n, sampling), N_SEEDS)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_sampled_tokens_follow_the_target_distribution(proposer):
    assert _fit(proposer) > 1e-3


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_the_sampling_filters_shape_both_distributions(proposer):
    # Cooler, top-2 and a penalty: p and q both pass through them, and the result still follows p.
    assert _fit(proposer, SamplingConfig(temperature=0.7, top_k=2, repetition_penalty=1.2)) > 1e-3


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_the_distribution_test_fails_a_sampler_that_keeps_every_guess(proposer, monkeypatch):
    monkeypatch.setattr(sp, "accept_or_resample", lambda p, q, guess, g: None)
    assert _fit(proposer) < 1e-6


# --- the command and the engine --------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    return CliRunner().invoke(app, ["generate", *args])


@pytest.mark.parametrize("how", [["--speculate", "ngram"], ["--speculate", "ngram:3"], ["--draft", "self:q8_0"]])
def test_generate_speculates_to_the_same_text_and_reports_it(model_dir, how):
    import json

    base = ["the cat runs. the cat runs. the cat", "--model", str(model_dir), "--json", "--device", "cpu"]
    base += ["-n", "20", "--temperature", "0", "--ignore-eot"]
    plain, fast = _cli(*base), _cli(*base, *how)
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    want, got = json.loads(plain.stdout), json.loads(fast.stdout)
    assert got["text"] == want["text"]
    sp_stats = got["stats"]["speculation"]
    assert sp_stats["proposer"] == ("draft" if "--draft" in how else "ngram")
    assert sp_stats["rounds"] + sp_stats["accepted"] == 19  # the first token comes from the prefill
    assert sp_stats["adaptive"] == (how[-1] in ("ngram", "self:q8_0"))
    assert "speculation" not in want["stats"]


def test_stats_say_what_the_adaptive_k_chose(model_dir):
    args = ["the cat runs. the cat runs. the cat", "--model", str(model_dir), "--device", "cpu", "-n", "12"]
    done = _cli(*args, "--temperature", "0", "--speculate", "ngram", "--stats")
    assert done.exit_code == 0, done.output
    assert "speculation K" in done.stderr and "plain steps where no K paid" in done.stderr
    fixed = _cli(*args, "--temperature", "0", "--speculate", "ngram:3", "--stats")
    assert "speculation K" not in fixed.stderr  # a K given is kept: nothing chosen


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--speculate", "ngram", "--window", "8"], "not go with --window"),
        (["--speculate", "ngram", "--num-samples", "2"], "--num-samples"),
        (["--speculate", "lookup"], "unknown speculation"),
        (["--speculate", "draft"], "no model to guess with"),
        (["--draft", "no/such/model"], "no --draft model at"),
        (["--draft", "self:q3"], "unknown --draft precision"),
        (["--speculate", "ngram", "--draft", "self:q8_0"], "without a --draft model"),
    ],
)
def test_generate_refuses_what_speculation_cannot_do(model_dir, extra, message):
    result = _cli("the cat", "--model", str(model_dir), "--device", "cpu", "-n", "4", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_the_lab_comparison_measures_both_sides_on_the_same_ids(model_dir):
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.lab.speculative_bench import compare

    engine = open_model(model_dir, EngineOptions(device="cpu"))
    ids = engine.encode("the cat runs. the cat runs. the cat")
    out = compare(engine, ids, 16, GREEDY, lambda: sp.Speculation(pr.NgramProposer()), repeats=2)
    assert out["identical"] is True
    assert out["plain_tok_s"]["median"] > 0 and out["speculative_tok_s"]["median"] > 0
    assert out["costs"]["verify_over_step"] > 0 and out["tokens_per_forward"] >= 1


def test_the_bench_runs_a_draft_alone(model_dir):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    argv = ["bench", "speculative", "--model", str(model_dir), "--draft", "self:q8_0", "-n", "6", "--repeats", "1"]
    argv += ["--prompt", "the cat runs. the cat"]
    done = CliRunner().invoke(app, [*argv, "--json"])
    assert done.exit_code == 0, done.output  # a draft alone means the draft proposer, not prompt lookup
    assert '"proposer": "self:q8_0"' in done.stdout
