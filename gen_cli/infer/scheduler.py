"""Continuous batching: requests join the running batch between decode steps and leave when done.

A `Scheduler` owns the model's batch. `submit` queues a request (a bounded queue: `QueueFull` when full);
each `step` drops cancelled rows, admits waiting requests while the batch and the KV budget have room,
decodes one token for every running row at once (`infer.batch.batched_step`), and prefills admitted
prompts at most `prefill_chunk` tokens per step. Where gen's C step takes the caches, prompts are fed in
the decode rows' C call instead (chunked prefill: their tokens as rows of their own caches, up to
MAX_BATCH rows a step). Events go to each request's `emit`, from the thread that steps. Modes:
`continuous`, `static` (admit a batch only when the last one has finished: the classic baseline), `single`
(one request at a time).

With `kv_blocks` the requests' caches are sequences of one paged pool (`cache.paged`): a request is admitted
when the pool can promise every block it may need (else it waits in the queue), its prompt's cached full
blocks are shared instead of prefilled (`prefix_cache`), and its blocks go back to the pool when it ends.
Every block a request fills, in prefill or decode, is indexed as soon as it is full, so that the next turn of a
chat (this prompt + this answer + a new message) finds the answer's blocks too.

With `speculate` K, each decoding request also feeds up to K prompt-lookup guesses (`NgramProposer`) as rows
of its own cache in the same C call, verified as `gen generate --speculate` verifies them (greedy: the same
ids as without; sampled: the target's distribution) and rolled back past the first rejected one. Guesses are
made only while a step's decode rows stay within SPECULATE_ROWS: verifying them costs little while the weights'
reads dominate, and full price once the products do (a batch of requests already fills those rows).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gen_cli.cache.paged import BLOCK_TOKENS, BlockPool, PagedSequence, blocks_for
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import GenError, UsageError
from gen_cli.infer.batch import Row, batched_step, native_rows, pick, prefill_chunk
from gen_cli.infer.generate import model_dtype, new_cache
from gen_cli.infer.options import SamplingConfig, check_lengths
from gen_cli.infer.proposers import NgramProposer
from gen_cli.infer.speculative import verify_guesses
from gen_cli.model.transformer import Transformer
from gen_cli.native.decoder import MAX_BATCH
from gen_cli.text.stream import TextStream

MODES = ("continuous", "static", "single")
# A step's decode rows, guesses included, past which no request guesses: a forward of up to 8 rows of one
# sequence costs 1.0-1.7 decode steps on a 104M F32 model (AVX2, 2 threads), 16 rows 2-3.
SPECULATE_ROWS = 8
MAX_SPECULATE = 16  # guesses per request and step (gen serve --prompt-lookup)


class QueueFull(GenError):
    """The waiting queue is full: try again later (a server answers 429)."""

    exit_code = 3


@dataclass
class Event:
    """What one step did for a request: a new token and the text it completed, or the end (`finish` set:
    stop, length or cancelled)."""

    token: int | None = None
    text: str = ""
    finish: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, how many tokens at most, sampling, seed, stop ids and strings."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    emit: Callable[[Event], None] | None = None  # called from the stepping thread; default: kept in `events`
    number: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    events: list[Event] = field(default_factory=list)
    cancelled: bool = False
    submitted_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the pool's prefix index, not prefilled


@dataclass(eq=False)
class _Running:
    request: Request
    row: Row
    reserved: int
    stream: TextStream | None
    logits: torch.Tensor | None = None  # (V,) after the prompt's last chunk, until its first token is picked
    proposer: NgramProposer | None = None  # prompt lookup, when the scheduler speculates


class Scheduler:
    """Runs many requests on one model: continuous batching under a batch size, a KV byte budget and a
    bounded queue. `step` is called by one thread; `submit` and `cancel` from any."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        spec: CacheSpec = CacheSpec(),
        max_batch: int = 8,
        kv_budget: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        mode: str = "continuous",
        static_wait_s: float = 0.05,
        by_row: bool = False,
        kv_blocks: int | None = None,
        block_tokens: int = BLOCK_TOKENS,
        prefix_cache: bool = True,
        speculate: int = 0,
    ) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown scheduling mode {mode!r}; choose {', '.join(MODES)}", params=("mode",))
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}", params=(name,))
        if not 0 <= speculate <= MAX_SPECULATE:
            raise UsageError(f"speculate takes 0 to {MAX_SPECULATE} guesses, got {speculate}", params=("speculate",))
        if speculate and spec.window is not None:
            raise UsageError(
                "speculation rolls rejected guesses back out of the cache, which a window cache cannot do",
                params=("speculate", "window"),
            )
        spec.check(model.config)
        if kv_blocks is not None and spec.window is not None:
            raise UsageError("a paged KV cache keeps every token: it takes no window", params=("kv_blocks", "window"))
        self.model, self.tokenizer, self.spec, self.mode = model, tokenizer, spec, mode
        self.max_batch = 1 if mode == "single" else max_batch
        self.kv_budget, self.max_queue, self.prefill_chunk = kv_budget, max_queue, prefill_chunk
        self.static_wait_s, self.by_row = static_wait_s, by_row  # by_row: see infer.batch.batched_step
        self.device = model.norm.weight.device
        self._bpe = torch.empty((), dtype=model_dtype(model)).element_size()
        self._waiting: deque[Request] = deque()
        self._running: list[_Running] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._numbers = itertools.count(1)
        self.reserved = 0  # KV bytes the running requests' caches hold
        self.pool: BlockPool | None = None  # the paged cache every request's sequence lives in
        if kv_blocks is not None:
            from gen_cli.memory import check_fits

            k_kind, v_kind = spec.kinds
            dtype = model_dtype(model)
            check_fits(
                spec.nbytes(model.config, kv_blocks * block_tokens, 1, self._bpe),
                f"a paged KV cache of {kv_blocks:,} blocks of {block_tokens} tokens",
                "use fewer KV blocks",
                self.device,
                params=("kv_blocks",),
            )
            self.pool = BlockPool(model.config, kv_blocks, block_tokens, dtype, self.device, k_kind, v_kind)
        self.prefix_cache = prefix_cache
        self.speculate = speculate
        self.steps = 0
        self.proposed = self.accepted = 0  # guesses made and kept, over the scheduler's life

    def kv_bytes(self, request: Request) -> int:
        """The KV bytes a request's cache takes: prompt plus max_tokens slots, as the spec stores them."""
        return self.spec.nbytes(self.model.config, len(request.ids) + request.max_tokens, 1, self._bpe)

    def submit(self, request: Request) -> Request:
        """Queue a request (checked: lengths, budget); QueueFull when the queue is full."""
        if request.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {request.max_tokens}", params=("max_tokens",))
        check_lengths(self.model.config, len(request.ids), request.max_tokens, self.spec)
        need = self.kv_bytes(request)
        if self.pool is not None and blocks_for(len(request.ids) + request.max_tokens, self.pool.block_tokens) > (
            self.pool.n_blocks
        ):
            raise UsageError(
                f"the request needs more KV blocks than the server's pool of {self.pool.n_blocks} holds; "
                "ask for fewer max_tokens or a shorter prompt",
                params=("max_tokens",),
            )
        if self.kv_budget is not None and need > self.kv_budget:
            raise UsageError(
                f"the request's KV cache needs {need:,} bytes, more than the server's budget of {self.kv_budget:,}; "
                "ask for fewer max_tokens or a shorter prompt",
                params=("max_tokens",),
            )
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again shortly")
            request.number, request.submitted_s = next(self._numbers), time.perf_counter()
            self._waiting.append(request)
            self._wake.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: a waiting one leaves the queue now; a running one's cache is freed before the next step."""
        with self._wake:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._finish_event(request, "cancelled")
            self._wake.notify_all()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_in_use(self) -> int:
        """KV bytes the running requests hold now: the pool's blocks in use (shared ones once), else their caches."""
        return self.pool.bytes_in_use if self.pool is not None else self.reserved

    def idle(self) -> bool:
        return not self._running and not self._waiting

    def wait_for_work(self, timeout: float) -> None:
        """Block until a request arrives (or `timeout` seconds pass) when there is nothing to do."""
        with self._wake:
            if not self._running and not self._waiting:
                self._wake.wait(timeout)

    def step(self) -> None:
        """One scheduling step: drop cancelled rows, admit, decode every running row once, prefill a chunk."""
        for run in [r for r in self._running if r.request.cancelled]:
            self._leave(run, "cancelled")
        self._admit()
        decoding = [r for r in self._running if not r.row.pending and r.logits is None]
        if not self._native_step(decoding):
            if decoding:
                tokens, caches = [r.row.ids[-1] for r in decoding], [r.row.cache for r in decoding]
                logits = batched_step(self.model, tokens, caches, self.by_row)
                self._take(decoding, logits)
            budget = self.prefill_chunk
            for run in [r for r in self._running if r.row.pending]:
                if budget == 0:
                    break
                chunk, run.row.pending = run.row.pending[:budget], run.row.pending[budget:]
                budget -= len(chunk)
                run.logits = prefill_chunk(self.model, chunk, run.row.cache)
        ready = [r for r in self._running if not r.row.pending and r.logits is not None]
        if ready:
            logits = torch.stack([r.logits for r in ready])  # (n, V)
            for r in ready:
                r.logits = None
            self._take(ready, logits)
        self.steps += 1

    def _native_step(self, decoding: list[_Running]) -> bool:
        """Prompts and decode in one C call (chunked prefill): the next tokens of waiting prompts, at most
        `prefill_chunk` and MAX_BATCH rows in all, as rows of their own caches, beside one row per decoding
        request; the weights are read once for all. The LM head runs only where its logits are used: each
        prompt's last token and the decode rows. False (nothing run) when no prompt waits or gen's C step does
        not take these caches (or `by_row` runs each request through the single-sequence step)."""
        if self.by_row:
            return False
        guesses = self._guesses(decoding)
        own = [[r.row.ids[-1], *guesses.get(r, [])] for r in decoding]  # each decoding request's rows
        room = min(self.prefill_chunk, MAX_BATCH - sum(map(len, own)))
        chunks: list[tuple[_Running, int]] = []  # (request, prompt tokens it feeds this step)
        for run in self._running:
            if run.row.pending and room > 0:
                chunks.append((run, min(room, len(run.row.pending))))
                room -= chunks[-1][1]
        if not chunks and not guesses:
            return False
        inner: list[tuple[_Running, int]] = []  # (request, token) rows whose logits nobody reads
        last: list[tuple[_Running, int]] = []  # each prompt's final token: its first pick's logits
        for run, take in chunks:
            fed = run.row.pending[:take]
            ends = take == len(run.row.pending)
            inner += [(run, t) for t in (fed[:-1] if ends else fed)]
            last += [(run, fed[-1])] if ends else []
        rows = inner + last + [(r, t) for r, ts in zip(decoding, own, strict=True) for t in ts]  # in cache order
        caches = [run.row.cache for run, _ in rows]
        native = native_rows(self.model, caches)
        if native is None:
            return False
        logits = native.rows([t for _, t in rows], caches, logits_from=len(inner))  # (last + decoding, V)
        for run, take in chunks:
            run.row.pending = run.row.pending[take:]
        for (run, _), row_logits in zip(last, logits, strict=False):
            run.logits = row_logits
        if decoding:
            self._take_verified(decoding, guesses, logits[len(last) :])
        return True

    def _guesses(self, decoding: list[_Running]) -> dict[_Running, list[int]]:
        """Each decoding request's prompt-lookup guesses this step (none found: absent), while the step's decode
        rows stay within SPECULATE_ROWS and the guesses within the request's max_tokens."""
        k = min(self.speculate, SPECULATE_ROWS // max(len(decoding), 1) - 1)
        out: dict[_Running, list[int]] = {}
        for run in decoding if k > 0 else []:
            room = run.request.max_tokens - len(run.request.tokens) - 1  # the step adds one token beside them
            if run.proposer is not None and room > 0:
                found, _ = run.proposer.propose(run.row.ids, min(k, room), run.row.sampling, run.row.generator)
                if found:
                    out[run] = found
        return out

    def _take_verified(self, runs: list[_Running], guesses: dict[_Running, list[int]], logits: torch.Tensor) -> None:
        """The tokens of a step whose decode rows may hold guesses: logits (rows, V), each request's row for its
        last id, then one per guess. A request's kept guesses and the token after them are handed out one by
        one, and its cache rolled back past the first rejected guess."""
        plain: list[tuple[_Running, torch.Tensor]] = []
        at = 0
        for run in runs:
            guessed = guesses.get(run, [])
            rows, at = logits[at : at + 1 + len(guessed)], at + 1 + len(guessed)  # (1 + guesses, V)
            if not guessed:
                plain.append((run, rows[0]))
                continue
            row = run.row
            kept, correction = verify_guesses(rows, row.ids, guessed, None, row.sampling, row.generator)
            # The cache holds ids[:-1], the last id and every guess; keep up to the last kept guess.
            row.cache.truncate(len(row.ids) + len(kept))
            self.proposed, self.accepted = self.proposed + len(guessed), self.accepted + len(kept)
            for token in (*kept, correction):
                if self._take_one(run, token):
                    break
        if plain:
            self._take([r for r, _ in plain], torch.stack([x for _, x in plain]))

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step until no request runs or waits (tests, benches)."""
        for _ in range(max_steps):
            if self.idle():
                return
            self.step()

    def abort(self, finish: str = "error") -> None:
        """End every running request with `finish` (a step failed), freeing their caches; waiting ones stay."""
        for run in list(self._running):
            self._leave(run, finish)

    def _admit(self) -> None:
        with self._wake:
            if self.mode == "static" and self._running:
                return  # the batch runs to its longest request before the next one starts
            short = self.mode == "static" and self._waiting and len(self._waiting) < self.max_batch
            if short and time.perf_counter() - self._waiting[0].submitted_s < self.static_wait_s:
                return  # wait a moment for a full batch
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting[0]
                need = self.kv_bytes(request)
                if self.kv_budget is not None and self.reserved + need > self.kv_budget:
                    return  # waits until running requests free their caches
                seq = None
                if self.pool is not None:
                    shared = request.ids if self.prefix_cache else []
                    seq = self.pool.admit(shared, len(request.ids) + request.max_tokens)
                    if seq is None:
                        return  # waits until running requests give blocks back
                self._waiting.popleft()
                self.reserved += need
                self._running.append(self._start(request, need, seq))

    def _start(self, request: Request, need: int, seq: PagedSequence | None = None) -> _Running:
        prompt = torch.tensor([request.ids], dtype=torch.long, device=self.device)  # (1, T)
        cache = seq if seq is not None else new_cache(self.model, prompt, request.max_tokens, 1, self.spec)
        generator = None
        if not request.sampling.greedy:
            seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        skip = seq.shared_tokens if seq is not None else 0  # a shared prefix's blocks hold its K/V already
        request.cached_tokens = skip
        row = Row(cache, list(request.ids), request.sampling, generator, pending=list(request.ids[skip:]))
        stream = None
        if self.tokenizer is not None:
            context = (request.ids[-1],)
            stream = TextStream(self.tokenizer, request.stop, stop_ids=request.stop_ids, context=context)
        proposer = None
        if self.speculate:
            proposer = NgramProposer()
            proposer.start(request.ids, len(request.ids) + request.max_tokens)
        return _Running(request, row, need, stream, proposer=proposer)

    def _take(self, runs: list[_Running], logits: torch.Tensor) -> None:
        """Pick each row's next token, hand it out, and end the rows that are done."""
        for run, token in zip(runs, pick(logits, [r.row for r in runs]), strict=True):
            self._take_one(run, token)

    def _take_one(self, run: _Running, token: int) -> bool:
        """Hand out one picked token; True when the request ended with it."""
        request = run.request
        run.row.ids.append(token)
        request.tokens.append(token)
        self._index(run)
        finish = None
        if token in request.stop_ids:
            finish = "stop"
        text = ""
        if run.stream is not None:
            run.stream.push(token)
            finish = "stop" if run.stream.done else finish
            text = run.stream.take()
        if finish is None and len(request.tokens) >= request.max_tokens:
            finish = "length"
        request.text += text
        self._emit(request, Event(token, text))
        if finish is not None:
            self._leave(run, finish)
        return finish is not None

    def _index(self, run: _Running) -> None:
        """Index a paged request's blocks that are now full (its prompt's after prefill, then one each
        `block_tokens` decode steps), so that a later prompt starting with them shares them, also after this
        request has ended. Its cache holds every id but the last (picked, not yet fed back)."""
        cache = run.row.cache
        if self.prefix_cache and isinstance(cache, PagedSequence):
            cache.commit(run.row.ids)

    def _leave(self, run: _Running, finish: str) -> None:
        self._running.remove(run)
        self.reserved -= run.reserved
        if isinstance(run.row.cache, PagedSequence):
            run.row.cache.free()  # its blocks back to the pool now (shared ones once nobody holds them)
        run.row.cache = None  # type: ignore[assignment]  # the cache's memory goes with the last reference
        if run.stream is not None and finish in ("stop", "length"):
            rest = run.stream.take(final=True)
            if rest:
                run.request.text += rest
                self._emit(run.request, Event(None, rest))
        self._finish_event(run.request, finish)

    def _finish_event(self, request: Request, finish: str) -> None:
        request.finish = finish
        self._emit(request, Event(finish=finish))

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        if request.emit is not None:
            request.emit(event)
        else:
            request.events.append(event)
