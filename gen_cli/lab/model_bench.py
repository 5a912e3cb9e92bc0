"""`gen bench decode --model`: gen's decode modes on a real model's weights (gen directory, HF folder or GGUF
file), and transformers on the same HF folder, measured as the preset benchmark measures random shapes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gen_cli.errors import UsageError
from gen_cli.formats.loading import load, require_model_kind
from gen_cli.infer.engine import decode_layout, open_model
from gen_cli.lab.decode_bench import (
    DECODE_PROMPT,
    NEW_TOKENS,
    PREFILL_PROMPT,
    Row,
    bench_runners,
    checked_modes,
    mode_options,
    run_context,
    split_mode,
    with_acts,
)
from gen_cli.lab.transformers_peer import hf_available
from gen_cli.memory import check_fits
from gen_cli.model.transformer import Transformer


def build_mode(reference: Transformer, mode: str, device: torch.device, path: Path | None = None) -> Transformer:
    """A copy of the fp32 model in `mode`, as `gen generate` builds it (the reference itself stays fp32);
    mode "file" loads `path` again as `gen generate --model` does: weights as stored, block types kept."""
    options = mode_options(mode, device)
    if split_mode(mode)[0] == "file" and path is not None:
        return open_model(path, options).model
    return decode_layout(copy.deepcopy(reference), options, device)


def torch_free_timer(path: Path, mode: str, device: torch.device) -> Callable | None:
    """A timer (as decode_bench.time_gen) on the engine `gen generate` takes for `mode` on the file at `path` when it
    is the torch-free one (a GGUF file, mode "file" with its precision, the CPU): the prompt then runs through the
    C step's rows rather than PyTorch's products, so the rate printed is the one users get. None elsewhere."""
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.options import SamplingConfig
    from gen_cli.infer.torch_free import applies, open_file

    base, act = split_mode(mode)
    if base != "file" or not applies(path, mode_options(mode, device), CacheSpec(), True):
        return None
    engine = open_file(path, torch.get_num_threads(), act)
    if isinstance(engine, str):  # the file's types or RoPE: the PyTorch path, as `gen generate` falls back
        return None
    greedy = SamplingConfig(temperature=0.0)

    def timer(_model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
        result = engine.generate(prompt[0].tolist(), new_tokens, greedy, 0, (), lambda _t: False)
        stats = result.stats
        return stats.decode_tokens_per_s or float("nan"), stats.prefill_tokens_per_s, torch.tensor(result.tokens)

    return timer


def _has_blocks(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "qtype") and hasattr(m, "blocks") for m in model.modules())


def _dequantized_bytes(model: torch.nn.Module) -> int:
    """fp32 bytes of `model`'s block weights dequantized (a head sharing the embedding's blocks counted once)."""
    from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear

    shapes = {}
    for m in model.modules():
        if isinstance(m, BlockLinear):
            shapes[m.blocks.data_ptr()] = m.out_features * m.in_features
        elif isinstance(m, BlockEmbedding):
            shapes[m.blocks.data_ptr()] = m.num_embeddings * m.embedding_dim
    return 4 * sum(shapes.values())


def load_transformers(folder: Path, device: torch.device) -> Any:
    """transformers' own model of an HF folder in float32, from local files only (never a download)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval().to(device)


def _text(loaded: Any, context: int) -> torch.Tensor:
    """(1, T) ids of real text for the quality of activation precisions, within the model's context."""
    from gen_cli.lab.act_quality import TEXT_TOKENS, text_ids
    from gen_cli.text.tokenizer import encode

    return text_ids(lambda t: encode(loaded.tokenizer, t), min(TEXT_TOKENS, context - 1))


def bench_model_decode(
    model_path: str | Path,
    modes: tuple[str, ...] | None = None,
    repeats: int = 3,
    new_tokens: int = NEW_TOKENS,
    device: torch.device | str = "cpu",
    on_step: Callable[[str], None] | None = None,
    on_run: Callable[[], None] | None = None,
    prompt_len: int = PREFILL_PROMPT,
    profile: bool = False,
    llama_bench: Path | None = None,
    acts: tuple[str, ...] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Rows for every mode on the model's weights (+ transformers for an HF folder, when installed) and the
    run's context; deviations are measured against the model in unoptimised fp32.

    With `llama_bench` (the binary) and a GGUF file, llama.cpp runs the same file, threads and lengths once
    after each round of gen's repeats; its merged tests are in `context["llama_bench"]`. `acts` runs each block
    mode once per activation precision, each also measured against fp32 activations on real text (the built-in
    corpus's validation split, through the model's own tokenizer).
    """
    device = torch.device(device)
    asked, modes = modes, checked_modes(modes, new_tokens, device)
    path = Path(model_path)
    kind = require_model_kind(path)
    if llama_bench is not None and kind != "gguf":
        raise UsageError(f"llama-bench runs GGUF files; {path} is a {kind} model", params=("llama_bench",))
    loaded = load(path, device=device, dtype=torch.float32)
    blocks = _has_blocks(loaded.model)
    if blocks:  # a quantized file: the reference is its weights dequantized
        from gen_cli.quant.block_linear import dequantize_modules

        # The fp32 reference, then each mode built from a copy of it: twice the dequantized weights at once.
        check_fits(
            2 * _dequantized_bytes(loaded.model), f"measuring {path.name} against its weights in fp32",
            "bench decode compares every mode with that reference; time this file with `gen generate --stats` "
            "or llama.cpp's llama-bench instead",
        )  # fmt: skip
        dequantize_modules(loaded.model)
    if not asked and (blocks or kind == "gguf"):
        # by default, first of all what the file itself runs at (on a GGUF file, the engine `gen generate` takes)
        modes = ("file", *modes)
    modes = checked_modes(with_acts(modes, acts, file_blocks=blocks), new_tokens, device)
    reference = loaded.model.eval()
    limit = reference.config.context_length
    if DECODE_PROMPT + new_tokens > limit:
        raise UsageError(
            f"max_new_tokens {new_tokens} + a {DECODE_PROMPT}-token prompt exceed the model's context of {limit} "
            "tokens",
            params=("max_new_tokens",),
        )
    # transformers reads the HF folder itself; a GGUF or gen model has no folder it loads as is.
    with_hf = kind == "hf" and hf_available()
    label = str(path)
    peer = None
    if llama_bench is not None:
        from gen_cli.lab.llama_bench import LlamaRunner

        peer = LlamaRunner(llama_bench, path, torch.get_num_threads(), prompt_len, new_tokens)
    rows = bench_runners(
        label, reference, lambda mode: build_mode(reference, mode, device, path),
        (lambda: load_transformers(path, device)) if with_hf else None, modes, repeats, new_tokens,
        on_step=on_step, on_run=on_run, vocab=min(loaded.tokenizer.get_vocab_size(), reference.config.vocab_size),
        prompt_len=prompt_len, between=peer, profile=profile, text=_text(loaded, limit) if acts else None,
        own_timer=lambda mode: torch_free_timer(path, mode, device),
    )  # fmt: skip
    for r in rows:
        r.vs_c = None  # the fixed C figures are for preset shapes, never a model's (whatever its folder is called)
    context = run_context(device, rows, (label,), with_hf, repeats, new_tokens, prompt_len)
    context["model"] = {"path": label, "kind": kind, **loaded.details}
    if peer is not None:
        context["llama_bench"] = [t.to_dict() for t in peer.tests()]
    return rows, context
