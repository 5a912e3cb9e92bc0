"""A GGUF file laid out for the C step with numpy alone: the way from a file to logits that never imports torch.

Every `gen generate` is a fresh process, and `import torch` was 1.0–1.2 s of a 1.8 s answer on a 135M file, though
the C step ran every forward of it. `FileModel.open` does what the PyTorch loader and `NativeDecoder.attach`
do together, in numpy:
- it checks the header and the stored bytes (NaN/Inf in block scales and floats, as `load_gguf` does);
- it writes each matrix a step streams once into one arena on 2 MB pages: q/k/v and gate/up fused, llama's Q/K rows
  un-permuted, F16 as fp32, Q4_0/Q4_1/Q4_K/Q8_0 in the kernel's interleaved layout where it has one (repack.py), the
  file's pages given back as each is copied;
- it points abi.h's structs there and at the file's map (norms).
`forward` runs consecutive tokens of its one sequence over an fp32 KV cache: a prompt in chunks of PROMPT_ROWS rows
(`gen_prompt_rows`: causal, attention in the prompt kernel's tiles), then one token a step (`gen_decode_step`, the
call the PyTorch path makes through `NativeDecoder`).

What it does not lay out (BF16 or re-quantized matrices, biases, RoPE scaling other than Llama 3's factors, a
sliding window, a machine without the kernel) `refusal` names, and the caller takes the PyTorch path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gen_cli.errors import GenError
from gen_cli.formats.gguf_blocks import Held
from gen_cli.formats.gguf_file import PERMUTED_QK, check_tensors, gguf_config, holdings, refuse_non_finite
from gen_cli.formats.gguf_reader import GGUFFile
from gen_cli.formats.schema import all_finite
from gen_cli.model.config import ModelConfig
from gen_cli.native.abi import (
    ACT_DEFAULT,
    ACT_MODES,
    KV_KINDS,
    MATRIX_TYPES,
    PROMPT_HEAD_MAX,
    Layer,
    Matrix,
    Model,
    Norm,
    scratch_shapes,
    unsupported_properties,
)
from gen_cli.native.build import library, native_status
from gen_cli.native.repack import repack_rows, repack_wanted
from gen_cli.native.threads import ThreadGovernor
from gen_cli.pages import PageReleaser, huge_page_region
from gen_cli.quant.formats import BLOCK_TYPES

Plan = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]  # gen name → (shape, the GGUF tensors it is made of)
# A prompt's rows per call. Each call streams every matrix once, so fewer calls read the weights fewer times. A
# 512-token prompt, 2 threads, against 64 rows: 256 ran 1.05-1.2x on a 1B-shaped Q4_K_M file and 1.07-1.18x on
# Q5_K_M (128: 0.85-1.1x); on the 135M F32 file 0.97-1.05x (128: 1.01-1.05x).
PROMPT_ROWS = 256


def refusal(config: ModelConfig, helds: list[Held]) -> str | None:
    """Why this file cannot run without torch (None: it can), from the header alone."""
    if (status := native_status()) != "ready":
        return status
    if found := unsupported_properties(config):
        return f"the native kernel does not implement {', '.join(found)}"
    if config.pos_encoding != "rope" or config.sliding_window is not None:
        return "the torch-free path runs RoPE models without a sliding window"
    if config.rope_scaling is not None and config.rope_scaling["type"] != "freq_factors":
        return f"the torch-free path does not scale RoPE by {config.rope_scaling['type']}"
    if config.head_dim > PROMPT_HEAD_MAX:
        return f"the torch-free path's prompt kernel takes heads up to {PROMPT_HEAD_MAX}, not {config.head_dim}"
    for held in helds:
        if held.blocks and held.converted:
            return f"{held.gen_name} is re-quantized at load (a GGUF type without a kernel)"
        if not held.blocks and (other := set(held.file_types) - {"F32", "F16"}):
            return f"{held.gen_name} is stored {other.pop()}; the torch-free path reads F32, F16 and block weights"
    return None


class _Arena:
    """One region on 2 MB pages (pages.huge_page_region) that the streamed matrices are written into once."""

    def __init__(self, nbytes: int) -> None:
        huge = huge_page_region(nbytes)
        self._raw = np.empty(nbytes, np.uint8) if huge is None else np.frombuffer(huge[0], np.uint8)[huge[1] :]
        self._at = 0

    def take(self, nbytes: int) -> np.ndarray:
        """The next nbytes (uint8), each slot on a cache line."""
        out = self._raw[self._at : self._at + nbytes]
        self._at += -(-nbytes // 64) * 64
        return out


@dataclass(frozen=True)
class _Part:
    """One GGUF tensor of a matrix: its rows, and the heads whose rows llama.cpp permuted (0: none)."""

    name: str
    rows: int
    heads: int = 0


@dataclass(frozen=True)
class _Run:
    """Parts held in one type, joined row after row into one Matrix (a fused q/k/v in one type is one run)."""

    parts: tuple[_Part, ...]
    qtype: str | None  # None: fp32
    cols: int
    packed: bool  # written in the interleaved layout

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def row_bytes(self) -> int:
        t = BLOCK_TYPES.get(self.qtype or "")
        return self.cols // t.elems * t.nbytes if t else 4 * self.cols

    @property
    def nbytes(self) -> int:
        return -(-self.rows * self.row_bytes // 64) * 64


class FileModel:
    """A GGUF model the C step runs from numpy buffers: `open` it, `start` a sequence, `forward` its tokens."""

    def __init__(
        self, f: GGUFFile, config: ModelConfig, arch: str, plan: Plan, helds: list[Held], threads: int, act: str
    ) -> None:
        self.file, self.config, self.arch, self._plan = f, config, arch, plan
        self.helds = {h.gen_name: h for h in helds}
        self.lib = library()
        self.threads, self.requested = ThreadGovernor(), threads
        self._lay_out(act)
        self.pos, self.max_tokens = 0, 0

    @classmethod
    def open(cls, path: Path, threads: int, act: str | None = None) -> FileModel | str:
        """The file laid out for the C step, or why it cannot be (then nothing large was allocated)."""
        f = GGUFFile(path)
        config, arch = gguf_config(f)
        plan = check_tensors(f, config, arch)
        helds = holdings(f, config, arch)
        return refusal(config, helds) or cls(f, config, arch, plan, helds, threads, act or ACT_DEFAULT)

    # ---- the layout --------------------------------------------------------------------------------------

    def _parts(self, gen_name: str) -> list[tuple[_Part, str | None]]:
        """The GGUF tensors of one gen tensor, each with the block type it is held in (None: F32)."""
        held, names = self.helds[gen_name], self._plan[gen_name][1]
        out = []
        for i, name in enumerate(names):
            permuted = self.arch in PERMUTED_QK and (".attn_q." in name or ".attn_k." in name)
            heads = (self.config.n_head if ".attn_q." in name else self.config.n_kv_head) if permuted else 0
            out.append((_Part(name, self.file.shape(name)[0], heads), held.qtypes[i] if held.blocks else None))
        return out

    def _runs(self, gen_names: list[str], act: str, packable: bool = True) -> list[_Run]:
        """Consecutive parts of one type as runs; runs interleaved where this machine's kernel has the layout (for
        `act` activations)."""
        parts = [p for name in gen_names for p in self._parts(name)]
        cols = self._plan[gen_names[0]][0][1]
        runs: list[list[tuple[_Part, str | None]]] = []
        for part in parts:
            if runs and runs[-1][0][1] == part[1]:
                runs[-1].append(part)
            else:
                runs.append([part])
        out = []
        for run in runs:
            qtype = run[0][1]
            packed = packable and qtype is not None and all(repack_wanted(qtype, p.rows, act) for p, _ in run)
            out.append(_Run(tuple(p for p, _ in run), qtype, cols, packed))
        return out

    def _matrices(self, act: str) -> dict[str, list[_Run]]:
        """Every streamed matrix by the Layer / Model field it fills."""
        c, out = self.config, {}
        for i in range(c.n_layer):
            at = f"layers.{i}."
            out[at + "wqkv"] = self._runs([at + "attn.wqkv.weight"], act)
            out[at + "wo"] = self._runs([at + "attn.wo.weight"], act)
            out[at + "w13"] = self._runs([at + "mlp.w1.weight", at + "mlp.w3.weight"], act)
            out[at + "w2"] = self._runs([at + "mlp.w2.weight"], act)
        out["tok_emb"] = self._runs(["tok_emb.weight"], act, packable=False)  # read a row per token: as stored
        head = self._runs(["tok_emb.weight" if c.tie_embeddings else "lm_head.weight"], act)
        out["lm_head"] = [] if c.tie_embeddings and not head[0].packed else head  # [] : the embedding itself
        return out

    def _write(self, run: _Run, arena: _Arena) -> Matrix:
        """The run's parts checked, un-permuted where stored so, joined and (where wanted) repacked into the arena."""
        dst = arena.take(run.nbytes)
        at = 0
        for part in run.parts:
            src = stored = self.file.view(part.name)
            if run.qtype is None:
                self._check_floats(part.name, src)
            else:
                refuse_non_finite(self.file, part.name, src, run.qtype)
            src = src.reshape(part.rows, -1)  # (rows, row bytes) or (rows, cols)
            if src.dtype == np.float16:  # run in fp32, as the PyTorch loader does on the CPU: converted once
                src = src.astype(np.float32)
            if part.heads:  # stored (heads, half, 2, …) → gen's (heads, 2, half, …): rotate-half's pairs
                src = src.reshape(part.heads, part.rows // part.heads // 2, 2, -1).transpose(0, 2, 1, 3)
                src = np.ascontiguousarray(src).reshape(part.rows, -1)
            size = part.rows * run.row_bytes
            if run.packed and run.qtype is not None:
                src = np.ascontiguousarray(src)
                repack_rows(src.ctypes.data, dst.ctypes.data + at, run.qtype, part.rows, run.row_bytes, self.requested)
            else:
                dst[at : at + size] = src.view(np.uint8).reshape(-1)
            # Read once: unmapped from this process (the page cache keeps them), so RSS holds the file once.
            self._pages.release_range(stored.ctypes.data, stored.nbytes, keep_cached=True)
            at += size
        kind = "fp32" if run.qtype is None else run.qtype + ("x16" if run.packed else "")
        return Matrix(dst.ctypes.data, None, run.rows, run.cols, MATRIX_TYPES[kind])

    def _check_floats(self, name: str, data: np.ndarray) -> None:
        if not all_finite(data):
            raise GenError(f"{self.file.path}: tensor {name} holds NaN or infinite values")

    def _norm(self, gen_name: str) -> Norm:
        (name,) = self._plan[gen_name][1]
        data = self.file.view(name)
        self._check_floats(name, data)
        return Norm(data.ctypes.data, None)

    def _lay_out(self, act: str) -> None:
        c = self.config
        matrices = self._matrices(act)
        self._arena = _Arena(sum(r.nbytes for runs in matrices.values() for r in runs))  # what the structs point into
        self._pages = PageReleaser()  # after the file is mapped: it finds the file's ranges in /proc/self/maps
        placed = {field: [self._write(r, self._arena) for r in runs] for field, runs in matrices.items()}
        self.layers = (Layer * c.n_layer)()
        for i in range(c.n_layer):
            at = f"layers.{i}."
            qkv, w13 = placed[at + "wqkv"], placed[at + "w13"]
            rest = (Matrix * 2)(*qkv[1:], *[Matrix()] * (3 - len(qkv)))
            self.layers[i] = Layer(
                self._norm(at + "attn_norm.weight"), self._norm(at + "mlp_norm.weight"), qkv[0],
                placed[at + "wo"][0], w13[0], placed[at + "w2"][0], wqkv_rest=rest,
                w13_rest=w13[1] if len(w13) > 1 else Matrix(),
            )  # fmt: skip
            self.layers[i].k_kind = self.layers[i].v_kind = KV_KINDS["float"]
        emb = placed["tok_emb"][0]
        self.struct = Model(
            n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim, d_model=c.d_model,
            d_ff=c.d_ff, vocab=c.vocab_size, bf16=0, norm_eps=c.norm_eps, tok_emb=emb.data,
            emb_type=emb.type, layers=self.layers, final_norm=self._norm("norm.weight"),
            lm_head=(placed["lm_head"] or [emb])[0], act=ACT_MODES[act],
        )  # fmt: skip
        self._ref = ctypes.byref(self.struct)

    # ---- a sequence ---------------------------------------------------------------------------------------

    def start(self, max_tokens: int) -> None:
        """An empty fp32 KV cache for up to max_tokens positions, the RoPE tables and scratch for them."""
        c, s = self.config, self.struct
        if not 1 <= max_tokens <= c.context_length:
            raise GenError(f"{max_tokens} positions do not fit the model's context length of {c.context_length}")
        shape = (1, c.n_kv_head, max_tokens, c.head_dim)  # (batch, n_kv_head, max_tokens, head_dim), as abi.h's
        self._kv = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.n_layer)]
        for layer, (k, v) in zip(self.layers, self._kv, strict=True):
            layer.k_cache, layer.v_cache = k.ctypes.data, v.ctypes.data
        self._cos, self._sin = rope_tables(max_tokens, c)
        s.rope_cos, s.rope_sin = self._cos.ctypes.data, self._sin.ctypes.data
        self._scratch = {}
        # one row attends on its own (a decode step); a prompt's rows take the tiles, which need no scores
        for name, (dims, dtype) in scratch_shapes(c, min(PROMPT_ROWS, max_tokens), max_tokens, scored=1).items():
            self._scratch[name] = np.empty(dims, dtype)
            setattr(s, name, self._scratch[name].ctypes.data)
        s.max_tokens, s.slots, s.n_slots, s.block_table = max_tokens, None, 0, None
        self.pos, self.max_tokens = 0, max_tokens

    @property
    def kv_nbytes(self) -> int:
        """Bytes the started sequence's K and V arrays hold (measured, beside the config's formula)."""
        return sum(k.nbytes + v.nbytes for k, v in self._kv)

    def forward(self, ids: list[int], last: int | None = None) -> np.ndarray:
        """Logits of consecutive tokens from the sequence's position on (≤ PROMPT_ROWS at once): (len(ids), vocab),
        or of the `last` rows only (0: none; a prompt's chunks need the final row's, and the head is the largest
        matrix)."""
        n = len(ids)
        if not 1 <= n <= PROMPT_ROWS or self.pos + n > self.max_tokens:
            raise GenError(f"{n} tokens at position {self.pos} do not fit the cache of {self.max_tokens}")
        s = self.struct
        tokens = np.asarray(ids, np.int64)
        kept = n if last is None else min(last, n)
        logits = np.empty((kept, self.config.vocab_size), np.float32)  # (rows kept, V)
        s.batch, s.n_threads, s.logits_from = n, self.threads.threads(self.requested), n - kept
        if n == 1:
            self.lib.gen_decode_step(self._ref, tokens.ctypes.data, 1, self.pos, logits.ctypes.data)
        else:
            pos = np.arange(self.pos, self.pos + n, dtype=np.int64)
            slot = np.zeros(n, np.int64)  # every row in the one sequence's cache
            # a prompt's rows (the one sequence's next tokens): attention in the prompt kernel's tiles
            self.lib.gen_prompt_rows(self._ref, tokens.ctypes.data, 1, pos.ctypes.data, slot.ctypes.data,
                                     logits.ctypes.data)  # fmt: skip
        self.pos += n
        return logits

    def prefill(self, ids: list[int]) -> np.ndarray:
        """The prompt through the model in chunks of PROMPT_ROWS rows: the last position's logits (vocab,)."""
        for at in range(0, len(ids), PROMPT_ROWS):
            chunk = ids[at : at + PROMPT_ROWS]
            logits = self.forward(chunk, last=1 if at + PROMPT_ROWS >= len(ids) else 0)
        return logits[-1]


def rope_tables(length: int, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin (length, head_dim) as positions.rope_tables makes them (float64, then float32), for no
    scaling or Llama 3's per-frequency factors."""
    hd = config.head_dim
    inv = config.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (head_dim/2,)
    if config.rope_scaling is not None:  # freq_factors (`refusal` lets no other kind through)
        inv = inv / np.asarray(config.rope_scaling["factors"], np.float64)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv  # (length, head_dim/2)
    sin = np.sin(angles)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
    return cos.astype(np.float32), np.concatenate([-sin, sin], axis=-1).astype(np.float32)
