"""Helpers for the hostile-input tests: run the CLI, assert one clean line, build damaged model dirs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from typer.testing import CliRunner

from gen_cli.cli import app

REPO = Path(__file__).resolve().parent.parent


def cli(argv, stdin=None):
    return CliRunner().invoke(app, argv, input=stdin)


def one_line(result) -> str:
    """The command's stderr, asserted to be one line and no traceback."""
    text = result.stderr.strip()
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(text.splitlines()) == 1, text
    return text


def copy_model(model_dir, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # json.dumps writes float("inf") as Infinity, as a hostile file would


def rewrite_weights(folder, change, metadata=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})


def refused(argv, pattern, code=1, stdin=None):
    result = cli(argv, stdin)
    line = one_line(result)
    assert result.exit_code == code, (result.exit_code, line)
    assert re.search(pattern, line), line
    return line
