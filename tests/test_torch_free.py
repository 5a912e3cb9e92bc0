"""`gen generate` without torch on a GGUF file (infer/file_model.py, infer/torch_free.py): the layout the numpy
loader builds gives the logits PyTorch's loader and NativeDecoder give (same kernel, same calls), the command
prints the text the PyTorch path prints (greedy, on the shipped model's trained weights too), never imports torch,
samples reproducibly for a seed, and hands every run it cannot take to the PyTorch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_builders import byte_level_tokenizer, random_hf_model, write_gguf

from gen_cli.cache.linear import KVCache
from gen_cli.formats.checkpoint import load_model
from gen_cli.formats.export_gguf import export_gguf
from gen_cli.formats.gguf_reader import GGUFFile
from gen_cli.infer.engine import open_model
from gen_cli.infer.file_model import FileModel
from gen_cli.infer.options import EngineOptions
from gen_cli.native.build import native_status
from gen_cli.resources import default_model_dir

pytestmark = pytest.mark.skipif(native_status() != "ready", reason="the native kernel is not built here")

# Shapes where every path of the layout runs: q/k/v and gate/up parts in whole groups of 16 rows (interleaved),
# rows of whole 256-blocks (k-quants), Q/K rows permuted by llama.cpp's converter.
SHAPE = dict(
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,  # a prompt past one chunk of PROMPT_ROWS
)
CASES = [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"), ("llama", "Q4_K"),
         ("llama", "Q6_K"), ("llama", "Q5_0"), ("llama", "F16"), ("llama3", "Q4_K"), ("mistral", "Q8_0")]  # fmt: skip


def _mixed(name: str) -> str:
    """Q4_K_M's way: Q6_K for v and the MLP's down matrix, Q4_K for the rest, the head Q8_0."""
    return "Q6_K" if ".attn_v." in name or ".ffn_down." in name else "Q8_0" if name == "output.weight" else "Q4_K"


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("torch-free")
    out = {}
    for arch in dict.fromkeys(a for a, _ in CASES):
        hf = random_hf_model(arch, **SHAPE)
        for a, q in [*CASES, ("llama", "mixed")]:
            if a == arch:
                out[a, q] = write_gguf(hf, tok, arch, root / f"{arch}-{q}.gguf", _mixed if q == "mixed" else q)
    return out


def _torch_path_logits(path: Path, ids: list[int], steps: list[int]) -> np.ndarray:
    """Logits of the prompt's last position, then of each of `steps`, through the PyTorch loader's layout and
    NativeDecoder's calls (the prompt as one causal multi-token forward, then one token a step)."""
    engine = open_model(path, EngineOptions(device="cpu"))
    native = engine.model.native_decoder
    assert native is not None
    cache = KVCache(engine.model.config, 1, len(ids) + len(steps), torch.float32)
    with torch.inference_mode():
        rows = [native.forward(ids, cache)[-1]]
        rows += [native(torch.tensor([[t]]), cache)[0] for t in steps]
    return torch.stack(rows).numpy()


def _file_model_logits(path: Path, ids: list[int], steps: list[int]) -> np.ndarray:
    model = FileModel.open(path, torch.get_num_threads())
    assert isinstance(model, FileModel), model
    model.start(len(ids) + len(steps))
    rows = [model.forward(ids)[-1]] + [model.forward([t])[0] for t in steps]
    return np.stack(rows)


@pytest.mark.parametrize("case", [*CASES, ("llama", "mixed")], ids="-".join)
def test_the_numpy_layout_gives_the_torch_layouts_logits(files, case):
    ids, steps = [5, 17, 200, 3, 99, 42, 7], [11, 250, 64]
    expected = _torch_path_logits(files[case], ids, steps)
    got = _file_model_logits(files[case], ids, steps)
    # The same kernel on the same bytes: only RoPE tables from numpy's sin/cos instead of torch's may differ.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_refusals_name_what_the_path_does_not_lay_out(tmp_path, tok):
    qwen2 = write_gguf(random_hf_model("qwen2"), tok, "qwen2", tmp_path / "qwen2.gguf", "Q8_0")
    assert "qkv_bias" in FileModel.open(qwen2, 1)
    bf16 = write_gguf(random_hf_model("llama"), tok, "llama", tmp_path / "bf16.gguf", "BF16")
    assert "stored BF16" in FileModel.open(bf16, 1)
    wide = write_gguf(random_hf_model("llama", hidden_size=640, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=320), tok, "llama", tmp_path / "wide.gguf", "F32")  # fmt: skip
    assert "heads up to 256, not 320" in FileModel.open(wide, 1)  # past the prompt kernel's tiles


# ---- the command ---------------------------------------------------------------------------------------------

PROBE = """
import sys
sys.argv = ["gen", *sys.argv[1:]]
from gen_cli.cli import main
try:
    main()
finally:
    sys.stderr.write("\\ntorch imported: %s\\n" % ("torch" in sys.modules))
"""


def _gen(*args: str, torch_free: bool = True) -> tuple[dict, bool]:
    """`gen ARGS --json` in a fresh process: its JSON, and whether it imported torch."""
    env = {**os.environ, "GEN_TORCH_FREE": "1" if torch_free else "0"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args, "--json"], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), "torch imported: True" in done.stderr


@pytest.fixture(scope="module")
def shipped_gguf(tmp_path_factory) -> dict[str, Path]:
    """The shipped model's trained weights as GGUF files: F32 and Q8_0."""
    model, tokenizer = load_model(default_model_dir())
    root = tmp_path_factory.mktemp("shipped")
    return {kind: Path(export_gguf(model, tokenizer, root / f"shipped-{kind}.gguf", kind).path)
            for kind in ("f32", "q8_0")}  # fmt: skip


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_the_command_prints_the_torch_paths_text_without_importing_torch(shipped_gguf, kind):
    args = ("generate", "Once upon a time there was", "--model", str(shipped_gguf[kind]), "--max-new-tokens", "40",
            "--temperature", "0")  # fmt: skip
    fast, imported = _gen(*args)
    slow, slow_imported = _gen(*args, torch_free=False)
    assert not imported and slow_imported
    assert fast["stats"]["decode_path"] == "native (torch-free)" and slow["stats"]["decode_path"] == "native"
    assert fast["text"] == slow["text"] and len(fast["text"]) > 40
    assert fast["stats"]["new_tokens"] == slow["stats"]["new_tokens"] == 40
    assert fast["stats"]["kv_cache_bytes"] == fast["stats"]["kv_cache_bytes_analytic"]


def test_sampling_without_torch_repeats_for_a_seed(shipped_gguf):
    args = ("generate", "Once upon a time", "--model", str(shipped_gguf["q8_0"]), "--max-new-tokens", "24",
            "--top-p", "0.9", "--repetition-penalty", "1.2")  # fmt: skip
    first, imported = _gen(*args, "--seed", "7")
    again, _ = _gen(*args, "--seed", "7")
    other, _ = _gen(*args, "--seed", "8")
    assert not imported and first["stats"]["decode_path"] == "native (torch-free)"
    assert first["text"] == again["text"] != other["text"]


def test_runs_it_cannot_take_go_to_the_torch_path(shipped_gguf):
    path = str(shipped_gguf["q8_0"])
    two, imported = _gen("generate", "Hello", "--model", path, "--max-new-tokens", "4", "--num-samples", "2")
    assert imported and two["stats"]["decode_path"] == "native" and len(two["texts"]) == 2
    kv8, imported = _gen("generate", "Hello", "--model", path, "--max-new-tokens", "4", "--temperature", "0",
                         "--kv-dtype", "int8")  # fmt: skip
    assert imported and kv8["stats"]["kv_dtype_k"] == "int8"


def test_bad_input_gets_the_torch_paths_one_line_errors(shipped_gguf, tmp_path):
    path = shipped_gguf["q8_0"]
    for flags, says in ((["--act", "int4"], "unknown activation precision"), (["--threads", "0"], "threads must be")):
        done = subprocess.run([sys.executable, "-m", "gen_cli", "generate", "Hi", "--model", str(path), *flags],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    for torch_free in (True, False):
        env = {**os.environ, "GEN_TORCH_FREE": "1" if torch_free else "0"}
        long = subprocess.run([sys.executable, "-m", "gen_cli", "generate", "word " * 2000, "--model", str(path),
                               "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert long.returncode == 2 and "context length" in long.stderr and "Traceback" not in long.stderr
    broken = tmp_path / "nan.gguf"
    data = bytearray(path.read_bytes())
    at = GGUFFile(path).tensors["output_norm.weight"].data_offset
    data[at : at + 4] = np.float32(np.nan).tobytes()  # the final norm's first weight
    broken.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "gen_cli", "generate", "Hi", "--model", str(broken), "--temperature",
                           "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "NaN" in done.stderr and "Traceback" not in done.stderr


def test_a_long_prompt_prefills_in_chunks_with_the_head_on_its_last_row_only(files):
    """PROMPT_ROWS + 6 tokens: a chunk of PROMPT_ROWS rows without logits, then 6 with the last row's only
    (Model.logits_from), against PyTorch's own forward of the whole prompt (fp32 weights: only the summation order
    differs). The scratch holds scores for one row: a prompt's rows attend in the prompt kernel's tiles."""
    from gen_cli.infer.file_model import PROMPT_ROWS
    from gen_cli.infer.generate import prefill

    ids = [int(i) for i in np.random.default_rng(0).integers(0, 300, PROMPT_ROWS + 6)]
    model = FileModel.open(files["llama", "F32"], torch.get_num_threads())
    model.start(len(ids))
    got = model.prefill(ids)
    assert model.pos == len(ids)
    engine = open_model(files["llama", "F32"], EngineOptions(device="cpu", native=False))
    cache = KVCache(engine.model.config, 1, len(ids), torch.float32)
    with torch.inference_mode():
        expected = prefill(engine.model, torch.tensor([ids]), cache)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    model.start(len(ids))
    np.testing.assert_array_equal(model.forward(ids[:PROMPT_ROWS], last=0).shape, (0, engine.model.config.vocab_size))


def test_rows_the_prompt_tiles_do_not_take_are_an_error_not_each_rows_own_pass(files):
    """FileModel holds scores for one row: rows given as a prompt's that are not consecutive positions of one slot
    are refused by the step, never attended one by one past that scratch."""
    from gen_cli.errors import InternalError

    model = FileModel.open(files["llama", "F32"], 1)
    model.start(16)
    s, n = model.struct, 4
    s.batch, s.n_threads, s.logits_from = n, 1, 0
    tokens, slot = np.arange(1, n + 1, dtype=np.int64), np.zeros(n, np.int64)
    logits = np.empty((n, model.config.vocab_size), np.float32)

    def rows(*pos: int) -> None:
        where = np.asarray(pos, np.int64)
        model.lib.gen_prompt_rows(model._ref, tokens.ctypes.data, 1, where.ctypes.data, slot.ctypes.data,
                                  logits.ctypes.data)  # fmt: skip

    with pytest.raises(InternalError, match="prompt tiles did not take the rows"):
        rows(0, 1, 3, 2)
    rows(4, 5, 6, 7)  # consecutive: the step runs
    assert np.isfinite(logits).all()


def test_two_int8_terms_bring_the_trained_models_logits_to_fp32s(shipped_gguf):
    """--act int8x2 on trained weights: a prompt (one batch through the step) and 6 decode steps land ~300 times
    closer to fp32 activations' logits than int8's (2e-4 against 0.06; at least 20 times, asserted), with fp32's
    top tokens; the command runs it without torch and says so."""
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 300, 24)]
    logits = {}
    for act in ("int8", "int8x2", "fp32"):
        model = FileModel.open(shipped_gguf["q8_0"], 2, act)
        model.start(len(ids) + 6)
        rows = [model.prefill(ids)] + [model.forward([t])[0] for t in ids[:6]]
        logits[act] = np.stack(rows)  # (7, vocab)
    far, near = (float(np.abs(logits[a] - logits["fp32"]).max()) for a in ("int8", "int8x2"))
    assert 0 < near <= far / 20, (near, far)
    assert (logits["int8x2"].argmax(-1) == logits["fp32"].argmax(-1)).all()
    done, imported = _gen("generate", "Once upon a time", "--model", str(shipped_gguf["q8_0"]), "--act", "int8x2",
                          "--max-new-tokens", "8", "--temperature", "0")  # fmt: skip
    assert not imported and done["stats"]["activations"] == "int8x2"
