"""The native kernel on other CPUs and compilers: built for aarch64 (cross-compiled, run under qemu-user:
correctness only, an emulator's speed says nothing) and by a compiler without OpenMP (one thread) — the same
logits as PyTorch's, instead of falling back to the PyTorch path."""

from __future__ import annotations

import ctypes
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.model.transformer import Transformer
from gen_cli.native import build
from gen_cli.native.abi import MATRIX_TYPES
from gen_cli.quant.formats import row_bytes

NATIVE = Path(build.__file__).parent
DRIVER = Path(__file__).parent / "native" / "step_driver.c"
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
TYPE_NAMES = {code: name for name, code in MATRIX_TYPES.items()}
# d_model 256: whole super-blocks for q4_k; every type the step runs on the portable paths
QUANTIZE = ("none", "q8_0", "q4_0", "q4_k")


def _model(quantize: str) -> tuple[Transformer, Transformer]:
    """(the reference in PyTorch, the same weights laid out for the native step)."""
    models = []
    for use_native in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(d_model=256, d_ff=512, n_kv_head=2)).eval()
        models.append(optimize_for_decode(model, quantize, native=use_native))
    assert models[1].native_decoder is not None, build.native_status()
    return models[0], models[1]


def _bytes(pointer: int | None, n: int) -> bytes:
    return b"" if not pointer else ctypes.string_at(pointer, n)


def _blob(out: list[bytes], pointer: int | None, n: int) -> None:
    data = _bytes(pointer, n)
    out += [struct.pack("<q", len(data)), data]


def _matrix(out: list[bytes], w) -> None:
    name = TYPE_NAMES[w.type]
    assert name in ("fp32", *QUANTIZE), name
    nbytes = w.rows * (w.cols * 4 if name == "fp32" else row_bytes(name, w.cols))
    out.append(struct.pack("<qqq", w.rows, w.cols, w.type))
    _blob(out, w.data, nbytes)


def write_model(model: Transformer, tokens: list[int], path: Path) -> None:
    """The native step's structs as tests/native/step_driver.c reads them: what the C kernel sees here."""
    m = model.native_decoder._struct
    c = model.config
    header = (c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.d_model, c.d_ff, c.vocab_size, len(tokens))
    out = [struct.pack("<9q", *header, len(tokens)), struct.pack("<q", m.emb_type), struct.pack("<f", m.norm_eps)]
    out.append(struct.pack(f"<{len(tokens)}q", *tokens))
    emb = TYPE_NAMES[m.emb_type]
    _blob(out, m.tok_emb, c.vocab_size * (c.d_model * 4 if emb == "fp32" else row_bytes(emb, c.d_model)))
    for table in (m.rope_cos, m.rope_sin):
        _blob(out, table, len(tokens) * c.head_dim * 4)
    for i in range(c.n_layer):
        layer = model.native_decoder._layers[i]
        for norm in (layer.attn_norm, layer.mlp_norm):
            assert not norm.bias  # RMSNorm: what the driver reads
            _blob(out, norm.weight, c.d_model * 4)
        for w in (layer.wqkv, layer.wo, layer.w13, layer.w2):
            _matrix(out, w)
    _blob(out, m.final_norm.weight, c.d_model * 4)
    _matrix(out, m.lm_head)
    path.write_bytes(b"".join(out))


def reference(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """(T, V) logits of every position, from one forward without a cache: the oracle."""
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].float()


def run_driver(command: list[str], model: Transformer, tokens: list[int], tmp: Path) -> torch.Tensor:
    write_model(model, tokens, tmp / "model.bin")
    subprocess.run([*command, str(tmp / "model.bin"), str(tmp / "logits.bin")], check=True, timeout=120)
    return torch.frombuffer(bytearray((tmp / "logits.bin").read_bytes()), dtype=torch.float32).view(len(tokens), -1)


def compile_driver(cc: list[str], out: Path, openmp: bool) -> Path:
    flags = ["-O2", "-std=c11", "-iquote", str(NATIVE), *(["-fopenmp"] if openmp else [])]
    done = build.compile_sources([*cc, *flags], [DRIVER, *sorted(NATIVE.glob("*.c"))], out, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


TOKENS = [5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200, 33]


CROSS_TOOLS = f"needs {CROSS_CC} and {QEMU} (Debian's gcc-aarch64-linux-gnu, qemu-user: `make cross-tools`)"


@pytest.mark.skipif(shutil.which(CROSS_CC) is None or shutil.which(QEMU) is None, reason=CROSS_TOOLS)
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
def test_the_kernel_built_for_aarch64_gives_pytorchs_logits(openmp, tmp_path_factory):
    # -static: qemu-user then needs no aarch64 loader or libraries on this machine
    binary = compile_driver([CROSS_CC, "-static"], tmp_path_factory.mktemp("arm") / "step_driver", openmp)
    for quantize in QUANTIZE:
        torch_model, native_model = _model(quantize)
        tmp = tmp_path_factory.mktemp(quantize)
        got = run_driver([QEMU, str(binary)], native_model, TOKENS, tmp)
        want = reference(torch_model, TOKENS)
        # fp32: the same sums in another order; blocks: int8 activations, as on x86's paths
        tol = 1e-4 if quantize == "none" else 0.15 * want.std().item()
        assert (got - want).abs().max() <= tol, (quantize, (got - want).abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or quantize != "none"


def test_the_driver_runs_the_kernel_as_python_does(tmp_path):
    # The driver itself, built for this machine: the logits the library gives through ctypes
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    binary = compile_driver([cc, "-march=native"], tmp_path / "step_driver", openmp=True)
    _, native_model = _model("q4_0")
    got = run_driver([str(binary)], native_model, TOKENS, tmp_path)
    cache_logits = []
    from gen_cli.cache.linear import KVCache
    from gen_cli.infer.generate import decode_step

    cache = KVCache(native_model.config, 1, len(TOKENS), torch.float32)
    with torch.inference_mode():
        for t in TOKENS:
            cache_logits.append(decode_step(native_model, torch.tensor([[t]]), cache)[0])
    assert torch.allclose(got, torch.stack(cache_logits), atol=1e-5, rtol=0)


def _no_openmp_cc(tmp_path: Path) -> str:
    """A compiler that rejects -fopenmp, as clang without libomp does."""
    script = tmp_path / "cc-no-openmp"
    refuse = """[ "$a" = -fopenmp ] && { echo "error: unsupported option '-fopenmp'" >&2; exit 1; }"""
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do {refuse}; done\nexec cc "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_compiler_without_openmp_builds_a_one_thread_kernel(fresh_library, monkeypatch, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", _no_openmp_cc(tmp_path))
    torch_model, native_model = _model("q4_0")
    assert build.native_status() == "ready"
    assert not build.has_openmp()
    assert any("has no OpenMP" in note for note in build.take_notes())
    want = reference(torch_model, TOKENS)
    got = run_driver_in_process(native_model, TOKENS)
    assert (got - want).abs().max() <= 0.15 * want.std().item()


def run_driver_in_process(model: Transformer, tokens: list[int]) -> torch.Tensor:
    from gen_cli.cache.linear import KVCache
    from gen_cli.infer.generate import decode_step

    cache = KVCache(model.config, 1, len(tokens), torch.float32)
    with torch.inference_mode():
        return torch.stack([decode_step(model, torch.tensor([[t]]), cache)[0] for t in tokens])
