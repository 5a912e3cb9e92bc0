"""A fused matrix whose row ranges are held in different block types, each as its file stores it.

A Q4_K_M file keeps q and k in Q4_K and v in Q6_K (in some layers); fusing them into one wqkv of one type
re-quantized the Q4_K rows up to Q6_K, so a decode step read more bytes than the file holds (680 MB per
token from a 669 MB file). `stack_rows` instead joins runs of one type into one BlockLinear and keeps runs of
different types as parts of a BlockStack, whose output is the parts' outputs side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from gen_cli.pages import join_rows
from gen_cli.quant.block_linear import BlockLinear


class BlockStack(nn.Module):
    """y = x Wᵀ (+ bias) for W (out_features, in_features) whose rows are `parts` in order, each a BlockLinear of
    its own type (a part's own bias stays with it; `bias` is the whole matrix's, added after)."""

    def __init__(self, parts: list[nn.Module], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        assert len({p.in_features for p in parts}) == 1, "parts of one matrix read the same input"
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def qtypes(self) -> list[str]:
        return [getattr(p, "qtype", "float") for p in self.parts]

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.parts)

    def dequantized(self) -> torch.Tensor:
        """The weight the parts hold, (out, in) float32."""
        return torch.cat([p.dequantized() if isinstance(p, BlockLinear) else p.weight.float() for p in self.parts])

    @property
    def weight(self) -> torch.Tensor:
        """nn.Linear's weight for callers that need the whole matrix: the parts' rows in order (dequantized)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{' + '.join(self.qtypes)}, in_features={self.in_features}, out_features={self.out_features}"


def stack_rows(parts: list[BlockLinear]) -> BlockLinear | BlockStack:
    """One matrix whose rows are the parts' rows (and biases) in order, every part in its own type: neighbours
    of one type (and layout) joined into one BlockLinear (one copy of their blocks), and a BlockStack when types
    differ."""
    runs: list[list[BlockLinear]] = []
    for p in parts:
        if runs and (runs[-1][0].qtype, runs[-1][0].interleaved) == (p.qtype, p.interleaved):
            runs[-1].append(p)
        else:
            runs.append([p])
    joined = [run[0] if len(run) == 1 else _join(run) for run in runs]
    return joined[0] if len(joined) == 1 else BlockStack(joined)


def _join(run: list[BlockLinear]) -> BlockLinear:
    blocks = join_rows([p.blocks for p in run])  # (sum of rows, row_bytes): a view when laid out side by side
    # Interleaved parts have whole groups of 16 rows: joined, they are the joined matrix's layout.
    return BlockLinear(blocks, run[0].qtype, run[0].in_features, _bias([p.bias for p in run]), run[0].interleaved)


def _bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    assert all(b is not None for b in biases), "a bias for every part or for none"
    return torch.cat(biases)  # type: ignore[arg-type]
