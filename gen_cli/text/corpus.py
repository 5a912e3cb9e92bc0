"""Where text comes from: the built-in `python-docs` corpus, files, folders, globs and stdin.

Every source is a sequence of documents. The train/validation split is the same everywhere: each
document's first ~90% of bytes (cut at a line boundary) is training text, the rest is validation.
Cutting every document, rather than assigning whole documents, keeps the split meaningful for a
single input file and keeps both splits drawn from the same mix of documents.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import json
import os
import sys
import sysconfig
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gen_cli.atomic import write_text_atomic
from gen_cli.errors import GenError, UsageError
from gen_cli.resources import cache_dir

BUILTIN = "python-docs"
VAL_FRACTION = 0.1
SPLITS = ("train", "val", "all")
_SNIFF_BYTES = 8192
_BLOCK_BYTES = 1 << 20
STDIN_BYTES = 64 << 20  # stdin is held whole (it cannot be read twice); files and folders are streamed
# Stdlib folders whose docstrings are tests, tools or vendored code rather than library prose.
_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                     "__pycache__", "ensurepip", "turtledemo"}  # fmt: skip


@dataclass(frozen=True)
class Document:
    """A named text streamed in blocks of whole lines; `size` is its length in UTF-8 bytes."""

    name: str
    size: int
    open_blocks: Callable[[], Iterable[tuple[str, int]]]  # (whole lines, their UTF-8 byte length)

    def chunks(self, split: str = "all", on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
        """Yield the text of `split` in large chunks of whole lines: cheap to stream and to copy.

        `on_bytes` is told the UTF-8 byte length of each chunk (progress and byte counts).
        """
        cut = self.size - int(self.size * VAL_FRACTION)
        seen = 0
        for block, n_bytes in self.open_blocks():
            start, seen = seen, seen + n_bytes
            if start < cut < seen:  # the block straddles the cut: decide line by line
                kept, position = [], start
                for line in block.splitlines(keepends=True):
                    if split == "all" or (split == "train") == (position < cut):
                        kept.append(line)
                    position += len(line.encode("utf-8"))
                text = "".join(kept)
                n_bytes = len(text.encode("utf-8"))
            elif split == "all" or (split == "train") == (start < cut):
                text = block
            else:
                continue
            if on_bytes:
                on_bytes(n_bytes)
            if text:
                yield text

    def lines(self, split: str = "all") -> Iterator[str]:
        """Yield the document's lines (with their newlines) that belong to `split`."""
        for chunk in self.chunks(split):
            yield from chunk.splitlines(keepends=True)


def _text_document(name: str, text: str) -> Document:
    return Document(name, len(text.encode("utf-8")), lambda: [(text, len(text.encode("utf-8")))])


# ---------------------------------------------------------------------------------------------
# The built-in corpus


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK = (ast.stmt, ast.excepthandler, ast.match_case)  # expressions hold no statements, so no docstrings


def _walk_blocks(tree: ast.AST) -> Iterator[ast.AST]:
    """`ast.walk` pruned to statements (and handlers, match cases): the same order for every node that can
    have a docstring, a breadth-first walk of a tree without subtrees that hold none; 6x faster over the
    stdlib, whose expressions are most of its nodes."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        for name in node._fields:
            if isinstance(value := getattr(node, name, None), list):
                todo.extend(v for v in value if isinstance(v, _BLOCK))
        yield node


def _stdlib_docstrings() -> list[tuple[str, str]]:
    """(module name, its docstrings joined) for every stdlib module, parsed without importing it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _SKIP_STDLIB_DIRS:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        strings = [d for n in _walk_blocks(tree) if isinstance(n, _DOCUMENTED) and (d := ast.get_docstring(n))]
        if strings:
            docs.append((".".join(rel.with_suffix("").parts), "\n\n".join(strings) + "\n"))
    return docs


def _is_pair(item: object) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)


def _python_docs_documents() -> list[Document]:
    """The language reference topics, then stdlib docstrings; cached because parsing takes seconds."""
    version = ".".join(map(str, sys.version_info[:3]))
    cache = cache_dir() / f"python-docs-{version}.json"
    try:
        pairs = json.loads(cache.read_text(encoding="utf-8"))
        # A damaged entry (`{}`, `[]`, wrong shapes) would be a silently empty or broken corpus: rebuild it.
        if not (isinstance(pairs, list) and pairs and all(_is_pair(p) for p in pairs)):
            raise ValueError("not a list of (name, text) pairs")
    except (OSError, ValueError):
        from pydoc_data.topics import topics

        pairs = [(f"topics/{k}", topics[k].strip() + "\n") for k in sorted(topics)]
        pairs += [(f"docstrings/{m}", text) for m, text in _stdlib_docstrings()]
        # A read-only working folder only costs the parse next time.
        with contextlib.suppress(OSError, GenError):
            write_text_atomic(cache, json.dumps(pairs))
    return [_text_document(name, text) for name, text in pairs]


BUILTIN_CORPORA = {
    BUILTIN: "Python's language reference (pydoc_data.topics) and the standard library's docstrings; "
    "ships with every Python, no download.",
}


# ---------------------------------------------------------------------------------------------
# Files, folders, globs, stdin


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _file_blocks(path: Path) -> Iterator[tuple[str, int]]:
    """Stream a UTF-8 file in blocks of whole lines; non-UTF-8 input is an error naming file and line."""
    lines_before = 0
    rest = b""
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK_BYTES):
            raw = rest + chunk
            end = raw.rfind(b"\n") + 1 or len(raw)
            raw, rest = raw[:end], raw[end:]
            yield _decode(path, raw, lines_before), len(raw)
            lines_before += raw.count(b"\n")
    if rest:
        yield _decode(path, rest, lines_before), len(rest)


def _decode(path: Path | str, raw: bytes, lines_before: int) -> str:
    """UTF-8 text, or a usage error (exit 2, from a file as from stdin) naming the source and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lines_before + raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{path}: line {line} is not valid UTF-8; convert the text to UTF-8") from None


def _file_document(path: Path) -> Document:
    return Document(str(path), path.stat().st_size, lambda: _file_blocks(path))


def _folder_files(folder: Path, skipped: list[str]) -> list[Path]:
    """Text files under `folder`, recursively, in sorted order; hidden entries skipped, binaries
    (compressed files among them) skipped and appended to `skipped`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            if _is_binary(path):
                skipped.append(str(path))
            else:
                found.append(path)
    return found


def _documents_for(spec: str, skipped: list[str]) -> list[Document]:
    if spec in BUILTIN_CORPORA:
        return _python_docs_documents()
    if spec == "-":
        stream = getattr(sys.stdin, "buffer", None)  # bytes, so a bad byte is reported, not smuggled through
        if stream is not None:
            raw = stream.read(STDIN_BYTES + 1)  # never more: stdin may be /dev/zero
        else:
            raw = sys.stdin.read(STDIN_BYTES + 1).encode("utf-8", "surrogateescape")
        if len(raw) > STDIN_BYTES:
            raise UsageError(
                f"the text on stdin is over {STDIN_BYTES:,} bytes, gen's limit for stdin (it is held in memory); "
                "give a file or folder instead, which is streamed"
            )
        return [_text_document("<stdin>", _decode("<stdin>", raw, 0))]
    path = Path(spec)
    if path.is_dir():
        files = _folder_files(path, skipped)
        if not files:
            raise UsageError(f"{spec}: folder holds no text files" + (f" ({len(skipped)} binary)" if skipped else ""))
        return [_file_document(p) for p in files]
    if path.is_file():
        if _is_binary(path):
            raise UsageError(f"{spec}: looks like a binary file (it contains NUL bytes); give text files")
        return [_file_document(path)]
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file() and not _is_binary(p)]
        skipped += [str(p) for p in matches if p.is_file() and p not in files]
        if not files:
            raise UsageError(f"{spec}: pattern matches no text files")
        return [_file_document(p) for p in files]
    raise UsageError(f"{spec}: no such file, folder or built-in corpus (built-in: {', '.join(BUILTIN_CORPORA)})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


class Corpus:
    """The documents of one or more inputs, in a deterministic order."""

    def __init__(self, inputs: Iterable[str] = ()) -> None:
        self.inputs = list(inputs) or [BUILTIN]
        if self.inputs.count("-") > 1:
            raise UsageError("stdin ('-') can be given only once")
        self.skipped: list[str] = []  # binary files (e.g. .gz) found in folders and globs, not read
        self.documents = [doc for spec in self.inputs for doc in _documents_for(spec, self.skipped)]

    @property
    def size(self) -> int:
        """Total UTF-8 bytes over all documents (both splits)."""
        return sum(d.size for d in self.documents)

    def texts(self, split: str = "train") -> Iterator[str]:
        """Yield each document's text for `split`, one string per document (skipping empty ones)."""
        _check_split(split)
        for doc in self.documents:
            text = "".join(doc.chunks(split))
            if text:
                yield text

    def chunks(self, split: str = "train", on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
        """Stream `split` over all documents in chunks of whole lines, never holding a whole file.

        A document whose split does not end in a newline gets one (not counted by `on_bytes`), so a
        consumer of the stream, such as tokenizer training on a spooled file, never joins the last
        word of one document to the first of the next.
        """
        _check_split(split)
        for doc in self.documents:
            last = ""
            for last in doc.chunks(split, on_bytes):
                yield last
            if last and not last.endswith("\n"):
                yield "\n"

    def lines(self, split: str = "train") -> Iterator[str]:
        """Stream the lines of `split` over all documents."""
        _check_split(split)
        for doc in self.documents:
            yield from doc.lines(split)

    def require_text(self) -> None:
        """Raise a clear error when the inputs hold no text at all."""
        if self.size == 0:
            raise UsageError(f"the corpus is empty: {', '.join(self.inputs)} holds no text")
