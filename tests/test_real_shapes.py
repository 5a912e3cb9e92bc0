"""Real sizes: a model that cannot fit (weights + a KV cache) is refused before any weight is read, against
the least of available memory, RLIMIT_AS and the cgroup limit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hf_builders import byte_level_tokenizer
from typer.testing import CliRunner

from gen_cli import memory
from gen_cli.cli import app
from gen_cli.errors import GenError
from gen_cli.formats.export_gguf import export_gguf
from gen_cli.formats.loading import load
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.text.tokenizer import configure

runner = CliRunner()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A llama GGUF of about 40 MB (a large padded vocabulary): big next to a small address-space limit."""
    path = tmp_path_factory.mktemp("real") / "m.gguf"
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, d_model=256, d_ff=512, n_head=4, n_kv_head=2, vocab_size=20000,
                         context_length=8192, tie_embeddings=False)  # fmt: skip
    export_gguf(Transformer(config).eval(), configure(byte_level_tokenizer()), path)
    return path


def test_available_bytes_is_the_least_of_memory_rlimit_and_cgroup(monkeypatch):
    monkeypatch.setattr(memory, "_rlimit_room", lambda: 123_456)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_bytes("cpu") == 123_456
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 99_999)
    assert memory.available_bytes("cpu") == 99_999


def test_cgroup_room_reads_v2_and_v1_limits(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_room(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert memory._cgroup_room(str(tmp_path)) == 600_000
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("5000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("7000\n")
    assert memory._cgroup_room(str(v1)) == 0
    assert memory._cgroup_room(str(tmp_path / "none")) is None


def test_a_model_that_cannot_fit_is_refused_with_bytes_needed_and_free(gguf_file, monkeypatch):
    monkeypatch.delenv(memory.NO_CHECK_ENV, raising=False)
    size = gguf_file.stat().st_size
    kv = memory.generation_bytes(ModelConfig(n_layer=1, d_model=256, d_ff=512, n_head=4, n_kv_head=2,
                                             vocab_size=20000, context_length=8192), 1, 4096, 2)  # fmt: skip
    monkeypatch.setattr(memory, "_cgroup_room", lambda: size + kv - 1)  # one byte short
    with pytest.raises(GenError, match=rf"needs {size + kv:,} bytes .* only {size + kv - 1:,} bytes"):
        load(gguf_file)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: size + kv)  # exactly enough
    assert load(gguf_file).model.config.vocab_size == 20000
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 1000)
    result = runner.invoke(app, ["generate", "Hi", "--model", str(gguf_file), "--max-new-tokens", "1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and "needs" in lines[0] and "1,000 bytes" in " ".join(lines), lines
    monkeypatch.setenv(memory.NO_CHECK_ENV, "1")
    load(gguf_file)  # the escape hatch the message names


def test_rlimit_as_refuses_before_the_weights_are_mapped(gguf_file):
    """A real address-space limit, set in a child process just above what it already uses."""
    script = textwrap.dedent(f"""
        import resource, psutil
        from pathlib import Path
        from gen_cli.errors import GenError
        from gen_cli.formats.loading import load
        import gen_cli.formats.gguf_file, gen_cli.formats.gguf_tokenizer, gen_cli.model.transformer
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + (8 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            load(Path({str(gguf_file)!r}))
        except GenError as e:
            print("refused:", e)
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != memory.NO_CHECK_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("refused:") and "RLIMIT_AS" in out.stdout, out.stdout + out.stderr
