"""Prompt reuse across runs: load the longest prefix a prompt-cache file shares with the prompt, prefill
only the rest, and (re)write the file when its prompt was not a prefix of this one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from gen_cli.cache.kinds import kind_of
from gen_cli.cache.linear import KVCache
from gen_cli.cache.prompt_file import identity, read_prompt_cache, restore, save_prompt_cache
from gen_cli.cache.spec import CacheSpec
from gen_cli.infer.generate import GenerationResult, model_dtype
from gen_cli.infer.session import common_prefix
from gen_cli.model.transformer import Transformer
from gen_cli.text.tokenizer import tokenizer_digest


class PromptReuse:
    """One run's use of a prompt-cache file: identity taken at load, `prepare` before the generation
    (reads and checks the file, picks the prefix), `save_if_new` after it."""

    def __init__(
        self,
        path: Path,
        model: Transformer,
        tokenizer: Any,
        weights: str = "none",
        spec: CacheSpec | None = None,
    ) -> None:
        """`spec`: the run's cache; a file holds a linear cache's prefix, in the kinds it names."""
        dtype = model_dtype(model)
        kinds = (spec or CacheSpec()).kinds
        k_kind, v_kind = (kind or kind_of(dtype) for kind in kinds)
        self.path = path
        self.ident = identity(model, tokenizer_digest(tokenizer), weights, k_kind, v_kind, dtype)
        self.ids: list[int] = []
        self.reused = 0
        self.action = ""  # created (no file), reused (the file's prompt is a prefix), rewrote (it differs)
        self.read_s = 0.0
        self.saved_tokens = 0

    def prepare(self, model: Transformer, ids: list[int]) -> Callable[[KVCache], None]:
        """Read and check the file against this run and `ids`; return what fills the new cache's prefix."""
        self.ids = list(ids)
        start = perf_counter()
        saved = read_prompt_cache(self.path, model.config, self.ident, model.config.context_length)
        self.read_s = perf_counter() - start
        if saved is None:
            self.action = "created"
            return lambda cache: None
        common = common_prefix(saved.ids, self.ids)
        # At least one prompt token is prefilled: its logits pick the first new token.
        self.reused = min(common, len(self.ids) - 1)
        self.saved_tokens = len(saved.ids)
        self.action = "reused" if common == len(saved.ids) else "rewrote"
        n = self.reused
        return lambda cache: restore(cache, saved, n) if n else None

    def save_if_new(self, result: GenerationResult) -> None:
        """Write the prompt's KV when there was no file or its prompt differs (after a completed prefill)."""
        if self.action == "reused" or result.cache is None or result.tokens.shape[1] == 0:
            return
        save_prompt_cache(self.path, result.cache, self.ids, self.ident)
        self.saved_tokens = len(self.ids)

    def summary(self) -> dict[str, Any]:
        return {
            "file": str(self.path), "action": self.action, "reused_tokens": self.reused,
            "prompt_tokens": len(self.ids), "file_tokens": self.saved_tokens, "read_s": self.read_s,
        }  # fmt: skip
