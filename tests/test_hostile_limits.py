"""Limits on what input may cost: chat templates (time, output, values), readers of user input (capped
before decoding and tokenizing), memory estimates, the text stream's tail, identities and checksums."""

from __future__ import annotations

import pytest

from gen_cli.errors import GenError
from gen_cli.text import chat
from gen_cli.text.chat import encode_rendered, render_chat

# ---------------------------------------------------------------------------------------------
# Chat templates: bounded in time, in output and in the values they make

HI = [{"role": "user", "content": "hi"}]

TEMPLATE_ATTACKS = {
    "nested-loops": ("{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}", r"took more"),
    "output-loop": ("{% for i in range(60000) %}{% for j in range(60000) %}x{% endfor %}{% endfor %}", r"more than"),
    "power": ("{{ (9 ** 999999999) > 1 }}", r"9 \*\* 999999999 is past the limit of 65,536 bits"),
    "repeat-100M": ("{{ 'x' * 100000000 }}", r"a product of 100,000,000 items is past the limit"),
    "repeat-3G": ("{{ 'x' * 3000000000 }}", r"a product of 3,000,000,000 items"),
    "strftime": ("{{ strftime_now('%Y' * 10**6) }}", r"a product of 2,000,000 items"),
    "doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        r"a joined string of [\d,]+ characters",
    ),
    "macro-doubling": (
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 40) }}",
        r"a joined string",
    ),
    "width": ("{{ 'x'|center(3000000000) }}", r"a filter argument 3,000,000,000 is past the limit"),
    "method-width": ("{{ 'x'.ljust(3000000000) }}", r"an argument 3,000,000,000 is past the limit"),
    "shared-list": ("{{ (['x' * 1000] * 100000)|join }}", r"a product of [\d,]+ items"),
}


@pytest.mark.parametrize("attack", TEMPLATE_ATTACKS)
def test_a_hostile_template_stops_at_the_render_limits(attack, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)  # small limits keep the test short
    template, pattern = TEMPLATE_ATTACKS[attack]
    with pytest.raises(GenError, match=pattern) as caught:
        render_chat(template, HI, max_bytes=1 << 16)
    assert "render limits" in str(caught.value)


def test_what_the_checks_miss_meets_the_address_space_net(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_HEADROOM", 256 << 20)
    with pytest.raises(GenError, match="too much memory"):  # 10^10 characters from a replace
        render_chat("{{ ('x' * 100000)|replace('x', 'x' * 100000) }}", HI)


def test_ordinary_templates_render_as_before():
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}"
        "<|assistant|>{% endif %}{{ messages|tojson }}{{ 2 ** 10 }}{{ 'ab' * 3 }}{{ [1] + [2] }}{{ 'a' ~ 'b' }}"
        "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    )
    want = '<|user|>hi<|assistant|>[{"role": "user", "content": "hi"}]1024ababab[1, 2]ab10'
    assert render_chat(template, HI) == want


class _Panicking:
    """A tokenizer that fails as `tokenizers` does where it cannot allocate: a BaseException."""

    encode_special_tokens = True

    class Panic(BaseException):
        pass

    def get_vocab(self):
        return {"abcdefgh": 0}

    def encode(self, text, add_special_tokens=False):
        raise self.Panic("capacity overflow")


def test_a_tokenizer_panic_is_one_error_and_long_text_is_refused_before_tokenizing():
    tok = _Panicking()
    with pytest.raises(GenError, match=r"the tokenizer failed on the rendered conversation \(Panic"):
        encode_rendered(tok, "hello")
    assert tok.encode_special_tokens is True  # restored
    with pytest.raises(GenError, match=r"is 81 bytes, more than 10 tokens could hold"):
        encode_rendered(tok, "x" * 81, max_tokens=10)  # 10 tokens of at most 8 bytes: never tokenized
