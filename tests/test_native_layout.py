"""The C kernel's layout: headers that stand alone, includes only at the top and without cycles, one file for
the ISA tests, every source in the build key, and the ABI's enums checked at load."""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gen_cli.errors import InternalError
from gen_cli.native import abi, build

NATIVE = Path(build.__file__).parent
HEADERS = sorted(NATIVE.glob("*.h"))
SOURCES = sorted(NATIVE.glob("*.c"))
INCLUDE = re.compile(r'\s*#\s*include\s*([<"])([^>"]+)[>"]')


def _code_lines(path: Path) -> list[str]:
    """The file's lines with comments blanked out (a block comment keeps its line breaks)."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), path.read_text(encoding="utf-8"), flags=re.S)
    return [re.sub(r"//.*", "", line).rstrip() for line in text.splitlines()]


def _local_includes(path: Path) -> list[str]:
    return [m[2] for line in _code_lines(path) if (m := INCLUDE.match(line)) and m[1] == '"']


def test_includes_come_before_any_code_and_name_files_here():
    for path in [*HEADERS, *SOURCES]:
        seen_code = False
        for number, line in enumerate(_code_lines(path), 1):
            if INCLUDE.match(line):
                assert not seen_code, f"{path.name}:{number}: an #include after code"
            elif line.strip() and not line.lstrip().startswith("#"):
                seen_code = True
        for name in _local_includes(path):
            assert (NATIVE / name).is_file(), f"{path.name} includes {name}, which is not in gen_cli/native"


def test_the_include_graph_has_no_cycle():
    graph = {p.name: _local_includes(p) for p in [*HEADERS, *SOURCES]}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"include cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for child in graph.get(name, []):
                visit(child, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_every_header_has_an_include_guard():
    for path in HEADERS:
        lines = [line.strip() for line in _code_lines(path) if line.strip()]
        guard = re.fullmatch(r"#ifndef (\w+)", lines[0])
        assert guard and lines[1] == f"#define {guard[1]}" and lines[-1] == "#endif", path.name


def test_only_features_h_asks_the_compiler_for_an_isa():
    isa = re.compile(r"__(AVX\w*|F16C|FMA|SSE\w*)__")
    for path in [*HEADERS, *SOURCES]:
        if path.name != "features.h":
            hits = [n for n, line in enumerate(_code_lines(path), 1) if isa.search(line)]
            assert not hits, f"{path.name}:{hits}: test GEN_* from features.h instead"


def test_the_build_key_covers_every_source_and_header():
    assert set(build.SOURCES) == set(SOURCES) and set(build.HEADERS) == set(HEADERS)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_build_key_changes_with_any_header(monkeypatch, tmp_path):
    extra = tmp_path / "extra.h"
    extra.write_text("/* one */\n")
    monkeypatch.setattr(build, "HEADERS", (*build.HEADERS, extra))
    before = build._build_key(["cc"])
    extra.write_text("/* two */\n")
    assert build._build_key(["cc"]) != before


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("march", ["native", "x86-64-v2"] if platform.machine() == "x86_64" else ["native"])
def test_every_header_compiles_on_its_own(march):
    # One compiler run, each header its own translation unit: a header that leans on names included before it
    # (an undeclared function, an unknown type) fails here. x86-64-v2: the portable paths, without immintrin.h.
    flags = ["-fsyntax-only", "-std=c11", "-fopenmp", f"-march={march}", "-Werror=implicit-function-declaration"]
    done = subprocess.run(["cc", *flags, "-x", "c", *map(str, HEADERS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


needs_kernel = pytest.mark.skipif(build.native_status() != "ready", reason="needs the compiled kernel")


@needs_kernel
def test_every_mirrored_enum_matches_the_kernel():
    lib = build.library()
    lib.gen_abi_enum.argtypes, lib.gen_abi_enum.restype = [ctypes.c_char_p], ctypes.c_int64
    found = {name: lib.gen_abi_enum(name.encode()) for name in abi._expected_enums()}
    assert found == abi._expected_enums()
    assert found["T_Q4_K"] == abi.MATRIX_TYPES["q4_k"] and found["KV_INT4"] == abi.KV_KINDS["int4"]


@needs_kernel
@pytest.mark.parametrize(
    ("changed", "said"),
    [({"T_Q4_K": 7}, "T_Q4_K is 6, Python's mirror says 7"), ({"T_Q2_K": 10}, "T_Q2_K is missing")],
)
def test_an_enum_mismatch_is_refused_at_load(changed, said, fresh_library, monkeypatch):
    real = abi._expected_enums
    monkeypatch.setattr(abi, "_expected_enums", lambda: {**real(), **changed})
    assert said in build.native_status()


@needs_kernel
@pytest.mark.parametrize("code", [abi.MATRIX_TYPES["int8"], 99, -1])  # the step's own int8, unknown codes
def test_the_block_entry_points_refuse_a_type_without_traits(code):
    lib = build.library()
    w, x, y = (ctypes.c_float * 64)(), (ctypes.c_float * 32)(), (ctypes.c_float * 64)()
    assert lib.gen_block_matmul(w, code, 2, 32, x, 1, y, 1, 0) == -1  # act: ACT_INT8
    assert lib.gen_block_dequantize(w, code, 2, 32, y, 0, 1) == -1


@needs_kernel
@pytest.mark.parametrize("where", ["lm_head", "emb_type"])
def test_the_step_refuses_an_unknown_type_before_reading_anything(where):
    # No layers and no buffers: the check runs first, so nothing is dereferenced and no type falls to a format.
    model = abi.Model(n_layer=0, lm_head=abi.Matrix(type=abi.MATRIX_TYPES["fp32"]))
    if where == "lm_head":
        model.lm_head.type = 99
    else:
        model.emb_type = 99
    with pytest.raises(InternalError, match="type it does not know"):
        build.library().gen_decode_step(ctypes.byref(model), None, 0, 0, None)
