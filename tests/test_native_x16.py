"""Q4_0 / Q4_1 / Q4_K / Q8_0 matrices in the 16-row interleaved layout (gen_cli/native/blocks_x16.h, blocks_k16.h,
blocks_q8x16.h): the repack keeps every byte (dequantized, the same weights; exported, the stored blocks again),
the kernel's products equal the stored layout's to fp32 rounding (the same integer sums), a row gets the same
bits alone and in any batch, and a GGUF model the loader repacked decodes as the stored layout does."""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_builders import byte_level_tokenizer

from gen_cli.cache.linear import KVCache
from gen_cli.formats.export import held_blocks
from gen_cli.formats.export_gguf import export_gguf
from gen_cli.formats.gguf_file import GGUFFile
from gen_cli.formats.loading import load
from gen_cli.infer.file_model import FileModel
from gen_cli.infer.generate import decode_step, prefill
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.model.config import ModelConfig
from gen_cli.model.info import weight_summary
from gen_cli.model.transformer import Transformer
from gen_cli.native import block_matmul as bm
from gen_cli.native import build
from gen_cli.native import decoder as native
from gen_cli.native.abi import MATRIX_TYPES
from gen_cli.native.block_matmul import block_matmul
from gen_cli.native.repack import repack_into, repack_wanted
from gen_cli.quant.block_linear import BlockLinear
from gen_cli.quant.blocks import deinterleave, dequantize, interleave
from gen_cli.quant.formats import BLOCK_TYPES, can_interleave
from gen_cli.text.tokenizer import configure

pytestmark = [
    pytest.mark.skipif(shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler"),
    pytest.mark.skipif(native.native_status() != "ready", reason="needs the compiled kernel"),
]
QTYPES = ("q4_0", "q4_1", "q4_k", "q5_k", "q8_0")
READ_BACK = ("q4_k", "q5_k", "q8_0")  # float products and prompt tiles read their rows back in the stored layout
SMALL = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=512, context_length=64,
                    tie_embeddings=False)  # fmt: skip
ALWAYS = lambda config: True  # noqa: E731 (the loader's question: will the native step stream this model?)


def _cols(qtype: str, blocks: int) -> int:
    return BLOCK_TYPES[qtype].elems * blocks


def _random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Every nibble (and the k-quants' 6-bit scales and mins, q5_k's fifth bits) random, the fp16 scales (and mins)
    small and finite."""
    t = BLOCK_TYPES[qtype]
    nb = cols // t.elems
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, nb, t.nbytes), dtype=np.uint8)
    for at in (0, 2) if qtype in ("q4_1", "q4_k", "q5_k") else (0,):
        half = ((rng.random((rows, nb)) - 0.3) * 0.02).astype(np.float16)
        raw[..., at : at + 2] = half.view(np.uint8).reshape(rows, nb, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def _pair(qtype: str, rows: int, cols: int, seed: int = 0) -> tuple[BlockLinear, BlockLinear]:
    """The same matrix as stored and interleaved."""
    blocks = _random_blocks(qtype, rows, cols, seed)
    return BlockLinear(blocks, qtype, cols), BlockLinear(interleave(blocks, qtype), qtype, cols, interleaved=True)


def _dequantize_native(layer: BlockLinear, bf16: bool) -> torch.Tensor:
    lib = build.library()
    out = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16 if bf16 else torch.float32)
    code = MATRIX_TYPES[layer.native_type]
    rows, cols = layer.out_features, layer.in_features
    assert lib.gen_block_dequantize(layer.blocks.data_ptr(), code, rows, cols, out.data_ptr(), bf16, 2) == 0
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_repack_keeps_every_byte_and_dequantizes_to_the_same_weights(qtype):
    plain, packed = _pair(qtype, 48, _cols(qtype, 3))
    assert not torch.equal(packed.blocks, plain.blocks)  # reordered …
    assert torch.equal(deinterleave(packed.blocks, qtype), plain.blocks)  # … and nothing lost
    assert torch.equal(packed.stored_blocks(), plain.blocks)
    assert torch.equal(packed.dequantized(), plain.dequantized())  # the torch path: the stored layout's weights
    for bf16 in (False, True):  # a prompt's row tiles (C), fp32 and bf16
        assert torch.equal(_dequantize_native(packed, bf16), _dequantize_native(plain, bf16))
    into = torch.empty_like(plain.blocks)
    repack_into(into, plain.blocks, qtype)  # the loader's C repack is the reference layout
    assert torch.equal(into, packed.blocks)


def test_only_whole_groups_of_rows_have_the_layout():
    assert can_interleave("q4_0", 32) and can_interleave("q4_1", 16) and can_interleave("q8_0", 32)
    assert can_interleave("q4_k", 32) and not can_interleave("q4_k", 40) and not can_interleave("q8_0", 8)
    assert not can_interleave("q4_0", 40) and not can_interleave("q6_k", 32) and not can_interleave("q5_0", 32)
    assert not repack_wanted("q4_0", 40)  # such rows stay as stored
    with pytest.raises(AssertionError):
        BlockLinear(_random_blocks("q4_0", 40, 64), "q4_0", 64, interleaved=True)
    with pytest.raises(Exception, match="no interleaved layout"):
        interleave(_random_blocks("q4_1", 40, 64), "q4_1")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n", [1, 5, 13, 40, 72])  # 8 a pass, a remainder; prompts (72: quantized on every thread)
@pytest.mark.parametrize("act", ["int8", "fp32", "bf16"])
@pytest.mark.parametrize("blocks_per_row", [1, 3, 16])
def test_products_equal_the_stored_layouts_to_fp32_rounding(qtype, n, act, blocks_per_row, monkeypatch):
    cols = _cols(qtype, blocks_per_row)
    plain, packed = _pair(qtype, 64, cols, seed=n)
    x = torch.randn(n, cols) * torch.rand(1, cols) * 3
    got = block_matmul(x, packed, act).double()
    if act == "int8":  # an interleaved prompt runs the int8 kernel: the stored layout's int8 kernel is the reference
        monkeypatch.setattr(bm, "TILE_MIN_TOKENS", 1 << 30)
    want = block_matmul(x, plain, act).double()  # fp32 / bf16 prompts: both run the tiled GEMM
    w = plain.dequantized().double()
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-7  # the same integer sums, scaled and added in another order
    assert ((got - want).abs() <= tol).all(), (got - want).abs().max()


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k"])
@pytest.mark.parametrize("n", [1, 3])  # a decode step's one row, and a batch's path
def test_the_largest_codes_against_the_largest_activations_do_not_overflow(qtype, n):
    """Every code at its largest (q5_k: 31, whose 8 products per lane pass int16) against activations at ±127: the
    weights' own product, exact (constant activations quantize without error)."""
    blocks = _random_blocks(qtype, 32, 512, seed=1).view(32, 2, -1)  # (rows, super-blocks, bytes)
    blocks[..., 16:] = 0xFF  # q4_k: the nibbles; q5_k: the fifth bits and the nibbles
    blocks = blocks.reshape(32, -1).contiguous()
    packed = BlockLinear(interleave(blocks, qtype), qtype, 512, interleaved=True)
    x = torch.ones(n, 512) * torch.tensor([1.0, -1.0, 1.0])[:n, None]
    want = x.double() @ BlockLinear(blocks, qtype, 512).dequantized().double().T
    torch.testing.assert_close(block_matmul(x, packed).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("act", ["int8", "fp32"])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(qtype, act):
    _, packed = _pair(qtype, 48, 256, seed=3)
    x = torch.randn(19 if act == "fp32" else 45, 256)  # int8: a prompt's 45 rows get a decode step's bits too
    together = block_matmul(x, packed, act)  # passes of 8 rows and a remainder
    for i in (0, 7, 8, 18) if act == "fp32" else (0, 7, 8, 18, 40, 44):
        assert torch.equal(block_matmul(x[i : i + 1], packed, act), together[i : i + 1]), i
    assert torch.equal(block_matmul(x[3:6], packed, act), together[3:6])


def test_the_torch_path_of_an_interleaved_layer_is_the_stored_layers():
    plain, packed = _pair("q4_1", 32, 64)
    x = torch.randn(3, 64)
    assert packed.kernel is None and torch.equal(packed(x), plain(x))  # dequantized: the very same weights


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for plain x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])  # AVX2, then no vector ISA (portable C)
def test_the_avx2_and_portable_paths_equal_the_native_one(march, fresh_library, monkeypatch, kernel_builds):
    pairs = {q: _pair(q, 48, 512, seed=5) for q in QTYPES}
    layers = {q: packed for q, (_, packed) in pairs.items()}
    x = torch.randn(11, 512)
    want = {(q, act): block_matmul(x, layer, act) for q, layer in layers.items() for act in ("int8", "fp32")}
    tiles = {(q, bf16): _dequantize_native(layer, bf16) for q, layer in layers.items() for bf16 in (False, True)}
    monkeypatch.setenv("GEN_HOME", str(kernel_builds))  # each -march builds once per session
    monkeypatch.setattr(build, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS))
    build.library.cache_clear()
    assert native.native_status() == "ready"
    for q, layer in layers.items():
        # AVX2 has a vector product for every layout (q8_0's with the sign trick: w + 128 would overflow maddubs)
        assert repack_wanted(q, 16) == (march == "x86-64-v3")
        # int8: the same integer sums, scaled and added lane by lane in the same order (fmaf): the same bits as the
        # AVX-512 build's. fp32: q4_0 / q4_1, the same products in the same order, the same bits again; q4_k and
        # q8_0 read their rows back stored: the stored layout's products on this build, bit for bit.
        assert torch.equal(block_matmul(x, layer, "int8"), want[q, "int8"]), q
        stored = pairs[q][0] if q in READ_BACK else None
        assert torch.equal(
            block_matmul(x, layer, "fp32"), block_matmul(x, stored, "fp32") if stored else want[q, "fp32"]
        )
        # a prompt's row tiles: the same values on every path (bf16: rounded alike); read back: the stored layout's
        for bf16 in (False, True):
            expected = _dequantize_native(stored, bf16) if stored else tiles[q, bf16]
            assert torch.equal(_dequantize_native(layer, bf16), expected), (q, bf16)
        # the torch path's weights (fused or not): within an ulp of each
        torch.testing.assert_close(_dequantize_native(layer, False), layer.dequantized(), rtol=2e-7, atol=1e-9)


def _write(path: Path, qtype: str) -> Path:
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    export_gguf(model, configure(byte_level_tokenizer()), path, qtype)
    return path


def _loaded(path: Path, monkeypatch, repack: bool):
    monkeypatch.setenv("GEN_REPACK", "1" if repack else "0")
    return load(path, arena=ALWAYS)


def _steps(model: Transformer, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (B, steps, V) of a prefill then one native decode step per remaining token."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], torch.float32)
    with torch.inference_mode():
        prefill(model, ids[:, :prompt_len], cache)
        return torch.stack([decode_step(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])], 1)


@pytest.mark.parametrize("qtype", QTYPES)
def test_float_activations_keep_the_layouts_without_a_float_product_stored(qtype, tmp_path):
    """Both loaders (the torch-free step's and the torch path's) with bf16 or fp32 activations: q4_0 / q4_1 stay
    interleaved (they have a float product of their own), while q4_k, q5_k and q8_0 would read every row back stored
    each step, so they stay stored. int8x2 runs the integer kernels: interleaved, as int8."""
    if not repack_wanted(qtype, 16):
        pytest.skip("this machine's kernel keeps the stored layout (no AVX2 or AVX-512 VNNI)")
    path = _write(tmp_path / "m.gguf", qtype)
    for act in ("int8", "int8x2", "bf16", "fp32"):
        model = FileModel.open(path, 1, act)
        assert isinstance(model, FileModel), model
        packed = act in ("int8", "int8x2") or qtype not in READ_BACK
        assert model.layers[0].w2.type == MATRIX_TYPES[qtype + ("x16" if packed else "")], act
        assert load(path, arena=ALWAYS, act=act).model.layers[0].mlp.w2.interleaved == packed, act


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_repacked_gguf_model_decodes_as_the_stored_layout(qtype, monkeypatch, tmp_path):
    path = _write(tmp_path / "m.gguf", qtype)
    if not repack_wanted(qtype, 16):
        pytest.skip("this machine's kernel keeps the stored layout (no AVX2 or AVX-512 VNNI)")
    packed, plain = _loaded(path, monkeypatch, True), _loaded(path, monkeypatch, False)
    layers = [m for m in packed.model.modules() if isinstance(m, BlockLinear)]
    assert layers and all(m.interleaved for m in layers)  # every streamed matrix: its rows are whole groups
    assert not any(m.interleaved for m in plain.model.modules() if isinstance(m, BlockLinear))
    assert not hasattr(packed.model.tok_emb, "interleaved") or not packed.model.tok_emb.interleaved
    with torch.no_grad():  # the torch path reads the stored layout's weights
        ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
        assert torch.equal(packed.model(ids), plain.model(ids))
    weights = weight_summary(packed.model)
    assert f"{qtype} (16-row interleaved)" in weights["mlp out"]["types"]
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    for act, tol in (("fp32", 1e-5), ("int8", 0.03)):
        # fp32 activations: the same sums to fp32 rounding. int8: also, until an activation lands on the other
        # side of a rounding tie (one step, under 1%), as between the one-row and batch kernels
        fast = optimize_for_decode(_loaded(path, monkeypatch, True).model, act=act)
        slow = optimize_for_decode(_loaded(path, monkeypatch, False).model, act=act)
        assert fast.native_decoder is not None and fast.layers[0].mlp.w13.interleaved
        got, want = _steps(fast, ids, 4), _steps(slow, ids, 4)
        assert (got - want).abs().max() <= tol * want.abs().max(), act
        assert torch.equal(got.argmax(-1), want.argmax(-1)), act  # greedy tokens


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_repacked_model_exports_the_files_blocks_byte_for_byte(qtype, monkeypatch, tmp_path):
    path = _write(tmp_path / "a.gguf", qtype)
    loaded = _loaded(path, monkeypatch, True)
    assert any(getattr(m, "interleaved", False) for m in loaded.model.modules()) or not repack_wanted(qtype, 16)
    assert all(b.shape[0] % 16 == 0 for b, _ in held_blocks(loaded.model).values())
    export_gguf(loaded.model, loaded.tokenizer, tmp_path / "b.gguf", qtype)
    a, b = GGUFFile(path), GGUFFile(tmp_path / "b.gguf")
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():  # Q/K rows re-permuted for llama.cpp, the stored layout: the bytes read
        assert t.tensor_type == b.tensors[name].tensor_type and (t.data == b.tensors[name].data).all(), name


def test_a_fused_matrix_of_interleaved_and_stored_parts_keeps_each_in_its_layout():
    from gen_cli.quant.block_stack import BlockStack, stack_rows

    plain, packed = _pair("q4_0", 32, 64)
    both = stack_rows([packed, plain])
    assert isinstance(both, BlockStack) and [p.interleaved for p in both.parts] == [True, False]
    joined = stack_rows([packed, _pair("q4_0", 16, 64, seed=1)[1]])
    assert isinstance(joined, BlockLinear) and joined.interleaved and joined.out_features == 48
    x = torch.randn(2, 64)
    torch.testing.assert_close(both(x), torch.cat([plain(x), plain(x)], -1), rtol=0, atol=0)
    assert torch.equal(dequantize(deinterleave(joined.blocks, "q4_0"), "q4_0", 64)[:32], plain.dequantized())


def test_info_says_which_matrices_a_native_decode_interleaves(tmp_path):
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    path = _write(tmp_path / "m.gguf", "q4_0")
    info = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert info.exit_code == 0, info.output
    matrices = json.loads(info.stdout)["matrices"]
    assert matrices["mlp out"]["interleaved"] == 2 and "interleaved" not in matrices["embedding"]
    text = CliRunner().invoke(app, ["info", str(path)])
    assert "mlp out: q4_0 ×2 from Q4_0 ×2 (native decode: 16-row interleaved ×2)" in " ".join(text.stdout.split())


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_tied_head_gets_its_own_interleaved_copy_and_the_same_tokens(qtype, monkeypatch, tmp_path):
    """The embedding keeps the stored layout (read a row at a time); the head it was tied to is streamed whole
    every step, so decode gives it an interleaved copy: the same logits to fp32 rounding, the same greedy ids."""
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path / "t.gguf"
    export_gguf(Transformer(tied).eval(), configure(byte_level_tokenizer()), path, qtype)
    if not repack_wanted(qtype, 16):
        pytest.skip("this machine's kernel keeps the stored layout (no vector product for it)")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    fast = optimize_for_decode(_loaded(path, monkeypatch, True).model)  # int8 activations: every type interleaved
    slow = optimize_for_decode(_loaded(path, monkeypatch, False).model, act="fp32")
    assert fast.lm_head.interleaved and not slow.lm_head.interleaved
    assert fast.lm_head.blocks.data_ptr() != fast.tok_emb.blocks.data_ptr()  # its own copy …
    assert torch.equal(fast.lm_head.stored_blocks(), fast.tok_emb.blocks)  # … of the same weights
    assert slow.lm_head.blocks.data_ptr() == slow.tok_emb.blocks.data_ptr()  # stored layout: still shared
    # fp32 activations (the same sums to fp32 rounding); q4_k, q5_k and q8_0 keep the head stored and shared there
    fast = optimize_for_decode(_loaded(path, monkeypatch, True).model, act="fp32")
    assert fast.lm_head.interleaved == (qtype not in READ_BACK)
    got, want = _steps(fast, ids, 3), _steps(slow, ids, 3)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
