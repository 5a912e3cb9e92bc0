"""HF transformers as the peer `gen bench decode` measures against: availability, a Llama holding gen's
weights, and its generate timed the way gen's is (prefill apart from decode)."""

from __future__ import annotations

import time
from typing import Any

import torch

from gen_cli.model.transformer import Transformer
from gen_cli.runtime import synchronize

HF_INSTALL = 'transformers is not installed; for the HF rows run: pip install -e ".[bench]"'


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_hf(reference: Transformer, device: torch.device) -> Any:
    """LlamaForCausalLM of the same shape holding a copy of gen's fp32 weights (random, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = reference.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.context_length,
        rope_theta=c.rope_base,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    H, Hkv, hd = c.n_head, c.n_kv_head, c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(reference.tok_emb.weight)
        hf.model.norm.weight.copy_(reference.norm.weight)
        for ours, theirs in zip(reference.layers, hf.model.layers, strict=True):
            q, k, v = ours.attn.wqkv.weight.split([H * hd, Hkv * hd, Hkv * hd])  # rows of the fused matrix
            attn, mlp = theirs.self_attn, theirs.mlp
            for dst, src in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v), (attn.o_proj, ours.attn.wo.weight),
                             (mlp.gate_proj, ours.mlp.w1.weight), (mlp.up_proj, ours.mlp.w3.weight),
                             (mlp.down_proj, ours.mlp.w2.weight)):  # fmt: skip
                dst.weight.copy_(src)
            theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
    return hf.to(device)


class _Clock:
    """A transformers streamer that timestamps each put(): the prompt first, then one per new token."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf: Any, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """HF generate, greedy, exactly new_tokens: (decode tok/s, prefill tok/s, new ids (new_tokens,))."""
    clock = _Clock(prompt.device)
    synchronize(prompt.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt, put before prefill
    decode = (new_tokens - 1) / (last - first) if new_tokens > 1 else float("nan")
    return decode, prompt.shape[1] / (first - start), out[0, prompt.shape[1] :]


def hf_version() -> str:
    import transformers

    return transformers.__version__
