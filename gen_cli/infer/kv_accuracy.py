"""What a KV cache kind costs in accuracy: the same model and tokens through a full-precision cache and
through the kind, teacher-forced, compared step by step."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.generate import greedy_steps, new_cache
from gen_cli.model.transformer import Transformer


@dataclass
class KVAccuracy:
    """KL(full ‖ kind) of the next-token distribution (nats) over every step and row, top-1 agreement
    (fraction of steps whose argmax matches) and greedy tokens before the first divergence (row 0)."""

    kl_mean: float
    kl_max: float
    top1_agreement: float
    tokens_before_divergence: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(ref ‖ got) of the next-token distributions (nats) and whether their argmaxes match, per position of
    logits (..., V): the figures every accuracy comparison reports."""
    p_log, q_log = torch.log_softmax(ref.float(), dim=-1), torch.log_softmax(got.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)  # rounding can dip below 0
    return kl, p_log.argmax(-1) == q_log.argmax(-1)


@torch.no_grad()
def kv_accuracy(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, spec: CacheSpec) -> KVAccuracy:
    """Greedy through the model-dtype cache keeping every token, then the same tokens forced through the
    cache `spec` describes (quantized kinds, a window)."""
    ref_logits, ref_tokens = [], []
    for logits, token in greedy_steps(model, prompt_ids, max_new_tokens, new_cache(model, prompt_ids, max_new_tokens)):
        ref_logits.append(logits.float().clone())
        ref_tokens.append(token.clone())
    forced = torch.stack(ref_tokens, dim=1)  # (B, steps)
    n = forced.shape[1]
    cache = new_cache(model, prompt_ids, n, spec=spec)
    # Teacher forcing: both runs see the same inputs at every step, so only the cache's storage differs.
    got = [logits.float().clone() for logits, _ in greedy_steps(model, prompt_ids, n, cache, forced=forced)]
    kl, same = agreement(torch.stack(ref_logits, dim=1), torch.stack(got, dim=1))  # (B, steps) each
    # Before the first disagreement the forced tokens are the kind's own greedy ones too.
    before = int(same[0].long().cumprod(0).sum())
    return KVAccuracy(float(kl.mean()), float(kl.max()), float(same.float().mean()), before, n)
