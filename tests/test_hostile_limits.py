"""Limits on what input may cost: chat templates (time, output, values), readers of user input (capped
before decoding and tokenizing), memory estimates, the text stream's tail, identities and checksums."""

from __future__ import annotations

import json

import pytest
from hostile import cli, copy_model, refused
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen_cli.errors import GenError, UsageError
from gen_cli.text import chat
from gen_cli.text.chat import encode_rendered, render_chat
from gen_cli.text.stream import TextStream

# ---------------------------------------------------------------------------------------------
# Chat templates: bounded in time, in output and in the values they make

HI = [{"role": "user", "content": "hi"}]

TEMPLATE_ATTACKS = {
    "nested-loops": ("{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}", r"took more"),
    "output-loop": ("{% for i in range(60000) %}{% for j in range(60000) %}x{% endfor %}{% endfor %}", r"more than"),
    "power": ("{{ (9 ** 999999999) > 1 }}", r"9 \*\* 999999999 is past the limit of 65,536 bits"),
    "repeat-100M": ("{{ 'x' * 100000000 }}", r"a product of 100,000,000 items is past the limit"),
    "repeat-3G": ("{{ 'x' * 3000000000 }}", r"a product of 3,000,000,000 items"),
    "strftime": ("{{ strftime_now('%Y' * 10**6) }}", r"a product of 2,000,000 items"),
    "doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        r"a joined string of [\d,]+ characters",
    ),
    "macro-doubling": (
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 40) }}",
        r"a joined string",
    ),
    "width": ("{{ 'x'|center(3000000000) }}", r"a filter argument 3,000,000,000 is past the limit"),
    "method-width": ("{{ 'x'.ljust(3000000000) }}", r"an argument 3,000,000,000 is past the limit"),
    "shared-list": ("{{ (['x' * 1000] * 100000)|join }}", r"a product of [\d,]+ items"),
}


@pytest.mark.parametrize("attack", TEMPLATE_ATTACKS)
def test_a_hostile_template_stops_at_the_render_limits(attack, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)  # small limits keep the test short
    template, pattern = TEMPLATE_ATTACKS[attack]
    with pytest.raises(GenError, match=pattern) as caught:
        render_chat(template, HI, max_bytes=1 << 16)
    assert "render limits" in str(caught.value)


def _alone(monkeypatch) -> None:
    # The net applies only in a one-thread process; earlier tests in the same process may leave threads
    # (a server's, a thread pool's) behind, so say "alone" explicitly.
    import threading

    monkeypatch.setattr(threading, "active_count", lambda: 1)


def test_what_the_checks_miss_meets_the_address_space_net(monkeypatch):
    _alone(monkeypatch)
    monkeypatch.setattr(chat, "RENDER_HEADROOM", 256 << 20)
    with pytest.raises(GenError, match="too much memory"):  # 10^10 characters from a replace
        render_chat("{{ ('x' * 100000)|replace('x', 'x' * 100000) }}", HI)


def test_ordinary_templates_render_as_before():
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}"
        "<|assistant|>{% endif %}{{ messages|tojson }}{{ 2 ** 10 }}{{ 'ab' * 3 }}{{ [1] + [2] }}{{ 'a' ~ 'b' }}"
        "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    )
    want = '<|user|>hi<|assistant|>[{"role": "user", "content": "hi"}]1024ababab[1, 2]ab10'
    assert render_chat(template, HI) == want


class _Panicking:
    """A tokenizer that fails as `tokenizers` does where it cannot allocate: a BaseException."""

    encode_special_tokens = True

    class Panic(BaseException):
        pass

    def get_vocab(self):
        return {"abcdefgh": 0}

    def encode(self, text, add_special_tokens=False):
        raise self.Panic("capacity overflow")


def test_a_tokenizer_panic_is_one_error_and_long_text_is_refused_before_tokenizing():
    tok = _Panicking()
    with pytest.raises(GenError, match=r"the tokenizer failed on the rendered conversation \(Panic"):
        encode_rendered(tok, "hello")
    assert tok.encode_special_tokens is True  # restored
    with pytest.raises(GenError, match=r"is 81 bytes, more than 10 tokens could hold"):
        encode_rendered(tok, "x" * 81, max_tokens=10)  # 10 tokens of at most 8 bytes: never tokenized


# ---------------------------------------------------------------------------------------------
# Readers of user input: capped before decoding and tokenizing


def test_tokenize_reads_stdin_only_up_to_its_limit(monkeypatch, tokenizer_path):
    from gen_cli.commands import text

    monkeypatch.setattr(text, "TOKENIZE_BYTES", 1000)
    refused(["tokenize", "-", "--tokenizer", str(tokenizer_path)], r"stdin is over 1,000 bytes, gen tokenize's limit",
            code=2, stdin=b"x" * 1001)  # fmt: skip
    assert cli(["tokenize", "-", "--tokenizer", str(tokenizer_path)], b"x" * 1000).exit_code == 0


def test_a_corpus_on_stdin_is_read_only_up_to_its_limit(monkeypatch, tmp_path):
    from gen_cli.text import corpus

    monkeypatch.setattr(corpus, "STDIN_BYTES", 1000)
    args = ["train-tokenizer", "-", "--out", str(tmp_path / "t.json")]
    refused(args, r"the text on stdin is over 1,000 bytes, gen's limit for stdin .* give a file", 2, b"\0" * 5000)


def test_a_stdin_line_is_read_only_up_to_its_limit(monkeypatch):
    import io
    import sys

    from gen_cli.commands.common import read_line

    stdin = io.TextIOWrapper(io.BytesIO(b"hello\n" + b"y" * 100 + b"\nok\r\n\xff\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert read_line(10, "too long") == "hello"
    with pytest.raises(UsageError, match=r"a line on stdin is over 10 bytes, too long"):
        read_line(10, "too long")  # 11 bytes read, not 100
    assert stdin.buffer.tell() == 6 + 11
    stdin.buffer.seek(6 + 101)
    assert read_line(10, "") == "ok"
    with pytest.raises(UsageError, match=r"not valid UTF-8 \(byte 0xff at offset 0\)"):
        read_line(10, "")  # decoded by gen, whatever PYTHONIOENCODING says
    assert read_line(10, "") is None


def test_tokenize_checks_a_models_tokenizer_digest(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|swapped|>"  # another tokenizer than the weights were trained with
    (folder / "tokenizer.json").write_text(json.dumps(data))
    refused(["tokenize", "hi", "--model", str(folder)], r"tokenizer\.json is not the tokenizer these weights were")
    assert cli(["tokenize", "hi", "--model", str(model_dir)]).exit_code == 0


# ---------------------------------------------------------------------------------------------
# The text stream: a bounded tail decoded per token, the same text as decoding the whole row


class _Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_the_stream_decodes_a_bounded_tail_per_token(tokenizer):
    from gen_cli.text.tokenizer import encode

    ids = encode(tokenizer, "ab é 中 😀 " * 400)
    counting = _Counting(tokenizer)
    row = TextStream(counting, stops=("never here",), context=(ids[0],))
    for i in ids[1:]:
        row.push(i)
        row.take()
    assert row.text == tokenizer.decode(ids[1:])
    assert counting.decoded < 20 * len(ids)  # the whole row each time would be len(ids)² / 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(["a", "b ", "é", "中", "😀", "END", "E", "N", "D", " ", "\n"]), max_size=40),
    stop=st.sampled_from([(), ("END",), ("D", "中😀"), ("\n\n",)]),
)
def test_the_streamed_text_is_the_decoded_text_cut_at_the_first_stop(tokenizer, words, stop):
    from gen_cli.text.tokenizer import encode

    text = "".join(words)
    row = TextStream(tokenizer, stops=stop)
    out = []
    for i in encode(tokenizer, text):
        row.push(i)
        got = row.take()
        assert "\ufffd" not in got
        out.append(got)
    out.append(row.take(final=True))
    cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    assert "".join(out) == row.text == text[:cut]


# ---------------------------------------------------------------------------------------------
# Memory estimates: the smallest of available memory, RLIMIT_AS and the cgroup; ids and sampling counted


def test_many_samples_are_refused_by_their_sampling_buffers(model_dir, monkeypatch):
    from gen_cli import memory

    monkeypatch.setattr(memory, "_rlimit_room", lambda: 64 << 20)  # as under `ulimit -v`
    refused(["generate", "hi", "--model", str(model_dir), "--num-samples", "100000", "--max-new-tokens", "2"],
            r"needs about [\d.]+ GiB but only 64 MiB of memory is available; use fewer --num-samples")  # fmt: skip


def test_a_windowed_run_counts_its_id_buffer(model_dir, monkeypatch):
    from gen_cli import memory

    monkeypatch.setattr(memory, "_rlimit_room", lambda: 64 << 20)
    refused(["generate", "hi", "--model", str(model_dir), "--window", "16", "--max-new-tokens", "100000000"],
            r"needs about [\d.]+ MiB but only 64 MiB of memory is available; .*fewer --max-new-tokens")  # fmt: skip


def test_a_windowed_chat_reply_counts_its_id_buffer(tokenizer, monkeypatch):
    import torch
    from conftest import tiny_config

    from gen_cli import memory
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.infer.session import ChatSession
    from gen_cli.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.get_vocab_size())).eval()
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    session = ChatSession(model, tokenizer, template, spec=CacheSpec(window=8, sinks=2))
    monkeypatch.setattr(memory, "_rlimit_room", lambda: 64 << 20)
    with pytest.raises(GenError, match=r"the ids and sampling buffers of 1 sequence\(s\) of [\d,]+ tokens needs"):
        session.say("hi", 100_000_000, SamplingConfig(temperature=0.0))  # a window: no context to stop it
    assert session.say("hi", 4, SamplingConfig(temperature=0.0)).new_tokens == 4


# ---------------------------------------------------------------------------------------------
# Identities and checksums: every weight byte, the shipped model's tokenizer, train states, token files


def test_a_prompt_cache_is_refused_by_weights_that_differ_in_one_element(tmp_path):
    import torch
    from conftest import tiny_config

    from gen_cli.cache.prompt_file import identity, model_fingerprint
    from gen_cli.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=4096, d_model=64)).eval()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.tok_emb.weight.view(-1)[4097] += 1e-3  # 262,144 elements: off a stride sampling 2^16 of them
    assert model_fingerprint(model) != before
    assert identity(model, "t", "none", "fp32", "fp32", torch.float32)["model_sha256"] == model_fingerprint(model)


def test_a_train_state_with_one_bit_flipped_is_refused(tmp_path):
    import torch
    from conftest import tiny_config

    from gen_cli.model.transformer import Transformer
    from gen_cli.text.tokenizer import new_tokenizer
    from gen_cli.train.run_folder import STATE_FILE, load_train_state, save_train_state

    torch.manual_seed(0)
    model = Transformer(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / STATE_FILE
    save_train_state(path, model, optimizer, torch.Generator(), 3, {}, model.config, new_tokenizer(), 10)
    assert load_train_state(tmp_path).step == 3
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of the last tensor (an RNG state, then weights: any byte is trained on)
    path.write_bytes(bytes(data))
    with pytest.raises(GenError, match=r"the train state is damaged \(its checksum does not match its content\)"):
        load_train_state(tmp_path)


def test_a_truncated_or_changed_token_file_is_rebuilt_not_reused(tokenizer, tmp_path):
    import numpy as np

    from gen_cli.text.corpus import Corpus
    from gen_cli.train.tokens import tokenize_split

    (tmp_path / "c.txt").write_text("one two three four five six\n" * 50)
    corpus = Corpus([str(tmp_path / "c.txt")])
    first = tokenize_split(tokenizer, corpus, "train", tmp_path / "tokens")
    good = first.path.read_bytes()
    assert tokenize_split(tokenizer, corpus, "train", tmp_path / "tokens").cached
    for damaged in (good[: len(good) // 2], good[:-2] + np.asarray([5], dtype="<u2").tobytes()):
        first.path.write_bytes(damaged)  # whole ids, valid ids, the EOT first: only the checksum tells
        again = tokenize_split(tokenizer, corpus, "train", tmp_path / "tokens")
        assert not again.cached and again.path.read_bytes() == good


def test_the_shipped_model_names_its_tokenizer_and_refuses_another(tmp_path):
    import shutil

    from safetensors import safe_open

    from gen_cli.formats.checkpoint import TOKENIZER_DIGEST_KEY
    from gen_cli.resources import default_model_dir
    from gen_cli.text.tokenizer import load_tokenizer, tokenizer_digest

    shipped = default_model_dir()
    with safe_open(str(shipped / "model.safetensors"), "pt") as f:
        digest = (f.metadata() or {}).get(TOKENIZER_DIGEST_KEY)
    assert digest == tokenizer_digest(load_tokenizer(shipped))
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same size, two ids swapped: garbage text, before the digest
    (copy / "tokenizer.json").write_text(json.dumps(data))
    refused(["generate", "hi", "--model", str(copy), "--max-new-tokens", "2"], r"is not the tokenizer these weights")


def test_the_address_space_net_stays_off_beside_other_threads(monkeypatch):
    import resource
    import threading

    calls = []
    real = resource.setrlimit
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits) or real(which, limits))
    with monkeypatch.context() as alone:
        _alone(alone)
        render_chat("{{ 'x' }}", HI)
    assert len(calls) == 2 and calls[1] == resource.getrlimit(resource.RLIMIT_AS)  # lowered, then restored
    calls.clear()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # as a server's decode loop: it must not meet the limit
    other.start()
    try:
        assert render_chat("{{ 'x' }}", HI) == "x"
    finally:
        stop.set()
        other.join()
    assert calls == []


def test_a_fifo_as_prompt_cache_is_refused_before_anything_reads_it(tmp_path):
    import os

    fifo = tmp_path / "cache.kv"
    os.mkfifo(fifo)  # reading it would block until a writer came
    refused(["generate", "Hello there", "-n", "2", "--prompt-cache", str(fifo)], r"not a regular file", code=2)
    assert fifo.exists() and not fifo.is_file()  # left as it was
