"""The native decode step: `decode.c`, compiled for this machine and called through ctypes.

`NativeDecoder.attach(model)` (done by `optimize_for_decode`) moves the streamed weights into 2 MB
pages, in place, and points the C structs at the model's own tensors; `decode_step` then routes
single-token CPU steps of an fp32 (or int8-weight) or bf16 model here. `NativeDecoder.rows` steps rows
of several batch-1 caches at once, each row at its own position (a ragged batch), or several consecutive
tokens of one cache (a causal multi-token forward: a speculative verify). Long prompts, the no-cache oracle
and every other device stay in PyTorch.

The library comes from `build` (compiled for this machine, or a reason it is unavailable); the
structs it reads are mirrored and checked in `abi`.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gen_cli.cache.kinds import kind_of
from gen_cli.cache.linear import KVCache
from gen_cli.cache.paged import BlockPool, PagedSequence, blocks_for
from gen_cli.cache.spec import CacheSpec
from gen_cli.errors import InternalError
from gen_cli.model.transformer import Transformer, check_context
from gen_cli.native.abi import (
    ACT_MODES,
    KV_KINDS,
    MATRIX_TYPES,
    MAX_BATCH,
    PROFILE_KEYS,
    KVSlot,
    Layer,
    Matrix,
    Model,
    Norm,
    scratch_shapes,
    unsupported_properties,
)
from gen_cli.native.build import library, native_status
from gen_cli.native.threads import ThreadGovernor
from gen_cli.quant.block_linear import BlockEmbedding, BlockLinear
from gen_cli.quant.block_stack import BlockStack
from gen_cli.quant.linear import Int8Linear


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """nbytes (uint8) of anonymous memory starting on a 2 MB boundary, advised to use huge pages."""
    from gen_cli.pages import huge_page_region

    if (huge := huge_page_region(nbytes)) is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    region, skip = huge
    return torch.frombuffer(region, dtype=torch.uint8)[skip : skip + nbytes]  # the tensor keeps the mapping alive


def _move_to_huge_pages(tensors: list[torch.Tensor]) -> None:
    """Re-home the streamed weights in one huge-page arena, in place (module attributes keep working).

    A decode step streams every matrix once; in 4 KB pages the hardware prefetcher stops at each page
    boundary and every page costs a TLB miss. Measured: a 98 MB matrix-vector product streamed 57 -> 65
    GB/s in fp32 with 2 MB pages; whole decode steps gained 8% on the base shape, 4% on small (20
    alternating runs each). A weight used in place from a memory-mapped file gives its pages back once
    copied, so a model opened in place is held once, not twice (peak: the arena plus one matrix). A copy
    made earlier (fused q/k/v, gate/up) is freed once moved, and the heap it leaves is given back at once:
    glibc would keep it resident (135M F32 file: peak 1,378 -> 1,167 MB and held 1,270 -> 793 MB measured).
    """
    from gen_cli.pages import PageReleaser, in_arena, return_free_heap

    tensors = [t for t in tensors if not in_arena(t)]  # a loader wrote these into 2 MB pages already
    pages = PageReleaser()
    sharing: dict[int, list[torch.Tensor]] = {}  # a tied head and the embedding share their memory
    for t in tensors:
        sharing.setdefault(t.data_ptr(), []).append(t)
    offsets, total = [], 0
    for first, *_ in sharing.values():
        offsets.append(total)
        total += -(-first.nbytes // 64) * 64  # each tensor on a cache line
    arena = huge_page_arena(total)
    for group, start in zip(sharing.values(), offsets, strict=True):
        view = arena[start : start + group[0].nbytes].view(group[0].dtype).view(group[0].shape)
        view.copy_(group[0])
        pages.release(group[0])
        for t in group:
            t.data = view
        return_free_heap()


def _streamed(linear: nn.Module) -> list[torch.Tensor]:
    if isinstance(linear, BlockStack):
        return [p.blocks for p in linear.parts]
    if isinstance(linear, (BlockLinear, BlockEmbedding)):
        return [linear.blocks]
    return [linear.qweight, linear.scale] if isinstance(linear, Int8Linear) else [linear.weight]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(linear: nn.Module) -> Matrix:
    linear = linear.parts[0] if isinstance(linear, BlockStack) else linear  # the rest: _rest
    if isinstance(linear, BlockLinear):  # the blocks as held (stored or interleaved): (out, row bytes) uint8
        code = MATRIX_TYPES[linear.native_type]
        return Matrix(_ptr(linear.blocks), None, linear.out_features, linear.in_features, code)
    weight, *scale = _streamed(linear)
    kind = "int8" if scale else "bf16" if weight.dtype == torch.bfloat16 else "fp32"
    return Matrix(_ptr(weight), _ptr(scale[0]) if scale else None, *weight.shape, MATRIX_TYPES[kind])


def _rest(linear: nn.Module, n: int) -> Any:
    """The parts after the first of a matrix held in parts (a BlockStack) as n Matrix slots (rows 0: none)."""
    rest = [_matrix(p) for p in getattr(linear, "parts", [])[1:]]
    rest += [Matrix()] * (n - len(rest))
    return (Matrix * n)(*rest) if n > 1 else rest[0]


def supports(model: Transformer) -> str | None:
    """None if the native step can run this model, else why not."""
    if found := unsupported_properties(model.config):
        return f"the native kernel does not implement {', '.join(found)}"
    params = list(model.parameters()) + list(model.buffers())
    if any(p.device.type != "cpu" for p in params):
        return "the model is not on the CPU"
    # Block-quantized matrices (uint8 blocks) compute with fp32 activations, like int8 ones.
    blocky = [m for m in model.modules() if isinstance(m, (BlockLinear, BlockEmbedding))]
    if unknown := sorted({m.qtype for m in blocky} - set(MATRIX_TYPES)):
        return f"the native kernel does not read {', '.join(unknown)} blocks"
    held = {m.blocks.data_ptr() for m in blocky}
    dtypes = {p.dtype for p in params if not (p.dtype == torch.uint8 and p.data_ptr() in held)}
    if blocky and dtypes - {torch.float32, torch.int8}:
        return "the native kernel runs block-quantized matrices with fp32 activations only"
    if not (dtypes <= {torch.float32, torch.int8} or dtypes == {torch.bfloat16}):
        return "the native kernel runs fp32 models (matrices fp32, int8 or GGML blocks) or all-bf16 ones"
    if any("w13" not in layer.mlp._modules for layer in model.layers):
        return "the MLP is not fused (run optimize_for_decode)"
    stacks = [(layer.attn.wqkv, 3) for layer in model.layers] + [(layer.mlp.w13, 2) for layer in model.layers]
    if any(isinstance(w, BlockStack) and len(w.parts) > most for w, most in stacks):
        return "a fused matrix is held in more parts of different types than the native step takes"
    return None


def unavailable_reason(model: Transformer) -> str | None:
    """Why the native step cannot run `model` here (no compiler, dtype, device…), or None if it can."""
    status = native_status()
    return status if status != "ready" else supports(model)


class NativeDecoder:
    """Runs `decode_step` for one model through the C kernel; holds the structs that point into it."""

    def __init__(self, model: Transformer, lib: ctypes.CDLL) -> None:
        c = model.config
        self.lib, self.config = lib, c
        # An all-bf16 model (KV cache too), else fp32 with fp32, int8 or block matrices (see `supports`).
        self.dtype = model.norm.weight.dtype
        linears = [m for b in model.layers for m in (b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2)] + [model.lm_head]
        (emb,) = _streamed(model.tok_emb)  # a table of floats, or of blocks (one row dequantized per token)
        emb_type = MATRIX_TYPES[model.tok_emb.qtype] if isinstance(model.tok_emb, BlockEmbedding) else 0
        _move_to_huge_pages([t for linear in linears for t in _streamed(linear)] + [emb])
        # The structs hold raw pointers: keep the memory they point into alive with this decoder, even
        # if the model is later moved (`.to()` swaps a parameter's data; a moved model's cache has
        # another dtype or device, so `accepts` sends its steps to PyTorch).
        self._memory = [t.detach() for t in (*model.parameters(), *model.buffers())]

        def fp32(t: torch.Tensor | None) -> int | None:
            """Norm weights and position tables go to the kernel in fp32 (a bf16 copy widens exactly)."""
            if t is not None and t.dtype != torch.float32:
                t = t.float()
                self._memory.append(t)
            return _ptr(t)

        def norm(module: nn.Module) -> Norm:
            return Norm(fp32(module.weight), fp32(getattr(module, "bias", None)))

        self._layers = (Layer * c.n_layer)()
        for i, block in enumerate(model.layers):
            attn, mlp = block.attn, block.mlp
            self._layers[i] = Layer(
                norm(block.attn_norm), norm(block.mlp_norm),
                _matrix(attn.wqkv), _matrix(attn.wo), _matrix(mlp.w13), _matrix(mlp.w2),
                wqkv_rest=_rest(attn.wqkv, 2), w13_rest=_rest(mlp.w13, 1),
            )  # fmt: skip
        pos_table = getattr(model, "sin_table", None)
        if c.pos_encoding == "learned":
            pos_table = model.pos_emb.weight
        self._struct = Model(
            n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim,
            d_model=c.d_model, d_ff=c.d_ff, vocab=c.vocab_size, bf16=self.dtype == torch.bfloat16, norm_eps=c.norm_eps,
            tok_emb=_ptr(emb), emb_type=emb_type, pos_table=fp32(pos_table),
            rope_cos=fp32(getattr(model, "rope_cos", None)), rope_sin=fp32(getattr(model, "rope_sin_signed", None)),
            layers=self._layers, final_norm=norm(model.norm), lm_head=_matrix(model.lm_head),
        )  # fmt: skip
        self._struct_ref = ctypes.byref(self._struct)
        self._bound: tuple[Any, ...] = ()
        self._scratch: dict[str, torch.Tensor] = {}
        self._scratch_cap = (0, 0)  # (rows, positions) the scratch holds for `rows`
        self._slots: ctypes.Array[KVSlot] | None = None
        self._paged_pool: BlockPool | None = None  # the pool the layers point into (None: a linear cache)
        self._table: torch.Tensor | None = None  # int32 (n_slots, max_blocks): the bound block tables
        self._table_key: tuple[Any, ...] = ()
        self._rows_key: tuple[Any, ...] = ()
        self._rows_mode = True  # the struct's stride, kinds and slots are not the plain step's
        self.threads = ThreadGovernor()  # fewer threads while other processes keep cores busy
        self._profile: torch.Tensor | None = None

    @classmethod
    def attach(cls, model: Transformer) -> str | None:
        """Set `model.native_decoder` when the kernel can run this model; else return why not."""
        reason = unavailable_reason(model)
        model.native_decoder = None if reason else cls(model, library())
        return reason

    def accepts(self, batch: int, cache: KVCache) -> bool:
        """Whether a step of `batch` rows into `cache` runs here (else PyTorch runs it)."""
        if isinstance(cache, PagedSequence):  # one sequence of a pool: a one-row `rows` call
            return batch == 1 and self._accepts_pool(cache.pool)
        # Only the linear layout: a ring of un-rotated keys (a window) is not where the kernel looks.
        fits = cache.native_layout and batch <= MAX_BATCH and cache.device.type == "cpu"
        unquantized = cache.k_kind == cache.v_kind == kind_of(cache.dtype)
        return fits and cache.dtype == self.dtype and (unquantized or self._reads_quantized(cache))

    def refusal(self, batch: int, cache: KVCache) -> str:
        """Why a step of `batch` rows into `cache` goes to PyTorch, or "" when it runs here."""
        if self.accepts(batch, cache):
            return ""
        if isinstance(cache, PagedSequence):
            return f"the native step reads a paged cache one row per sequence, not {batch}, of a CPU pool of its dtype"
        if not cache.native_layout:
            return f"the native step reads the linear KV cache layout; this cache is {CacheSpec.of(cache).describe()}"
        if batch > MAX_BATCH:
            return f"the native step takes at most {MAX_BATCH} rows, not {batch}"
        reads = "fp32, bf16, int8 or int4" if self.dtype == torch.float32 else "bf16"
        return f"the native step reads {reads} K/V here; this cache stores K {cache.k_kind}, V {cache.v_kind}"

    def _accepts_pool(self, pool: BlockPool) -> bool:
        """Whether the step reads this pool's blocks: on the CPU, the model's dtype, a kind pair it reads."""
        unquantized = pool.k_kind == pool.v_kind == kind_of(pool.dtype)
        fits = pool.device.type == "cpu" and pool.dtype == self.dtype
        return fits and (unquantized or self._reads_quantized(pool))  # type: ignore[arg-type]

    def _reads_quantized(self, cache: KVCache) -> bool:
        """An fp32 model reads bf16/int8/int4 K and V (either side may stay fp32); a bf16 one only plain bf16."""
        kinds = {"fp32", "bf16", "int8", "int4"}
        return self.dtype == torch.float32 and cache.k_kind in kinds and cache.v_kind in kinds

    def _scratch_for(self, batch: int, tokens: int) -> None:
        """Point the scratch at buffers for `batch` rows attending over up to `tokens` positions each."""
        s = self._struct
        for name, (shape, dtype) in scratch_shapes(self.config, batch, tokens).items():
            self._scratch[name] = torch.empty(shape, dtype=getattr(torch, dtype))
            setattr(s, name, self._scratch[name].data_ptr())
        self._scratch_cap = (batch, tokens)

    def _ensure_scratch(self, batch: int, tokens: int) -> None:
        """Scratch for at least `batch` rows over `tokens` positions; grown only, as batches change size."""
        if self._scratch_cap[0] < batch or self._scratch_cap[1] < tokens:
            self._scratch_for(max(batch, self._scratch_cap[0]), max(tokens, self._scratch_cap[1]))

    def _set_kinds(self, cache: KVCache) -> None:
        """Layer.k_kind/v_kind from this cache (the one kind pair a step reads)."""
        for i in range(self.config.n_layer):
            self._layers[i].k_kind = KV_KINDS.get(cache.k_sides[i].kind, KV_KINDS["float"])
            self._layers[i].v_kind = KV_KINDS.get(cache.v_sides[i].kind, KV_KINDS["float"])

    def _point_layers(self, cache: KVCache | BlockPool) -> None:
        """Point every Layer's K/V fields at `cache`'s tensors (a linear cache, or a pool's blocks)."""
        for i in range(self.config.n_layer):
            layer = self._layers[i]
            for side, sides in (("k", cache.k_sides), ("v", cache.v_sides)):
                # int8: [values, scale]; int4: [packed values, scale, zero]; a float kind: [values]
                values, scale, zero = (*(t.data_ptr() for t in sides[i].tensors), None, None)[:3]
                setattr(layer, f"{side}_cache", values)
                setattr(layer, f"{side}_scale", scale)
                setattr(layer, f"{side}_zero", zero)

    def _bind(self, cache: KVCache, batch: int) -> None:
        """Point the structs at this cache and size the scratch for `batch` rows (only when they change)."""
        # A weak reference: a finished generation's cache is freed, and a new one is bound afresh.
        bound = self._bound and self._bound[0]()
        key = (weakref.ref(cache), batch, torch.get_num_threads())
        s = self._struct
        if not (bound is cache and key[1:] == self._bound[1:]):
            self._point_layers(cache)
            self._bound, self._rows_mode, self._paged_pool = key, True, None  # the fields below are set afresh
        if self._rows_mode:  # `rows` ran since: its slots, stride and kinds give way to this cache's
            self._ensure_scratch(batch, cache.max_tokens)
            self._set_kinds(cache)
            s.max_tokens, s.batch, s.n_threads = cache.max_tokens, batch, torch.get_num_threads()
            s.slots, s.n_slots, s.block_table = None, 0, None
            self._rows_mode = False

    def accepts_rows(self, caches: Sequence[KVCache]) -> bool:
        """Whether `rows` runs a step over these batch-1 caches (at most MAX_BATCH rows, one kind pair)."""
        if not caches or len(caches) > MAX_BATCH:
            return False
        first = caches[0]
        if isinstance(first, PagedSequence):  # sequences of one pool, read through their block tables
            same = all(isinstance(c, PagedSequence) and c.pool is first.pool for c in caches)
            return same and self._accepts_pool(first.pool)
        kinds = (first.k_kind, first.v_kind, first.dtype)
        for cache in caches:
            if getattr(cache, "batch_size", 0) != 1 or (cache.k_kind, cache.v_kind, cache.dtype) != kinds:
                return False
        return all(self.accepts(1, cache) for cache in dict.fromkeys(caches))

    def _bind_rows(self, caches: list[KVCache], batch: int) -> None:
        """Point Model.slots at each distinct cache's memory (rebuilt only when the set changes)."""
        c, s = self.config, self._struct
        key = (tuple(weakref.ref(x) for x in caches), torch.get_num_threads())
        same = self._rows_key and len(key[0]) == len(self._rows_key[0])
        same = same and all(a() is b for a, b in zip(self._rows_key[0], caches, strict=True))
        rebuilt = not (same and key[1] == self._rows_key[1])
        if rebuilt:
            table = (KVSlot * (c.n_layer * len(caches)))()  # (n_layer, n_slots)
            for j, cache in enumerate(caches):
                for i in range(c.n_layer):
                    entry = table[i * len(caches) + j]
                    for side, sides in (("k", cache.k_sides), ("v", cache.v_sides)):
                        values, scale, zero = (*(t.data_ptr() for t in sides[i].tensors), None, None)[:3]
                        setattr(entry, f"{side}_cache", values)
                        setattr(entry, f"{side}_scale", scale)
                        setattr(entry, f"{side}_zero", zero)
                    entry.max_tokens = cache.max_tokens
            self._slots, self._rows_key = table, key
        if rebuilt or not self._rows_mode:
            self._set_kinds(caches[0])  # one kind pair for every slot: the layer says it
        self._ensure_scratch(batch, max(x.max_tokens for x in caches))
        s.slots, s.n_slots, s.block_table = ctypes.addressof(self._slots), len(caches), None
        # The scores' stride: the scratch's, which covers every slot's positions.
        s.max_tokens, s.batch, s.n_threads = self._scratch_cap[1], batch, torch.get_num_threads()
        self._rows_mode = True  # the plain step restores its own fields

    def _bind_paged(self, seqs: list[PagedSequence], batch: int) -> None:
        """Point the layers at the pool's blocks and Model.block_table at each sequence's table."""
        s, pool = self._struct, seqs[0].pool
        if self._paged_pool is not pool:
            self._point_layers(pool)
            self._paged_pool, self._bound = pool, ()  # the plain step re-points the layers at its cache
        self._set_kinds(pool)  # type: ignore[arg-type]
        self._rows_key = ()  # the slots path sets its kinds afresh
        key = tuple(tuple(q.table) for q in seqs)
        if key != self._table_key or self._table is None:
            widest = max(len(q.table) for q in seqs)
            table = torch.zeros(len(seqs), widest, dtype=torch.int32)  # (n_slots, max_blocks)
            for j, q in enumerate(seqs):
                table[j, : len(q.table)] = torch.tensor(q.table, dtype=torch.int32)
            self._table, self._table_key = table, key
        bt = pool.block_tokens
        self._ensure_scratch(batch, max(blocks_for(q.max_tokens, bt) for q in seqs) * bt)
        s.slots, s.n_slots, s.block_table = None, len(seqs), self._table.data_ptr()
        s.block_tokens, s.max_blocks, s.pool_blocks = bt, self._table.shape[1], pool.n_blocks
        s.max_tokens, s.batch, s.n_threads = self._scratch_cap[1], batch, torch.get_num_threads()
        self._rows_mode = True  # the plain step restores its own fields

    def rows(
        self, tokens: Sequence[int] | torch.Tensor, caches: Sequence[KVCache], logits_from: int = 0
    ) -> torch.Tensor:
        """Logits (N - logits_from, V) of rows logits_from.. of N tokens, token i into caches[i] at that cache's
        next free position: a cache named r times takes r consecutive tokens (a causal multi-token forward);
        each cache advances by its count. Rows before `logits_from` skip the LM head (a prompt's inner tokens;
        logits_from = N: no row needs logits)."""
        n = len(caches)
        if len(tokens) != n or not 0 <= logits_from <= n or not self.accepts_rows(caches):
            raise InternalError("NativeDecoder.rows was given rows it does not accept (check accepts_rows)")
        slots: dict[int, int] = {}  # id(cache) -> slot
        distinct: list[KVCache] = []
        count: list[int] = []
        slot, pos = [], []
        for cache in caches:
            j = slots.setdefault(id(cache), len(distinct))
            if j == len(distinct):
                distinct.append(cache)
                count.append(0)
            slot.append(j)
            pos.append(cache.pos + count[j])
            count[j] += 1
        for cache, k in zip(distinct, count, strict=True):
            check_context(self.config, cache.pos, k)
            if cache.pos + k > cache.max_tokens:
                cache.advance(k)  # raises the cache's own "overflow" error
        if isinstance(distinct[0], PagedSequence):
            for cache, k in zip(distinct, count, strict=True):
                cache.reserve(k)  # type: ignore[union-attr]  # blocks for the new positions, copied if shared
            self._bind_paged(distinct, n)  # type: ignore[arg-type]
        else:
            self._bind_rows(distinct, n)
        self._struct.n_threads = self.threads.threads(torch.get_num_threads())
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(n)  # (N,)
        where = torch.tensor([pos, slot], dtype=torch.int64)  # (2, N): positions, slots
        logits = torch.empty(n - logits_from, self.config.vocab_size)  # (N - logits_from, V)
        self._struct.logits_from = logits_from
        self.lib.gen_decode_rows(
            self._struct_ref, ids.data_ptr(), ids.stride(0), where[0].data_ptr(), where[1].data_ptr(), logits.data_ptr()
        )
        for cache, k in zip(distinct, count, strict=True):
            cache.advance(k)
        return logits

    def forward(self, tokens: Sequence[int] | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (T, V) of T consecutive tokens of one batch-1 cache, from its position on (T ≤ MAX_BATCH)."""
        return self.rows(tokens, [cache] * len(tokens))

    def __call__(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token (B, 1) at cache.pos -> fp32 logits (B, vocab); writes this position's k/v, advances the cache."""
        batch = token.shape[0]
        if isinstance(cache, PagedSequence):  # `accepts` took one row of a pool
            return self.rows(token.reshape(batch), [cache])
        check_context(self.config, cache.pos, 1)
        if cache.pos + 1 > cache.max_tokens:
            cache.advance(1)  # raises the cache's own "overflow" error
        self._bind(cache, batch)
        self._struct.n_threads = self.threads.threads(torch.get_num_threads())
        if token.dtype != torch.int64:
            token = token.long()
        logits = torch.empty(batch, self.config.vocab_size)  # (B, vocab)
        self._struct.logits_from = 0
        # Row b's id is at data_ptr + b * stride(0): a column of generate's id buffer needs no copy.
        # (Each PyTorch op here costs tens of µs: the step has just streamed the caches cold.)
        self.lib.gen_decode_step(self._struct_ref, token.data_ptr(), token.stride(0), cache.pos, logits.data_ptr())
        cache.advance(1)
        return logits

    def set_act(self, act: str) -> None:
        """Block weights' products in later steps take `act` activations (abi.py's ACT_MODES)."""
        self._struct.act = ACT_MODES[act]

    def start_profile(self) -> None:
        """Zero the per-op timers and have every following step add its seconds to them."""
        self._profile = torch.zeros(len(PROFILE_KEYS), dtype=torch.float64)
        self._struct.profile = self._profile.data_ptr()

    def stop_profile(self) -> dict[str, float]:
        """Seconds spent per op class (PROFILE_KEYS order) since `start_profile`; steps stop timing."""
        self._struct.profile = None
        times, self._profile = self._profile, None
        if times is None:
            return dict.fromkeys(PROFILE_KEYS, 0.0)
        return dict(zip(PROFILE_KEYS, times.tolist(), strict=True))

    def argmax_into(self, logits: torch.Tensor, out: torch.Tensor) -> bool:
        """out[b] = logits[b].argmax() for fp32 CPU logits (B, V), as torch picks (first of ties, NaN
        wins); out is a (B,) int64 view, e.g. a column of generate's id buffer. False if not done."""
        fits = logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.stride(-1) == 1
        if not fits or out.dtype != torch.int64 or out.device.type != "cpu" or out.shape != logits.shape[:1]:
            return False
        batch, vocab = logits.shape
        self.lib.gen_argmax(logits.data_ptr(), batch, logits.stride(0), vocab, out.data_ptr(), out.stride(0))
        return True
