"""A Llama-style decoder-only transformer: pre-norm blocks, fused-qkv attention (MHA/GQA/MQA), SwiGLU.

Positions come from `config.pos_encoding`: `rope` (rotary, rotate-half convention), `sinusoidal`
(the original Transformer table added to the embeddings), `learned` (an embedding per position) or
`alibi` (no embedding; a per-head linear bias on the attention logits). The tables live in positions.py.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gen_cli.errors import UsageError
from gen_cli.model.attention import (
    ATTENTION_IMPLS,
    AttentionPlan,
    CausalKernel,
    Positions,
    attend,
    causal_mask,
    plan_attention,
)
from gen_cli.model.config import WEIGHT_SEED, ModelConfig
from gen_cli.model.positions import (  # noqa: F401  (re-exported: callers import the tables from here)
    RELATIVE,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_tables,
    scaled_frequencies,
    sinusoidal_table,
)


class KVCache(Protocol):
    """What the model needs of any KV cache (the classes live in gen_cli.cache): once per forward the
    positions of its queries and of the keys `update` will return, per layer `update` (store the new k/v,
    return what to attend to), then one `advance` after every layer wrote."""

    pos: int
    chunk_limit: int | None  # the most tokens one forward may bring (None: any); the model splits longer ones

    def positions(self, T: int, device: torch.device) -> Positions: ...

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, t: int) -> None: ...


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

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd) for x (B, T, d_model): after q/k norms and RoPE."""
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
        return q, k, v.transpose(1, 2)  # v: (B, n_kv_head, T, head_dim)

    def weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The softmax SDPA computes, written out: (B, n_head, Tq, Tk) for q from `project` and k (cached or not).

        For inspection (gen attention); `forward` leaves the same arithmetic to SDPA's fused kernels.
        """
        # (B, n_head, Tk, hd): query head h reads KV head h // group, as SDPA's enable_gqa does
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, n_head, Tq, Tk)
        if is_causal:
            mask = causal_mask(0, q.shape[2], q.device)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, plan.rope_new)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, L, head_dim): the keys the positions describe
        y = attend(q, k, v, plan, self.n_kv_head != self.n_head)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head × head_dim)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), or GELU: w2(gelu(w1 x)) (`config.mlp`).

    For inference a SwiGLU's w1 and w3 may be replaced by one matrix `w13` (gate rows, then up rows).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        bias = config.mlp_bias
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=bias)  # gate (SwiGLU) or up (GELU)
        if self.kind == "swiglu":
            self.w3 = nn.Linear(config.d_model, config.d_ff, bias=bias)  # up
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=bias)  # down

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

    def forward(self, x, plan, cache, layer) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), plan, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def _shape_only() -> bool:
    """Whether modules are being built on the meta device (shapes only: a loader's skeleton, a count). There
    no op may run: the first meta op (a draw, an arange) imports PyTorch's decompositions, a second of load."""
    return torch.empty(0).is_meta


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding; shapes only, without its N(0, 1) draw (real weights are drawn as before)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim)) if _shape_only() else nn.Embedding(num, dim)


class Transformer(nn.Module):
    """Decoder-only LM: `forward(idx (B, T), cache=None) -> logits (B, T, vocab)`."""

    # How attention is computed (ATTENTION_IMPLS), a run-time choice: see `set_attention_impl`.
    attn_impl: str = ATTENTION_IMPLS[0]
    # `fused`'s kernel for plain causal prompts where it applies (set from above: gen's C kernel on the CPU).
    causal_kernel: CausalKernel | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = _embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.pos_emb = _embedding(config.context_length, config.d_model)
        elif config.pos_encoding == "sinusoidal":
            # Non-persistent: derived from the config, so never stored in a checkpoint.
            shape = (config.context_length, config.d_model)
            table = torch.empty(shape) if _shape_only() else sinusoidal_table(*shape)
            self.register_buffer("sin_table", table, False)
        elif config.pos_encoding == "alibi":
            self.alibi_slopes = torch.tensor(alibi_slopes(config.n_head))  # (n_head,) fp32; see `_apply`
        else:
            self.set_rope_tables(config)
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

    def set_rope_tables(self, config: ModelConfig) -> None:
        """(Re)compute the RoPE tables for `config` (its base, scaling and context) and adopt the config."""
        if _shape_only():  # no values needed: model_from_tensors computes the tables once the weights are real
            cos, sin_signed = (torch.empty(config.context_length, config.head_dim) for _ in range(2))
        else:
            cos, sin_signed = rope_tables(config.context_length, config.head_dim, config.rope_base, config.rope_scaling)
        old = getattr(self, "rope_cos", None)
        if old is not None and old.device.type != "meta":
            cos, sin_signed = cos.to(old.device, old.dtype), sin_signed.to(old.device, old.dtype)
        self.register_buffer("rope_cos", cos, persistent=False)  # (context, head_dim)
        self.register_buffer("rope_sin_signed", sin_signed, persistent=False)  # (context, head_dim)
        self._rope_longer = None  # rows past the context (`rope_table`) follow the new base and scaling
        self.config = config

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # The ALiBi slopes follow the model's device but stay fp32: a plain attribute, not a buffer, so
        # `.to(bfloat16)` does not round them (and no checkpoint ever holds them).
        module = super()._apply(fn, recurse)
        if isinstance(getattr(self, "alibi_slopes", None), torch.Tensor):
            self.alibi_slopes = self.alibi_slopes.to(self.norm.weight.device)
        return module

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

    def rope_table(self, extent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables of at least `extent` rows: the model's own, or longer rows computed by the
        same function (so shared rows are bit-equal) for a cache whose positions pass the context."""
        cos, sin = self.rope_cos, self.rope_sin_signed
        if extent <= cos.shape[0]:
            return cos, sin
        longer = getattr(self, "_rope_longer", None)
        if (
            longer is None
            or longer[0].shape[0] < extent
            or longer[0].device != cos.device
            or longer[0].dtype != cos.dtype
        ):
            c = self.config
            table = rope_tables(extent, c.head_dim, c.rope_base, c.rope_scaling)
            longer = self._rope_longer = tuple(t.to(cos.device, cos.dtype) for t in table)
        return longer

    def attention_plan(self, at: Positions, dtype: torch.dtype, device: torch.device) -> AttentionPlan:
        """RoPE rows and the mask (with any ALiBi bias) for the queries and keys `at` describes."""
        kind = self.config.pos_encoding
        rope = self.rope_table(at.frame_extent or at.end) if kind == "rope" else None
        slopes = self.alibi_slopes.to(device) if kind == "alibi" else None  # a no-op unless placed without `.to`
        plan = plan_attention(at, self.config, rope, slopes, dtype, device)
        plan.impl = self.attn_impl
        plan.kernel = self.causal_kernel
        return plan

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab); with a cache, positions start at cache.pos and the cache advances by T.

        `last_only` computes logits for the last position only, (B, 1, vocab): prefill needs no more.
        """
        T = idx.shape[1]
        limit = cache.chunk_limit if cache is not None else None
        if limit is not None and limit < T:
            # The cache takes chunks it can hold beside what each query sees (a window cache).
            parts = [self(idx[:, i : i + limit], cache, last_only) for i in range(0, T, limit)]
            return parts[-1] if last_only else torch.cat(parts, dim=1)  # (B, T or 1, vocab)
        at = cache.positions(T, idx.device) if cache is not None else Positions(0, T)
        kind = self.config.pos_encoding
        if at.frame_extent is None or kind not in RELATIVE:  # frames within a cache have no context limit
            check_context(self.config, at.start, T)
        pos = at.start
        x = self.tok_emb(idx)  # (B, T, d_model)
        if kind == "sinusoidal":
            x = x + self.sin_table[pos : pos + T]  # (T, d_model) broadcast over B
        elif kind == "learned":
            x = x + self.pos_emb.weight[pos : pos + T]  # (T, d_model) broadcast over B
        plan = self.attention_plan(at, x.dtype, idx.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, cache, i)
        if cache is not None:
            cache.advance(T)  # once per forward, after every layer wrote at the same position
        if last_only:
            x = x[:, -1:, :]  # (B, 1, d_model)
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab)


def set_attention_impl(model: Transformer, impl: str) -> None:
    """Compute `model`'s attention with `impl` (`fused` SDPA or `eager`, scores materialized) from now on."""
    if impl not in ATTENTION_IMPLS:
        raise UsageError(f"unknown attention implementation {impl!r}; choose one of: {', '.join(ATTENTION_IMPLS)}")
    model.attn_impl = impl


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


def model_from_tensors(
    config: ModelConfig, tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module] | None = None
) -> Transformer:
    """A model in eval mode holding exactly `tensors` (names and shapes as `expected_shapes`), without
    ever allocating random weights: loaders fill it from a file holding one copy of the weights.

    `layers` replaces whole modules by their path (`tok_emb`, `layers.0.attn.wqkv` …): a loader's own layer
    kinds, e.g. block-quantized ones, whose weights (and biases) are then absent from `tensors`. A tied
    lm_head follows the embedding (`tied_head()` when the replacement offers one)."""
    layers = layers or {}
    with torch.device("meta"):
        model = Transformer(config)
    # expected_shapes, from the skeleton built anyway (a second build costs tens of ms for a 30-layer model)
    tied = config.tie_embeddings
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    held = {k: tuple(t.shape) for k, t in tensors.items()}
    for path, module in layers.items():
        held[path + ".weight"] = _weight_shape(module)
        if getattr(module, "bias", None) is not None:
            held[path + ".bias"] = tuple(module.bias.shape)
    if held != shapes:
        raise AssertionError("model_from_tensors: names or shapes differ from expected_shapes (a loader bug)")
    # strict=False for the replaced modules and a tied lm_head, absent here and placed below; checked above.
    model.load_state_dict(tensors, strict=False, assign=True)
    for path, module in layers.items():
        parent_name, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module)
    if config.tie_embeddings:
        tied_head = getattr(model.tok_emb, "tied_head", None)
        if tied_head is not None:
            model.lm_head = tied_head()
        else:
            model.lm_head.weight = model.tok_emb.weight
    # The derived tables are not in any file: compute them, in the weights' dtype as `.to(dtype)` would.
    dtype = model.norm.weight.dtype
    if config.pos_encoding == "sinusoidal":
        model.sin_table = sinusoidal_table(config.context_length, config.d_model).to(dtype)
    elif config.pos_encoding == "rope":
        cos, sin_signed = rope_tables(config.context_length, config.head_dim, config.rope_base, config.rope_scaling)
        model.rope_cos, model.rope_sin_signed = cos.to(dtype), sin_signed.to(dtype)
    elif config.pos_encoding == "alibi":
        model.alibi_slopes = torch.tensor(alibi_slopes(config.n_head))  # built on meta above: real values now
    return model.eval()


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The float weight shape a replacement layer stands for: (out, in) or (num_embeddings, dim)."""
    if hasattr(module, "embedding_dim"):
        return (module.num_embeddings, module.embedding_dim)
    return (module.out_features, module.in_features)


def apply_rope_scaling(model: Transformer, scaling: dict[str, Any] | None) -> None:
    """Run `model` with this RoPE scaling (None: plain RoPE) instead of its own: new tables, a longer context."""
    from gen_cli.model.config import with_rope_scaling

    if scaling is None and model.config.pos_encoding != "rope":
        return  # nothing to remove; a real scaling on such a model is refused by the config below
    model.set_rope_tables(with_rope_scaling(model.config, scaling))


def grow_context(model: Transformer, length: int) -> None:
    """Let `model` run `length` positions, past the context it was trained with: longer RoPE or sinusoidal
    tables (ALiBi needs none); learned positions have no rows there, so are refused."""
    config = model.config
    if length <= config.context_length:
        return
    if config.pos_encoding == "learned":
        raise UsageError(
            f"learned positions end at the trained context of {config.context_length} tokens; "
            f"{length} positions need rope, sinusoidal or alibi"
        )
    grown = config.replace(context_length=length)
    if config.pos_encoding == "rope":
        model.set_rope_tables(grown)
        return
    if config.pos_encoding == "sinusoidal":
        old = model.sin_table
        model.sin_table = sinusoidal_table(length, config.d_model).to(old.device, old.dtype)
    model.config = grown
