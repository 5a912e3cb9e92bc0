"""The next token from one row of logits in numpy, for the torch-free path: sampling.py's filters (repetition
penalty, temperature, top-k, top-p, min-p) giving the same probabilities (tested against `sampling.distribution`),
then one draw from numpy's seeded PCG64 generator by the inverse of the cumulative distribution.

The same seed gives the same tokens on this path every time; the PyTorch path draws from torch's generator, so a
seed picks other tokens there (from the same distribution).
"""

from __future__ import annotations

import numpy as np

from gen_cli.infer.options import SamplingConfig

_F32 = np.finfo(np.float32)
_TINY, _MAX = float(_F32.tiny), float(_F32.max)


def generator(seed: int) -> np.random.Generator:
    """numpy's generator for a `--seed` (any 64-bit value, negative ones included)."""
    return np.random.default_rng(seed % 2**64)


def distribution(logits: np.ndarray, history: list[int], cfg: SamplingConfig) -> np.ndarray:
    """The probabilities (V,) the next token is drawn from (greedy: one-hot at the argmax), in fp32."""
    logits = logits.astype(np.float32, copy=True)
    if history and cfg.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(history))
        was = logits[seen]
        logits[seen] = np.minimum(
            np.where(was > 0, was / cfg.repetition_penalty, was * cfg.repetition_penalty), _F32.max
        )
    if cfg.greedy:
        out = np.zeros_like(logits)
        out[np.argmax(logits)] = 1.0
        return out
    # In place on the copy from here on: a temporary of V floats (196 KB at 49,152) costs its page faults too.
    logits -= logits.max()  # temperature: the row's maximum first, as apply_temperature
    if cfg.temperature < _TINY:
        logits[logits < 0] = -np.inf
    elif cfg.temperature > _MAX:
        logits[logits > -np.inf] = 0.0
    else:
        logits /= np.float32(cfg.temperature)
    if cfg.top_k is not None and cfg.top_k < logits.size:
        keep = np.argsort(-logits, kind="stable")[: cfg.top_k]  # exactly k, the lower id first among ties
        kept = np.full_like(logits, -np.inf)
        kept[keep] = logits[keep]
        logits = kept
    if cfg.top_p is not None and cfg.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        drop = np.cumsum(probs) - probs >= cfg.top_p  # the tokens above each already reach p
        drop[0] = False
        logits = np.where(_scatter(order, drop), -np.inf, logits).astype(np.float32)
    if cfg.min_p is not None:
        probs = _softmax(logits)
        logits = np.where(probs < cfg.min_p * probs.max(), -np.inf, logits).astype(np.float32)
    return _softmax(logits, out=logits)


def sample(logits: np.ndarray, history: list[int], cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """The next token id: the argmax when greedy (the first of ties), else one draw from `distribution`."""
    if cfg.greedy and (cfg.repetition_penalty == 1.0 or not history):
        return int(np.argmax(logits))
    probs = distribution(logits, history, cfg)
    if cfg.greedy:
        return int(np.argmax(probs))
    return inverse_cdf(probs, rng.random())


BLOCK = 256  # tokens a partial sum of inverse_cdf covers


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The first index whose running sum of probs (float64) passes u × their total, for u in [0, 1): a draw with
    those probabilities, never of a zero one. By blocks: the sums of BLOCK entries (vectorised) and their running
    sum find the block, then the running sum inside it the index. np.cumsum over all of V is one sequential
    pass: 0.2-0.9 ms at V = 49,152 on two cores, most of a sampled token's sampling."""
    whole = probs.size // BLOCK * BLOCK
    sums = probs[:whole].reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)  # (V // BLOCK,)
    if whole < probs.size:
        sums = np.append(sums, probs[whole:].sum(dtype=np.float64))
    ends = np.cumsum(sums)  # each block's running sum at its end
    target = u * ends[-1]
    b = min(int(np.searchsorted(ends, target, side="right")), ends.size - 1)
    block = probs[b * BLOCK : (b + 1) * BLOCK]
    inside = (ends[b - 1] if b else 0.0) + np.cumsum(block, dtype=np.float64)
    j = int(np.searchsorted(inside, target, side="right"))
    if j == block.size:  # rounding put the target past the block's own running sum: its last token with weight
        j = int(np.flatnonzero(block)[-1])
    return b * BLOCK + j


def _scatter(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[order] = values
    return out


def _softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """softmax of fp32 x, into `out` when given (x itself, say)."""
    e = np.subtract(x, x.max(), out=out)
    np.exp(e, out=e)
    e /= e.sum(dtype=np.float32)
    return e
