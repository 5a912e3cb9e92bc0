"""A Llama-style decoder-only transformer: pre-norm blocks, fused-qkv attention (MHA/GQA/MQA), SwiGLU.

Positions come from `config.pos_encoding`: `rope` (rotary, rotate-half convention), `sinusoidal`
(the original Transformer table added to the embeddings) or `learned` (an embedding per position).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.errors import UsageError
from gen_cli.model.config import WEIGHT_SEED, ModelConfig
from gen_cli.model.kv_cache import KVCache


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (length, 1)
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = pos * inv  # (length, dim/2)
    table = torch.empty(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


def scaled_frequencies(inv: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim/2,) after a `ModelConfig.rope_scaling` (as transformers and llama.cpp do)."""
    if scaling is None:
        return inv
    if scaling["type"] == "freq_factors":
        return inv / torch.tensor(scaling["factors"], dtype=inv.dtype)
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_context_length"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(
    length: int, head_dim: int, base: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (length, head_dim), for the rotate-half convention.

    Pair i is (x[i], x[i + head_dim/2]) rotated by pos × base^(-2i/head_dim); the frequencies are
    repeated over both halves, and rotate-half's minus sign is folded into the first half of sin, so
    `apply_rope` needs no slicing or concatenation.
    """
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    inv = scaled_frequencies(inv, scaling)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv  # (length, head_dim/2)
    sin = angles.sin()
    cos = torch.cat([angles.cos()] * 2, dim=-1)  # (length, head_dim)
    return cos.float(), torch.cat([-sin, sin], dim=-1).float()  # (length, head_dim) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., head_dim) by tables from `rope_tables` that broadcast against it.

    x*cos + [x2, x1]*[-sin, sin]: the same as x*cos + rotate_half(x)*sin, without a cat.
    """
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (..., head_dim): [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_signed)


def check_context(config: ModelConfig, pos: int, new_tokens: int) -> None:
    """Refuse positions past the context: the position tables end there."""
    limit = config.context_length
    if pos + new_tokens > limit:
        raise UsageError(f"sequence of {pos + new_tokens} tokens exceeds the model's context length of {limit} tokens")


class DecodeStep(Protocol):
    """A replacement for single-token forwards: `decode_step` calls it when it `accepts` the step."""

    def accepts(self, batch: int, cache: KVCache) -> bool: ...

    def __call__(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor: ...

    def argmax_into(self, logits: torch.Tensor, out: torch.Tensor) -> bool: ...


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim or config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(dim or config.d_model, eps=config.norm_eps)


class Attention(nn.Module):
    """Causal self-attention; n_kv_head selects MHA (= n_head), GQA or MQA (= 1) with one code path."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One fused projection: a single matmul reads x once for q, k and v.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.d_model, qkv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.attn_out_bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, hd)  # (B, T, heads of q, k and v, head_dim)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]
        if "q_norm" in self._modules:  # each head normalised over head_dim, before the rotation
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)  # (B, T, H+Hkv, hd)
        if rope is not None:
            # One rotation covers q and k together: fewer ops per decode step than one call each.
            cos, sin_signed = rope
            qk = apply_rope(qk, cos[:, None], sin_signed[:, None])  # (B, T, H+Hkv, hd); tables (T, 1, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, n_head, T, head_dim)
        k = qk[:, :, H:].transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, pos+T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hkv != H
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, n_head × head_dim)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), or GELU: w2(gelu(w1 x)) (`config.mlp`).

    After `fuse()`, a SwiGLU's w1 and w3 are one matrix `w13` (inference only).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        bias = config.mlp_bias
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=bias)  # gate (SwiGLU) or up (GELU)
        if self.kind == "swiglu":
            self.w3 = nn.Linear(config.d_model, config.d_ff, bias=bias)  # up
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=bias)  # down

    def fuse(self) -> None:
        """Replace w1 and w3 by one (2 d_ff, d_model) linear `w13`: one matmul reads x once for both."""
        if self.kind != "swiglu":
            return  # one input matrix already
        bias = self.w1.bias is not None
        w13 = nn.Linear(self.w1.in_features, 2 * self.w1.out_features, bias=bias)
        w13.to(self.w1.weight.device, self.w1.weight.dtype)
        with torch.no_grad():
            w13.weight.copy_(torch.cat([self.w1.weight, self.w3.weight]))  # (2 d_ff, d_model): gate rows, then up
            if bias:
                w13.bias.copy_(torch.cat([self.w1.bias, self.w3.bias]))  # (2 d_ff,)
        self.w13 = w13
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "swiglu":
            return self.w2(F.gelu(self.w1(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))
        if "w13" in self._modules:
            gate, up = self.w13(x).chunk(2, dim=-1)  # each (B, T, d_ff)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, is_causal, cache, layer) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM: `forward(idx (B, T), cache=None) -> logits (B, T, vocab)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        elif config.pos_encoding == "sinusoidal":
            # Non-persistent: derived from the config, so never stored in a checkpoint.
            self.register_buffer("sin_table", sinusoidal_table(config.context_length, config.d_model), False)
        else:
            cos, sin_signed = rope_tables(config.context_length, config.head_dim, config.rope_base, config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)  # (context, head_dim)
            self.register_buffer("rope_sin_signed", sin_signed, persistent=False)  # (context, head_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # A faster single-token step for inference (gen's native C step), hung here by
        # `infer.optimize.optimize_for_decode`; None means every step runs this module's forward.
        self.native_decoder: DecodeStep | None = None
        if self.tok_emb.weight.device.type != "meta":  # a shape-only model (loaders, counting) needs no draws
            self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02); projections that add into the residual stream are scaled by
        # 1/sqrt(2 n_layer) so the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn.wo.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.w2.weight, mean=0.0, std=residual_std)
        if self.config.tie_embeddings:
            # The shared matrix was visited twice above; both draws are N(0, 0.02), so it stays so.
            assert self.lm_head.weight is self.tok_emb.weight

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab); with a cache, positions start at cache.pos and the cache advances by T.

        `last_only` computes logits for the last position only, (B, 1, vocab): prefill needs no more.
        """
        T = idx.shape[1]
        pos = cache.pos if cache is not None else 0
        check_context(self.config, pos, T)
        x = self.tok_emb(idx)  # (B, T, d_model)
        rope = None
        kind = self.config.pos_encoding
        if kind == "sinusoidal":
            x = x + self.sin_table[pos : pos + T]  # (T, d_model) broadcast over B
        elif kind == "learned":
            x = x + self.pos_emb.weight[pos : pos + T]  # (T, d_model) broadcast over B
        else:
            rope = (self.rope_cos[pos : pos + T], self.rope_sin_signed[pos : pos + T])  # each (T, head_dim)

        # Masking: a fresh sequence (pos 0) uses SDPA's built-in causal mask; a single new token may
        # see every cached key, so needs none; a chunk after a cached prefix needs the causal mask
        # shifted by pos (SDPA's is_causal aligns top-left, which would be wrong there).
        mask, is_causal = None, T > 1 and pos == 0
        if T > 1 and pos > 0:
            q_pos = torch.arange(pos, pos + T, device=idx.device)[:, None]  # (T, 1)
            k_pos = torch.arange(pos + T, device=idx.device)[None, :]  # (1, pos+T)
            mask = k_pos <= q_pos  # (T, pos+T) True = may attend

        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(T)  # once per forward, after every layer wrote at the same position
        if last_only:
            x = x[:, -1:, :]  # (B, 1, d_model)
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab)


def random_model(config: ModelConfig) -> Transformer:
    """A model of this shape with gen's fixed random weights (seed WEIGHT_SEED), in eval mode."""
    torch.manual_seed(WEIGHT_SEED)
    return Transformer(config).eval()


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this shape holds, by state_dict name (a tied lm_head is left out)."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        state = Transformer(config).state_dict()
    tied = config.tie_embeddings
    return {name: tuple(t.shape) for name, t in state.items() if not (tied and name == "lm_head.weight")}


def model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> Transformer:
    """A model in eval mode holding exactly `tensors` (names and shapes as `expected_shapes`), without
    ever allocating random weights: loaders fill it from a file holding one copy of the weights."""
    shapes = expected_shapes(config)
    if sorted(shapes) != sorted(tensors) or any(tuple(tensors[k].shape) != s for k, s in shapes.items()):
        raise AssertionError("model_from_tensors: names or shapes differ from expected_shapes (a loader bug)")
    with torch.device("meta"):
        model = Transformer(config)
    # strict=False only for a tied lm_head, absent from `tensors` and re-tied below; checked exactly above.
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    # The derived tables are not in any file: compute them, in the weights' dtype as `.to(dtype)` would.
    dtype = model.tok_emb.weight.dtype
    if config.pos_encoding == "sinusoidal":
        model.sin_table = sinusoidal_table(config.context_length, config.d_model).to(dtype)
    elif config.pos_encoding == "rope":
        cos, sin_signed = rope_tables(config.context_length, config.head_dim, config.rope_base, config.rope_scaling)
        model.rope_cos, model.rope_sin_signed = cos.to(dtype), sin_signed.to(dtype)
    return model.eval()
