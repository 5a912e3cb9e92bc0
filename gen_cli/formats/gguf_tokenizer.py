"""Rebuild a `tokenizers.Tokenizer` from GGUF tokenizer metadata (tokenizer.ggml.*)."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gen_cli.errors import GenError
from gen_cli.formats.schema import BOOL, INT, LIST_INT, LIST_STR, STR, Key, check, shown

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
# Names llama.cpp gives the same split rule (llama-vocab.cpp); the Llama 3 family also uses a word whole
# when the vocabulary has it (`ignore_merges`, as Llama 3's tokenizer.json).
LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
PRE_TOKENIZER_REGEXES = dict.fromkeys(LLAMA3_NAMES, _LLAMA3) | dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2)
GPT2_NAMES = ("gpt2", "gpt-2", "default")  # "default": files older than tokenizer.ggml.pre, read as transformers does
PRE_TOKENIZERS = (*GPT2_NAMES, "smollm", *PRE_TOKENIZER_REGEXES)
TOKENIZER_MODELS = ("gpt2 (byte-level BPE)", "llama (SentencePiece BPE with byte fallback)")
# token_type values in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
# The tokenizer.ggml.* values gen reads, by type and range (token ids are checked against the vocabulary too).
TOKEN_ID_KEYS = ("bos", "eos", "unknown", "padding", "eot", "eom")
TOKENIZER_SCHEMA = {
    "tokenizer.ggml.model": Key(STR), "tokenizer.ggml.pre": Key(STR), "tokenizer.ggml.tokens": Key(LIST_STR),
    "tokenizer.ggml.token_type": Key(LIST_INT), "tokenizer.ggml.merges": Key(LIST_STR),
    "tokenizer.ggml.add_bos_token": Key(BOOL), "tokenizer.ggml.add_space_prefix": Key(BOOL),
    "tokenizer.chat_template": Key(STR), **{f"tokenizer.ggml.{k}_token_id": Key(INT, lo=0) for k in TOKEN_ID_KEYS},
}  # fmt: skip
# A SentencePiece vocabulary's merges are rebuilt from its scores by splitting each token in two; tokens
# longer than this are refused (real ones are at most a few hundred characters: a 1M-character one took
# minutes). With the split points limited to the vocabulary's own token lengths the rebuild stays near linear.
MAX_SCORED_TOKEN_CHARS = 1024
# The rebuild's cost in characters hashed: Σ over tokens of (token lengths shorter than it) × its length. A
# real vocabulary costs a few million (Llama 2: ~3M); past this budget a file is refused, not rebuilt for minutes.
MAX_REBUILD_CHARS = 1 << 28


def _pre_tokenizer(pre: str, source: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in PRE_TOKENIZER_REGEXES:
        split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # each digit alone, then GPT-2's split
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise GenError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score
    first (transformers' `generate_merges`, which its GGUF and sentencepiece converters use)."""
    ids = {t: i for i, t in enumerate(tokens)}
    if (long := next((i for i, t in enumerate(tokens) if len(t) > MAX_SCORED_TOKEN_CHARS), None)) is not None:
        raise GenError(f"token #{long} is {len(tokens[long]):,} characters long; a SentencePiece vocabulary "
                       f"rebuilt from its scores may have tokens of at most {MAX_SCORED_TOKEN_CHARS:,}")  # fmt: skip
    lengths = sorted({len(t) for t in tokens})  # a split's left part is a token: only these lengths can be one
    cost = sum(len(t) * bisect.bisect_left(lengths, len(t)) for t in tokens)
    if cost > MAX_REBUILD_CHARS:
        raise GenError(f"rebuilding this SentencePiece vocabulary's merges from its scores would hash {cost:,} "
                       f"characters; gen's limit is {MAX_REBUILD_CHARS:,} (a real one: a few million)")  # fmt: skip
    found = []
    for token, score in zip(tokens, scores, strict=True):
        n = len(token)
        local = [(token[:k], token[k:], score) for k in lengths if k < n and token[:k] in ids and token[k:] in ids]
        found += sorted(local, key=lambda m: (ids[m[0]], ids[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _byte_level(tokens: list[str], merges: list[str], pre: str, source: str) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in LLAMA3_NAMES))
    tok.pre_tokenizer = _pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(
    tokens: list[str], scores: list[float] | None, merges: list[str] | None, unk: int | None, space_prefix: bool
) -> Tokenizer:
    """Llama 2 / TinyLlama / Mistral v0.1 style: spaces as ▁ with one prepended, BPE, unknown bytes as <0xNN>."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None and len(scores) == len(tokens):
        pairs = merges_from_scores(tokens, scores)
    else:
        raise GenError("a SentencePiece vocabulary needs tokenizer.ggml.scores or tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend(SPACE)] if space_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []  # the prepended space is not the text's
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def tokenizer_from_gguf(get: Callable[..., Any], source: str) -> tuple[Tokenizer, tuple[int, ...], bool]:
    """A `tokenizers.Tokenizer` from GGUF metadata (`get(key, default)`), its end-of-turn ids, and whether
    prompts start with BOS."""
    from tokenizers import AddedToken, processors

    check(get, TOKENIZER_SCHEMA, source, "metadata ")
    kind = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama"):
        raise GenError(f"{source}: GGUF tokenizer model {kind!r} is not supported; supported: "
                       f"{', '.join(TOKENIZER_MODELS)}")  # fmt: skip
    if not isinstance(tokens, list) or not tokens:
        raise GenError(f"{source}: tokenizer.ggml.tokens is missing")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GenError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    for key in TOKEN_ID_KEYS:  # an id past the vocabulary would index nothing (or wrap, for -1)
        if (i := get(f"tokenizer.ggml.{key}_token_id")) is not None and i >= len(tokens) and key != "padding":
            raise GenError(f"{source}: metadata tokenizer.ggml.{key}_token_id is {i}, but the vocabulary has "
                           f"{len(tokens):,} tokens")  # fmt: skip
    scores = get("tokenizer.ggml.scores")
    if scores is not None and not (
        isinstance(scores, list) and all(isinstance(x, int | float) and x == x for x in scores)
    ):  # ±inf sorts (a score some converters give unused tokens); NaN does not
        raise GenError(f"{source}: metadata tokenizer.ggml.scores must be a list of numbers, got {shown(scores)}")
    merges = get("tokenizer.ggml.merges")
    try:
        if kind == "gpt2":
            if not isinstance(merges, list):
                raise GenError(f"{source}: tokenizer.ggml.merges is missing")
            tok = _byte_level(tokens, merges, get("tokenizer.ggml.pre", "default"), source)
        else:
            unk, space_prefix = get("tokenizer.ggml.unknown_token_id"), get("tokenizer.ggml.add_space_prefix", True)
            tok = _sentencepiece(tokens, scores, merges, unk, bool(space_prefix))
    except GenError as e:
        raise GenError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from None
    except Exception as e:
        raise GenError(f"{source}: the GGUF vocabulary does not make a tokenizer ({e})") from None
    # Control tokens (and SentencePiece's <unk>) are special; user-defined ones are added tokens matched whole.
    specials = [AddedToken(t, special=k != USER_DEFINED, normalized=False)
                for t, k in zip(tokens, types, strict=True) if k in (CONTROL, USER_DEFINED, UNKNOWN)]  # fmt: skip
    tok.add_tokens(specials)
    tok.encode_special_tokens = True  # as gen's own tokenizers: text spelling a special token is text
    bos = get("tokenizer.ggml.bos_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = bool(get("tokenizer.ggml.add_bos_token", kind == "llama")) and isinstance(bos, int)
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
