"""What guesses the next tokens for speculative decoding: prompt lookup (n-grams of the text so far) or a draft
model with its own KV cache; opening a draft and checking that it shares the target's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.cache.window import Cache
from gen_cli.errors import UsageError
from gen_cli.infer.batch import native_rows
from gen_cli.infer.generate import decode_step, new_cache, prefill
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.sampling import distribution, draw
from gen_cli.infer.speculative import Proposer, Speculation, plain_greedy
from gen_cli.model.transformer import Transformer
from gen_cli.native.decoder import MAX_BATCH

if TYPE_CHECKING:
    from gen_cli.infer.engine import Engine
    from gen_cli.infer.options import Preset


class NgramProposer:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n ids (n = 3, 2, 1)."""

    name = "ngram"

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n
        self._seen: list[dict[tuple[int, ...], int]] = []
        self._indexed = 0  # ids[:_indexed] are in the tables

    def start(self, prompt: list[int], max_tokens: int) -> None:
        self._seen = [{} for _ in range(self.max_n + 1)]
        self._indexed = 0

    def _index(self, ids: list[int]) -> None:
        # For each position t, the n-gram ending just before it is followed by ids[t]: remember the latest t.
        for t in range(max(self._indexed, 1), len(ids)):
            for n in range(1, self.max_n + 1):
                if t - n >= 0:
                    self._seen[n][tuple(ids[t - n : t])] = t
        self._indexed = len(ids)

    def propose(
        self, ids: list[int], k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        self._index(ids)
        for n in range(min(self.max_n, len(ids)), 0, -1):
            start = self._seen[n].get(tuple(ids[-n:]))
            if start is not None:
                # Copied from ids + the guess so far: a match near the end repeats its period (a loop of one
                # token guesses that token k times, not once).
                guess: list[int] = []
                for j in range(start, start + k):
                    guess.append(ids[j] if j < len(ids) else guess[j - len(ids)])
                return guess, None
        return [], None

    def keep(self, n: int) -> None:
        pass  # the tables index only ids already accepted


class DraftProposer:
    """A smaller (or lower-precision) model with the target's tokenizer, guessing with its own KV cache."""

    name = "draft"

    def __init__(self, model: Transformer, spec: CacheSpec | None = None) -> None:
        self.model = model
        self.spec = spec or CacheSpec()
        self.cache: Cache | None = None

    def start(self, prompt: list[int], max_tokens: int) -> None:
        ids = torch.zeros(1, len(prompt), dtype=torch.long)  # (1, T): only its shape is read
        self.cache = new_cache(self.model, ids, max_tokens - len(prompt), 1, self.spec)
        if CacheSpec.of(self.cache).window is not None:  # a model trained with a sliding window, run past it
            raise UsageError(
                "the draft model's cache would be a window ring, which cannot roll back; use a shorter run"
            )
        # The prompt now, beside the target's prefill (time to first token), not in the first round's guesses.
        with torch.inference_mode():
            prefill(self.model, torch.tensor([prompt], dtype=torch.long, device=self.cache.device), self.cache)

    @torch.inference_mode()
    def propose(
        self, ids: list[int], k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        cache = self.cache
        assert cache is not None, "start() first"
        device = cache.device
        unseen = ids[cache.pos :]  # the ids since the last guess: one or two after a round, more after plain steps
        fresh = torch.tensor([unseen], dtype=torch.long, device=device)  # (1, n)
        if len(unseen) > 1 and native_rows(self.model, [cache] * min(len(unseen), MAX_BATCH)) is not None:
            # In C, up to MAX_BATCH ids a call (after many plain rounds, PyTorch's forward cost milliseconds).
            for i in range(0, len(unseen), MAX_BATCH):
                chunk = unseen[i : i + MAX_BATCH]
                rows = native_rows(self.model, [cache] * len(chunk))
                assert rows is not None, "the C step took the first chunk of this cache"
                logits = rows.forward(chunk, cache)[-1:]  # (1, V)
        elif fresh.shape[1] <= 4:  # single steps (the C step) beat a PyTorch forward
            for i in range(fresh.shape[1]):
                logits = decode_step(self.model, fresh[:, i : i + 1], cache)  # (1, V)
        else:
            logits = prefill(self.model, fresh, cache)
        if plain_greedy(sampling):  # the argmax alone: no distribution, no history (q is one-hot at the guess)
            guesses = [int(logits.argmax())]
            for _ in range(k - 1):
                logits = decode_step(self.model, torch.tensor([guesses[-1:]], device=device), cache)
                guesses.append(int(logits.argmax()))
            return guesses, None
        history = torch.tensor([ids], dtype=torch.long, device=device)  # (1, L)
        guesses = []
        qs: list[torch.Tensor] = []
        for i in range(k):
            q = distribution(logits, history, sampling)  # (1, V)
            token = q.argmax(-1) if sampling.greedy else draw(q, generator)
            guesses.append(int(token))
            qs.append(q[0])
            history = torch.cat([history, token.view(1, 1)], dim=1)  # (1, L + i + 1)
            if i < k - 1:
                logits = decode_step(self.model, token.view(1, 1), cache)
        return guesses, torch.stack(qs) if qs else None  # (k, V)

    def keep(self, n: int) -> None:
        assert self.cache is not None
        if self.cache.pos > n:
            self.cache.truncate(n)


def parse_speculate(value: str) -> tuple[str, int | None]:
    """`ngram`, `ngram:K`, `draft`, `draft:K` -> (proposer name, K or None for the adaptive default)."""
    name, _, k = value.partition(":")
    if name not in ("ngram", "draft"):
        raise UsageError(f"unknown speculation {value!r}; use ngram[:K] or draft[:K]", params=("speculate",))
    if not k:
        return name, None
    if not k.isdigit() or not 1 <= int(k) <= 64:
        raise UsageError(f"speculation K must be 1 to 64 guesses, got {k!r}", params=("speculate",))
    return name, int(k)


def check_draft(target_vocab: int, target_digest: str, draft_vocab: int, draft_digest: str, draft: str) -> None:
    """Refuse a draft whose ids mean other text than the target's: its guesses would be nonsense."""
    if draft_vocab != target_vocab:
        raise UsageError(
            f"the draft model {draft} has a {draft_vocab:,}-token vocabulary, the target {target_vocab:,}; "
            "a draft must share the target's tokenizer",
            params=("draft",),
        )
    if draft_digest != target_digest:
        raise UsageError(
            f"the draft model {draft} has a different tokenizer from the target's (same size, other ids); "
            "a draft must share the target's tokenizer",
            params=("draft",),
        )


def open_draft(target: Engine, target_source: Path | Preset | None, draft: str) -> Engine:
    """A draft model: `self:MODE` is the target itself at `quantize=MODE`, else a model path; refused unless
    its tokenizer is the target's (same vocabulary size and digest)."""
    from dataclasses import replace

    from gen_cli.infer.engine import open_model
    from gen_cli.infer.optimize import QUANTIZE_MODES
    from gen_cli.text.tokenizer import tokenizer_digest

    if draft.startswith("self:"):
        mode = draft.removeprefix("self:")
        if mode not in QUANTIZE_MODES:
            raise UsageError(f"unknown draft precision {mode!r}; choose {', '.join(QUANTIZE_MODES)}", params=("draft",))
        engine = open_model(target_source, replace(target.options, quantize=mode))
    else:
        if not Path(draft).exists():
            raise UsageError(f"no draft model at {draft}; give a model folder or file, or self:q4_0", params=("draft",))
        engine = open_model(Path(draft), replace(target.options, quantize="none"))
    check_draft(
        target.model.config.vocab_size, tokenizer_digest(target.tokenizer),
        engine.model.config.vocab_size, tokenizer_digest(engine.tokenizer), engine.source,
    )  # fmt: skip
    return engine


def speculation_for(
    target: Engine, target_source: Path | Preset | None, speculate: str | None, draft: str | None
) -> Speculation | None:
    """The speculation `speculate` (ngram[:K], draft[:K]) and `draft` (a model, self:MODE) describe (None when
    neither is given; a draft alone means `draft`). A K given is kept; else K starts at 4 and follows acceptance."""
    if speculate is None and draft is None:
        return None
    name, k = parse_speculate(speculate or "draft")
    if name == "draft":
        if draft is None:
            raise UsageError("the draft proposer has no model to guess with; name one (a model path or self:q4_0)")
        proposer: Proposer = DraftProposer(open_draft(target, target_source, draft).model)
    else:
        if draft is not None:
            raise UsageError("prompt lookup (ngram) guesses without a draft model; drop one", params=("draft",))
        proposer = NgramProposer()
    return Speculation(proposer, k or 4, adaptive=k is None)
