"""Tiny random transformers models of every architecture gen imports, saved as HF folders (no download)."""

from __future__ import annotations

import json
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


# The pre-tokenizers of the original tokenizer.json files that llama.cpp's `tokenizer.ggml.pre` names stand
# for (Llama 3, Qwen2, SmolLM, GPT-2), written out here independently of gen's rebuild.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def original_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"), byte_level])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2), behavior="isolated"), byte_level])
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def byte_level_tokenizer(pre: str = "gpt2", vocab_size: int = 300):
    """A byte-level BPE trained on SENTENCES; `pre` picks the pre-tokenizer split rule (as GGUF names it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = original_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(SENTENCES, trainer)
    if pre == "llama-bpe":
        tok.model.ignore_merges = True  # as Llama 3's tokenizer.json
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
        # n_positions 1024: transformers' GGUF reader ignores gpt2.context_length and assumes GPT-2's own.
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=1024,
                                      bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    else:
        raise ValueError(arch)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2")


def random_hf_model(arch: str, seed: int = 0, **shape):
    """A random `arch` model (hf_config's shape, changed by `shape`) with non-trivial norms and biases."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **shape)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from 1/0, so a mix-up shows
            elif p.dim() == 2:
                p.normal_(0, 0.1)  # larger than the 0.02 init so logits spread and a wrong layout shows
    return model


def build_hf_model(arch: str, directory: Path, tokenizer=None, seed: int = 0):
    """Save a random `arch` model (with non-trivial norms and biases) and tokenizer.json in `directory`."""
    model = random_hf_model(arch, seed)
    model.save_pretrained(directory)
    (tokenizer or byte_level_tokenizer()).save(str(directory / "tokenizer.json"))
    return model


GGUF_ARCH = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gpt2": "gpt2"}  # fmt: skip


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_chatml_model(directory: Path) -> Path:
    """A tiny random Llama with ChatML special tokens and template in `directory`, as an instruct model ships
    them (HF folder: weights, tokenizer.json, tokenizer_config.json, generation_config.json)."""
    import transformers
    from tokenizers import AddedToken

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("llama", max_position_embeddings=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)  # logits spread enough that greedy replies are not one repeated token
    model.save_pretrained(directory)
    tok = byte_level_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(directory / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, tok.token_to_id("<|im_end|>")]}))
    return directory


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's permute: llama.cpp's interleaved RoPE pairs rows (j, j + half) as (2j, 2j+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name → tensor, as llama.cpp's convert_hf_to_gguf.py writes these architectures."""
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        out |= {"token_embd.weight": sd["wte.weight"], "position_embd.weight": sd["wpe.weight"],
                "output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"]}  # fmt: skip
        names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
        for i in range(cfg.n_layer):
            for hf, gg in names.items():
                for kind in ("weight", "bias"):
                    t = sd[f"h.{i}.{hf}.{kind}"]
                    out[f"blk.{i}.{gg}.{kind}"] = t.T if kind == "weight" and not hf.startswith("ln") else t
        return out
    out |= {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if GGUF_ARCH[arch] == "llama" and gg in ("attn_q", "attn_k"):
                    t = _permute(t, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
                out[f"blk.{i}.{gg}.{kind}"] = t
    return out


def write_gguf(
    model, tokenizer, arch: str, path: Path, qtype="F32", pre: str = "gpt2", chat_template: str | None = None
) -> Path:
    """Write `model` and a byte-level BPE `tokenizer` as llama.cpp's converter would; 2-D tensors in the GGML
    type `qtype` (a name, or a function of the tensor's GGUF name). Block bytes come from the gguf package,
    or from gen's quantizer for the types it cannot quantize (the k-quants)."""
    import gguf
    import numpy as np

    from gen_cli.quant.blocks import quantize

    g = GGUF_ARCH[arch]
    cfg = model.config
    w = gguf.GGUFWriter(str(path), g)
    w.add_name(f"tiny-{arch}")
    if g == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    add_tokenizer(w, tokenizer, pre)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, t in gguf_tensors(model, arch).items():
        a = t.numpy().astype(np.float32)
        kind = gguf.GGMLQuantizationType[qtype(name) if callable(qtype) else qtype]
        if a.ndim != 2 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
            continue
        try:
            blocks = gguf.quants.quantize(a, kind)
        except NotImplementedError:
            blocks = quantize(t.float(), kind.name.lower()).numpy()
        w.add_tensor(name, blocks, raw_dtype=kind)
    if arch == "llama3":  # convert_hf_to_gguf.py stores Llama 3's scaling as per-frequency divisors
        w.add_tensor("rope_freqs.weight", llama3_freq_factors(cfg).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_freq_factors(cfg) -> torch.Tensor:
    """The divisors of the plain RoPE frequencies that give transformers' llama3 ones, (head_dim/2,) float32."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return (plain / scaled).float()


def write_tokenizer_gguf(tokenizer, path: Path, pre: str) -> None:
    """A GGUF file holding only tokenizer metadata (enough for `gen tokenize --model`)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(w, tokenizer, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_tokenizer(w, tokenizer, pre: str) -> None:
    """tokenizer.ggml.* as convert_hf_to_gguf.py writes a byte-level BPE (padded to VOCAB with [PADn])."""
    import gguf

    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * tokenizer.get_vocab_size()
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    # Like convert_hf_to_gguf.py: the list is padded to the embedding's rows with unused [PADn] tokens.
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    types += [gguf.TokenType.UNUSED] * (VOCAB - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def sentencepiece_style_tokenizer(vocab_size: int = 420):
    """A Llama 2 style tokenizer.json: ▁ for spaces (one prepended), BPE with <0xNN> byte fallback,
    ids 0–2 <unk> <s> </s>, 3–258 the bytes, then the learned pieces in merge order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    space = "\u2581"
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    # Pieces never span words, as in SentencePiece: train on words split before each ▁.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPM_SPECIALS, show_progress=False)
    trainer_tok.train_from_iterator(SENTENCES, trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in SPM_SPECIALS]
    tokens = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))  # fmt: skip
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPM_SPECIALS])
    return tok


def write_sentencepiece_gguf(tokenizer, path: Path) -> None:
    """Tokenizer metadata as llama.cpp writes a SentencePiece vocabulary: tokens, scores, types, no merges."""
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]  # merge order, best first
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
