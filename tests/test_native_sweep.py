"""The native step at the head sizes its AVX-512 attention specialises (64 and 128), against PyTorch's
no-cache forward: query heads per KV head 1, 2, 3, 4 and MQA's 6 (taken 4, then 2), every position
encoding it runs, fp32; and head_dim 40, which AVX2 builds take 32 columns, then 8. test_native.py's sweep
uses head_dim 8 (the portable loops).

Weights are drawn at unit scale (std 1/sqrt(fan_in), wqkv doubled) rather than the training init
(std 0.02), so attention is peaked instead of a near-uniform average that would hide a wrong score.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil

import pytest
import torch

from gen_cli.infer.generate import greedy_steps, new_cache
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.model.config import ModelConfig
from gen_cli.model.transformer import Transformer
from gen_cli.native import decoder as native

pytestmark = pytest.mark.skipif(
    shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None, reason="no C compiler on this machine"
)
VOCAB, CONTEXT, PROMPT = 64, 40, 3
# Largest |native - no-cache PyTorch| logit over the largest |logit| (about 4 here). Both sum the same fp32
# products in other orders: measured up to 4.7e-6 over this sweep on an AVX-512 CPU, where PyTorch's own
# cached path differs from its no-cache forward by up to 6.0e-6.
REL_TOL = 2e-5

# (n_head, n_kv_head): query heads per KV head 1 (MHA), 2, 3 and 4 (GQA), and MQA with 6 heads, which the
# kernel takes as a group of 4 and then one of 2 (AVX2's fp32 attention reads K and V once for up to 3).
GROUPINGS = {"mha": (2, 2), "gqa2": (4, 2), "gqa3": (6, 2), "gqa4": (8, 2), "mqa6": (6, 1)}
# Every position encoding the native step accepts (ALiBi is refused, below); two also switch to LayerNorm.
POSITIONS = {
    "rope": {"pos_encoding": "rope"},
    "rope-yarn": {  # scaled tables, with YaRN's attention gain folded into cos/sin
        "pos_encoding": "rope",
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_context_length": 16},
    },
    "sinusoidal": {"pos_encoding": "sinusoidal", "norm": "layernorm"},
    "learned": {"pos_encoding": "learned", "norm": "layernorm"},
}


def _config(head_dim: int, grouping: str, position: str, **changes) -> ModelConfig:
    n_head, n_kv_head = GROUPINGS[grouping]
    shape = dict(vocab_size=VOCAB, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=n_head * head_dim)
    # Untied: a unit-scale embedding as the head would make every token predict itself.
    rest = {"d_ff": 32, "context_length": CONTEXT, "tie_embeddings": False}
    return ModelConfig(**shape | rest | POSITIONS[position] | changes)


def _unit_scale(model: Transformer) -> Transformer:
    """Redraw every weight at unit scale (seeded), norms' gains and biases away from 1 and 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("tok_emb.weight", "pos_emb.weight"):  # unit entries, like the sinusoidal table's
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                gain = 2.0 if "wqkv" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def _models(config: ModelConfig) -> tuple[Transformer, Transformer]:
    """(the plain PyTorch model, untouched by optimize_for_decode; the same weights on the native step)."""
    plain = _unit_scale(Transformer(config))
    fast = _unit_scale(Transformer(config))
    optimize_for_decode(fast)
    assert fast.native_decoder is not None, native.unavailable_reason(fast)
    return plain, fast


def _native_steps(model: Transformer, prompt: torch.Tensor, n: int, forced: torch.Tensor | None = None):
    """(fp32 logits (B, n, V), tokens (B, n)): PyTorch prefills the prompt, the C step runs the n steps,
    fed its own greedy picks or, with `forced` (B, n), those tokens."""
    cache = new_cache(model, prompt, n)
    assert model.native_decoder.accepts(prompt.shape[0], cache)
    with torch.inference_mode():
        steps = list(greedy_steps(model, prompt, n, cache, forced))
    return torch.stack([logits for logits, _ in steps], 1), torch.stack([token for _, token in steps], 1)


def _no_cache_logits(model: Transformer, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The logits (B, T - prompt_len + 1, V) that pick the tokens after ids[:, :prompt_len], in one forward."""
    with torch.inference_mode():
        return model(ids)[:, prompt_len - 1 :]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max() / want.abs().max()
    assert err <= REL_TOL, f"relative logit error {err:.2e}"


# Every grouping with RoPE, and every other position encoding with one grouping, at both head sizes:
# positions only change q and k before the attention reads them (the full product measured the same).
CASES = [(hd, grouping, "rope") for hd in (64, 128) for grouping in GROUPINGS]
CASES += [(hd, "gqa2", position) for hd in (64, 128) for position in POSITIONS if position != "rope"]
CASES += [(40, grouping, "rope") for grouping in ("mha", "gqa3", "gqa4")]


@pytest.mark.parametrize(("head_dim", "grouping", "position"), CASES)
def test_native_step_at_avx512_head_sizes(head_dim, grouping, position):
    plain, fast = _models(_config(head_dim, grouping, position))
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    prompt, n = ids[:, :PROMPT], CONTEXT - PROMPT
    # Steps at positions 3..39: attention over 4..40 tokens, whole 16-token blocks and the tails after them.
    got, _ = _native_steps(fast, prompt, n, forced=ids[:, PROMPT:])
    _assert_close(got, _no_cache_logits(plain, ids[:, :-1], PROMPT))
    # Greedy: the no-cache oracle picks token t as the argmax of a forward over everything before it, so
    # one forward over the native step's own picks checks every pick (and its logits) at once.
    got, tokens = _native_steps(fast, prompt, n)
    want = _no_cache_logits(plain, torch.cat([prompt, tokens[:, :-1]], 1), PROMPT)
    _assert_close(got, want)
    # Each pick is the oracle's argmax, or a token whose oracle logit ties the top one within the logit
    # tolerance (a float near-tie either path may break either way). Measured: every pick the argmax.
    top, picked = want.max(-1).values, want.gather(-1, tokens[..., None])[..., 0]
    assert (top - picked <= REL_TOL * want.abs().max()).all(), (tokens, want.argmax(-1))
    assert tokens.unique().numel() > 4  # the weights give varied text, not one token repeated (measured 10-40)


@pytest.mark.parametrize(("head_dim", "grouping"), [(64, "gqa2"), (128, "mqa6")])
def test_native_step_past_one_attention_chunk(head_dim, grouping):
    """Past 256 positions a KV head's tokens split into chunks whose softmaxes are merged."""
    plain, fast = _models(_config(head_dim, grouping, "rope", n_layer=1, context_length=280))
    ids = torch.randint(0, VOCAB, (1, 280), generator=torch.Generator().manual_seed(2))
    got, _ = _native_steps(fast, ids[:, :250], 30, forced=ids[:, 250:])  # one chunk, then two
    _assert_close(got, _no_cache_logits(plain, ids[:, :-1], 250))


def test_alibi_stays_in_pytorch_at_these_sizes():
    torch.manual_seed(0)
    model = optimize_for_decode(Transformer(_config(64, "gqa2", "rope", pos_encoding="alibi")).eval())
    assert model.native_decoder is None
    assert "ALiBi" in native.supports(model)
