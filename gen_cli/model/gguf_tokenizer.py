"""Rebuild a `tokenizers.Tokenizer` from GGUF tokenizer metadata (tokenizer.ggml.*)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The split rules llama.cpp names by `tokenizer.ggml.pre` (llama-vocab.cpp); each is the Split regex of the
# original tokenizer.json, applied before byte-level mapping.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES = {"llama-bpe": _LLAMA3, "qwen2": _QWEN2}
PRE_TOKENIZERS = ("gpt2", "default", "llama-bpe", "qwen2", "smollm")
# token_type values in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str, source: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in PRE_TOKENIZER_REGEXES:
        split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # each digit alone, then GPT-2's split
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise GenError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")


def tokenizer_from_gguf(get: Callable[..., Any], source: str) -> tuple[Tokenizer, tuple[int, ...], bool]:
    """A `tokenizers.Tokenizer` from GGUF metadata (`get(key, default)`), its end-of-turn ids, and whether
    prompts start with BOS. Byte-level BPE ("gpt2") only; SentencePiece ("llama") is refused."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GenError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported yet; supported: gpt2 (byte-level BPE)"
        )
    tokens = get("tokenizer.ggml.tokens")
    merges = get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise GenError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GenError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    pre = get("tokenizer.ggml.pre", "default")
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        # llama.cpp's llama-bpe uses a word whole when the vocabulary has it, as Llama 3's tokenizer.json does.
        tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre == "llama-bpe"))
    except Exception as e:
        raise GenError(f"{source}: the GGUF vocabulary does not make a BPE tokenizer ({e})") from None
    tok.pre_tokenizer = _pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=kind_ == CONTROL, normalized=False)
                for t, kind_ in zip(tokens, types, strict=True) if kind_ in (CONTROL, USER_DEFINED)]  # fmt: skip
    tok.add_tokens(specials)
    tok.encode_special_tokens = True  # as gen's own tokenizers: text spelling a special token is text
    bos = get("tokenizer.ggml.bos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False)) and isinstance(bos, int)
    if add_bos:
        bos_token = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    stops = []
    for key in ("eos", "eot", "eom"):
        i = get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens) and i not in stops:
            stops.append(i)
    return tok, tuple(stops), add_bos
