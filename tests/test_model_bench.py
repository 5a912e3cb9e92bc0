"""`gen bench decode --model`: gen's modes on a real model's weights, transformers on the same HF folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hf_builders import build_hf_model, byte_level_tokenizer, write_gguf  # noqa: E402

from gen_cli.cli import app  # noqa: E402
from gen_cli.errors import UsageError  # noqa: E402
from gen_cli.lab.model_bench import bench_model_decode  # noqa: E402

runner = CliRunner()
NEW = 12  # the tiny model's context is 64 tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tok = byte_level_tokenizer()
    model = build_hf_model("llama", folder, tok)
    gguf_path = folder.parent / "llama.gguf"
    write_gguf(model, tok, "llama", gguf_path)
    return folder, gguf_path


def test_hf_folder_rows_and_transformers_deviation(llama):
    folder, _ = llama
    rows, context = bench_model_decode(folder, ("fp32", "fp32-torch", "bf16"), 1, NEW, "cpu")
    by_mode = {r.mode: r for r in rows}
    assert set(by_mode) == {"fp32", "fp32-torch", "bf16", "transformers"}
    assert by_mode["transformers"].path == "transformers" and by_mode["fp32-torch"].path == "torch"
    assert by_mode["transformers"].max_logit_diff < 1e-4  # transformers' own load of the folder vs gen's fp32
    assert by_mode["fp32-torch"].max_logit_diff < 1e-4  # measured after bf16 was built: the modes run copies
    assert by_mode["bf16"].max_logit_diff < 0.1
    assert all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 and r.shape == str(folder) for r in rows)
    assert all(r.vs_c is None for r in rows)
    assert context["model"]["kind"] == "hf" and str(folder) in context["bandwidth_gb_s"]


def test_gguf_has_gen_rows_only_and_a_too_long_run_is_refused(llama):
    _, gguf_path = llama
    rows, context = bench_model_decode(gguf_path, ("fp32-torch",), 1, NEW, "cpu")
    assert [r.mode for r in rows] == ["fp32-torch"] and context["model"]["kind"] == "gguf"
    with pytest.raises(UsageError, match=r"max_new_tokens 100 .* context of 64 tokens"):
        bench_model_decode(gguf_path, ("fp32-torch",), 1, 100, "cpu")


def test_cli_json_and_refusals(llama, tmp_path):
    folder, _ = llama
    args = [
        "bench",
        "decode",
        "--model",
        str(folder),
        "--modes",
        "fp32",
        "--repeats",
        "1",
        "--max-new-tokens",
        str(NEW),
    ]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["mode"]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == {"fp32", "transformers"} and rows["transformers"]["max_logit_diff"] < 1e-4
    r = runner.invoke(app, ["bench", "decode", "--model", str(tmp_path / "missing.gguf"), "--json"])
    assert r.exit_code == 2 and "missing.gguf: no such directory or .gguf file" in r.output
    r = runner.invoke(app, ["bench", "decode", "--model", str(folder), "--shapes", "tiny"])
    assert r.exit_code == 2 and "not both" in r.output


def test_gguf_beside_llama_bench_interleaved_with_ratios(llama, tmp_path):
    from test_llama_bench import fake_llama_bench

    from gen_cli.lab.bench_format import render, tests

    _, gguf_path = llama
    binary, log = fake_llama_bench(tmp_path)
    events = []
    rows, context = bench_model_decode(gguf_path, ("fp32-torch",), 2, NEW, "cpu", on_run=lambda: events.append(1),
                                       prompt_len=16, llama_bench=binary)  # fmt: skip
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and f"-p 16 -n {NEW} -r 1 -o json" in calls[0]  # one llama run per round of gen's
    pp, tg = context["llama_bench"]
    assert (pp["test"], tg["test"], len(tg["samples_ts"])) == ("pp16", f"tg{NEW}", 2)
    records = {(r["path"], r["test"]): r for r in tests(rows, context)}
    gen_tg = records[("torch", f"tg{NEW}")]
    assert gen_tg["vs_llama"] == pytest.approx(rows[0].decode_tok_s / 100.0)  # the fake's tg rate
    assert records[("torch", "pp16")]["vs_llama"] == pytest.approx(rows[0].prefill_tok_s / 500.0)
    assert records[("llama.cpp", "pp16")]["t_s"] == 500.0 and "vs_llama" not in records[("llama.cpp", "pp16")]
    md = render(rows, context, "md").splitlines()
    assert md[0].startswith("| model | mode | path | threads | test | t/s |") and len(md) == 2 + 4
    assert all(line.count(" | ") == md[0].count(" | ") for line in md if "---" not in line)  # cells escaped
    assert any("| llama.cpp |" in line and "| 100.00 ± 0.00 |" in line for line in md)
    with pytest.raises(UsageError, match="GGUF"):
        bench_model_decode(llama[0], ("fp32-torch",), 1, NEW, "cpu", llama_bench=binary)


def test_cli_formats_flags_and_profile(llama, tmp_path):
    import csv
    import io

    from test_llama_bench import fake_llama_bench

    _, gguf_path = llama
    binary, log = fake_llama_bench(tmp_path)
    args = ["bench", "decode", "-m", str(gguf_path), "--modes", "fp32-torch", "-r", "1", "-p", "16", "-n", str(NEW),
            "-t", "1", "--llama-bench", str(binary)]  # fmt: skip
    r = runner.invoke(app, [*args, "--format", "csv"])
    assert r.exit_code == 0, r.output
    lines = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["path"], x["test"]) for x in lines] == [("torch", "pp16"), ("torch", f"tg{NEW}"),
                                                        ("llama.cpp", "pp16"), ("llama.cpp", f"tg{NEW}")]  # fmt: skip
    assert {x["threads"] for x in lines} == {"1"} and "-t 1 " in log.read_text()
    r = runner.invoke(app, [*args, "--json", "--profile"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    profile = data["rows"][0]["extra"]["profile"]
    assert profile["path"] == "torch" and all(v >= 0 for v in profile["seconds"].values())
    assert 0 < sum(v for k, v in profile["seconds"].items() if k != "python") <= profile["step_s"]
    assert {t["test"] for t in data["tests"]} == {"pp16", f"tg{NEW}"} and data["context"]["peak_gflops"][
        str(gguf_path)
    ]["fp32"] > 0
    r = runner.invoke(app, [*args, "--no-llama-bench", "--format", "xml"])
    assert r.exit_code == 2 and "--format" in r.output


def test_a_quantized_file_runs_as_stored_against_its_dequantized_weights(llama, tmp_path):
    from hf_builders import build_hf_model, byte_level_tokenizer, write_gguf

    tok = byte_level_tokenizer()
    path = tmp_path / "q8.gguf"
    write_gguf(build_hf_model("llama", tmp_path / "hf", tok), tok, "llama", path, qtype="Q8_0")
    rows, _ = bench_model_decode(path, None, 1, NEW, "cpu", prompt_len=16)
    by_mode = {r.mode: r for r in rows}
    assert rows[0].mode == "file"  # a quantized file's own types come first by default
    file, fp32 = by_mode["file"], by_mode["fp32"]
    assert file.bytes_per_token < fp32.bytes_per_token / 3  # Q8_0 blocks: 34 bytes per 32 weights
    assert fp32.max_logit_diff < 1e-4  # the reference is the file's weights dequantized: fp32 runs exactly those
    assert file.max_logit_diff < 0.05 and file.greedy_agree >= 1  # activations quantized per block by the kernel
    with pytest.raises(UsageError, match="needs a model"):
        from gen_cli.lab.decode_bench import bench_decode

        bench_decode(("tiny",), ("file",))


def test_a_quantized_file_whose_fp32_reference_will_not_fit_is_refused_in_one_line(tmp_path, monkeypatch):
    """bench decode dequantizes a block file to fp32 as its deviation oracle: refused before that, not killed."""
    from gen_cli import memory
    from gen_cli.errors import GenError
    from gen_cli.resources import default_model_dir

    out = tmp_path / "q8.gguf"
    r = CliRunner().invoke(
        app, ["export", str(default_model_dir()), "--to", "gguf", "--out", str(out), "--type", "q8_0"]
    )
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 12 * 2**20)  # room to load the 5 MB file
    with pytest.raises(GenError, match=r"measuring q8\.gguf against its weights in fp32 needs about .* llama-bench"):
        bench_model_decode(out, None, 1, NEW, "cpu")


def test_a_gguf_files_own_row_times_the_engine_gen_generate_takes(llama, monkeypatch):
    """`gen generate` answers a GGUF file without torch: the file's row times that engine (its prompt through the C
    step's rows, not PyTorch's products), and the PyTorch path where the switch turns it off, as in the command."""
    from gen_cli.infer.torch_free import TORCH_FREE_ENV, FileEngine
    from gen_cli.native import decoder as native

    if native.native_status() != "ready":
        pytest.skip("the native kernel does not build here: no torch-free engine")
    _, gguf_path = llama
    prompts = []
    generate = FileEngine.generate
    monkeypatch.setattr(
        FileEngine, "generate", lambda self, ids, *a: prompts.append(len(ids)) or generate(self, ids, *a)
    )
    rows, _ = bench_model_decode(gguf_path, None, 1, NEW, "cpu", prompt_len=16)
    by_mode = {r.mode: r for r in rows}
    assert rows[0].mode == "file"  # by default, first: an F32 file's own row too
    assert by_mode["file"].path == "torch-free" and by_mode["fp32"].path == "native"
    assert 16 in prompts and by_mode["file"].prefill_runs == [by_mode["file"].prefill_tok_s]
    assert by_mode["file"].max_logit_diff < 1e-4 and by_mode["file"].greedy_agree >= 1
    monkeypatch.setenv(TORCH_FREE_ENV, "0")
    prompts.clear()
    rows, _ = bench_model_decode(gguf_path, ("file",), 1, NEW, "cpu", prompt_len=16, acts=("int8", "fp32"))
    assert [(r.mode, r.path) for r in rows] == [("file", "native")] and not prompts  # F32: no precision to choose


def test_a_torch_free_rows_peak_is_what_the_c_steps_products_compute_in(tmp_path):
    """A stored Q5_0 file's 48-token prompt: the PyTorch path multiplies it on dequantized tiles (a float GEMM's
    peak), while the C step's products are int8 whatever the rows; the torch-free row divides by int8's peak (it
    was labelled as the tiles' bf16 before)."""
    from hf_builders import build_hf_model, byte_level_tokenizer, write_gguf

    from gen_cli.native import decoder as native

    if native.native_status() != "ready":
        pytest.skip("the native kernel does not build here: no torch-free engine")
    tok = byte_level_tokenizer()
    path = tmp_path / "q5_0.gguf"
    write_gguf(build_hf_model("llama", tmp_path / "hf", tok), tok, "llama", path, qtype="Q5_0")
    (row,), _ = bench_model_decode(path, ("file",), 1, NEW, "cpu", prompt_len=48)
    assert row.path == "torch-free" and row.peak_dtype.startswith("int8 ")
