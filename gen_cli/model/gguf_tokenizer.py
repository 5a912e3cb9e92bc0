"""Rebuild a `tokenizers.Tokenizer` from GGUF tokenizer metadata (tokenizer.ggml.*)."""

from __future__ import annotations

# The split rules llama.cpp names by `tokenizer.ggml.pre` (llama-vocab.cpp); each is the Split regex of the
# original tokenizer.json, applied before byte-level mapping.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES = {"llama-bpe": _LLAMA3, "qwen2": _QWEN2}
