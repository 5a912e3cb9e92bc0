"""Layers whose weights stay in GGML's block formats (blocks.py): a linear and an embedding.

The weights are the uint8 blocks as a GGUF file stores them; nothing keeps an fp32 copy. A BlockLinear
runs through `kernel` when the infer layer sets one (the native C matmul reading the blocks), else
dequantizes its matrix per call (the PyTorch fallback: correct everywhere, slow). A BlockEmbedding
dequantizes only the rows it looks up. A tied lm_head is a BlockLinear sharing the embedding's `blocks`.

A BlockLinear may hold its q4_0 / q4_1 / q4_k / q5_k / q8_0 rows in the 16-row interleaved layout the native decode
kernel reads fastest (`interleaved`; blocks.py's `interleave`, done by the GGUF loader as it writes the decode
arena): the same bytes per 16 rows, reordered inside each group. Whatever reads the bytes asks `stored_blocks()`
(GGUF's layout) or `native_type` (the kernel's type code name); dequantization and export see the stored layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.quant.blocks import deinterleave, dequantize, quantize
from gen_cli.quant.formats import can_interleave, most_precise, row_bytes


def _check(blocks: torch.Tensor, qtype: str, rows: int, cols: int) -> torch.Tensor:
    expected = (rows, row_bytes(qtype, cols))
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected:
        raise AssertionError(f"{qtype} blocks {tuple(blocks.shape)} {blocks.dtype}; expected uint8 {expected}")
    return blocks.contiguous()


class BlockLinear(nn.Module):
    """y = x Wᵀ (+ bias) with W (out_features, in_features) held as `qtype` blocks (out_features, row_bytes).

    `kernel(x, self)` computes x Wᵀ only (no bias) for x (..., in_features) float32; forward adds the bias.
    """

    kernel: Callable[[torch.Tensor, BlockLinear], torch.Tensor] | None

    def __init__(
        self,
        blocks: torch.Tensor,
        qtype: str,
        in_features: int,
        bias: torch.Tensor | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        if interleaved and not can_interleave(qtype, blocks.shape[0]):
            raise AssertionError(f"{qtype} with {blocks.shape[0]} rows has no interleaved layout")
        self.interleaved = interleaved
        self.register_buffer("blocks", _check(blocks, qtype, blocks.shape[0], in_features))
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.kernel = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> BlockLinear:
        """Quantize a float (out, in) weight to `qtype`."""
        return cls(quantize(weight, qtype).to(weight.device), qtype, weight.shape[1], bias)

    def stored_blocks(self) -> torch.Tensor:
        """The blocks in GGUF's layout, (out, row_bytes): `blocks` itself unless interleaved (then a new tensor)."""
        return deinterleave(self.blocks, self.qtype) if self.interleaved else self.blocks

    @property
    def native_type(self) -> str:
        """The name of the kernel's type for these bytes (abi.py's MATRIX_TYPES): `qtype`, or `q4_0x16` interleaved."""
        return self.qtype + ("x16" if self.interleaved else "")

    def dequantized(self) -> torch.Tensor:
        """The weight the blocks hold, (out, in) float32."""
        return dequantize(self.stored_blocks(), self.qtype, self.in_features)

    @property
    def weight_bytes(self) -> int:
        return self.blocks.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized().to(x.dtype), bias)  # (..., out)
        y = self.kernel(x, self)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        layout = " (16-row interleaved)" if self.interleaved else ""
        return f"{self.qtype}{layout}, in_features={self.in_features}, out_features={self.out_features}"


class BlockEmbedding(nn.Module):
    """A token embedding whose table (num_embeddings, embedding_dim) is `qtype` blocks; a lookup dequantizes
    only the rows it reads. `dtype` is what forward returns (the model's compute dtype)."""

    def __init__(self, blocks: torch.Tensor, qtype: str, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, blocks.shape[0], embedding_dim
        self.register_buffer("blocks", _check(blocks, qtype, blocks.shape[0], embedding_dim))
        self.dtype = dtype

    @property
    def weight_bytes(self) -> int:
        return self.blocks.numel()

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """nn.Embedding's weight for callers that need the whole table: dequantized on every access (a full
        copy in `dtype`; ask `blocks` for the device and `dtype` for the dtype instead)."""
        return self.dequantized().to(self.dtype)

    def tied_head(self) -> BlockLinear:
        """An lm_head sharing these blocks (no copy): logits = x Eᵀ."""
        return BlockLinear(self.blocks, self.qtype, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[ids.reshape(-1)]  # (n, row_bytes): only the looked-up rows
        x = dequantize(rows, self.qtype, self.embedding_dim)  # (n, embedding_dim)
        return x.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(dtype)` must not touch the uint8 blocks (it does not: integer buffers keep their dtype) but
        # sets the dtype lookups return, as it would an nn.Embedding's weight.
        probe = fn(torch.zeros((), dtype=self.dtype))
        self.dtype = probe.dtype if probe.is_floating_point() else self.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.qtype}, {self.num_embeddings}, {self.embedding_dim}"


def block_layers(
    blocks: dict[str, tuple[torch.Tensor, str]],
    tensors: dict[str, torch.Tensor],
    in_dims: dict[str, int],
    interleaved: frozenset[str] = frozenset(),
) -> dict[str, nn.Module]:
    """Layers for the matrices a loader keeps as blocks (weight name → (uint8 blocks (rows, row_bytes), qtype)),
    by module path, for `model_from_tensors`: BlockEmbedding for `tok_emb`, else BlockLinear with its bias moved
    out of `tensors` (in the interleaved layout for the names in `interleaved`). `in_dims` gives each weight's
    columns; lookups return the norm weights' dtype."""
    dtype = next(t.dtype for k, t in tensors.items() if k.endswith("norm.weight"))
    layers: dict[str, nn.Module] = {}
    for name, (data, qtype) in blocks.items():
        path = name.removesuffix(".weight")
        if path == "tok_emb":
            layers[path] = BlockEmbedding(data, qtype, in_dims[name], dtype)
        else:
            bias = tensors.pop(path + ".bias", None)
            layers[path] = BlockLinear(data, qtype, in_dims[name], bias, interleaved=name in interleaved)
    return layers


def as_block_linear(layer: nn.Module, like: nn.Module) -> BlockLinear:
    """`layer` itself when block-quantized, else an nn.Linear quantized to the type of `like` (a BlockLinear)."""
    if isinstance(layer, BlockLinear):
        return layer
    assert isinstance(layer, nn.Linear) and isinstance(like, BlockLinear)
    return BlockLinear.from_weight(layer.weight, like.qtype, layer.bias)


def concat_rows(parts: list[BlockLinear]) -> tuple[BlockLinear, str | None]:
    """One BlockLinear whose rows are the parts' rows in order (a fused wqkv or w13), and a note when the
    parts' types differ: then every part is held in the most precise of them, re-quantized (one type per
    matrix is what the kernels read)."""
    qtypes = [p.qtype for p in parts]
    target = most_precise(qtypes)
    blocks = [p.stored_blocks() if p.qtype == target else quantize(p.dequantized(), target) for p in parts]
    biases = [p.bias for p in parts]
    bias = None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]
    fused = BlockLinear(torch.cat(blocks), target, parts[0].in_features, bias)  # (sum of rows, row_bytes)
    note = None if len(set(qtypes)) == 1 else f"{' + '.join(qtypes)} re-quantized to {target}"
    return fused, note


def dequantize_modules(model: nn.Module) -> nn.Module:
    """Replace every BlockLinear and BlockEmbedding in `model` by an nn.Linear / nn.Embedding holding its
    dequantized weight (float32), in place: the reference a quantized model is measured against (a model
    computing in another dtype: `.float()` it too). A head sharing an embedding's blocks shares the new
    float weight."""
    shared: dict[int, nn.Parameter] = {}

    def weight(module: BlockLinear | BlockEmbedding) -> nn.Parameter:
        key = module.blocks.data_ptr()
        if key not in shared:
            shared[key] = nn.Parameter(module.dequantized(), requires_grad=False)
        return shared[key]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BlockEmbedding):
                emb = nn.Embedding(child.num_embeddings, child.embedding_dim, device="meta")
                emb.weight = weight(child)
                setattr(parent, name, emb)
            elif isinstance(child, BlockLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lin.weight = weight(child)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.float(), requires_grad=False)
                setattr(parent, name, lin)
    return model
