"""A chat conversation that keeps its KV cache between turns.

Each turn re-renders the whole conversation with the model's chat template, and prefills only the
tokens after the longest prefix it shares with what the cache holds; where the new render diverges
earlier (a reply re-tokenized differently, a template that rewrites past turns), the cache is rolled
back to the shared prefix. Replies come from `generate`'s own loop (`continue_steps`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch

from gen_cli.cache.spec import CacheSpec
from gen_cli.cache.window import Cache
from gen_cli.errors import GenError, UsageError
from gen_cli.infer.generate import continue_steps, model_dtype, prefill
from gen_cli.infer.options import SamplingConfig
from gen_cli.model.transformer import Transformer
from gen_cli.runtime import synchronize
from gen_cli.text.chat import encode_rendered, render_chat
from gen_cli.text.stream import TextStream


class ContextFull(GenError):
    """The conversation with the new message no longer fits the cache: only starting over helps."""


@dataclass
class Turn:
    """One reply: tokens reused from the cache, prefilled and generated, and its measured times."""

    prompt_tokens: int  # the whole conversation as rendered for this turn
    reused_tokens: int  # of those, already in the cache: not recomputed
    prefilled_tokens: int  # prompt_tokens - reused_tokens
    rolled_back: int  # cached tokens dropped because the new render diverged before the cache's end
    new_tokens: int
    ttft_s: float | None  # prefill of the new tokens and the first token's pick (None: stopped before it)
    decode_s: float  # the other steps (printing not counted)
    text: str
    token_ids: list[int]  # as generated (a final stop id included)
    interrupted: bool = False
    context_full: bool = False  # the reply was cut because the cache had no room left


@dataclass
class PrefillComparison:
    """The last turn's prompt prefilled whole vs only its new tokens, measured now on a scratch cache."""

    prompt_tokens: int
    reused_tokens: int
    full_s: list[float]
    reuse_s: list[float]

    @property
    def full_median_s(self) -> float:
        return statistics.median(self.full_s)

    @property
    def reuse_median_s(self) -> float:
        return statistics.median(self.reuse_s)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """A conversation with one model: its messages, one KV cache for all of it, the ids that cache holds."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        template: str,
        *,
        special_tokens: dict[str, str] | None = None,
        stop_ids: tuple[int, ...] = (),
        system: str | None = None,
        context_tokens: int | None = None,
        source: str = "chat template",
        spec: CacheSpec | None = None,
    ) -> None:
        """`spec`: the cache (default: every token, in the model's dtype). With a window it keeps the first
        `sinks` and the last `window` tokens, so the conversation may go on past the context (RoPE/ALiBi
        models); what left the window is forgotten."""
        config = model.config
        capacity = config.context_length if context_tokens is None else context_tokens
        if not 2 <= capacity <= config.context_length:
            raise UsageError(
                f"context_tokens must be between 2 and the model's context length ({config.context_length:,}), "
                f"got {capacity}",
                params=("context_tokens",),
            )
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.special_tokens, self.stop_ids, self.source = special_tokens or {}, stop_ids, source
        self.system = system
        device = model.norm.weight.device  # not tok_emb: a block-quantized table would dequantize whole
        spec = spec or CacheSpec()
        spec.check(config)
        _check_cache_fits(model, capacity, device, spec)
        self.cache: Cache = spec.allocate(config, 1, capacity, model_dtype(model), device)
        self.ids: list[int] = []  # the ids whose k/v the cache holds: len(self.ids) == cache.pos
        self.messages: list[dict[str, str]] = []
        self.turns: list[Turn] = []
        self._last_prompt: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and empty the cache."""
        self.cache.reset()
        self.ids, self.turns, self._last_prompt = [], [], []
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of the conversation as the template writes it, ready for the assistant's reply."""
        text = render_chat(self.template, messages, True, self.special_tokens, self.source)
        # Text no cache could hold is refused before it is tokenized (a window: the render's own limits).
        return encode_rendered(self.tokenizer, text, self.cache.sequence_limit)

    def say(
        self,
        message: str,
        max_new_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Turn:
        """Add a user message and generate the reply, handing its text to `on_text` as it becomes safe to
        show. Ctrl-C ends the reply early (`interrupted`); the conversation keeps what was said."""
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}", params=("max_new_tokens",))
        messages = [*self.messages, {"role": "user", "content": message}]
        ids = self.render(messages)
        limit = self.cache.sequence_limit  # None: a window goes on however long the conversation runs
        capacity = limit if limit is not None else len(ids) + max_new_tokens
        if len(ids) >= capacity:
            raise ContextFull(
                f"with this message the conversation is {len(ids):,} tokens, leaving no room for a reply in the "
                f"cache's {capacity:,}; reset the conversation to go on"
            )
        # At most len(ids) - 1 reused: the last prompt token must run to give the first reply token's logits.
        reused = common_prefix(self.ids, ids[:-1])
        if not self.cache.can_truncate(reused):
            reused = 0  # the window overwrote what a roll-back would need: prefill the conversation again
        rolled_back = self.cache.pos - reused
        self.cache.truncate(reused)
        self.ids = self.ids[:reused]
        budget = min(max_new_tokens, capacity - len(ids))
        # The prompt's last id as context: a SentencePiece decoder would strip the reply's first space.
        stream = TextStream(self.tokenizer, stop_ids=self.stop_ids, context=tuple(ids[-1:]))
        prompt = torch.tensor([ids], dtype=torch.long, device=self.cache.device)  # (1, T)
        generated: list[int] = []
        times: list[float] = []
        interrupted = False
        steps = continue_steps(self.model, prompt, budget, sampling, self.cache, generator, self.stop_ids or None)
        synchronize(self.cache.device)
        resumed = perf_counter()
        try:
            for _, token in steps:
                generated.append(int(token[0]))  # int() waits for the device
                times.append(perf_counter() - resumed)
                stream.push(generated[-1])
                if on_text is not None and (new := stream.take()):
                    on_text(new)
                if stream.done:
                    break
                resumed = perf_counter()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            steps.close()
            # The cache holds the prompt, then every generated token but the last (never fed back).
            self.ids = (ids + generated)[: self.cache.pos]
        if on_text is not None and (rest := stream.take(final=True)):
            on_text(rest)
        self.messages = [*messages, {"role": "assistant", "content": stream.text}]
        self._last_prompt = ids
        cut = (
            limit is not None
            and not stream.done
            and not interrupted
            and len(generated) == budget
            and len(ids) + budget >= capacity
        )
        turn = Turn(
            prompt_tokens=len(ids), reused_tokens=reused, prefilled_tokens=len(ids) - reused,
            rolled_back=rolled_back, new_tokens=len(generated), ttft_s=times[0] if times else None,
            decode_s=sum(times[1:]), text=stream.text, token_ids=generated, interrupted=interrupted, context_full=cut,
        )  # fmt: skip
        self.turns.append(turn)
        return turn

    def compare_prefill(self, repeats: int = 3) -> PrefillComparison | None:
        """Time the last turn's prompt prefilled whole against only the tokens after its reused prefix,
        alternating on a scratch cache (the live turns warmed the model up); None before the first turn."""
        if not self.turns or repeats < 1:
            return None
        prompt, reused = self._last_prompt, self.turns[-1].reused_tokens
        spec, device = CacheSpec.of(self.cache), self.cache.device
        if spec.slots(len(prompt)) < len(prompt):
            return None  # past the window a prefix cannot be rolled back to: nothing comparable to time
        _check_cache_fits(self.model, len(prompt), device, spec)
        scratch = spec.allocate(self.model.config, 1, len(prompt), self.cache.dtype, device)
        x = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)

        def timed(start_at: int) -> float:
            scratch.truncate(start_at)  # the prefix before start_at is left by the full prefill before
            synchronize(device)
            t0 = perf_counter()
            prefill(self.model, x[:, start_at:], scratch)
            synchronize(device)
            return perf_counter() - t0

        full: list[float] = []
        reuse: list[float] = []
        for _ in range(repeats):  # alternating, so a drift in the machine's load hits both sides alike
            full.append(timed(0))
            reuse.append(timed(reused))  # after timed(0), the scratch holds the whole prompt's k/v
        return PrefillComparison(len(prompt), reused, full, reuse)


def _check_cache_fits(model: Transformer, tokens: int, device: torch.device, spec: CacheSpec) -> None:
    from gen_cli.memory import check_fits, generation_bytes

    bpe = torch.empty((), dtype=model_dtype(model)).element_size()
    check_fits(
        generation_bytes(model.config, 1, tokens, bpe, spec),
        f"a KV cache for a conversation of {tokens:,} tokens",
        "hold fewer tokens (context_tokens)",
        device,
        params=("context_tokens",),
    )
