"""Prompt-cache files: reuse equals recomputing; other models, kinds, damaged files refused; atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gen_cli.cache.prompt_file import identity, read_prompt_cache, restore, save_prompt_cache
from gen_cli.cache.spec import CacheSpec
from gen_cli.cli import app
from gen_cli.errors import GenError
from gen_cli.infer.generate import continue_steps, generate, new_cache, prefill
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer
from tests.conftest import tiny_config

# head_dim 32, so int4 can be stored too.
CONFIG = tiny_config(d_model=64, n_head=2, n_kv_head=1, context_length=48)
GREEDY = SamplingConfig(temperature=0.0)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIG).eval()


def _ident(model: Transformer, kinds: tuple[str, str] = ("fp32", "fp32"), tok: str = "t" * 64) -> dict[str, str]:
    return identity(model, tok, "none", *kinds, torch.float32)


def _saved(tmp_path, model, prefix, kinds=("fp32", "fp32")):
    cache = new_cache(model, prefix, 4, spec=CacheSpec(*kinds))
    prefill(model, prefix, cache)
    path = tmp_path / "prompt.st"
    save_prompt_cache(path, cache, prefix[0].tolist(), _ident(model, kinds))
    return path


def _logits(model, prompt, cache, n=8):
    return [lg.clone() for lg, _ in continue_steps(model, prompt, n, GREEDY, cache)]


@pytest.mark.parametrize("kinds", [("fp32", "fp32"), ("int8", "int4"), ("bf16", "int8")])
def test_reuse_gives_the_logits_of_recomputing(tmp_path, kinds):
    model = _model()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    path = _saved(tmp_path, model, prompt[:, :12], kinds)
    saved = read_prompt_cache(path, CONFIG, _ident(model, kinds), CONFIG.context_length)
    assert saved is not None and saved.ids == prompt[0, :12].tolist()
    reused = new_cache(model, prompt, 8, spec=CacheSpec(*kinds))
    restore(reused, saved, 12)
    # Oracle 1: the same split recomputed (prefix prefilled, then the rest): bit-identical, the file is lossless.
    fresh = new_cache(model, prompt, 8, spec=CacheSpec(*kinds))
    prefill(model, prompt[:, :12], fresh)
    for a, b in zip(_logits(model, prompt, reused), _logits(model, prompt, fresh), strict=True):
        assert torch.equal(a, b)
    if kinds == ("fp32", "fp32"):  # Oracle 2: the no-cache path, within fp32 rounding
        reused = new_cache(model, prompt, 8)
        restore(reused, saved, 12)
        tokens = torch.stack(list(generate(model, prompt, 8, GREEDY, None)), dim=1)
        got = [t for _, t in continue_steps(model, prompt, 8, GREEDY, reused)]
        assert torch.equal(torch.stack(got, dim=1), tokens)


def test_another_model_tokenizer_or_kind_is_refused(tmp_path):
    model = _model()
    prompt = torch.arange(10)[None]
    path = _saved(tmp_path, model, prompt)
    before = path.read_bytes()
    with pytest.raises(GenError, match="another model"):
        read_prompt_cache(path, CONFIG, _ident(_model(seed=1)), 48)
    with pytest.raises(GenError, match="another tokenizer"):
        read_prompt_cache(path, CONFIG, _ident(model, tok="u" * 64), 48)
    with pytest.raises(GenError, match="another V cache kind: the file has fp32, this run uses int8"):
        read_prompt_cache(path, CONFIG, _ident(model, ("fp32", "int8")), 48)
    with pytest.raises(GenError, match="holds 1 to 8"):  # more tokens than this run's cache could hold
        read_prompt_cache(path, CONFIG, _ident(model), 8)
    assert path.read_bytes() == before


def test_truncated_or_damaged_file_is_refused(tmp_path):
    model = _model()
    path = _saved(tmp_path, model, torch.arange(10)[None])
    data = path.read_bytes()
    ident = _ident(model)
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(GenError, match="truncated or damaged"):
        read_prompt_cache(path, CONFIG, ident, 48)
    flipped = bytearray(data)
    flipped[-7] ^= 0x40  # one bit of the last tensor's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(GenError, match="checksum"):
        read_prompt_cache(path, CONFIG, ident, 48)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(GenError, match="not a readable prompt-cache file"):
        read_prompt_cache(path, CONFIG, ident, 48)


def test_a_header_that_lies_about_sizes_is_refused_before_reading(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _model()
    path = _saved(tmp_path, model, torch.arange(10)[None])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=meta | {"tokens": str(10**12)})
    with pytest.raises(GenError, match="declares '1000000000000' tokens"):
        read_prompt_cache(path, CONFIG, _ident(model), 48)
    tensors["k.0.0"] = tensors["k.0.0"][:, :, :5].contiguous()  # fewer tokens than declared
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(GenError, match=r"'k\.0\.0' does not match"):
        read_prompt_cache(path, CONFIG, _ident(model), 48)


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_intact(tmp_path, monkeypatch):
    import safetensors.torch

    model = _model()
    path = _saved(tmp_path, model, torch.arange(10)[None])
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    cache = new_cache(model, torch.arange(12)[None], 2)
    prefill(model, torch.arange(12)[None], cache)
    with pytest.raises(GenError, match="cannot write"):
        save_prompt_cache(path, cache, list(range(12)), _ident(model))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.st"]  # no temporary left behind


def test_cli_saves_then_reuses_then_rewrites_and_refuses_another_kind(model_dir, tmp_path):
    runner = CliRunner()
    path = tmp_path / "p.st"
    base = ["generate", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"]
    args = [*base, "--prompt-cache", str(path), "--json"]
    first = runner.invoke(app, [*args, "The quick brown fox jumps"])
    assert first.exit_code == 0, first.output
    one = json.loads(first.stdout)
    assert one["stats"]["prompt_cache"]["action"] == "created" and path.is_file()
    n = one["stats"]["prompt_tokens"]
    second = json.loads(runner.invoke(app, [*args, "The quick brown fox jumps"]).stdout)
    assert second["text"] == one["text"]
    assert second["stats"]["prompt_cache"]["reused_tokens"] == second["stats"]["reused_prompt_tokens"] == n - 1
    longer = runner.invoke(app, [*args, "The quick brown fox jumps over the lazy dog", "--stats"])
    plain = json.loads(runner.invoke(app, [*base, "--json", "The quick brown fox jumps over the lazy dog"]).stdout)
    assert json.loads(longer.stdout)["text"] == plain["text"]
    assert json.loads(longer.stdout)["stats"]["prompt_cache"]["action"] == "reused"
    other = runner.invoke(app, [*args, "Keys and values"])
    assert json.loads(other.stdout)["stats"]["prompt_cache"]["action"] == "rewrote"
    assert "rewritten" in other.stderr
    before = path.read_bytes()
    bad = runner.invoke(app, [*args, "Keys and values", "--kv-dtype", "int8"])
    assert bad.exit_code == 1 and "another K cache kind" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before
    bad = runner.invoke(app, [*args, "Keys", "--num-samples", "2"])
    assert bad.exit_code == 2 and "--prompt-cache" in bad.stderr


def test_cli_refuses_a_prompt_cache_it_could_not_write_before_generating(model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    for bad in (tmp_path, blocker / "p.st"):
        result = CliRunner().invoke(app, [*args, "--prompt-cache", str(bad)])
        assert result.exit_code == 2 and "--prompt-cache" in result.stderr and result.stdout == ""


def test_cli_refuses_a_prompt_cache_with_a_window(model_dir, tmp_path):
    args = ["generate", "The quick", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--window", "8", "--prompt-cache", str(tmp_path / "p.st")])
    assert result.exit_code == 2 and "--window" in result.stderr and result.stdout == ""
    assert not (tmp_path / "p.st").exists()


def test_a_file_replaced_while_it_is_read_is_read_whole_old_or_new(tmp_path, monkeypatch):
    import os
    import threading

    import gen_cli.cache.prompt_file as prompt_file

    model = _model()
    other = tmp_path / "other"
    other.mkdir()
    new = _saved(other, model, torch.arange(5, 12)[None])  # a valid file with other ids
    path = _saved(tmp_path, model, torch.arange(10)[None])
    checked = prompt_file._checked

    def replaced_between_header_and_tensors(*args, **kwargs):
        os.replace(new, path)  # what a second process saving the same prompt cache does
        return checked(*args, **kwargs)

    monkeypatch.setattr(prompt_file, "_checked", replaced_between_header_and_tensors)
    saved = read_prompt_cache(path, CONFIG, _ident(model), 48)
    assert saved is not None and saved.ids == list(range(10))  # the file as opened, whole
    monkeypatch.setattr(prompt_file, "_checked", checked)
    assert read_prompt_cache(path, CONFIG, _ident(model), 48).ids == list(range(5, 12))

    # Two handles at once: a writer replacing the file over and over while a reader reads it.
    caches = {}
    for ids in (list(range(10)), list(range(3, 9))):
        caches[len(ids)] = new_cache(model, torch.tensor([ids]), 4)
        prefill(model, torch.tensor([ids]), caches[len(ids)])
    stop = threading.Event()

    def writer() -> None:
        for i in range(200):
            if stop.is_set():
                return
            ids = list(range(10)) if i % 2 else list(range(3, 9))
            save_prompt_cache(path, caches[len(ids)], ids, _ident(model))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = {tuple(read_prompt_cache(path, CONFIG, _ident(model), 48).ids) for _ in range(30)}
    finally:
        stop.set()
        thread.join(60)
    assert seen <= {tuple(range(10)), tuple(range(3, 9)), tuple(range(5, 12))}


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "cache.fifo"
    os.mkfifo(fifo)
    with pytest.raises(GenError, match="not a regular file"):
        read_prompt_cache(fifo, CONFIG, _ident(_model()), 48)
