"""Tiny random transformers models of every architecture gen imports, saved as HF folders (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Keys and values are cached; each new token costs one step.",
    "日本語のテキスト and émoji 🙂 mixed   with    spaces\n\tand tabs.",
    "def f(x):\n    return x ** 2  # 3.14159",
] * 20
VOCAB = 320  # the embedding is larger than the tokenizer's ~300 tokens, as in many real models
EOS = "<|endoftext|>"
PROMPT = "The quick brown fox 2024, 日本 🙂"


def byte_level_tokenizer(pre: str = "gpt2", vocab_size: int = 300):
    """A byte-level BPE trained on SENTENCES; `pre` picks the pre-tokenizer split rule (as GGUF names it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from gen_cli.model.gguf_tokenizer import PRE_TOKENIZER_REGEXES

    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def hf_config(arch: str, **changes):
    """A transformers config of `arch`: 2 layers, hidden 64, 4 query / 2 KV heads (GPT-2: 4 heads)."""
    import transformers

    eos = 0  # EOS is the first special token the trainer adds
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64, eos_token_id=eos,
                  bos_token_id=eos, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
    elif arch == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16, rope_theta=500000.0)  # fmt: skip
        cfg = transformers.LlamaConfig(**common, rope_parameters=scaling)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32)  # head_dim × heads ≠ hidden, as in real Qwen3
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                      bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    else:
        raise ValueError(arch)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2")


def build_hf_model(arch: str, directory: Path, tokenizer=None, seed: int = 0):
    """Save a random `arch` model (with non-trivial norms and biases) and tokenizer.json in `directory`."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from 1/0, so a mix-up shows
            elif p.dim() == 2:
                p.normal_(0, 0.1)  # larger than the 0.02 init so logits spread and a wrong layout shows
    model.save_pretrained(directory)
    (tokenizer or byte_level_tokenizer()).save(str(directory / "tokenizer.json"))
    return model
