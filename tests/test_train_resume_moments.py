"""A resumed train state whose AdamW moments do not fit their weights is refused on load, naming the tensor
(torch would accept it and fail at the first step)."""

from __future__ import annotations

import re

import pytest
from hostile import cli


@pytest.fixture
def home(tmp_path, monkeypatch):
    from test_train import write_corpus

    monkeypatch.setenv("GEN_HOME", str(tmp_path / "home"))
    write_corpus(tmp_path / "corpus.txt")
    return tmp_path


@pytest.mark.parametrize("field", ["exp_avg", "exp_avg_sq", "step"])
def test_a_moment_of_the_wrong_shape_is_one_line_naming_it(home, field):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_train import tiny_args

    from gen_cli.train.loop import train
    from gen_cli.train.run_folder import state_checksum

    train(tiny_args(home, stop_after=2))
    path = home / "run" / "train_state.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = f"optim.1.{field}"
    tensors[name] = tensors[name].reshape(-1)[:3].clone() if field != "step" else tensors[name].reshape(1)
    meta["checksum"] = state_checksum(tensors, meta)  # damaged consistently: only the shape check can see it
    save_file(tensors, str(path), metadata=meta)
    result = cli(["train", "--resume", str(home / "run")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert re.search(rf"damaged train state .*optim\.1\.{field} \(of \S+\) has shape", errors[0]), errors[0]
