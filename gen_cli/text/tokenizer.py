"""Train, save, load and use a byte-level BPE tokenizer (HF `tokenizers`).

Special tokens: text from a corpus or a prompt is always encoded as ordinary text, so a document
that happens to contain the spelling `<|endoftext|>` gets the bytes of that spelling, never the
special id. Special ids enter a sequence only where gen puts them (between training documents).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from gen_cli.atomic import atomic_path
from gen_cli.errors import GenError, UsageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.trainers import BpeTrainer

    from gen_cli.text.corpus import Corpus

EOT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TokenizerSummary:
    """What a tokenizer training run did; every figure measured."""

    documents: int
    input_bytes: int
    vocab_size: int
    train_seconds: float
    throughput_mb_per_s: float
    val_bytes: int
    val_tokens: int
    bytes_per_token: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def new_trainer(vocab_size: int, min_frequency: int = 2, specials: Sequence[str] = (EOT,)) -> BpeTrainer:
    """gen's BPE trainer settings (byte alphabet, specials): `gen bench tokenizer` gives both sides these."""
    from tokenizers import pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def new_tokenizer() -> Tokenizer:
    """An empty byte-level BPE tokenizer with gen's pre-tokenizer and decoder, ready for a trainer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s for every string, leading spaces included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    corpus: Corpus,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = (EOT,),
    on_bytes: Callable[[int], None] = lambda n: None,
) -> tuple[Tokenizer, TokenizerSummary]:
    """Train on the corpus's training split, streamed; `on_bytes` reports bytes read (progress)."""
    specials = tuple(dict.fromkeys(special_tokens))
    if any(not t for t in specials):
        raise UsageError("a special token cannot be the empty string", params=("special_token",))
    if vocab_size < BYTE_ALPHABET + len(specials):
        raise UsageError(
            f"vocab_size {vocab_size} is too small: the byte alphabet needs {BYTE_ALPHABET} ids "
            f"plus {len(specials)} special token(s); use at least {BYTE_ALPHABET + len(specials)}",
            params=("vocab_size",),
        )
    from gen_cli.limits import check_size_limit

    check_size_limit("vocab_size", vocab_size)  # tokenizers aborts the process on a huge allocation
    if min_frequency < 1:
        raise UsageError(f"min_frequency must be at least 1, got {min_frequency}", params=("min_frequency",))
    corpus.require_text()
    tok = new_tokenizer()
    trainer = new_trainer(vocab_size, min_frequency, specials)
    fed = 0

    def count(n: int) -> None:
        nonlocal fed
        fed += n
        on_bytes(n)

    start = time.perf_counter()
    # Spooling the training split to one temporary file and letting `tokenizers` read it natively is
    # faster than feeding it from a Python iterator (its file reader is parallel), and keeps memory flat.
    with tempfile.TemporaryDirectory(prefix="gen-tokenizer-") as tmp:
        split_file = Path(tmp) / "train.txt"
        with open(split_file, "w", encoding="utf-8") as f:
            f.writelines(corpus.chunks("train", on_bytes=count))
        if fed:
            tok.train([str(split_file)], trainer=trainer)
    seconds = time.perf_counter() - start
    if fed == 0:
        raise UsageError(f"the corpus has no training text: {', '.join(corpus.inputs)}")
    configure(tok)
    val_bytes, val_tokens = measure_compression(tok, corpus.lines("val"))
    summary = TokenizerSummary(
        documents=len(corpus.documents),
        input_bytes=fed,
        vocab_size=tok.get_vocab_size(),
        train_seconds=seconds,
        throughput_mb_per_s=fed / 1e6 / seconds,
        val_bytes=val_bytes,
        val_tokens=val_tokens,
        bytes_per_token=val_bytes / val_tokens if val_tokens else None,
    )
    return tok, summary


def configure(tok: Tokenizer) -> Tokenizer:
    """Make special-token spellings in input text encode as ordinary text (see the module doc)."""
    tok.encode_special_tokens = True
    return tok


def measure_compression(tok: Tokenizer, texts: Iterable[str], batch_size: int = 4096) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) over `texts`, encoded in parallel batches."""
    n_bytes = n_tokens = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return n_bytes, n_tokens


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write a standard tokenizer.json atomically."""
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (or the one inside a model directory) with a clear error."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{path}: no tokenizer file there; train one with `gen train-tokenizer`")
    try:
        return configure(Tokenizer.from_file(str(path)))
    except Exception as e:
        raise GenError(f"{path}: not a valid tokenizer.json ({e})") from None


def tokenizer_digest(tok: Tokenizer) -> str:
    """A hash of the tokenizer's full JSON (vocabulary, merges, normalisation, special tokens)."""
    import hashlib

    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Ids of `text` as ordinary text: no special tokens added or recognised."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`; the exact inverse of `encode` on its outputs."""
    return tok.decode(list(ids), skip_special_tokens=False)


def special_id(tok: Tokenizer, token: str = EOT) -> int | None:
    """The id of a special token, or None when the tokenizer lacks it."""
    return tok.token_to_id(token)


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: each byte is shown as a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The raw bytes one token stands for (special tokens: their spelling)."""
    piece = tok.id_to_token(token_id)
    if piece is None:
        raise GenError(f"token id {token_id} is outside the vocabulary")
    table = _byte_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return piece.encode("utf-8")


_longest: dict[int, tuple[Tokenizer, int]] = {}  # id → (the tokenizer, kept alive so its id stays its own; bytes)


def longest_token_bytes(tok: Tokenizer) -> int:
    """Bytes the longest token stands for (byte-level pieces are one character per byte), at least 4:
    text longer than n times this cannot fit in n tokens. Computed once per tokenizer."""
    if (known := _longest.get(id(tok))) is not None and known[0] is tok:
        return known[1]
    longest = max(4, *(len(piece.encode("utf-8")) for piece in tok.get_vocab()))
    _longest[id(tok)] = (tok, longest)
    return longest
