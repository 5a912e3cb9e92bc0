"""A trained model at a larger model's cost: zero-pad it to a bigger shape that computes the same function.

A step's speed depends on the bytes and multiply-adds of the shape; its text on the weights. A small trained
model runs from cache and a random large one writes noise, so neither shows what speculation or batching do
to a real model's text at a real model's cost. `widen` gives a trained model a larger shape with the same
logits: every new row and column is zero, so the new residual dimensions stay zero, and the new query heads,
KV heads, MLP units and layers add nothing to the residual. RMSNorm's mean then runs over d' dimensions of
which d carry the signal, so each norm's gain is scaled by √(d/d') and its eps by d/d': the normalised values
are the old ones. Old query head i (of KV group j = i // g) goes to new head j·g' + i mod g, so it still reads
its own KV head when the new groups are wider.
"""

from __future__ import annotations

import math

import torch

from gen_cli.errors import UsageError
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer, model_from_tensors

# Positions and norms whose arithmetic zero padding leaves unchanged. Sinusoidal tables and ALiBi slopes
# depend on d_model and n_head; LayerNorm subtracts a mean the zeros would shift.
WIDENABLE_POSITIONS = ("rope", "learned")


def widened_config(config: ModelConfig, d_model: int, n_layer: int, n_head: int, n_kv_head: int,
                   d_ff: int) -> ModelConfig:  # fmt: skip
    """The larger shape, or one UsageError naming the size that cannot hold the model."""
    if config.norm != "rmsnorm":
        raise UsageError(f"widening needs RMSNorm: a {config.norm}'s mean would shift with the zero dimensions")
    if config.pos_encoding not in WIDENABLE_POSITIONS:
        raise UsageError(f"widening keeps {' or '.join(WIDENABLE_POSITIONS)} positions; "
                         f"{config.pos_encoding} depends on the model's width")  # fmt: skip
    # named as the CLI's parameters, which it shows as their flags (--d-model …)
    sizes = {
        "d_model": (d_model, config.d_model),
        "layers": (n_layer, config.n_layer),
        "heads": (n_head, config.n_head),
        "kv_heads": (n_kv_head, config.n_kv_head),
        "d_ff": (d_ff, config.d_ff),
    }
    for name, (new, old) in sizes.items():
        if new < old:
            raise UsageError(f"{name} {new} is smaller than the model's {old}: widening only adds", params=(name,))
    if config.qk_norm and d_model != config.d_model:  # one eps serves both: the wider mean needs it scaled
        raise UsageError("a model with q/k norms keeps its d_model: they share the eps the wider norms would change",
                         params=("d_model",))  # fmt: skip
    if n_head % n_kv_head:
        raise UsageError(f"heads {n_head} is not divisible by kv_heads {n_kv_head}", params=("heads", "kv_heads"))
    group = config.n_head // config.n_kv_head
    if n_head // n_kv_head < group:
        wide = n_head // n_kv_head
        raise UsageError(f"heads / kv_heads = {wide} is below the model's {group} query heads per KV head: each old "
                         "group needs a group at least as wide", params=("heads", "kv_heads"))  # fmt: skip
    return config.replace(d_model=d_model, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, d_ff=d_ff,
                          head_dim=config.head_dim, norm_eps=config.norm_eps * config.d_model / d_model)  # fmt: skip


def widen(model: Transformer, target: ModelConfig) -> Transformer:
    """A model of `target`'s shape (from `widened_config`) computing `model`'s logits: its weights placed among
    zeros, norm gains scaled by √(d/d')."""
    old, new = model.config, target
    with torch.device("meta"):  # the names and shapes only: a random draw of every weight cost 90% of the time
        skeleton = Transformer(new)
    dtype, tied = model.tok_emb.weight.dtype, new.tie_embeddings
    state = {n: torch.zeros(t.shape, dtype=dtype) for n, t in skeleton.state_dict().items()
             if not (tied and n == "lm_head.weight")}  # fmt: skip
    d = torch.arange(old.d_model)  # the residual's old dimensions keep their place
    q_heads = _query_heads(old, new)
    qkv = _head_rows([*q_heads, *(new.n_head + j for j in range(old.n_kv_head)),
                      *(new.n_head + new.n_kv_head + j for j in range(old.n_kv_head))], old.head_dim)  # fmt: skip
    heads_out = _head_rows(q_heads, old.head_dim)  # the attention output's columns, per old query head
    units = torch.arange(old.d_ff)
    gain = math.sqrt(old.d_model / new.d_model)
    places = {  # a name's end → where its rows (and columns) go
        "attn.wqkv.weight": (qkv, d), "attn.wqkv.bias": (qkv,), "attn.wo.weight": (d, heads_out),
        "attn.wo.bias": (d,), "mlp.w1.weight": (units, d), "mlp.w3.weight": (units, d), "mlp.w1.bias": (units,),
        "mlp.w3.bias": (units,), "mlp.w2.weight": (d, units), "mlp.w2.bias": (d,),
        "tok_emb.weight": (slice(None), d), "lm_head.weight": (slice(None), d), "pos_emb.weight": (slice(None), d),
    }  # fmt: skip
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name not in state:  # a tied head: the embedding's own tensor
                continue
            short = name.split(".", 2)[-1] if name.startswith("layers.") else name  # "layers.3.mlp.w1.weight"
            if short in ("attn.q_norm.weight", "attn.k_norm.weight"):
                state[name].copy_(value)  # per head, over head_dim: unchanged
            elif short.endswith("norm.weight"):
                state[name][: old.d_model] = value * gain  # over the wider mean: the same normalised values
            elif len(places[short]) == 1:
                state[name][places[short][0]] = value
            else:
                rows, cols = places[short]
                state[name][rows[:, None] if isinstance(rows, torch.Tensor) else rows, cols] = value
        for layer in range(old.n_layer, new.n_layer):  # added layers: zero projections, norms as a fresh model's
            for norm in ("attn_norm", "mlp_norm"):
                state[f"layers.{layer}.{norm}.weight"].fill_(gain)
    return model_from_tensors(new, state)


def _query_heads(old: ModelConfig, new: ModelConfig) -> list[int]:
    """Old query head i's place in the new model: the same offset in the same KV head's (wider) group."""
    group, wide_group = old.n_head // old.n_kv_head, new.n_head // new.n_kv_head
    return [(i // group) * wide_group + i % group for i in range(old.n_head)]


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows (or columns) of `heads`, each head_dim long, in order: (len(heads) × head_dim,)."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
