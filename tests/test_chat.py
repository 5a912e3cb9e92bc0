"""`gen chat` and its session: each turn prefills only the tokens after the cached prefix, rolls the
cache back where the render diverges, and replies exactly as recomputing the whole conversation would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_builders import CHATML, write_chatml_model  # noqa: E402

from gen_cli.cache.linear import KVCache  # noqa: E402
from gen_cli.cache.spec import CacheSpec  # noqa: E402
from gen_cli.cli import app  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.infer.generate import continue_steps, generate, greedy_steps, new_cache, prefill  # noqa: E402
from gen_cli.infer.options import SamplingConfig  # noqa: E402
from gen_cli.infer.session import ChatSession, ContextFull, common_prefix  # noqa: E402

runner = CliRunner()
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_chatml_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def loaded(chat_dir):
    return load(chat_dir)


def _session(loaded, **kw) -> ChatSession:
    return ChatSession(
        loaded.model, loaded.tokenizer, loaded.chat_template, special_tokens=loaded.special_tokens,
        stop_ids=loaded.stop_ids, **kw,
    )  # fmt: skip


def _oracle(loaded, ids: list[int], n: int) -> list[int]:
    """Greedy tokens recomputing the whole conversation every step, no cache, cut after the first stop id."""
    prompt = torch.tensor([ids])  # (1, T)
    out = [int(t[0]) for t in generate(loaded.model, prompt, n, GREEDY, None, stop_token_id=loaded.stop_ids)]
    stops = [i for i, t in enumerate(out) if t in loaded.stop_ids]
    return out[: stops[0] + 1] if stops else out


def _cache_matches_fresh_prefill(loaded, session: ChatSession) -> None:
    fresh = KVCache(loaded.model.config, 1, len(session.ids))
    prefill(loaded.model, torch.tensor([session.ids]), fresh)
    assert session.cache.pos == len(session.ids)
    for a, b in zip(session.cache.k + session.cache.v, fresh.k + fresh.v, strict=True):
        torch.testing.assert_close(a[:, :, : fresh.pos], b, atol=1e-5, rtol=1e-5)


def test_second_turn_prefills_only_new_tokens_and_equals_the_no_cache_oracle(loaded):
    session = _session(loaded, system="Be brief.")
    first = session.say("Hello there, fox!", 8, GREEDY)
    assert first.reused_tokens == 0 and first.prefilled_tokens == first.prompt_tokens
    cached = list(session.ids)
    ids = session.render([*session.messages, {"role": "user", "content": "And 12345?"}])
    second = session.say("And 12345?", 8, GREEDY)
    reused = common_prefix(cached, ids)
    assert second.reused_tokens == reused >= first.prompt_tokens  # the whole first prompt came from the cache
    assert second.prefilled_tokens == len(ids) - reused < len(ids) // 2
    assert second.token_ids == _oracle(loaded, ids, 8)
    assert second.text == session.messages[-1]["content"]
    _cache_matches_fresh_prefill(loaded, session)


def test_continue_steps_logits_equal_recomputing_without_a_cache(loaded):
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(1))  # (1, T)
    cache = KVCache(loaded.model.config, 1, 40)
    prefill(loaded.model, ids[:, :12], cache)  # a conversation's earlier turns, already cached
    cache.truncate(9)  # …of which only 9 tokens are still shared
    cached = list(continue_steps(loaded.model, ids, 6, GREEDY, cache))
    oracle = list(greedy_steps(loaded.model, ids, 6, None))
    assert len(cached) == len(oracle) == 6
    for (lc, tc), (lo, to) in zip(cached, oracle, strict=True):
        torch.testing.assert_close(lc, lo, atol=1e-4, rtol=1e-4)
        assert torch.equal(tc, to)


def test_native_step_continues_a_conversation_as_the_oracle_does(chat_dir):
    from gen_cli.infer.optimize import optimize_for_decode
    from gen_cli.native.build import native_status

    if native_status() != "ready":
        pytest.skip(f"no native step here: {native_status()}")
    fast = load(chat_dir)
    fast.model = optimize_for_decode(fast.model, native=True)
    assert fast.model.native_decoder is not None
    session = _session(fast)
    session.say("Hello there, fox!", 8, GREEDY)
    ids = session.render([*session.messages, {"role": "user", "content": "And 12345?"}])
    turn = session.say("And 12345?", 8, GREEDY)
    assert turn.reused_tokens > 0 and turn.token_ids == _oracle(fast, ids, 8)


def test_reset_empties_the_cache_and_starts_over(loaded):
    session = _session(loaded, system="Be brief.")
    session.say("Hello there, fox!", 5, GREEDY)
    session.reset()
    assert session.cache.pos == 0 and session.ids == [] and session.turns == []
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    again = session.say("Hello there, fox!", 5, GREEDY)
    fresh = _session(loaded, system="Be brief.").say("Hello there, fox!", 5, GREEDY)
    assert again.reused_tokens == 0 and again.token_ids == fresh.token_ids


def test_a_render_that_diverges_rolls_the_cache_back(loaded):
    session = _session(loaded)
    session.say("Hello there, fox!", 6, GREEDY)
    before = session.cache.pos
    # As a template that rewrites past turns (Qwen3 drops earlier reasoning): the history changes.
    session.messages[0]["content"] = "Hello there, dog!"
    ids = session.render([*session.messages, {"role": "user", "content": "Why?"}])
    shared = common_prefix(session.ids, ids)
    turn = session.say("Why?", 6, GREEDY)
    assert 0 < turn.reused_tokens == shared < before and turn.rolled_back == before - shared
    assert turn.token_ids == _oracle(loaded, ids, 6)
    _cache_matches_fresh_prefill(loaded, session)


def test_ctrl_c_keeps_the_conversation_and_cache_consistent(loaded):
    session = _session(loaded)

    def stop(_: str) -> None:
        raise KeyboardInterrupt

    cut = session.say("Tell me a long story about keys and values", 30, GREEDY, on_text=stop)
    assert cut.interrupted and cut.new_tokens < 30
    _cache_matches_fresh_prefill(loaded, session)
    ids = session.render([*session.messages, {"role": "user", "content": "Go on."}])
    assert session.say("Go on.", 6, GREEDY).token_ids == _oracle(loaded, ids, 6)


def test_context_full_cuts_the_reply_then_refuses_the_next_turn(loaded):
    session = _session(loaded, context_tokens=40)
    turn = session.say("Hello there, fox!", 200, GREEDY)
    if not turn.context_full:  # a stop id came first; fill the rest with more turns
        with pytest.raises(ContextFull):
            for _ in range(10):
                session.say("More, more, more please.", 200, GREEDY)
    else:
        assert turn.prompt_tokens + turn.new_tokens == 40
        with pytest.raises(ContextFull, match="the cache's 40"):
            session.say("More?", 5, GREEDY)
    session.reset()
    assert session.say("Hi", 3, GREEDY).prompt_tokens < 40


def test_a_conversation_runs_on_an_int8_cache_and_keeps_its_prefix(loaded):
    session = _session(loaded, spec=CacheSpec("int8", "int8"))
    session.say("Hello there, fox!", 6, GREEDY)
    second = session.say("And 12345?", 6, GREEDY)
    assert second.reused_tokens > 0 and session.cache.k_kind == "int8" and session.cache.pos == len(session.ids)
    fresh = KVCache(loaded.model.config, 1, len(session.ids))
    prefill(loaded.model, torch.tensor([session.ids]), fresh)
    for side, ref in ((session.cache.k_sides[0], fresh.k[0]), (session.cache.v_sides[0], fresh.v[0])):
        # Layer 0's k/v do not depend on the cache: int8 keeps each within half a step (amax / 254) of its
        # token's head. Deeper layers read rounded k/v, so their inputs drift too.
        bound = ref.abs().amax(-1, keepdim=True) / 254 + 1e-5
        assert ((side.read(fresh.pos) - ref).abs() <= bound).all()


def test_kv_cache_truncate_keeps_a_prefix():
    from conftest import tiny_config

    from gen_cli.errors import InternalError

    cache = KVCache(tiny_config(), 1, 8)
    cache.advance(5)
    cache.truncate(2)
    assert cache.pos == 2
    with pytest.raises(InternalError):
        cache.truncate(3)


def _chat(chat_dir, lines: str, *extra: str):
    argv = ["chat", "--model", str(chat_dir), "--temperature", "0", "--max-new-tokens", "6", "--no-native", *extra]
    return runner.invoke(app, argv, input=lines)


def test_cli_chat_with_piped_turns_prints_replies_and_stats(chat_dir, loaded):
    from gen_cli.infer.optimize import optimize_for_decode

    result = _chat(chat_dir, "Hello there, fox!\nAnd 12345?\n/stats\n/exit\nnever read\n", "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    # The same turns through the library, on the model as the command prepares it.
    model = optimize_for_decode(load(chat_dir).model, native=False)
    session = ChatSession(model, loaded.tokenizer, CHATML, special_tokens=loaded.special_tokens,
                          stop_ids=loaded.stop_ids, system="Be brief.")  # fmt: skip
    expected = [session.say(m, 6, GREEDY).text for m in ("Hello there, fox!", "And 12345?")]
    assert result.stdout == "".join(t + "\n" for t in expected)
    assert "re-prefill" in result.stderr and "reused from the cache" in result.stderr
    assert "whole / from cache" in result.stderr


def test_cli_chat_json_is_one_object_per_turn_and_per_stats(chat_dir, loaded):
    from gen_cli.infer.optimize import optimize_for_decode

    result = _chat(chat_dir, "Hello there, fox!\nAnd 12345?\n/stats\n", "--json")
    assert result.exit_code == 0, result.output
    first, second, stats = (json.loads(line) for line in result.stdout.splitlines())
    assert first["reused_tokens"] == 0 and second["reused_tokens"] >= first["prompt_tokens"]
    model = optimize_for_decode(load(chat_dir).model, native=False)
    session = ChatSession(model, loaded.tokenizer, CHATML, special_tokens=loaded.special_tokens,
                          stop_ids=loaded.stop_ids)  # fmt: skip
    assert [first["reply"], second["reply"]] == [
        session.say(m, 6, GREEDY).text for m in ("Hello there, fox!", "And 12345?")
    ]
    assert second["ttft_s"] > 0
    stats = stats["stats"]
    assert stats["turns"] == 2 and stats["cached_tokens"] > second["prompt_tokens"] - 1
    cmp = stats["prefill_comparison"]
    assert cmp["prompt_tokens"] == second["prompt_tokens"] and len(cmp["full_s"]) == len(cmp["reuse_s"]) == 3


def test_cli_chat_says_when_the_context_is_full(chat_dir):
    lines = "Hello there, fox!\n" * 6 + "/reset\nHi\n"
    result = _chat(chat_dir, lines, "--context-tokens", "48")
    assert result.exit_code == 0, result.output
    assert "the context is full" in result.stderr and "/reset" in result.stderr
    assert "conversation cleared" in result.stderr


def test_cli_chat_refuses_a_model_without_a_template_in_one_line(chat_dir, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(chat_dir, plain)
    (plain / "tokenizer_config.json").unlink()
    result = runner.invoke(app, ["chat", "--model", str(plain)], input="hi\n")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no chat template" in lines[0] and "gen generate" in lines[0]


def _generate_oracle(loaded, ids: list[int], n: int, kinds: tuple[str, str]) -> list[int]:
    """Greedy tokens of `generate` on the whole conversation with a fresh cache of the same kinds."""
    prompt = torch.tensor([ids])  # (1, T)
    cache = new_cache(loaded.model, prompt, n, spec=CacheSpec(*kinds))
    out = [int(t[0]) for t in generate(loaded.model, prompt, n, GREEDY, cache, stop_token_id=loaded.stop_ids)]
    stops = [i for i, t in enumerate(out) if t in loaded.stop_ids]
    return out[: stops[0] + 1] if stops else out


@pytest.mark.parametrize("kinds", [("int8", "int8"), ("bf16", "int8")])
def test_a_quantized_conversation_equals_generate_with_the_same_kind(loaded, kinds):
    # The oracle is not the no-cache path (a quantized cache rounds K/V, the no-cache path does not), but
    # `generate` over the whole conversation with a fresh cache of the same kinds: each token's K/V is
    # quantized on its own, so turn-by-turn reuse must give what one prefill gives.
    session = _session(loaded, system="Be brief.", spec=CacheSpec(*kinds))
    first = session.say("Hello there, fox!", 8, GREEDY)
    assert first.token_ids == _generate_oracle(loaded, session.ids[: first.prompt_tokens], 8, kinds)
    ids = session.render([*session.messages, {"role": "user", "content": "And 12345?"}])
    second = session.say("And 12345?", 8, GREEDY)
    assert second.reused_tokens > 0
    assert second.token_ids == _generate_oracle(loaded, ids, 8, kinds)


def test_cli_chat_kv_dtype_stores_the_conversation_in_that_kind(chat_dir, loaded):
    from gen_cli.infer.optimize import optimize_for_decode

    result = _chat(chat_dir, "Hello there, fox!\nAnd 12345?\n", "--kv-dtype", "int8")
    assert result.exit_code == 0, result.output
    model = optimize_for_decode(load(chat_dir).model, native=False)
    session = ChatSession(model, loaded.tokenizer, CHATML, special_tokens=loaded.special_tokens,
                          stop_ids=loaded.stop_ids, spec=CacheSpec("int8", "int8"))  # fmt: skip
    expected = [session.say(m, 6, GREEDY).text for m in ("Hello there, fox!", "And 12345?")]
    assert result.stdout == "".join(t + "\n" for t in expected)
    bad = _chat(chat_dir, "Hi\n", "--kv-dtype", "q3")
    assert bad.exit_code == 2 and "unknown KV cache kind" in bad.stderr
    bad = _chat(chat_dir, "Hi\n", "--kv-dtype", "int8", "--kv-dtype-v", "fp32")
    assert bad.exit_code == 2 and "not both forms" in bad.stderr


def test_cli_chat_refuses_a_piped_line_that_is_not_utf8_as_generate_does(chat_dir):
    result = runner.invoke(app, ["chat", "--model", str(chat_dir), "--max-new-tokens", "2"], input=b"caf\xe9\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert "a line on stdin is not valid UTF-8 (byte 0xe9 at offset 3)" in result.stderr


def test_a_system_message_that_is_not_utf8_is_refused_in_one_line(chat_dir):
    import os

    argv = ["chat", "--model", str(chat_dir), "--system", os.fsdecode(b"caf\xe9")]
    result = runner.invoke(app, argv, input="Hi\n")
    assert result.exit_code == 2 and "the system message is not valid UTF-8" in result.stderr
    argv = ["generate", "--model", str(chat_dir), "--chat", "Hi", "--system", os.fsdecode(b"caf\xe9")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "the system message is not valid UTF-8" in result.stderr


def test_cli_chat_refuses_a_line_no_context_could_hold_before_tokenizing_it(chat_dir):
    result = runner.invoke(app, ["chat", "--model", str(chat_dir), "--max-new-tokens", "2"], input=b"x" * 10**6 + b"\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert re.search(r"a line on stdin is over [\d,]+ bytes, more than the context could hold", result.stderr)


def test_cli_chat_decodes_piped_bytes_itself_under_a_strict_io_encoding(chat_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONPATH": str(Path(__file__).parent.parent)}
    argv = [sys.executable, "-m", "gen_cli", "chat", "--model", str(chat_dir), "--max-new-tokens", "2"]
    done = subprocess.run(argv, input=b"caf\xe9\n", capture_output=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode().strip() == "error: a line on stdin is not valid UTF-8 (byte 0xe9 at offset 3)"
