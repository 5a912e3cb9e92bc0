"""Chat templates: a model's Jinja template (from downloaded files, so untrusted) rendered in a sandbox.

Rendering follows transformers' `apply_chat_template`: an immutable sandboxed environment with
trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that keeps non-ASCII text, and
`add_generation_prompt`. A template that fails or reaches outside the sandbox is one GenError line.

The sandbox bounds what a template may cost (it runs in gen's own process): RENDER_SECONDS of wall
clock, checked at every call, filter, operator, loop step over `range` and output chunk; RENDER_BYTES of
output, and of any one value an operator, a `~`, a call or a filter makes or is given (a big `*` or
`**` is refused before it is computed).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from gen_cli.errors import GenError

RENDER_SECONDS = 2.0  # real templates render in milliseconds
RENDER_BYTES = 1 << 20  # 1 MiB of rendered conversation: far above any context gen runs
_POW_BITS = 1 << 16  # an integer power's result, in bits (a template needs none this big)
RENDER_HEADROOM = 1 << 30  # address space a render may add to the process (a net under the checks)


class TemplateLimit(Exception):
    """A template went past the render limits."""


def _length(value: Any, budget: int = RENDER_BYTES) -> int:
    """Items in `value` counted through its nesting (a list of one big string is big), up to past `budget`."""
    total, todo = 0, [value]
    while todo and total <= budget:
        v = todo.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, list | tuple | dict):
            total += len(v)
            todo.extend(v.values() if isinstance(v, dict) else v)
    return total


@contextmanager
def _address_space(extra: int) -> Iterator[None]:
    """RLIMIT_AS lowered to what the process maps now plus `extra` while the template renders: whatever the
    checks miss allocates into a MemoryError, not into swap. Linux only, and only in a process with one
    Python thread: the limit is process-wide, and another thread (a server's decode loop) must not meet it."""
    import threading

    if threading.active_count() > 1:
        yield
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = pages * resource.getpagesize() + extra
        if (soft != resource.RLIM_INFINITY and soft <= cap) or (hard != resource.RLIM_INFINITY and hard < cap):
            raise OSError("already lower")
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _sandbox(deadline: float, max_bytes: int, given: tuple = ()) -> Any:
    """An immutable sandbox that refuses, before computing them, values past `max_bytes`, and stops at `deadline`."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    def tick() -> None:
        if time.monotonic() > deadline:
            raise TemplateLimit(f"took more than {RENDER_SECONDS:g} s")

    # The conversation itself, sized by its caller: not walked again at every call that passes it.
    known = {id(v) for v in given}

    def sized(value: Any, what: str, numbers: bool = True) -> Any:
        if numbers and isinstance(value, int) and not isinstance(value, bool) and abs(value) > max_bytes:
            raise TemplateLimit(f"{what} {value:,} is past the limit of {max_bytes:,}")
        if id(value) not in known and _length(value, max_bytes) > max_bytes:
            raise TemplateLimit(f"{what} of over {max_bytes:,} items is past the limit")
        return value

    def checked_range(*args: int) -> Iterator[int]:
        numbers = range(*args)
        if len(numbers) > MAX_RANGE:
            raise TemplateLimit(f"a range of {len(numbers):,} is past the limit of {MAX_RANGE:,}")
        for n in numbers:
            tick()  # a loop with no output and no calls inside still stops at the deadline
            yield n

    class Concat(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: sized before it is joined
            self.write("environment.gen_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class CheckedNamespace(Namespace):  # the one value a loop can grow across its steps
        def __setitem__(self, name: str, value: Any) -> None:
            tick()
            super().__setitem__(name, sized(value, "a namespace value"))

    class Bounded(ImmutableSandboxedEnvironment):
        code_generator_class = Concat
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def gen_concat(self, parts: tuple) -> str:
            tick()
            strings = [str(p) for p in parts]
            if (n := sum(map(len, strings))) > max_bytes:
                raise TemplateLimit(f"a joined string of {n:,} characters is past the limit of {max_bytes:,}")
            return "".join(strings)

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            tick()
            big = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
            if op == "**" and big and abs(left).bit_length() * right > _POW_BITS:
                raise TemplateLimit(f"{left} ** {right} is past the limit of {_POW_BITS:,} bits")
            if op == "*" and isinstance(right, int) and _length(left) * abs(right) > max_bytes:
                raise TemplateLimit(f"a product of {_length(left) * right:,} items is past the limit of {max_bytes:,}")
            if op == "*" and isinstance(left, int) and _length(right) * abs(left) > max_bytes:
                raise TemplateLimit(f"a product of {_length(right) * left:,} items is past the limit of {max_bytes:,}")
            if op == "+" and _length(left) + _length(right) > max_bytes:
                raise TemplateLimit(f"a sum of {_length(left) + _length(right):,} items is past the limit")
            result = super().call_binop(context, op, left, right)
            return sized(result, "a value", numbers=False) if op == "%" else result

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            tick()
            for value in (*args, *kwargs.values()):
                sized(value, "an argument")
            return sized(super().call(__context, __obj, *args, **kwargs), "a result", numbers=False)

        def getattr(self, obj: Any, attribute: str) -> Any:
            tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            tick()
            return super().getitem(obj, argument)

    def bounded_filter(f: Any) -> Any:
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
        def run(*args: Any, **kwargs: Any) -> Any:
            tick()
            for value in (*args, *kwargs.values()):
                sized(value, "a filter argument")
            return sized(f(*args, **kwargs), "a filter's result", numbers=False)

        return run

    from jinja2.ext import loopcontrols

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals["range"] = checked_range
    env.globals["namespace"] = CheckedNamespace
    return env


class Rendered(str):
    """A rendered conversation that remembers how it was made, so `encode_rendered` can keep the messages'
    text as text: a message spelling a special token (`<|im_end|>`) must not become that control token."""

    render: Any  # (sentinel messages) -> str: the same render with other message contents
    contents: tuple[str, ...]

    def message_spans(self) -> list[tuple[int, int]]:
        """(start, end) of each message content in this text, found by rendering once more with a marker in
        place of each content; GenError when the template rewrites contents (then they cannot be told apart)."""
        markers = [f"{_MARK}{i}{_MARK}" for i in range(len(self.contents))]
        marked = self.render(markers)
        pieces = marked.split(_MARK)  # template text, index, template text, index, …
        if len(pieces) % 2 == 0 or not all(p.isdigit() and int(p) < len(markers) for p in pieces[1::2]):
            raise GenError("the chat template rewrites the messages' text; gen cannot keep it as text")
        for rewrite in (str, str.strip):  # verbatim, or trimmed as Llama-3's template does (`| trim`)
            spans, out, pos = [], [], 0
            for i, piece in enumerate(pieces):
                if i % 2:
                    piece = rewrite(self.contents[int(piece)])
                    spans.append((pos, pos + len(piece)))
                out.append(piece)
                pos += len(piece)
            if "".join(out) == self:
                return spans
        raise GenError(
            "the chat template rewrites the messages' text, so a message spelling a special token cannot be kept "
            "as text; remove the special token's spelling from the message"
        )


_MARK = "\U000f0000"  # a private-use character no template writes and no message is likely to hold


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    source: str = "chat template",
    max_bytes: int = RENDER_BYTES,
) -> Rendered:
    """The conversation as the model's template writes it; `special_tokens` gives bos_token, eos_token …

    Refused (GenError) past RENDER_SECONDS or `max_bytes` of UTF-8 output (see the module doc)."""

    def render(contents: list[str]) -> str:
        marked = [{**m, "content": c} for m, c in zip(messages, contents, strict=True)]
        return _render(template, marked, add_generation_prompt, special_tokens, source, max_bytes)

    out = Rendered(_render(template, messages, add_generation_prompt, special_tokens, source, max_bytes))
    out.render, out.contents = render, tuple(str(m.get("content", "")) for m in messages)
    return out


def _render(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str] | None,
    source: str,
    max_bytes: int,
) -> str:
    import jinja2

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    deadline = time.monotonic() + RENDER_SECONDS
    env = _sandbox(deadline, max_bytes, (messages, *messages))
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
    try:
        with _address_space(RENDER_HEADROOM):
            chunks, size = [], 0
            stream = env.from_string(template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
            )
            for chunk in stream:
                size += len(chunk.encode("utf-8"))
                if size > max_bytes:
                    raise TemplateLimit(f"wrote more than {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise TemplateLimit(f"took more than {RENDER_SECONDS:g} s")
                chunks.append(chunk)
            return "".join(chunks)
    except TemplateLimit as e:
        raise GenError(f"{source} went past gen's render limits: {e}; refusing it") from None
    except MemoryError:
        raise GenError(f"{source} went past gen's render limits: it asked for too much memory; refusing it") from None
    except jinja2.exceptions.SecurityError as e:
        raise GenError(f"{source} tried to leave its sandbox ({e}); refusing it") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a template is code from a file: any failure is the file's (MemoryError too)
        raise GenError(f"{source} failed: {type(e).__name__}: {e}") from None


def conversation(message: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: an optional system message, then the user's."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]


def encode_rendered(tok: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of a rendered template: there its special-token spellings are the special tokens (gen's `encode`
    reads them as text), and it writes any BOS itself, so none is added. With `max_tokens`, text longer in
    bytes than that many of the tokenizer's longest tokens is refused before it is tokenized."""
    from gen_cli.text.tokenizer import longest_token_bytes

    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    if max_tokens is not None and n_bytes > max_tokens * longest_token_bytes(tok):
        raise GenError(
            f"the rendered conversation is {n_bytes:,} bytes, more than {max_tokens:,} tokens could hold; shorten it"
        )
    spans = _message_spans(tok, text)
    before = tok.encode_special_tokens
    try:
        if not spans:
            tok.encode_special_tokens = False
            return tok.encode(text, add_special_tokens=False).ids
        # The template's text with its special tokens; each message's text with special spellings as text.
        ids, pos = [], 0
        for start, end in [*spans, (len(text), len(text))]:
            tok.encode_special_tokens = False
            ids += tok.encode(text[pos:start], add_special_tokens=False).ids if start > pos else []
            tok.encode_special_tokens = True
            ids += tok.encode(text[start:end], add_special_tokens=False).ids if end > start else []
            pos = end
        return ids
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # `tokenizers` panics (a BaseException) where it cannot allocate
        raise GenError(f"the tokenizer failed on the rendered conversation ({type(e).__name__}: {e})") from None
    finally:
        tok.encode_special_tokens = before


def _message_spans(tok: Any, text: str) -> list[tuple[int, int]]:
    """Where the messages' text lies in `text`, when some message spells one of `tok`'s special tokens (else
    [] : the whole text is encoded at once, exactly as before)."""
    if not isinstance(text, Rendered):
        return []
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content]
    if not any(s in c for c in text.contents for s in specials):
        return []
    return sorted(text.message_spans())
