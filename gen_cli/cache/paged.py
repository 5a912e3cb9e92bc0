"""A paged KV cache: one pool of fixed-size blocks shared by many sequences, each with its own block table.

`BlockPool` holds every layer's K and V in any KV kind as one linear cache row of n_blocks × block_tokens
slots, (1, n_kv_head, n_blocks × block_tokens, head_dim): block b is slots b·block_tokens onwards, so that gen's
C step reads a block as a piece of a cache row, and a KV head's blocks that follow each other in the pool as
one piece.
`PagedSequence` is one sequence's cache over the pool (the interface every cache has: positions, update,
advance), taking blocks as it grows and giving them back when freed. Prefix caching as vLLM does it: a full
block is known by a hash of its tokens and of every token before it, whether a prompt or decode filled it
(`commit`: a chat's next prompt is the last one + its answer + a new turn); a new sequence whose prompt starts
with cached full blocks takes them (refcounted) instead of computing them. The partly filled last block is
never shared, and a shared block is copied before it is written (after a truncate). Freed blocks that carry a
hash stay findable until reused, oldest first, a sequence's last block before its first.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from gen_cli.cache.kinds import KVSide
from gen_cli.cache.linear import KVStorage, allocate_kv
from gen_cli.errors import GenError, InternalError, UsageError
from gen_cli.model.attention import Positions
from gen_cli.model.config import ModelConfig

BLOCK_TOKENS = 16  # vLLM's default: small enough that a sequence wastes little, large enough to read in one piece


class PoolExhausted(GenError):
    """No free KV block is left in the pool."""


def blocks_for(tokens: int, block_tokens: int) -> int:
    """Blocks holding `tokens` tokens."""
    return -(-tokens // block_tokens)


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix hash of a block of `tokens` after the block whose hash is `parent` (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_hashes(ids: Sequence[int], block_tokens: int) -> list[bytes]:
    """The chain hash of each full block of `ids`: block i's hash covers its tokens and every token before."""
    out, parent = [], b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        parent = chain_hash(parent, ids[start : start + block_tokens])
        out.append(parent)
    return out


class BlockPool(KVStorage):
    """`n_blocks` KV blocks of `block_tokens` tokens for every layer, with refcounts and a prefix index."""

    def __init__(
        self,
        config: ModelConfig,
        n_blocks: int,
        block_tokens: int = BLOCK_TOKENS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        k_kind: str | None = None,
        v_kind: str | None = None,
    ) -> None:
        if n_blocks < 1 or block_tokens < 1:
            raise UsageError(f"a paged KV cache needs n_blocks and block_tokens ≥ 1, got {n_blocks}, {block_tokens}")
        self.n_blocks, self.block_tokens = n_blocks, block_tokens
        # One linear cache row holding the blocks in order: (1, n_kv_head, n_blocks × block_tokens, head_dim)
        allocate_kv(self, config, 1, n_blocks * block_tokens, dtype, device, k_kind, v_kind)
        self.refs = [0] * n_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n_blocks))  # refs 0, oldest first
        self._hash_of: dict[int, bytes] = {}  # block -> its prefix hash (full, immutable blocks only)
        self._by_hash: dict[bytes, int] = {}
        self._promised = 0  # blocks admitted sequences may still take (PagedSequence.reserved)
        self.prefix_hits = 0  # blocks taken from the index instead of computed
        self.peak_in_use = 0  # the most blocks held at once since the pool was made

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes one block holds over every layer, K and V, scales and zero points included."""
        return self.nbytes // self.n_blocks

    @property
    def blocks_in_use(self) -> int:
        """Blocks some sequence holds (refcount > 0)."""
        return self.n_blocks - len(self._free)

    @property
    def bytes_in_use(self) -> int:
        """KV bytes the live sequences hold, counted from the pool's own refcounts (shared blocks once)."""
        return self.blocks_in_use * self.block_bytes

    @property
    def available(self) -> int:
        """Blocks free and not promised to an admitted sequence."""
        return len(self._free) - self._promised

    @property
    def cached(self) -> int:
        """Free blocks that still carry a prefix hash (reused by a later sequence with that prefix)."""
        return sum(1 for b in self._free if b in self._hash_of)

    def stats(self) -> dict[str, int]:
        """The pool now (blocks held, cached, bytes held) and its prefix hits so far, for a server or bench."""
        return {"blocks": self.n_blocks, "block_tokens": self.block_tokens, "block_bytes": self.block_bytes,
                "in_use": self.blocks_in_use, "cached": self.cached, "bytes_in_use": self.bytes_in_use,
                "peak_bytes_in_use": self.peak_in_use * self.block_bytes, "prefix_hit_blocks": self.prefix_hits,
                "prefix_hit_tokens": self.prefix_hits * self.block_tokens}  # fmt: skip

    def analytic_bytes(self, tokens: int) -> int:
        """The analytic minimum for `tokens` distinct tokens: bytes per token (every layer, K and V) × tokens."""
        return tokens * self.block_bytes // self.block_tokens

    # ---- blocks -------------------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            del self._free[block]
            self.peak_in_use = max(self.peak_in_use, self.blocks_in_use)
        self.refs[block] += 1

    def allocate(self, after: int | None = None, want: int = 1) -> int:
        """A fresh block (refcount 1), its old prefix hash forgotten: the one right after block `after` (a
        sequence's last) when vacant, else one with room to grow after it, else a cached block (`_evict`; the
        sequence may take `want` blocks in all from now on).

        A sequence whose blocks lie side by side is read as one piece; blocks scattered through the pool read
        about half as fast (memory traffic, not per-block work: docs/kv-cache.md). Blocks that still carry a
        prefix hash count as taken until nothing else is free, so cached prefixes live as long as they can."""
        if not self._free:
            raise PoolExhausted(f"the KV pool's {self.n_blocks} blocks are all in use")
        block = after + 1 if after is not None and after + 1 < self.n_blocks and self._vacant(after + 1) else None
        if block is None:
            block = self._roomiest()
        if block is None:
            block = self._evict(after, want)
        self._forget(block)
        self._take(block)
        return block

    def _evict(self, after: int | None, want: int) -> int:
        """A free block to reuse when every one is cached: among the `want` freed longest ago (the blocks that
        least-recently-used order gives a sequence taking `want`), the one after `after`, else the first of the
        run of them that holds the oldest. About the blocks that order evicts, but side by side: a freed chain's
        last block is its oldest (`free`), so taking them oldest first would lay a growing sequence out
        backwards, one piece per block."""
        oldest = list(itertools.islice(self._free, max(want, 1)))
        if after is not None and after + 1 in oldest:
            return after + 1
        soon, block = set(oldest), oldest[0]
        while block - 1 in soon:
            block -= 1
        return block

    def _vacant(self, block: int) -> bool:
        return self.refs[block] == 0 and block not in self._hash_of

    def _roomiest(self) -> int | None:
        """A vacant block in the longest run of vacant ones: its middle when the block before the run is held
        (that sequence may grow into the first half), else its start; None when no block is vacant."""
        best, best_len, start = None, 0, None
        for b in range(self.n_blocks + 1):
            if b < self.n_blocks and self._vacant(b):
                start = b if start is None else start
                continue
            if start is not None and b - start > best_len:
                best_len = b - start
                best = start + best_len // 2 if start > 0 else start
            start = None
        return best

    def release(self, block: int) -> None:
        """Drop one reference; at 0 the block is free (a hashed one stays findable until reused)."""
        if self.refs[block] <= 0:
            raise InternalError(f"KV block {block} released more often than taken")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free[block] = None  # the newest free block: reused last

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._by_hash[h]

    def register(self, block: int, h: bytes) -> None:
        """Make a full block findable by its prefix hash (kept as is if that prefix is already indexed)."""
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h], self._hash_of[block] = block, h

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest indexed prefix of `hashes` (nothing taken)."""
        found = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # ---- sequences ----------------------------------------------------------------------------------
    def admit(self, ids: Sequence[int], max_tokens: int) -> PagedSequence | None:
        """A sequence for a prompt `ids` growing to `max_tokens` tokens, its cached prefix shared, with every
        block it may need promised; None when the pool cannot promise them now (the caller waits)."""
        total = blocks_for(max_tokens, self.block_tokens)
        if total > self.n_blocks:
            raise UsageError(
                f"a sequence of {max_tokens} tokens needs {total} KV blocks, more than the pool's {self.n_blocks}"
            )
        # Share full blocks before the prompt's last token only: that token's logits are computed anyway.
        hashes = prefix_hashes(ids[: max(len(ids) - 1, 0)], self.block_tokens)
        shared = self.match(hashes)
        revived = sum(1 for b in shared if self.refs[b] == 0)  # cached blocks leave the free list too
        fresh = total - len(shared)
        if fresh + revived > self.available:
            return None
        for block in shared:
            self._take(block)
        self.prefix_hits += len(shared)
        self._promised += fresh
        return PagedSequence(self, max_tokens, shared, hashes[: len(shared)], fresh)

    def sequence(self, max_tokens: int) -> PagedSequence:
        """An empty sequence of up to `max_tokens` tokens, no prefix (PoolExhausted if its blocks are short)."""
        seq = self.admit([], max_tokens)
        if seq is None:
            raise PoolExhausted(
                f"the KV pool has {self.available} blocks free, a {max_tokens}-token sequence needs more"
            )
        return seq


class PagedSequence:
    """One sequence's KV cache in a `BlockPool`: its block table, position and prefix hashes.

    The cache interface of `KVCache` (positions, update, advance, truncate) for a batch of 1; gen's C step
    reads it through the block table (`NativeDecoder.rows`), PyTorch through `update`'s gathered copy."""

    batch_size = 1
    chunk_limit: int | None = None
    window: int | None = None
    sinks = 0
    native_layout = False  # the plain C step reads one linear cache; `rows` reads paged ones

    def __init__(self, pool: BlockPool, max_tokens: int, shared: list[int], hashes: list[bytes], fresh: int) -> None:
        self.pool, self.max_tokens = pool, max_tokens
        self.config, self.k_kind, self.v_kind = pool.config, pool.k_kind, pool.v_kind
        self.table: list[int] = list(shared)
        self.hashes: list[bytes] = list(hashes)  # of table's first blocks, as registered or shared
        self.pos = self.shared_tokens = len(shared) * pool.block_tokens
        self.reserved = fresh  # blocks promised by the pool and not yet taken

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def sequence_limit(self) -> int:
        return self.max_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks this sequence holds (a shared block counts for each holder)."""
        return len(self.table) * self.pool.block_bytes

    def _fresh(self) -> int:
        want = self.reserved  # the blocks this sequence may still take, this one included
        if self.reserved > 0:
            self.reserved -= 1
            self.pool._promised -= 1
        return self.pool.allocate(after=self.table[-1] if self.table else None, want=want)

    def reserve(self, t: int) -> None:
        """Make positions pos…pos+t-1 writable: blocks taken as needed, a shared or indexed one copied first."""
        end = self.pos + t
        if end > self.max_tokens:
            raise InternalError(f"KV cache overflow: position {self.pos} + {t} > capacity {self.max_tokens}")
        bt, pool = self.pool.block_tokens, self.pool
        if t <= 0:
            return
        for i in range(self.pos // bt, blocks_for(end, bt)):
            if i == len(self.table):
                self.table.append(self._fresh())
                continue
            block = self.table[i]
            if pool.refs[block] > 1:  # copy on write: another sequence still reads this block as it is
                copy = pool.allocate(after=self.table[i - 1] if i else None)  # the promise stays for growth
                for side in (*pool.k_sides, *pool.v_sides):
                    for x in side.tensors:  # (1, n_kv_head, slots, ·)
                        x[:, :, copy * bt : (copy + 1) * bt] = x[:, :, block * bt : (block + 1) * bt]
                pool.release(block)
                self.table[i] = copy
            else:
                pool._forget(block)  # its contents change: no longer what its hash says
            del self.hashes[i:]

    def positions(self, T: int, device: torch.device) -> Positions:
        """The next forward's T queries at pos…pos+T-1 over keys 0…pos+T-1 (blocks taken for them here)."""
        self.reserve(T)
        return Positions(self.pos, T)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (1, n_kv_head, T, head_dim) at [pos:pos+T] into the blocks; return [0:pos+T] gathered."""
        t, bt = k_new.shape[2], self.pool.block_tokens
        end = self.pos + t
        if blocks_for(end, bt) > len(self.table):
            raise InternalError("PagedSequence.update before its blocks were reserved (positions/reserve)")
        device = self.pool.device
        blocks = torch.tensor(self.table[: blocks_for(end, bt)], device=device)  # (nb,)
        slots = (blocks[:, None] * bt + torch.arange(bt, device=device)).reshape(-1)[:end]  # (pos+T,) pool slots
        out = []
        for side, new in ((self.pool.k_sides[layer], k_new), (self.pool.v_sides[layer], v_new)):
            at = self.pos
            while at < end:  # the part of the new tokens that falls in each block
                n = min(end - at, bt - at % bt)
                side.write(self.table[at // bt] * bt + at % bt, new[:, :, at - self.pos : at - self.pos + n])
                at += n
            whole = KVSide.__new__(KVSide)
            whole.kind, whole.compute = side.kind, side.compute
            whole.tensors = [x.index_select(2, slots) for x in side.tensors]  # (1, H, pos+T, ·): in sequence order
            out.append(whole.read(end))  # (1, n_kv_head, pos+T, head_dim)
        return out[0], out[1]

    def advance(self, t: int) -> None:
        """Move the write position past `t` tokens (after every layer wrote them)."""
        if self.pos + t > self.max_tokens:
            raise InternalError(f"KV cache overflow: position {self.pos} + {t} > capacity {self.max_tokens}")
        self.pos += t

    def can_truncate(self, pos: int) -> bool:
        return 0 <= pos <= self.pos

    def truncate(self, pos: int) -> None:
        """Roll back to `pos`; blocks past it are given back (kept promised), the rest rewritten copy-on-write."""
        if not 0 <= pos <= self.pos:
            raise InternalError(f"KV cache truncate to {pos}: must be between 0 and the position {self.pos}")
        keep = blocks_for(pos, self.pool.block_tokens)
        for block in reversed(self.table[keep:]):  # the last block freed first is reused first (see `free`)
            self.pool.release(block)
            self.reserved += 1
            self.pool._promised += 1
        del self.table[keep:]
        del self.hashes[keep:]
        self.pos = pos

    def reset(self) -> None:
        self.truncate(0)

    def commit(self, ids: Sequence[int]) -> None:
        """Index the blocks that filled since the last call by the prefix hashes of `ids` (this sequence's
        tokens so far: its prompt's and those decode wrote), so that later sequences starting with them share
        the blocks. O(1) unless a block filled: the scheduler calls it after every decode step.

        Only blocks whose every slot holds K/V of `ids` (below `pos`) are indexed, so a partly filled block
        never is. An indexed block is never written while indexed: `reserve` drops its hash (or copies it,
        when shared) before a write after a `truncate` into it."""
        bt = self.pool.block_tokens
        full, done = min(self.pos, len(ids)) // bt, len(self.hashes)
        if full <= done:
            return
        parent = self.hashes[-1] if done else b""
        for i in range(done, full):  # each hash chained from the last: the hash a prompt of these tokens gets
            parent = chain_hash(parent, ids[i * bt : (i + 1) * bt])
            self.pool.register(self.table[i], parent)
            self.hashes.append(parent)

    def free(self) -> None:
        """Give every block back (and any promised block not taken); the sequence is empty after.

        Last block first: freed blocks are reused oldest first, and a prefix is found block by block from its
        start, so evicting a cached chain from its tail keeps its head (the part most prompts share) longest."""
        for block in reversed(self.table):
            self.pool.release(block)
        self.pool._promised -= self.reserved
        self.table, self.hashes, self.reserved, self.pos = [], [], 0, 0
