"""`gen eval` on imported models: HF folders and GGUF files, scored against transformers by hand."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hf_builders import (  # noqa: E402
    SENTENCES,
    build_hf_model,
    byte_level_tokenizer,
    hf_config,
    sentencepiece_style_tokenizer,
    write_gguf,
)

from gen_cli.cli import app  # noqa: E402
from gen_cli.text.corpus import Corpus  # noqa: E402
from gen_cli.train.evaluate import evaluate_model  # noqa: E402
from gen_cli.train.tokens import covered_bytes  # noqa: E402

runner = CliRunner()
CONTEXT = 24
# Characters the tiny tokenizers never saw: the SentencePiece-style one spells them in <0xNN> byte pieces.
RARE = "Straße, niño, 中文字 🚀 — ünïcödé\n"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "gen-home"))  # token files of one test never feed another


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Three documents, so the stream holds several separators; each document's last lines are its val split."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        lines = [SENTENCES[(i + j) % 4] + "\n" if j % 3 else RARE for j in range(40)]
        (root / f"doc{i}.txt").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama HF folder with a byte-level BPE (BOS = EOS = <|endoftext|>, id 0) and its GGUF file."""
    folder = tmp_path_factory.mktemp("llama")
    tok = byte_level_tokenizer()
    model = build_hf_model("llama", folder, tok)
    gguf_path = folder.parent / "llama.gguf"
    write_gguf(model, tok, "llama", gguf_path)
    return folder, model, tok, gguf_path


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory):
    """A tiny llama HF folder with a Llama 2 style tokenizer: ▁ for spaces, <0xNN> byte fallback, <s> = 1."""
    folder = tmp_path_factory.mktemp("spm")
    tok = sentencepiece_style_tokenizer()
    torch.manual_seed(1)
    cfg = hf_config("llama", vocab_size=tok.get_vocab_size() + 8, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, model, tok


def hand_bits_per_byte(
    model, tok, corpus_dir, sep: int, split: str = "val", stride: int = CONTEXT
) -> tuple[float, int]:
    """transformers' cross-entropy of every target, each from a full forward over exactly the window the rule
    gives it (windows start every `stride`; a target belongs to the first window that reaches it), / ln 2 /
    UTF-8 bytes."""
    texts = list(Corpus([str(corpus_dir)]).texts(split))
    stream = []
    for text in texts:
        stream += [sep, *tok.encode(text, add_special_tokens=False).ids]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nats, n = 0.0, len(stream) - 1  # targets are stream positions 1..n
    first_window: dict[int, list[int]] = {}  # window start -> the targets it is the first to reach
    for t in range(1, n + 1):
        start = next(b for b in range(0, n, stride) if t <= min(b + CONTEXT, n))
        first_window.setdefault(start, []).append(t)
    with torch.no_grad():
        for start, targets in first_window.items():
            x = torch.tensor(stream[start : min(start + CONTEXT, n) + 1])
            logits = model(x[None, :-1]).logits[0]  # (T, V): the whole window, as the rule feeds it
            for t in targets:
                nats += float(F.cross_entropy(logits[t - 1 - start].float(), x[t - start]))
    return nats / math.log(2) / n_bytes, n_bytes


def test_hf_folder_and_gguf_equal_transformers_by_hand(llama, corpus_dir):
    folder, model, tok, gguf_path = llama
    expected, n_bytes = hand_bits_per_byte(model, tok, corpus_dir, sep=0)
    res = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT, split="val")
    assert res.bytes == n_bytes and (res.split, res.stride) == ("val", CONTEXT)  # non-overlapping on a val split
    assert res.bits_per_byte == pytest.approx(expected, rel=1e-4)
    from_gguf = evaluate_model(gguf_path, [str(corpus_dir)], device="cpu", context=CONTEXT, split="val")
    assert from_gguf.bytes == n_bytes and from_gguf.tokens == res.tokens
    assert from_gguf.bits_per_byte == pytest.approx(expected, rel=1e-4)


def test_sentencepiece_bytes_are_the_texts_own(spm_llama, corpus_dir):
    folder, model, tok = spm_llama
    assert any(t.startswith("<0x") for t in tok.encode(RARE).tokens)  # the byte-fallback path is exercised
    expected, n_bytes = hand_bits_per_byte(model, tok, corpus_dir, sep=1)  # BOS <s> separates documents
    res = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT, split="val")
    assert res.bytes == n_bytes
    assert res.bits_per_byte == pytest.approx(expected, rel=1e-4)
    again = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT, split="val")  # cached files
    assert again == res


def test_named_files_are_scored_whole_in_strided_windows(llama, corpus_dir):
    """The default for a user's files: every token of every file, windows every CONTEXT/2 tokens, each target
    scored once from the first window reaching it, equal to a forward over exactly that window."""
    folder, model, tok, _ = llama
    expected, n_bytes = hand_bits_per_byte(model, tok, corpus_dir, sep=0, split="all", stride=CONTEXT // 2)
    res = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT)
    assert (res.split, res.context, res.stride, res.bytes) == ("all", CONTEXT, CONTEXT // 2, n_bytes)
    assert res.bits_per_byte == pytest.approx(expected, rel=1e-4)
    odd = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT, stride=5, batch_size=3)
    assert odd.bits_per_byte == pytest.approx(hand_bits_per_byte(model, tok, corpus_dir, 0, "all", 5)[0], rel=1e-4)
    assert odd.tokens == res.tokens and odd.bytes == res.bytes  # the same targets, other contexts


def test_strided_windows_score_every_target_once():
    from gen_cli.train.evaluate import strided_windows

    assert strided_windows(10, 4, 4) == [(0, 4, 4), (4, 4, 4), (8, 2, 2)]  # non-overlapping
    assert strided_windows(10, 4, 2) == [(0, 4, 4), (2, 4, 2), (4, 4, 2), (6, 4, 2)]  # ends at the last target
    assert strided_windows(3, 8, 4) == [(0, 3, 3)]
    for targets, context, stride in itertools.product(range(1, 30), (1, 4, 7), (1, 2, 3, 7)):
        if stride > context:
            continue
        spans = strided_windows(targets, context, stride)
        scored = [t for b, length, k in spans for t in range(b + length - k + 1, b + length + 1)]
        assert scored == list(range(1, targets + 1))  # each target (1-based position) once, in order
        assert all(length <= context and k <= length for _, length, k in spans)


def test_covered_bytes_sum_to_the_text_and_follow_offsets():
    tok = sentencepiece_style_tokenizer()
    for text in (RARE, "  two  spaces", "a", SENTENCES[2]):
        enc = tok.encode(text, add_special_tokens=False)
        per_token = covered_bytes(text, enc.offsets)
        assert len(per_token) == len(enc.ids) and per_token.sum() == len(text.encode("utf-8"))
        assert (per_token >= 0).all()


def test_max_tokens_counts_the_bytes_of_the_scored_prefix(llama, corpus_dir):
    folder, _, tok, _ = llama
    res = evaluate_model(folder, [str(corpus_dir)], device="cpu", context=CONTEXT, max_tokens=10)
    first = next(iter(Corpus([str(corpus_dir)]).texts("all")))  # a named file is scored whole
    ids = tok.encode(first, add_special_tokens=False).ids
    assert res.tokens == 10 and len(ids) >= 10
    assert res.bytes == len(tok.decode(ids[:10]).encode("utf-8"))  # byte-level BPE: a prefix decodes exactly


def test_bucket_counts_are_json_numbers():
    import dataclasses

    import numpy as np

    from gen_cli.train.by_position import bucketed

    (bucket,) = bucketed(np.ones(4), np.ones(4), n_windows=3, buckets=1)
    assert json.loads(json.dumps(dataclasses.asdict(bucket), default=str))["tokens"] == 4 * 3


def test_cli_json_by_position_and_refusals(llama, corpus_dir, tmp_path):
    folder, _, _, gguf_path = llama
    r = runner.invoke(app, ["eval", str(gguf_path), str(corpus_dir), "--context", str(CONTEXT), "--json"])
    assert r.exit_code == 0, r.output
    lib = evaluate_model(gguf_path, [str(corpus_dir)], device="cpu", context=CONTEXT)
    assert json.loads(r.stdout)["bits_per_byte"] == lib.bits_per_byte
    r = runner.invoke(app, ["eval", str(folder), str(corpus_dir), "--by-position", "--context", "16", "--json"])
    assert r.exit_code == 0, r.output
    sweep = json.loads(r.stdout)
    edges = [(b["start"], b["end"]) for b in sweep["buckets"]]
    # Buckets tile the 16 window positions in order; each scores its positions in every window once.
    assert edges[0][0] == 0 and edges[-1][1] == 16 and all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    # int(): the counts come out as JSON strings for now (test_bucket_counts_are_json_numbers)
    assert [int(b["tokens"]) for b in sweep["buckets"]] == [(e - s) * sweep["windows"] for s, e in edges]
    r = runner.invoke(app, ["eval", str(tmp_path / "missing.gguf"), str(corpus_dir)])
    assert r.exit_code == 2
    assert "missing.gguf: no such file or folder" in r.output and len(r.output.strip().splitlines()) <= 2


def test_cli_stride_and_what_was_scored(llama, corpus_dir):
    folder = llama[0]
    r = runner.invoke(app, ["eval", str(folder), str(corpus_dir), "--context", str(CONTEXT), "--stride", "6"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert f"scored all of {corpus_dir} in {CONTEXT}-token windows every 6 tokens" in said, said
    r = runner.invoke(app, ["eval", str(folder), str(corpus_dir), "--context", str(CONTEXT), "--stride", "25"])
    assert r.exit_code == 2 and "stride 25 must be between 1 and the context" in " ".join(r.output.split())
