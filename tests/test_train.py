"""Training: loss falls, resume is exact, checkpoints survive interrupted writes, DDP matches one process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_text

from gen_cli.errors import GenError
from gen_cli.text.corpus import Corpus
from gen_cli.train.args import TrainArgs
from gen_cli.train.loop import lr_at, train

REPO = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    path.write_text(random_text(lines, seed), encoding="utf-8")
    return path


def tiny_args(tmp_path: Path, **changes) -> TrainArgs:
    """2 layers, d=32, vocab 300, context 32, batch 4: a few ms per step on CPU."""
    base = dict(
        inputs=[str(tmp_path / "corpus.txt")], vocab_size=300, layers=2, d_model=32, heads=4, d_ff=64,
        context=32, batch_size=4, steps=20, lr=3e-3, eval_every=0, eval_batches=2, seed=1,
        device="cpu", dtype="float32", out=str(tmp_path / "run"),
    )  # fmt: skip
    base.update(changes)
    return TrainArgs(**base)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    write_corpus(tmp_path / "corpus.txt")
    return tmp_path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_min():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert all(lr_at(s, 100, 1.0, 10, 0.1) >= lr_at(s + 1, 100, 1.0, 10, 0.1) for s in range(10, 100))


def test_loss_goes_down_and_metrics_and_checkpoint_are_written(home):
    from gen_cli.formats.checkpoint import load_model

    events = []
    summary = train(tiny_args(home, steps=40, eval_every=20), events.append)
    records = _metrics(home / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert summary.step == 40 and summary.val_loss == pytest.approx(evals[1]["val_loss"])
    model, tok = load_model(home / "run")
    assert summary.parameters == model.num_parameters()
    assert model.config.vocab_size == tok.get_vocab_size() == 300 and model.config.context_length == 32


def test_alibi_trains_saves_and_reloads_and_head_size_follows_d_model(home):
    from gen_cli.formats.checkpoint import load_model
    from gen_cli.model.config import load_preset
    from gen_cli.train.args import build_config

    summary = train(tiny_args(home, pos="alibi", steps=8))
    assert summary.val_loss < math.log(300)  # it learned something from the bias-only positions
    model, _ = load_model(home / "run")
    assert model.config.pos_encoding == "alibi" and model.alibi_slopes.tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # A preset's derived head size is recomputed from the new width (tiny: d_model 32 / 4 heads = 8).
    wider = build_config(tiny_args(home, preset="tiny", layers=None, d_ff=None, heads=None, d_model=64), 300)
    assert load_preset("tiny").head_dim == 8 and wider.head_dim == 16


def test_resume_continues_exactly(home):
    import torch

    straight_run = train(tiny_args(home, out=str(home / "straight")))
    half = train(tiny_args(home, out=str(home / "split"), stop_after=10))
    assert half.step == 10
    resumed = train(TrainArgs(resume=str(home / "split")))
    assert resumed.step == 20 and resumed.resumed_from == 10
    assert resumed.tokens_seen == 2 * half.tokens_seen == straight_run.tokens_seen > 0
    a, b = _weights(home / "straight"), _weights(home / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    straight = [r for r in _metrics(home / "straight") if "loss" in r]
    split = [r for r in _metrics(home / "split") if "loss" in r]
    assert [r["step"] for r in split] == list(range(1, 21))
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in straight], rel=1e-5)


@pytest.mark.parametrize("crashing", ["train_state", "model.safetensors"])
def test_interrupted_checkpoint_write_keeps_the_previous_one(home, monkeypatch, crashing):
    import safetensors.torch

    from gen_cli.formats.checkpoint import load_model
    from gen_cli.train.run_folder import load_train_state

    train(tiny_args(home, stop_after=5))
    before = _weights(home / "run")
    real = safetensors.torch.save_file

    def broken(tensors, filename, metadata=None):
        if crashing not in Path(filename).name:  # the train state is written first, then the model
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"partial" * 100)  # half a file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(GenError, match=r"cannot write .*: disk full"):  # one line, not a traceback
        train(TrainArgs(resume=str(home / "run"), stop_after=3))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # A crash in the model write leaves the new (self-consistent) state beside the old model.
    assert load_train_state(home / "run").step == (5 if crashing == "train_state" else 8)
    load_model(home / "run")  # the model directory is whole too
    after = _weights(home / "run")
    assert all((before[k] == after[k]).all() for k in before)
    assert not list((home / "run").glob(".*.tmp"))
    assert train(TrainArgs(resume=str(home / "run"))).step == 20  # and the run still resumes


def test_ctrl_c_saves_and_stops_at_a_step_boundary(home):
    from gen_cli.train.loop import StepEvent
    from gen_cli.train.run_folder import load_train_state

    def interrupt(event):
        if isinstance(event, StepEvent) and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(tiny_args(home), interrupt)
    assert summary.interrupted and summary.step == 3
    assert load_train_state(home / "run").step == 3


def test_token_files_are_reused_by_later_runs(home):
    first = train(tiny_args(home, steps=2, out=str(home / "a")))
    second = train(tiny_args(home, steps=2, out=str(home / "b")))
    assert not first.token_files_cached and second.token_files_cached
    assert first.train_tokens == second.train_tokens


def _torchrun_env(home: Path) -> dict:
    env = {**os.environ, "GEN_HOME": str(home / "home"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("GEN_TRAIN_DIGEST_DIR", None)
    return env


def test_two_process_ddp_matches_one_process_with_double_batch(home):
    import torch

    args = ["--vocab-size", "300", "--layers", "2", "--d-model", "32", "--heads", "4", "--d-ff", "64",
            "--context", "32", "--steps", "6", "--lr", "3e-3", "--eval-every", "0", "--eval-batches", "1",
            "--seed", "1", "--device", "cpu", "--dtype", "float32", str(home / "corpus.txt")]  # fmt: skip
    env = _torchrun_env(home)
    # Tokenizer and token files first (in one process), so both runs read the same cache.
    single = subprocess.run(
        [sys.executable, "-m", "gen_cli", "train", *args, "--batch-size", "4", "--out", str(home / "one")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    digests = home / "digests"
    digests.mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "gen_cli", "train", *args, "--batch-size", "2", "--out", str(home / "two")],
        env={**env, "GEN_TRAIN_DIGEST_DIR": str(digests)}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = sorted(digests.glob("rank*.txt"))
    assert len(ranks) == 2 and ranks[0].read_text() == ranks[1].read_text()  # replicas stay identical
    a, b = _weights(home / "one"), _weights(home / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    la = [r["loss"] for r in _metrics(home / "one") if "loss" in r]
    lb = [r["loss"] for r in _metrics(home / "two") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-4)
    assert "step 6/6" in ddp.stderr and ddp.stderr.count("done at step") == 1  # rank 0 alone speaks


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: one line on stderr, non-zero exit


def _cli(*argv: str):
    from typer.testing import CliRunner

    from gen_cli.cli import app

    return CliRunner().invoke(app, list(argv))


TINY = ["--vocab-size", "300", "--layers", "2", "--d-model", "32", "--heads", "4", "--d-ff", "64", "--context",
        "32", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu", "--dtype", "float32"]  # fmt: skip


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def trained(home):
    """A finished 4-step run in home/run, made through the CLI."""
    result = _cli("train", str(home / "corpus.txt"), *TINY, "--steps", "4", "--out", str(home / "run"))
    assert result.exit_code == 0, result.output
    return home


def test_cli_train_json_summary(trained):
    result = _cli("train", "--resume", str(trained / "run"), "--steps", "6", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["step"] == 6 and summary["resumed_from"] == 4


def test_cli_empty_and_tiny_corpus(home):
    (home / "empty.txt").write_text("")
    _one_line_error(_cli("train", str(home / "empty.txt"), *TINY, "--out", str(home / "e")), "empty")
    (home / "small.txt").write_text("tiny text.\n" * 2)
    _one_line_error(_cli("train", str(home / "small.txt"), *TINY, "--out", str(home / "s")), "fewer than one window")


def test_cli_out_folder_with_another_run_needs_force(trained):
    args = ["train", str(trained / "corpus.txt"), *TINY, "--steps", "2", "--out", str(trained / "run")]
    _one_line_error(_cli(*args), "different training run", "--force")
    assert _cli(*args, "--force").exit_code == 0


def test_cli_resume_refuses_changed_architecture_context_and_tokenizer(trained):
    from gen_cli.text.tokenizer import save_tokenizer, train_tokenizer

    run = str(trained / "run")
    _one_line_error(
        _cli("train", "--resume", run, "--steps", "8", "--layers", "3"), "different architecture", "n_layer"
    )
    _one_line_error(_cli("train", "--resume", run, "--steps", "8", "--attention", "mqa"), "n_kv_head")
    _one_line_error(_cli("train", "--resume", run, "--steps", "8", "--context", "64"), "context of 64 tokens", "32")
    tok, _ = train_tokenizer(Corpus([str(trained / "corpus.txt")]), vocab_size=280)
    save_tokenizer(tok, trained / "other.json")
    _one_line_error(_cli("train", "--resume", run, "--steps", "8", "--tokenizer", str(trained / "other.json")),
                    "280", "300")  # fmt: skip
    _one_line_error(_cli("train", "--resume", str(trained), "--steps", "8"), "nothing to resume")


def test_cli_nan_loss_stops_and_keeps_last_good_checkpoint(trained, monkeypatch):
    from gen_cli.model.transformer import Transformer
    from gen_cli.train.run_folder import load_train_state

    real = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, idx, **kw: real(self, idx, **kw) * math.nan)
    result = _cli("train", "--resume", str(trained / "run"), "--steps", "8")
    _one_line_error(result, "diverged at step 5", "step 4")
    assert load_train_state(trained / "run").step == 4


def test_cli_eval_uniform_model_gives_ln_v(trained, monkeypatch):
    import torch

    from gen_cli.formats.checkpoint import load_model, save_model

    model, tok = load_model(trained / "run")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # zero embeddings and head: every logit is 0, so p = 1/V for every token
    save_model(trained / "uniform", model, tok)
    result = _cli("eval", str(trained / "uniform"), str(trained / "corpus.txt"), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout[result.stdout.index("{") :])
    all_bytes = sum(len(t.encode()) for t in Corpus([str(trained / "corpus.txt")]).texts("all"))  # a named file: whole
    assert got["loss"] == pytest.approx(math.log(300), rel=1e-6)
    assert got["perplexity"] == pytest.approx(300, rel=1e-5)
    assert got["bytes"] == all_bytes and got["split"] == "all"
    assert got["bits_per_byte"] == pytest.approx(got["tokens"] * math.log(300) / math.log(2) / all_bytes, rel=1e-6)
    monkeypatch.setattr("gen_cli.resources.default_model_dir", lambda: trained / "missing")
    _one_line_error(_cli("eval"), "no default model")


def test_cli_eval_of_a_run_scores_its_training_text_and_says_so(trained):
    result = _cli("eval", str(trained / "run"), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout[result.stdout.index("{") :])
    assert (got["corpus"], got["split"]) == (str(trained / "corpus.txt"), "val")
    val_bytes = sum(len(t.encode()) for t in Corpus([str(trained / "corpus.txt")]).texts("val"))
    assert got["bytes"] == val_bytes  # not python-docs
    plain = _cli("eval", str(trained / "run"), "--device", "cpu")
    assert "validation split of" in plain.stderr and "training text" in plain.stderr


def test_tokens_seen_counts_each_run_at_its_own_batch_size(home):
    first = train(tiny_args(home, steps=6, stop_after=3))  # batch 4 × context 32
    assert first.tokens_seen == 3 * 4 * 32
    resumed = train(TrainArgs(resume=str(home / "run"), batch_size=8))
    assert resumed.tokens_seen == 3 * 4 * 32 + 3 * 8 * 32  # not 6 steps at the new batch size


def test_a_default_run_folder_is_named_after_what_was_trained():
    from gen_cli.train.setup import run_label

    assert run_label(TrainArgs()) == "tiny"
    assert run_label(TrainArgs(preset="small")) == "small"
    assert run_label(TrainArgs(preset="small", layers=3)) == "custom"  # not a small any more
    assert run_label(TrainArgs(heads=2)) == "custom"
    assert run_label(TrainArgs(init="runs/mqa")) == "mqa"
