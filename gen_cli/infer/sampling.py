"""Pure functions on logits (B, V): temperature, top-k, top-p, min-p, repetition penalty, sampling.

Filters return new logits with excluded tokens set to -inf; randomness comes only from an explicit
torch.Generator, so the same seed gives the same tokens.
"""

from __future__ import annotations

import torch

from gen_cli.infer.options import SamplingConfig


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by a positive temperature (below 1 sharpens, above 1 flattens).

    The row maximum is subtracted first, so a tiny temperature (1e-45) gives 0 for the top logit and
    -inf below it, never inf - inf = NaN: the limit, argmax, instead of a crash in sampling."""
    assert temperature > 0, "temperature 0 is argmax; handle it before scaling"
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    if temperature < torch.finfo(shifted.dtype).tiny:
        # The scalar would round to 0 in this dtype (0/0 = NaN); its limit keeps only the top logit(s).
        return shifted.masked_fill(shifted < 0, float("-inf"))
    if temperature > torch.finfo(shifted.dtype).max:
        # The scalar would round to inf (-inf / inf = NaN for excluded tokens); its limit is uniform over the rest.
        return shifted.masked_fill(shifted > float("-inf"), 0.0)
    return shifted / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row, even when others tie with the k-th."""
    if k >= logits.shape[-1]:
        return logits
    # A threshold (logits >= kth value) would keep every tie; scattering topk's indices keeps k.
    values, indices = torch.topk(logits, k, dim=-1)  # (B, k)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    # A token is needed while the tokens above it have not reached p yet; the top one always is.
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p × the most likely token's probability."""
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, history_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already in the sequence: positive logits / penalty, negative × penalty."""
    if penalty == 1.0 or history_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, history_ids)  # (B, T); repeated ids gather the same value, so no double penalty
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    # A tiny penalty overflows a positive logit to inf; keep it the largest finite value instead.
    seen = seen.clamp(max=torch.finfo(seen.dtype).max)
    return logits.scatter(-1, history_ids, seen)


def distribution(logits: torch.Tensor, history_ids: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    """The probabilities (B, V) `sample_next` draws from (greedy: one-hot at the argmax), in fp32."""
    if logits.dtype != torch.float32:
        logits = logits.float()  # filters and softmax in fp32 whatever the model dtype
    if history_ids is not None:
        logits = apply_repetition_penalty(logits, history_ids, cfg.repetition_penalty)
    if cfg.greedy:
        top = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        return torch.zeros_like(logits).scatter(-1, top, 1.0)
    return torch.softmax(_filtered(logits, cfg), dim=-1)


def _filtered(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as configured."""
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def sample_next(
    logits: torch.Tensor,
    history_ids: torch.Tensor | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V) and the ids so far (B, T), reproducible for a seeded generator."""
    if logits.dtype != torch.float32:
        logits = logits.float()  # filters and softmax in fp32 whatever the model dtype
    if history_ids is not None:
        logits = apply_repetition_penalty(logits, history_ids, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_filtered(logits, cfg), dim=-1)  # (B, V)
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of non-negative weights (..., V), drawn with probability weight / row sum: where the
    row's cumulative sum (float64) first passes a uniform draw times the total. A zero-weight index is never
    drawn (its sum equals the one before it). torch.multinomial draws V exponentials for the same thing:
    1.7 ms a token at V = 49,152 on two cores, against ~0.1 ms."""
    cdf = weights.double().cumsum(-1)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=weights.device)  # [0, 1)
    return torch.searchsorted(cdf, u * total, right=True).squeeze(-1)  # (...); u < 1 keeps u * total < total
