"""Inference-only fast paths: fused MLP, the native C decode step, oneDNN for CPU products, weight-only
int8 or GGML block formats, torch.compile.

`optimize_for_decode(model, quantize=..., compile=..., native=...)` turns a trained or random
`Transformer` into an inference-only one (its state_dict changes: w1/w3 become w13, int8 layers hold
`qweight`/`scale`, block layers `blocks`). Call it after `.to(device, dtype)`; generation code is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from gen_cli.errors import UsageError
from gen_cli.infer.options import SamplingConfig, check_act
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.pages import PageReleaser, join_rows
from gen_cli.quant.block_linear import BlockLinear, as_block_linear
from gen_cli.quant.block_stack import stack_rows
from gen_cli.quant.formats import block_type_for
from gen_cli.quant.linear import Int8Linear, OneDNNLinear, onednn_applies

# int8: one scale per output row (gen's own, PyTorch's int8 kernel); q8_0 / q4_0 / q4_k: GGML's block
# formats (a scale per 32 weights, or per 32 inside 256), the bytes a GGUF file of that type holds.
BLOCK_MODES = ("q8_0", "q4_0", "q4_k")
QUANTIZE_MODES = ("none", "int8", *BLOCK_MODES)


def _linears(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) for every nn.Linear, so it can be swapped in place."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def _untie(model: Transformer) -> None:
    if model.config.tie_embeddings and isinstance(model.tok_emb, nn.Embedding):  # a BlockEmbedding's head is blocks
        # The embedding keeps its float table (a lookup reads one row); the head gets its own copy.
        model.tok_emb.weight = nn.Parameter(model.tok_emb.weight.detach().clone(), requires_grad=False)


def _to_onednn(model: Transformer, pack_decode: bool) -> None:
    """Replace every wide enough CPU linear by a OneDNNLinear sharing its weight (a tied head stays tied)."""
    for parent, name, lin in _linears(model):
        if onednn_applies(lin.weight):
            setattr(parent, name, OneDNNLinear(lin.weight, pack_decode))


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every linear (the lm head included) by an Int8Linear in the model's dtype; in place."""
    _untie(model)
    for parent, name, lin in _linears(model):
        setattr(parent, name, Int8Linear(lin.weight, lin.weight.dtype))  # built on the weight's device
    return model


def quantize_blocks(model: Transformer, qtype: str) -> Transformer:
    """Replace every float linear (the lm head included; a tied head gets its own blocks, the embedding
    stays as it is) by a BlockLinear of `qtype`, in place. A matrix whose rows are not whole blocks stays
    float; q4_k falls back to q4_0 where rows are whole 32-blocks but not 256-blocks."""
    for parent, name, lin in _linears(model):
        kind = block_type_for(qtype, lin.in_features)
        if kind is not None:
            setattr(parent, name, BlockLinear.from_weight(lin.weight, kind, lin.bias))
    return model


def interleave_tied_head(model: Transformer, act: str | None = None) -> None:
    """A head tied to a q4_0 / q4_1 / q4_k / q5_k / q8_0 embedding gets its own copy in the 16-row interleaved layout
    (on 2 MB pages): the embedding is read a row at a time and keeps the stored layout, while the head is streamed
    whole every step, where the interleaved product is several times the stored one's. Costs the matrix's bytes once
    more (17.7 MB on a 135M model with a 49k vocabulary)."""
    from gen_cli.native.repack import repack_into, repack_wanted
    from gen_cli.pages import WeightArena, copy_rows

    head, emb = model.lm_head, model.tok_emb
    blocks = getattr(emb, "blocks", None)
    if not isinstance(head, BlockLinear) or head.interleaved or blocks is None or head.blocks.device.type != "cpu":
        return
    if head.blocks.data_ptr() != blocks.data_ptr() or not repack_wanted(head.qtype, head.out_features, act):
        return
    place = WeightArena(head.blocks.nbytes).take(tuple(head.blocks.shape), torch.uint8)  # (vocab, row_bytes)
    # A MB of rows at a time, the file's pages given back as read: the embedding's map is not made resident whole.
    copy_rows(place, head.blocks, PageReleaser(), 16, move=partial(repack_into, qtype=head.qtype, threads=1))
    model.lm_head = BlockLinear(place, head.qtype, head.in_features, head.bias, interleaved=True)


def attach_native_kernels(model: Transformer, act: str = "int8") -> None:
    """Point every BlockLinear's `kernel` at the fastest product this machine has for its blocks (the
    native block matmul, activations in `act`; where none is set, a BlockLinear dequantizes per call), and
    `fused` attention of CPU prompts at gen's C kernel, when the kernel builds here."""
    from gen_cli.native.block_matmul import use_block_kernel
    from gen_cli.native.prompt_attention import use_prompt_attention

    use_block_kernel(model, act)
    use_prompt_attention(model)


def set_act(model: Transformer, act: str) -> None:
    """Block weights' products take `act` activations from now on: in the native step and in prompts through
    the block kernel (layers without it dequantize per call: fp32 activations whatever `act` says)."""
    from gen_cli.native.block_matmul import block_kernel

    kernel = block_kernel(check_act(act))
    for layer in model.modules():
        if isinstance(layer, BlockLinear) and layer.kernel is not None:
            layer.kernel = kernel
    if getattr(model, "native_decoder", None) is not None:
        model.native_decoder.set_act(act)


def activations(model: Transformer) -> str | None:
    """What block weights' products multiply in `model` (abi.py's ACT_MODES), or None when it has no block weights."""
    layers = [m for m in model.modules() if isinstance(m, BlockLinear)]
    if not layers:
        return None
    kernel = next((m.kernel for m in layers if m.kernel is not None), None)
    if kernel is None:  # each layer dequantizes its blocks per call and multiplies in the model's dtype
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model.norm.weight.dtype, "fp32")
    return getattr(kernel, "keywords", {}).get("act", "int8")  # block_kernel's partial carries a non-int8 act


def decode_arena(
    quantize: str, compile: bool, native: bool, device: torch.device
) -> Callable[[ModelConfig], bool] | None:
    """For a loader: whether a model of a config will have its weights streamed by the native step as loaded
    (then they go straight into 2 MB pages, each copied once); None when these options change the weights
    or skip the native step."""
    if quantize != "none" or compile or not native or device.type != "cpu":
        return None

    def streams(config: ModelConfig) -> bool:
        from gen_cli.native.abi import unsupported_properties
        from gen_cli.native.build import native_status

        return not unsupported_properties(config) and native_status() == "ready"

    return streams


def compute_dtype(
    quantize: str, device: torch.device, native: bool = True, requested: torch.dtype | None = None
) -> torch.dtype | None:
    """The dtype a model runs in: `requested` when given; for int8 weights, fp32 through the native CPU
    step and otherwise bfloat16; else None: the model's own (fp32 for gen's models, as stored for imports).

    PyTorch's own CPU int8 kernel is ~20x slower with fp32 activations than with bf16 ones, so
    without the native step (`native=False`, or none on this machine) int8 computes in bfloat16.
    """
    if requested is not None or quantize not in ("int8", *BLOCK_MODES):
        return requested
    if quantize in BLOCK_MODES:
        return torch.float32  # block layers compute on fp32 activations (the native kernels and the fallback)
    if native and device.type == "cpu":
        from gen_cli.native.build import native_status

        if native_status() == "ready":
            return torch.float32
    return torch.bfloat16


def compile_model(model: Transformer) -> Transformer:
    """Compile the model's forward with torch.compile (inductor); on CPU with weight freezing."""
    import torch._inductor.config as inductor_config

    if next(model.parameters()).device.type == "cpu":
        # Freezing folds the (constant) weights into the graph so inductor can prepack them for its GEMMs.
        inductor_config.freezing = True
    model.forward = torch.compile(model.forward, dynamic=None)
    return model


def compile_warm_up(
    model: Transformer, prompt_ids: torch.Tensor, new_tokens: int, sampling: SamplingConfig, num_samples: int = 1
) -> float:
    """Run a compiled model once, untimed, so its prefill and decode graphs exist before a measured
    generation (otherwise the first steps' compile time, seconds, lands in the decode rate); seconds."""
    import itertools
    import time

    from gen_cli.infer.generate import run_generation

    start = time.perf_counter()
    # The same shapes as the measured run (its id buffer and cache are sized by new_tokens, and the
    # graphs are specialised to their strides), stopped after two decode steps.
    generator = torch.Generator(device=prompt_ids.device).manual_seed(0)
    steps = itertools.count(1)
    run_generation(
        model, prompt_ids, new_tokens, sampling, True, generator, None, num_samples, lambda _: next(steps) >= 3
    )
    return time.perf_counter() - start


def fuse_mlp(mlp: nn.Module, pages: PageReleaser | None = None) -> str | None:
    """Replace a SwiGLU's w1 and w3 by one (2 d_ff, d_model) linear `w13`: one matmul reads x once for both.

    Block-quantized halves are concatenated as blocks, each half in its own type (a BlockStack when they
    differ: re-quantizing one to the other's type would read more bytes than the file holds). A GELU MLP, or
    one already fused, is left as it is."""
    if mlp.kind != "swiglu" or "w13" in mlp._modules:
        return None
    if isinstance(mlp.w1, BlockLinear) or isinstance(mlp.w3, BlockLinear):
        halves = [as_block_linear(mlp.w1, mlp.w3), as_block_linear(mlp.w3, mlp.w1)]
        mlp.w13 = stack_rows(halves)
        note = None if halves[0].qtype == halves[1].qtype else f"{halves[0].qtype} + {halves[1].qtype} kept apart"
        kept = {p.blocks.data_ptr() for p in getattr(mlp.w13, "parts", [mlp.w13])}
        pages = pages or PageReleaser()
        for half in (mlp.w1, mlp.w3):  # copied into w13: a file-mapped half gives its pages back
            held = half.blocks if isinstance(half, BlockLinear) else half.weight
            if held.data_ptr() not in kept:
                pages.release(held)
        del mlp.w1, mlp.w3
        return note
    w1, w3 = mlp.w1, mlp.w3
    bias = w1.bias is not None
    # Built on the meta device (no random init of a matrix about to be replaced), then given the joined rows.
    w13 = nn.Linear(w1.in_features, 2 * w1.out_features, bias=bias, device="meta")
    with torch.no_grad():
        joined = join_rows([w1.weight.detach(), w3.weight.detach()])  # (2 d_ff, d_model): gate rows, then up
        w13.weight = nn.Parameter(joined, requires_grad=False)
        if bias:
            w13.bias = nn.Parameter(torch.cat([w1.bias, w3.bias]), requires_grad=False)  # (2 d_ff,)
    if joined.data_ptr() != w1.weight.data_ptr():  # copied, not a view of halves laid out side by side
        pages = pages or PageReleaser()
        for half in (w1, w3):  # a file-mapped half gives its pages back
            pages.release(half.weight)
    mlp.w13 = w13
    del mlp.w1, mlp.w3
    return None


def optimize_for_decode(
    model: Transformer, quantize: str = "none", compile: bool = False, native: bool = True, act: str | None = None
) -> Transformer:
    """Make `model` inference-only and fast: fuse w1/w3, int8 or block weights, then the fastest decode path.

    On the CPU, for fp32 (or int8-weight) and bf16 models, that is the native C step (`gen_cli/native.py`)
    when this machine can compile it; otherwise oneDNN-prepacked weights, or torch.compile when asked.
    fp32 results equal the unoptimised model's within float rounding; bf16 and int8 change them
    (measured by `gen bench decode`). `act`: block weights' activation precision (None: ACT_DEFAULT). Call it
    after `.to(device, dtype)`: the native step points at the weights as they are then.
    """
    from gen_cli.native.abi import ACT_DEFAULT

    act = check_act(act or ACT_DEFAULT)
    if quantize not in QUANTIZE_MODES:
        raise UsageError(
            f"unknown quantize mode {quantize!r}; choose {', '.join(QUANTIZE_MODES)}", params=("quantize",)
        )
    model.eval().requires_grad_(False)
    pages = PageReleaser()  # the file mappings, read once for every layer
    for layer in model.layers:
        fuse_mlp(layer.mlp, pages)
    if quantize == "int8":
        quantize_int8(model)
    elif quantize in BLOCK_MODES:
        quantize_blocks(model, quantize)
    if native and not compile:  # `native=False` keeps every op in PyTorch: blocks dequantized per call
        interleave_tied_head(model, act)
        attach_native_kernels(model)  # block kernels also for a model loaded with blocks (a quantized GGUF file)
    if compile:
        return compile_model(model)
    native_step = False
    if native:
        from gen_cli.native.decoder import NativeDecoder

        native_step = NativeDecoder.attach(model) is None
    set_act(model, act)
    head = model.lm_head
    if quantize == "none" and isinstance(head, nn.Linear) and onednn_applies(head.weight):
        _to_onednn(model, pack_decode=not native_step)  # the native step reads the plain weights itself
    return model
