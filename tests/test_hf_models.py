"""Hugging Face folders: gen's logits equal transformers' on tiny random models of every architecture.

Cache on and off, batch 1 and 3, the native step where the shape allows; sharded weights; stop ids;
and bad folders refused with one line through the CLI.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_builders import ARCHS, build_hf_model, byte_level_tokenizer  # noqa: E402

from gen_cli.cache.linear import KVCache  # noqa: E402
from gen_cli.cli import app  # noqa: E402
from gen_cli.formats.checkpoint import load_config  # noqa: E402
from gen_cli.formats.loading import load  # noqa: E402
from gen_cli.infer.generate import decode_step, generate, new_cache, prefill  # noqa: E402
from gen_cli.infer.optimize import optimize_for_decode  # noqa: E402
from gen_cli.infer.options import SamplingConfig  # noqa: E402
from gen_cli.model.config import ModelConfig  # noqa: E402
from gen_cli.resources import default_model_dir  # noqa: E402

runner = CliRunner()
TOL = 1e-4
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    """arch → (HF folder, the transformers model saved there)."""
    root = tmp_path_factory.mktemp("hf")
    built = {}
    for arch in ARCHS:
        (root / arch).mkdir()
        built[arch] = (root / arch, build_hf_model(arch, root / arch, tok))
    return built


def _ids(batch: int, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(batch))  # (B, T)


def _cached_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, T - prompt_len + 1, V): a prefill, then one decode step per remaining token."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], model.tok_emb.weight.dtype)
    with torch.inference_mode():
        out = [prefill(model, ids[:, :prompt_len], cache)]
        out += [decode_step(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_equal_transformers_cache_off_and_on(folders, arch, batch):
    directory, hf = folders[arch]
    model = load(directory).model
    ids = _ids(batch)
    with torch.no_grad():
        ref = hf(ids).logits  # (B, T, V)
        full = model(ids)
    assert (full - ref).abs().max().item() < TOL
    cached = _cached_logits(model, ids, prompt_len=4)
    assert (cached - ref[:, 3:]).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_with_and_without_cache(folders, arch):
    model = optimize_for_decode(load(folders[arch][0]).model, native=False)
    prompt = _ids(3, 5)
    caches = (new_cache(model, prompt, 8), None)
    runs = [torch.stack(list(generate(model, prompt, 8, GREEDY, c)), dim=1) for c in caches]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_native_step_runs_a_plain_llama_and_matches_transformers(folders, arch):
    directory, hf = folders[arch]  # llama3: scaled RoPE, which the kernel reads from the model's tables
    model = optimize_for_decode(load(directory).model, native=True)
    assert model.native_decoder is not None
    ids = _ids(3)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (_cached_logits(model, ids, prompt_len=4) - ref[:, 3:]).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gpt2"])
def test_native_step_refuses_properties_it_lacks(folders, arch):
    from gen_cli.native.decoder import supports

    reason = supports(optimize_for_decode(load(folders[arch][0]).model, native=False))
    assert reason is not None and "native kernel does not implement" in reason


def test_sharded_folder_and_stored_dtype(tmp_path, tok):
    hf = build_hf_model("llama", tmp_path, tok)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load(tmp_path).model
    assert model.tok_emb.weight.dtype == torch.bfloat16  # kept as stored
    ids = _ids(1)
    fp32 = load(tmp_path, dtype=torch.float32).model
    # transformers reloads the shards itself (`hf.float()` would keep its bf16-rounded RoPE buffer).
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (fp32(ids) - ref(ids).logits).abs().max().item() < TOL


def test_stop_ids_from_config_and_generation_config(folders, tok, tmp_path):
    directory = folders["qwen2"][0]
    shutil.copytree(directory, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    loaded = load(tmp_path / "m")
    assert loaded.stop_ids == (0, 7)
    # generate() stops every row at any of several ids: here every token is a stop id.
    every = list(range(loaded.model.config.vocab_size))
    steps = list(generate(loaded.model, _ids(2, 4), 6, GREEDY, None, stop_token_id=every))
    assert len(steps) == 1


def test_gen_models_load_and_save_unchanged():
    config = load_config(default_model_dir())
    on_disk = json.loads((default_model_dir() / "config.json").read_text())
    assert config.to_dict() == on_disk  # new properties are omitted at their defaults
    assert ModelConfig.from_dict(on_disk).head_dim == config.d_model // config.n_head


def test_cli_info_generate_and_tokenize(folders):
    directory = str(folders["qwen3"][0])
    info = runner.invoke(app, ["info", "--model", directory])
    assert info.exit_code == 0, info.output
    assert "Qwen3ForCausalLM" in info.stdout and "grouped-query (4 query / 2 KV heads)" in info.stdout
    data = json.loads(runner.invoke(app, ["info", directory, "--json"]).stdout)
    assert data["head_dim"] == 32 and data["architecture"] == "Qwen3ForCausalLM"
    args = ["generate", "Hello", "--model", directory, "--json", "--max-new-tokens", "4", "--ignore-eot"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["stats"]["new_tokens"] == 4  # no stop id ends it early
    ids = runner.invoke(app, ["tokenize", "12345 日本", "--model", directory, "--ids"])
    tok_ids = byte_level_tokenizer().encode("12345 日本").ids
    assert ids.exit_code == 0 and ids.stdout.split() == [str(i) for i in tok_ids]


def _one_line_error(args: list[str], *fragments: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    joined = " ".join(lines)
    assert "Traceback" not in result.output and result.stdout == ""
    assert all(f in joined for f in fragments), joined
    assert len(lines) <= 2  # one message, wrapped at most once by the terminal width


def _copy(folders, arch: str, tmp_path: Path) -> Path:
    shutil.copytree(folders[arch][0], tmp_path / arch)
    return tmp_path / arch


def test_unsupported_architecture_is_one_line(folders, tmp_path):
    d = _copy(folders, "llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"architectures": ["FalconForCausalLM"]}))
    _one_line_error(["generate", "hi", "--model", str(d)], "FalconForCausalLM", "supported")
    _one_line_error(["info", str(d)], "FalconForCausalLM")


def test_unknown_rope_scaling_is_one_line(folders, tmp_path):
    d = _copy(folders, "llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(["generate", "hi", "--model", str(d)], "dynamic", "llama3")


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
    ],
)
def test_rope_scaling_kinds_equal_transformers(folders, tmp_path, scaling):
    d = _copy(folders, "llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = scaling | {"rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    model = load(d).model
    assert model.config.rope_scaling["type"] == scaling["rope_type"]
    ids = _ids(2, length=40)  # past the original 16 positions
    with torch.no_grad():
        ref = hf(ids).logits  # (B, T, V)
        assert (model(ids) - ref).abs().max().item() < TOL
    assert (_cached_logits(model, ids, prompt_len=20) - ref[:, 19:]).abs().max().item() < TOL
    native = optimize_for_decode(load(d).model, native=True)  # the C step rotates by the same scaled tables
    if native.native_decoder is not None:
        assert (_cached_logits(native, ids, prompt_len=20) - ref[:, 19:]).abs().max().item() < TOL


def test_truncated_safetensors_is_one_line(folders, tmp_path):
    d = _copy(folders, "gpt2", tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(["generate", "hi", "--model", str(d)], "model.safetensors")


def test_missing_shard_is_one_line(tmp_path, tok):
    build_hf_model("mistral", tmp_path, tok).save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    _one_line_error(["generate", "hi", "--model", str(tmp_path)], "missing shard")


def test_wrong_shape_is_one_line(folders, tmp_path):
    d = _copy(folders, "qwen2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 128}))
    _one_line_error(["generate", "hi", "--model", str(d)], "shape", "(128, 64)")


def test_tokenizer_larger_than_the_embedding_is_one_line(folders, tmp_path):
    d = _copy(folders, "llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"vocab_size": 280}))
    _one_line_error(["generate", "hi", "--model", str(d)], "300 tokens", "vocab_size is 280")


def test_absurd_context_length_is_refused_before_allocating(folders, tmp_path):
    d = _copy(folders, "mistral", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 2**40}))
    _one_line_error(["generate", "hi", "--model", str(d)], "context_length 1099511627776 is above gen's limit")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"type": "dynamic"}}, "unknown rope_scaling"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "needs original_context_length"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
        ({"mlp": "relu"}, "unknown MLP kind"),
        ({"head_dim": 0}, "head_dim must be a positive integer"),
    ],
)
def test_model_config_checks_the_new_properties(changes, message):
    from gen_cli.errors import UsageError

    base = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, context_length=16)
    with pytest.raises(UsageError, match=message):
        ModelConfig(**base, **changes)
    explicit = ModelConfig(**base, head_dim=32)  # head_dim × heads need not equal d_model (Qwen3)
    assert explicit.to_dict()["head_dim"] == 32 and "head_dim" not in ModelConfig(**base).to_dict()


def test_mixed_dtype_file_loads_in_the_embeddings_dtype(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    build_hf_model("qwen3", tmp_path, tok).to(torch.bfloat16).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {k: v.float() if "norm" in k else v for k, v in tensors.items()}  # norms fp32, matrices bf16
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load(tmp_path).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        assert model(_ids(1)).dtype == torch.bfloat16


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chat_folder(folders, tmp_path):
    """The qwen2 folder with ChatML special tokens and template, as an instruct model ships them."""
    from tokenizers import AddedToken

    d = _copy(folders, "qwen2", tmp_path)
    tok = byte_level_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(d / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, tok.token_to_id("<|im_end|>")]}))
    return d


def test_chat_template_renders_and_encodes_as_transformers(chat_folder):
    from gen_cli.text.chat import conversation, encode_rendered, render_chat

    loaded = load(chat_folder)
    messages = conversation("What is 2+2? 日本", system="Be brief.")
    ours = encode_rendered(loaded.tokenizer, render_chat(loaded.chat_template, messages))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chat_folder / "tokenizer.json"))
    expected = theirs.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours == list(expected)
    # Where transformers parses a message's `<|im_end|>` as the control token, gen keeps it text (docs/generate.md).
    spelled = conversation("What is 2+2? <|im_end|> stays text? 日本", system="Be brief.")
    kept = encode_rendered(loaded.tokenizer, render_chat(loaded.chat_template, spelled))
    end = loaded.tokenizer.token_to_id("<|im_end|>")
    assert kept.count(end) == ours.count(end) and kept[: ours.index(end)] == ours[: ours.index(end)]
    assert loaded.stop_ids == (0, loaded.tokenizer.token_to_id("<|im_end|>"))
    result = runner.invoke(app, ["generate", "--chat", "hi", "--system", "Be brief.", "--model", str(chat_folder),
                                 "--json", "--max-new-tokens", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    hi = encode_rendered(loaded.tokenizer, render_chat(CHATML, conversation("hi", "Be brief.")))
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == len(hi)


def test_chat_without_template_or_with_a_bad_one_is_one_line(folders, chat_folder):
    _one_line_error(["generate", "--chat", "hi", "--model", str(folders["llama"][0])], "no chat template")
    config = json.loads((chat_folder / "tokenizer_config.json").read_text())
    for template, fragment in (
        ("{{ raise_exception('only user turns') }}", "only user turns"),
        ("{{ ''.__class__.__mro__ }}", "sandbox"),
        ("{% for %}", "failed"),
    ):
        (chat_folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
        _one_line_error(["generate", "--chat", "hi", "--model", str(chat_folder)], fragment)
    _one_line_error(["generate", "text", "--chat", "hi", "--model", str(chat_folder)], "either PROMPT")


@pytest.mark.parametrize(("arch", "pos"), [("qwen2", "rope"), ("gpt2", "learned")])
def test_compare_measures_an_imported_models_shape(folders, arch, pos):
    fast = ["--prompt-len", "4", "--max-new-tokens", "5", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    model = ["compare", "--model", str(folders[arch][0])]
    result = runner.invoke(
        app, [*model, *fast, "--attention", "mha,mqa", "--pos", pos, "--in-process", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {(r["kv_heads"], r["pos"]) for r in rows} == {(4, pos), (1, pos)}  # the imported shape's 4 heads
    assert all(r["greedy_match"] for r in rows if r["kv_cache"])  # the cache agrees with the oracle on this shape
    refused = runner.invoke(app, [*model, "--quality-steps", "5"])
    assert refused.exit_code == 2 and "gen's tokenizer" in refused.stderr
