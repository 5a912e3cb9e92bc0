"""What an activation precision for block weights (int8, int8x2, bf16) costs against fp32 activations on the same
weights.

A text's tokens are teacher-forced through the decode path one step at a time (the native step where it runs, as
`gen generate` decodes), once per precision, switched on the same model (`set_act`) or scored against fp32's
figures taken on the same weights in another layout (`Reference`), so the only difference is what the block
products multiply. Reported per precision: KL(fp32 ‖ mode) of the next-token distributions (mean
and max over positions), top-1 agreement (positions whose argmax is the same), and greedy agreement (tokens a greedy
continuation of the text's start keeps before its first divergence from fp32's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from gen_cli.infer.generate import greedy_steps, new_cache
from gen_cli.infer.kv_accuracy import agreement
from gen_cli.infer.optimize import activations, set_act
from gen_cli.model.transformer import Transformer

TEXT_TOKENS = 256  # positions scored: a few seconds on a 135M model's native step
GREEDY_PROMPT = 32  # the text's first tokens start the greedy continuations


@dataclass
class ActQuality:
    """One precision against fp32 activations on the same weights and text."""

    act: str
    kl_mean: float  # nats, KL(fp32 ‖ act) averaged over the text's positions
    kl_max: float
    top1_agreement: float  # share of positions with the same argmax
    greedy_agree: int  # greedy tokens identical to fp32's before the first divergence
    greedy_tokens: int
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def _stepped_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits (T - 1, V) for positions 0 … T - 2 of ids (1, T), every token fed as one decode step."""
    n = ids.shape[1] - 1
    cache = new_cache(model, ids[:, :1], n)
    forced = ids[:, 1:]  # (1, n): the text's own next tokens, not the model's picks
    return torch.cat([logits for logits, _ in greedy_steps(model, ids[:, :1], n, cache, forced)]).float()[:n]


@torch.inference_mode()
def _greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens (n,) after `prompt` (1, P)."""
    cache = new_cache(model, prompt, n)
    return torch.cat([tok.reshape(-1) for _, tok in greedy_steps(model, prompt, n, cache)])


@dataclass
class Reference:
    """fp32 activations' figures on a text: what every precision is scored against."""

    model: Transformer  # the model they came from (its fp32 act then scores exactly 0)
    logits: torch.Tensor  # (T - 1, V), every token of the text fed as one decode step
    prompt: torch.Tensor  # (1, P): the text's start the greedy continuations follow
    greedy: torch.Tensor  # (greedy_tokens,)


def fp32_reference(model: Transformer, ids: torch.Tensor, greedy_tokens: int = 64) -> Reference:
    """fp32 activations' logits on text ids (1, T) (T ≥ 2) and their greedy continuation of its start, through
    `model`'s block weights; the model's own precision is restored after."""
    own = activations(model) or "int8"
    try:
        set_act(model, "fp32")
        prompt = ids[:, : max(1, min(GREEDY_PROMPT, ids.shape[1], model.config.context_length - greedy_tokens))]
        return Reference(model, _stepped_logits(model, ids), prompt, _greedy(model, prompt, greedy_tokens))
    finally:
        set_act(model, own)


def act_quality(
    model: Transformer, ids: torch.Tensor, acts: list[str], greedy_tokens: int = 64, reference: Reference | None = None
) -> list[ActQuality]:
    """Each precision in `acts` against fp32 activations, on text ids (1, T) (T ≥ 2) through `model`'s block weights;
    the model's own precision is restored after. `reference`: fp32's figures on the same ids and greedy_tokens
    (default: taken on `model`), e.g. from the same weights held in the layout fp32 activations are fastest in."""
    ref = reference or fp32_reference(model, ids, greedy_tokens)
    own = activations(model) or "int8"
    try:
        out = []
        for act in acts:
            set_act(model, act)
            same_path = act == "fp32" and ref.model is model
            logits = ref.logits if same_path else _stepped_logits(model, ids)
            kl, same = agreement(ref.logits, logits)  # (T - 1,) each
            tokens = ref.greedy if same_path else _greedy(model, ref.prompt, greedy_tokens)
            differ = (tokens != ref.greedy).nonzero()
            out.append(ActQuality(
                act, float(kl.mean()), float(kl.max()), float(same.float().mean()),
                int(differ[0, 0]) if len(differ) else greedy_tokens, greedy_tokens, ref.logits.shape[0],
            ))  # fmt: skip
        return out
    finally:
        set_act(model, own)


def text_ids(encode: Any, tokens: int = TEXT_TOKENS, inputs: list[str] | None = None) -> torch.Tensor:
    """(1, ≤ tokens + 1) ids of real text: the validation split of `inputs` (default: the built-in corpus), encoded
    by `encode` (a model's own text → ids)."""
    from gen_cli.text.corpus import Corpus

    ids: list[int] = []
    for text in Corpus(inputs or []).texts("val"):
        ids += encode(text)
        if len(ids) > tokens:
            break
    return torch.tensor([ids[: tokens + 1]], dtype=torch.long)
