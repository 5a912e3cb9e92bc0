"""Token files: a corpus split tokenized once into a compact array that training and evaluation reuse.

Layout: every document is preceded by the `<|endoftext|>` id, so the stream reads
`EOT doc1 EOT doc2 …`. The leading EOT acts as a beginning-of-text marker: every text token then
has something before it and can be predicted, so evaluating the whole stream scores every byte of
the text. The file is raw little-endian uint16 (vocabulary ≤ 65535) or uint32, named by a hash of
everything that determines its contents, and written atomically; a `.sum` file written after it holds
its length and sha256 (and its `.bytes` partner's), checked before the file is reused: a truncated or
changed token file is rebuilt, never read as a corpus.

Imported models have no `<|endoftext|>`: their stream separates documents by an id the caller picks
(BOS or EOS), and a parallel `.bytes` file holds the UTF-8 bytes of text each token covers, since
SentencePiece-style pieces (`▁`, `<0x41>`) are no byte table's business.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gen_cli.atomic import atomic_path, write_text_atomic
from gen_cli.errors import UsageError
from gen_cli.resources import cache_dir
from gen_cli.text.tokenizer import EOT, special_id, token_bytes, tokenizer_digest

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from gen_cli.text.corpus import Corpus

_ENCODE_BATCH = 64
_BYTES_DTYPE = "<u4"


@dataclass(frozen=True)
class TokenFile:
    """A tokenized split on disk; `cached` says whether an earlier run had already written it."""

    path: Path
    dtype: str
    tokens: int
    cached: bool
    bytes_path: Path | None = None  # per-token text bytes, written when the caller chose the separator

    def load(self) -> np.ndarray:
        """The token ids as a read-only memory map (the file is never read whole)."""
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r")

    def load_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text per token (separators 0), parallel to `load()`; needs `bytes_path`."""
        assert self.bytes_path is not None, "token file written without per-token bytes"
        if self.tokens == 0:
            return np.zeros(0, dtype=_BYTES_DTYPE)
        return np.memmap(self.bytes_path, dtype=_BYTES_DTYPE, mode="r")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id: uint16 up to 65535, else uint32."""
    return "<u2" if vocab_size <= 65535 else "<u4"


def corpus_identity(corpus: Corpus) -> list:
    """What determines a corpus's text, cheaply: file path + size + mtime, or a hash of other text.

    Built-in and stdin documents are not files; their text is hashed (a few ms for the built-in
    corpus), which also covers the Python version the built-in text came from.
    """
    ident: list = [sys.version_info[:3]]
    for doc in corpus.documents:
        path = Path(doc.name)
        if path.is_file():
            st = path.stat()
            ident.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        else:
            h = hashlib.sha256()
            for line in doc.lines("all"):
                h.update(line.encode("utf-8"))
            ident.append([doc.name, h.hexdigest()])
    return ident


def token_file_key(tok: Tokenizer, corpus: Corpus, split: str, separator: int | None = None) -> str:
    """The cache key: tokenizer content, inputs' identity, split and layout version (and the separator id)."""
    ident = [1, tokenizer_digest(tok), corpus_identity(corpus), split]
    if separator is not None:  # layout 2: a chosen separator and a .bytes file; gen's layout-1 keys unchanged
        ident = [2, *ident[1:], separator]
    payload = json.dumps(ident)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _document_ids(tok: Tokenizer, corpus: Corpus, split: str, eot: int) -> Iterator[list[int]]:
    """Per document: [EOT, ids…]; documents encoded in batches so the Rust side runs in parallel."""
    texts = iter(corpus.texts(split))  # streamed: only one batch of documents is in memory
    while batch := list(itertools.islice(texts, _ENCODE_BATCH)):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            yield [eot, *enc.ids]


def _document_bytes(tok: Tokenizer, corpus: Corpus, split: str, sep: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Per document: [sep, ids…] and the UTF-8 bytes each covers (sep 0), summing to the text's bytes."""
    texts = iter(corpus.texts(split))
    while batch := list(itertools.islice(texts, _ENCODE_BATCH)):
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            yield [sep, *enc.ids], np.concatenate([[0], covered_bytes(text, enc.offsets)])


def covered_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Bytes of `text` per token from its character offsets: each token gets the bytes between the furthest
    end before it and its own; the last takes the rest, so the sum is exactly the text's UTF-8 length
    (byte-fallback pieces of one character share its span: the first gets its bytes, the rest 0)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts = np.append(np.flatnonzero((raw & 0xC0) != 0x80), len(raw))  # byte offset of each character, + end
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    ends = np.maximum.accumulate(starts[np.minimum([e for _, e in offsets], len(starts) - 1)])
    out = np.diff(ends, prepend=0)
    out[-1] += len(raw) - ends[-1]
    return out


def tokenize_split(
    tok: Tokenizer, corpus: Corpus, split: str, folder: Path | None = None, separator: int | None = None
) -> TokenFile:
    """Tokenize one split into a token file, or reuse the one an earlier run wrote; `separator` (an imported
    model's BOS or EOS id) replaces `<|endoftext|>` and adds the per-token bytes file."""
    eot = special_id(tok, EOT) if separator is None else separator
    if eot is None:
        raise UsageError(f"the tokenizer has no {EOT} token; train one with `gen train-tokenizer`")
    dtype = token_dtype(tok.get_vocab_size())
    folder = folder or cache_dir() / "tokens"
    path = folder / f"{token_file_key(tok, corpus, split, separator)}.bin"
    if separator is not None:
        return _tokenize_with_bytes(tok, corpus, split, path, dtype, separator)
    itemsize = np.dtype(dtype).itemsize
    if path.is_file():
        if _checksum_matches(path) and _valid_token_file(path, dtype, tok.get_vocab_size(), eot):
            return TokenFile(path, dtype, path.stat().st_size // itemsize, cached=True)
        path.unlink(missing_ok=True)  # damaged: rebuilt below, as if never cached
    _sum_path(path).unlink(missing_ok=True)
    total, h = 0, hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for ids in _document_ids(tok, corpus, split, eot):
            data = np.asarray(ids, dtype=dtype).tobytes()
            f.write(data)
            h.update(data)
            total += len(ids)
    _write_checksum(path, [(total * itemsize, h)])  # last: a crash before it leaves a file never reused
    return TokenFile(path, dtype, total, cached=False)


def _tokenize_with_bytes(tok: Tokenizer, corpus: Corpus, split: str, path: Path, dtype: str, sep: int) -> TokenFile:
    """Token ids and per-token bytes, two parallel files under one key; reused only when both are whole."""
    itemsize = np.dtype(dtype).itemsize
    bytes_path = path.with_suffix(".bytes")
    if path.is_file() and bytes_path.is_file():
        tokens = path.stat().st_size // itemsize
        whole = bytes_path.stat().st_size == tokens * np.dtype(_BYTES_DTYPE).itemsize
        if whole and _checksum_matches(path) and _valid_token_file(path, dtype, tok.get_vocab_size(), sep):
            return TokenFile(path, dtype, tokens, cached=True, bytes_path=bytes_path)
    path.unlink(missing_ok=True)
    bytes_path.unlink(missing_ok=True)
    _sum_path(path).unlink(missing_ok=True)
    total, h, hb = 0, hashlib.sha256(), hashlib.sha256()
    # The ids are renamed into place first, the bytes last: a crash between leaves no pair to reuse.
    with (
        atomic_path(bytes_path) as tmp_bytes,
        open(tmp_bytes, "wb") as fb,
        atomic_path(path) as tmp,
        open(tmp, "wb") as f,
    ):
        for ids, n_bytes in _document_bytes(tok, corpus, split, sep):
            data, covered = np.asarray(ids, dtype=dtype).tobytes(), np.asarray(n_bytes, dtype=_BYTES_DTYPE).tobytes()
            f.write(data)
            fb.write(covered)
            h.update(data)
            hb.update(covered)
            total += len(ids)
    sizes = (total * np.dtype(dtype).itemsize, total * np.dtype(_BYTES_DTYPE).itemsize)
    _write_checksum(path, [(sizes[0], h), (sizes[1], hb)])
    return TokenFile(path, dtype, total, cached=False, bytes_path=bytes_path)


def _sum_path(path: Path) -> Path:
    """The length and sha256 of a token file (and its .bytes partner), written after it."""
    return path.with_name(path.name + ".sum")


def _write_checksum(path: Path, parts: list[tuple[int, Any]]) -> None:
    write_text_atomic(_sum_path(path), json.dumps([[size, h.hexdigest()] for size, h in parts]) + "\n")


def _checksum_matches(path: Path) -> bool:
    """The token file (and its .bytes partner, when it has one) have the length and hash written with them:
    a truncated or changed file is never reused as a corpus."""
    try:
        recorded = json.loads(_sum_path(path).read_text(encoding="utf-8"))
        files = [path, path.with_suffix(".bytes")][: len(recorded)]
        for file, (size, digest) in zip(files, recorded, strict=True):
            if file.stat().st_size != size:
                return False
            h = hashlib.sha256()
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != digest:
                return False
    except (OSError, ValueError, TypeError):
        return False
    return True


def _valid_token_file(path: Path, dtype: str, vocab_size: int, eot: int) -> bool:
    """Whole ids only, every id inside the vocabulary, and the EOT a stream starts with (see the layout)."""
    try:
        size = path.stat().st_size
        if size % np.dtype(dtype).itemsize:
            return False
        if size == 0:
            return True  # an empty split is a valid file
        data = np.memmap(path, dtype=dtype, mode="r")
        return int(data[0]) == eot and int(data.max()) < vocab_size
    except (OSError, ValueError):
        return False


def byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (the EOT separator) count 0 bytes.

    Byte-level BPE tokens concatenate to exactly the encoded text's bytes, so summing this table
    over predicted tokens gives the exact byte count of the text they cover.
    """
    vocab = tok.get_vocab_size()
    table = np.zeros(vocab, dtype=np.int64)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for i in range(vocab):
        piece = tok.id_to_token(i)
        if piece is None or piece in specials:
            continue
        table[i] = len(token_bytes(tok, i))
    return table


def windows(data: np.ndarray, starts: np.ndarray | list[int], length: int) -> np.ndarray:
    """Rows data[s : s + length] for each start, as int64: (len(starts), length)."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)[None, :]  # (b, length)
    return np.asarray(data[idx], dtype=np.int64)


def require_tokens(tokens: int, window: int, what: str) -> None:
    """Refuse a split too small to cut even one training window from."""
    if tokens < window + 1:
        raise UsageError(
            f"the {what} has only {tokens} tokens, fewer than one window of {window + 1} "
            f"(context {window} + 1); give more text or a smaller context",
            params=("context",),
        )
