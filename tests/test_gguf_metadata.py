"""gen reads GGUF headers itself (the gguf package's reader is seconds slow on a real vocabulary): its metadata
and tensor infos equal gguf.GGUFReader's on files written by gguf.GGUFWriter, and a truncated or corrupt
file is one GenError line naming the file, never another exception."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hf_builders import add_tokenizer, byte_level_tokenizer  # noqa: E402

from gen_cli.errors import GenError  # noqa: E402
from gen_cli.formats.gguf_file import GGUFFile  # noqa: E402
from gen_cli.quant.blocks import quantize  # noqa: E402

T = gguf.GGUFValueType
SCALARS = [("u8", T.UINT8, 200), ("i8", T.INT8, -100), ("u16", T.UINT16, 60000), ("i16", T.INT16, -30000),
           ("u32", T.UINT32, 4_000_000_000), ("i32", T.INT32, -2_000_000_000), ("f32", T.FLOAT32, 0.1),
           ("u64", T.UINT64, 2**63 + 5), ("i64", T.INT64, -(2**62)), ("f64", T.FLOAT64, 1e-300),
           ("yes", T.BOOL, True), ("no", T.BOOL, False), ("s", T.STRING, "héllo 🙂"),
           ("empty_s", T.STRING, "")]  # fmt: skip
ARRAYS = {"ints": [1, -2, 3], "floats": [0.5, -1e-5, 3.25], "bools": [True, False, True],
          "strings": ["a", "", "日本語", "x y"], "nul": ["a\x00b", "", "\x00"], "nested": [[1, 2], [3, 4, 5]],
          "nested_strings": [["a", "b"], ["c"]]}  # fmt: skip
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


def _write(path: Path, alignment: int | None = None, tokenizer: bool = True) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        w.add_key_value(f"test.{key}", value, vtype)
    for key, value in ARRAYS.items():
        w.add_array(f"test.{key}", value)
    w.add_key_value("test.u64s_typed", [2**64 - 1, 7], T.ARRAY, sub_type=T.UINT64)  # typed, not INT32
    w.add_key_value("test.f64s", [1e-300, -2.5], T.ARRAY, sub_type=T.FLOAT64)
    if tokenizer:
        add_tokenizer(w, byte_level_tokenizer(), "gpt2")
    rng = np.random.default_rng(0)
    for i, name in enumerate(QTYPES):
        a = rng.standard_normal((3 + i, 256)).astype(np.float32)
        kind = gguf.GGMLQuantizationType[name]
        if name == "F32":
            w.add_tensor(f"t.{name}", a)
        elif name in ("Q4_K", "Q6_K"):  # the gguf package cannot quantize these: gen's quantizer writes them
            w.add_tensor(f"t.{name}", quantize(torch.from_numpy(a), name.lower()).numpy(), raw_dtype=kind)
        else:
            w.add_tensor(f"t.{name}", gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.add_tensor("t.vector", rng.standard_normal(5).astype(np.float32))  # odd size: the next one is padded
    w.add_tensor("t.3d", rng.standard_normal((2, 3, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _flat(value):
    """GGUFReader's contents() flattens arrays of arrays (its own FIXME): compare ours flattened."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for v in value for x in _flat(v)]
    return value


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensor_infos_equal_gguf_readers(tmp_path, alignment):
    path = _write(tmp_path / "m.gguf", alignment)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert _flat(ours.metadata[key]) == field.contents(), key
        assert ours.value_types[key] == tuple(int(t) for t in field.types), key
    assert ours.metadata["test.nested"] == [[1, 2], [3, 4, 5]]  # ours keeps the nesting
    assert ours.metadata["test.u64s_typed"] == [2**64 - 1, 7] and ours.metadata["test.s"] == "héllo 🙂"
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type and list(mine.dims) == t.shape.tolist()
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (t.n_elements, t.n_bytes, t.data_offset)
        assert mine.data.tobytes() == t.data.tobytes(), t.name
        assert ours.shape(t.name) == tuple(reversed(t.shape.tolist()))
    # the tokenizer arrays as the gguf package reads them: every token and merge, in order
    assert ours.get("tokenizer.ggml.tokens") == fields["tokenizer.ggml.tokens"].contents()
    assert ours.get("tokenizer.ggml.merges") == fields["tokenizer.ggml.merges"].contents()


def test_tensors_are_views_of_the_map_and_writes_stay_in_memory(tmp_path):
    path = _write(tmp_path / "m.gguf", tokenizer=False)
    before = path.read_bytes()
    f = GGUFFile(path)
    t = f.torch_view("t.Q4_0")
    assert t.shape == (7, 256 // 32 * 18) and t.dtype == torch.uint8  # 3 + its index rows, 18-byte blocks
    t[0, 0] += 1  # copy-on-write: the process's page changes, the file does not
    assert f.view("t.Q4_0")[0, 0] == t[0, 0].item()
    assert path.read_bytes() == before
    assert np.array_equal(f.array("t.F32"), gguf.GGUFReader(str(path)).tensors[0].data)


def _error(path: Path) -> str:
    with pytest.raises(GenError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "GGUF" in message
    return message


def test_every_truncation_is_one_line(tmp_path):
    data = _write(tmp_path / "m.gguf").read_bytes()
    header_end = GGUFFile(tmp_path / "m.gguf").data_offset
    cuts = sorted({*range(0, 64), *random.Random(0).sample(range(64, len(data)), 300), header_end - 1, len(data) - 1})
    for cut in cuts:
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _error(tmp_path / "cut.gguf")


def test_corrupt_headers_are_one_line_or_read(tmp_path):
    data = bytearray(_write(tmp_path / "m.gguf").read_bytes())
    header_end = GGUFFile(tmp_path / "m.gguf").data_offset
    rng = random.Random(1)
    errors = 0
    for i in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(4, header_end)] = rng.randrange(256)
        (tmp_path / f"{i % 3}.gguf").write_bytes(bad)
        try:
            GGUFFile(tmp_path / f"{i % 3}.gguf")
        except GenError as e:
            assert "\n" not in str(e) and "GGUF" in str(e)
            errors += 1
    assert errors > 100  # most flips land in lengths, types and counts


def _patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def test_huge_counts_and_lengths_are_refused_before_allocating(tmp_path):
    path = _write(tmp_path / "m.gguf")
    data = path.read_bytes()
    cases = {
        "tensor count": (8, "<Q", 2**60),
        "metadata count": (16, "<Q", 2**60),
        "first key's length": (24, "<Q", 2**62),
    }
    tokens_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4  # type, element type
    cases["vocabulary length"] = (tokens_at, "<Q", 2**50)
    for what, (at, fmt, value) in cases.items():
        (tmp_path / "bad.gguf").write_bytes(_patched(data, at, fmt, value))
        assert "past the end" in _error(tmp_path / "bad.gguf"), what


def test_bad_files_name_what_is_wrong(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "shorter than a GGUF header" in _error(tmp_path / "empty.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + bytes(60))
    assert "does not start with the bytes GGUF" in _error(tmp_path / "magic.gguf")
    data = _write(tmp_path / "m.gguf").read_bytes()
    (tmp_path / "v1.gguf").write_bytes(_patched(data, 4, "<I", 1))
    assert "version 1 is not supported" in _error(tmp_path / "v1.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("x", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "big-endian" in _error(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "utf8.gguf"), "llama")
    w.add_array("test.names", [b"fine", b"\xff\xfe not UTF-8"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "metadata test.names (element 1) is not valid UTF-8" in _error(tmp_path / "utf8.gguf")


def test_ggml_types_equal_the_gguf_packages():
    from gen_cli.formats.gguf_reader import GGML_TYPES, GGMLType

    theirs = {t.name: (int(t), *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert theirs == GGML_TYPES
    assert all(GGMLType[name] == gguf.GGMLQuantizationType[name] for name in theirs)


def test_a_load_reads_the_header_once(tmp_path, monkeypatch):
    from gen_cli.formats.export_gguf import export_gguf
    from gen_cli.formats.gguf_reader import GGUFFile as Reader
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.model.config import ModelConfig
    from gen_cli.model.transformer import Transformer
    from gen_cli.text.tokenizer import configure

    config = ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64, context_length=64)
    path = tmp_path / "m.gguf"
    export_gguf(Transformer(config).eval(), configure(byte_level_tokenizer()), path)
    reads = []
    read = Reader._read
    monkeypatch.setattr(Reader, "_read", lambda self: reads.append(self.path) or read(self))
    open_model(path, EngineOptions(threads=1))
    assert reads == [path]  # the fit check's header is the one the load uses


@pytest.mark.parametrize(
    ("kind", "value", "fits"),
    [("a list of strings", ["a", "b"], True), ("a list of strings", ["a", 1], False),
     ("a list of whole numbers", [1, 2], True), ("a list of whole numbers", [1, True], False),
     ("a list of numbers", [1, 2.5], True), ("a list of numbers", [1, float("nan")], False),
     ("a list of numbers", [1, False], False), ("a list of strings", [], True), ("a list of strings", "ab", False)],
)  # fmt: skip
def test_list_keys_check_every_element(kind, value, fits):
    from gen_cli.formats.schema import Key

    assert Key(kind).fits(value) is fits
