"""Render `gen compare` records: Rich table, md / csv / json / jsonl (the charts are in compare_charts).

Knows nothing about torch: it reads the plain dicts that gen_cli.lab.compare returns, `{"env": …, "rows": […]}`.
jsonl is one object per line: first `{"env": {...}}`, then one row per line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "md", "csv", "json", "jsonl")
SUFFIX_FORMATS = {".md": "md", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".txt": "table"}

# ---------------------------------------------------------------------------------------------
# Cells


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def attention_label(r: dict[str, Any]) -> str:
    conv = f" ←{r['converted']}" if r.get("converted") else ""  # pooled from the trained MHA, then uptrained
    return f"{r['attention']} {r['kv_heads']}/{r['n_heads']}{conv}"


def _correct(r: dict[str, Any]) -> str:
    if r.get("greedy_match") is None:
        return "window: KL" if r.get("kv_window") else "oracle"
    mark = "match" if r["greedy_match"] else "DIFFERS"
    return f"{mark}, Δ {r['max_logit_diff']:.1e}"


def _speedup(r: dict[str, Any]) -> str:
    text = "baseline" if r.get("baseline") else _num(r.get("speedup"), ".2f") + "×" + _ns(r.get("speedup_note"))
    if r.get("speedup_vs_no_cache"):
        text += f" ({r['speedup_vs_no_cache']:.1f}× vs off{_ns(r.get('speedup_vs_no_cache_note'))})"
    return text


def _kv(r: dict[str, Any]) -> str:
    a, m = r["kv_cache_bytes_analytic"], r["kv_cache_bytes_measured"]
    if not r["kv_cache"]:
        return "0 / 0"
    return human_bytes(a) if a == m else f"{human_bytes(a)} ≠ {human_bytes(m)}"


def _spread(r: dict[str, Any]) -> str:
    return f"{_num(r['decode_tokens_per_s_min'], ',.0f')}–{_num(r['decode_tokens_per_s_max'], ',.0f')}"


def _kv_kind_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """KV kind, KL (nats, mean over steps) and top-1 agreement vs the full-precision cache, when measured."""
    if not any(r.get("kv_dtype") or r.get("kv_window") for r in rows):
        return []

    def kind(r: dict[str, Any]) -> str:
        name = r.get("kv_dtype") or ("—" if not r["kv_cache"] else "plain")
        return name + (f" w{r['kv_window']}+{r.get('kv_sinks', 0)}" if r.get("kv_window") else "")

    cols = [("KV kind", kind), ("KL", lambda r: _num(r.get("kv_kl_mean"), ".2e")),
            ("top-1", lambda r: _num(r.get("kv_top1_agreement"), ".3f"))]  # fmt: skip
    if any(r.get("kv_delta_bits_per_byte") is not None for r in rows):  # trained weights only (kv_quality)
        cols.append(("Δ bpb", lambda r: _num(r.get("kv_delta_bits_per_byte"), "+.2e")))
    return cols


def _varying(rows: Sequence[dict[str, Any]], key: str) -> bool:
    return len({r[key] for r in rows}) > 1


def columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(header, row → cell) for the human-readable table; workload columns only when they vary."""
    cols: list[tuple[str, Any]] = [("attention kv/heads", attention_label), ("pos", lambda r: r["pos"]),
                                   ("KV cache", lambda r: "on" if r["kv_cache"] else "off")]  # fmt: skip
    if len({r.get("attn_impl", "fused") for r in rows}) > 1:
        cols.append(("attention impl", lambda r: r.get("attn_impl", "fused")))
    for key, head in (("dtype", "dtype"), ("prompt_len", "prompt"), ("gen_len", "gen"), ("batch", "batch")):
        if _varying(rows, key):
            cols.append((head, lambda r, k=key: str(r[k])))
    cols += [
        ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
        ("TTFT ms", lambda r: _num(r["ttft_s"] and r["ttft_s"] * 1000, ".2f")),
        ("prefill tok/s", lambda r: _num(r["prefill_tokens_per_s"], ",.0f")),
        ("decode tok/s", lambda r: _num(r["decode_tokens_per_s"], ",.1f")),
        ("spread", _spread),
        ("ms/token", lambda r: _num(r["ms_per_token"], ".3f")),
        ("KV cache bytes", _kv),
        *_kv_kind_columns(rows),
        ("peak mem", lambda r: human_bytes(r["peak_memory_bytes"])),
        ("speed-up", _speedup),
        ("greedy vs fp32 oracle", _correct),
    ]  # fmt: skip
    if any(r.get("val_loss") is not None for r in rows):
        cols += [("val loss", lambda r: _num(r.get("val_loss"), ".4f")),
                 ("bits/byte", lambda r: _num(r.get("bits_per_byte"), ".4f"))]  # fmt: skip
    if any(r.get("eval_context") for r in rows):
        cols.append((f"bits/byte past training (to {rows[0]['eval_context']})", _past))
    return cols


def _past(r: dict[str, Any]) -> str:
    return _num(r.get("bits_per_byte_past_context"), ".4f") if r.get("eval_context") else "—"


def env_lines(env: dict[str, Any]) -> list[str]:
    """The environment block: where and how the figures were measured."""
    s = env.get("shape", {})
    shape = (f"{s.get('n_layer')} layers, d_model {s.get('d_model')}, {s.get('n_head')} heads, d_ff {s.get('d_ff')}, "
             f"vocab {s.get('vocab_size')}, context {s.get('context_length')}")  # fmt: skip
    threads = ", ".join(map(str, env.get("threads", [])))
    return [
        f"shape     {env.get('shape_source')}: {shape}",
        f"weights   {env.get('weights')}",
        f"device    {env.get('device')} ({env.get('device_name')}), threads {threads}, "
        f"dtype {', '.join(env.get('dtypes', []))}, torch {env.get('torch')}",
        f"memory    {env.get('memory_method', '')}",
        f"speed-up  decode tok/s over the {env.get('baseline')}",
        *([f"KV kinds  {env['kv_quality']}"] if env.get("kv_quality") else []),
    ]


# ---------------------------------------------------------------------------------------------
# Formats


def _ns(note: str | None) -> str:
    return "" if note is None else " ns"


def _short_speedup(r: dict[str, Any]) -> str:
    if r.get("baseline"):
        return "base"
    return "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×{_ns(r.get('speedup_note'))}"


def _vs_off(r: dict[str, Any]) -> str:
    v = r.get("speedup_vs_no_cache")
    return "" if v is None else f"{v:.1f}×{_ns(r.get('speedup_vs_no_cache_note'))}"


def _pm(r: dict[str, Any]) -> str:
    lo, hi, mid = r["decode_tokens_per_s_min"], r["decode_tokens_per_s_max"], r["decode_tokens_per_s"]
    return "—" if not mid or lo is None else f"±{50 * (hi - lo) / mid:.0f}%"


_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def narrow_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """(columns, constant settings) for an 80-column table: settings shared by every row leave the table."""
    axes = (("attn", "attention", attention_label, lambda r: (r["attention"], r["kv_heads"], r.get("converted"))),
            ("pos", "pos", lambda r: r["pos"], lambda r: r["pos"]),
            ("cache", "KV cache", lambda r: "on" if r["kv_cache"] else "off", lambda r: r["kv_cache"]),
            ("dtype", "dtype", lambda r: _SHORT_DTYPE.get(r["dtype"], r["dtype"]), lambda r: r["dtype"]))  # fmt: skip
    work = [(k, label) for k, label in (("prompt_len", "prompt"), ("gen_len", "generate"), ("batch", "batch"))]
    cols: list[tuple[str, Any]] = []
    shared: list[str] = []
    for head, label, cell, key in axes:
        if len({key(r) for r in rows}) > 1:
            cols.append((head, cell))
        elif rows:
            shared.append(f"{label} {cell(rows[0])}")
    varying = [(k, label) for k, label in work if _varying(rows, k)]
    shared += [f"{label} {rows[0][k]}" for k, label in work if rows and not _varying(rows, k)]
    if varying:  # one column for the workload axes that vary: p16 g240 b1
        cols.append(("work", lambda r: " ".join(f"{label[0]}{r[k]}" for k, label in varying)))
    cols += [("tok/s", lambda r: _num(r["decode_tokens_per_s"], ",.0f")), ("±", _pm), ("×base", _short_speedup)]
    if any(r.get("speedup_vs_no_cache") for r in rows):
        cols.append(("×off", _vs_off))
    cols += [("KV", lambda r: _kv(r) if r["kv_cache"] else "—"), *_kv_kind_columns(rows),
             ("oracle", lambda r: _correct(r).split(",")[0])]  # fmt: skip
    if any(r.get("val_loss") is not None for r in rows):
        cols.append(("bits/byte", lambda r: _num(r.get("bits_per_byte"), ".3f")))
    if any(r.get("eval_context") for r in rows):
        cols.append(("past ctx", _past))
    return cols, shared


def footnotes(result: dict[str, Any]) -> list[str]:
    """Prose under the table: what 'ns' means here and how busy the machine was (wrapped by the console)."""
    rows = result["rows"]
    reasons: dict[str, int] = {}
    for r in rows:
        for key in ("speedup_note", "speedup_vs_no_cache_note"):
            if r.get(key):
                reasons[r[key]] = reasons.get(r[key], 0) + 1
    notes = []
    if reasons:
        notes.append("ns = " + "; ".join(f"{why} ({n} ratio{'s' * (n > 1)})" for why, n in reasons.items()))
    if any(r.get("converted") for r in rows):
        notes.append(
            "←mha: the MHA model trained as the others, its KV heads mean-pooled to the row's count, then trained "
            "as many steps again (speed figures: the same shape's)"
        )
    loads = [
        r["machine_load"]["others_cores"] for r in rows if (r.get("machine_load") or {}).get("others_cores") is not None
    ]
    if loads:
        busy = sum(1 for r in rows if (r.get("machine_load") or {}).get("busy"))
        notes.append(
            f"machine load: other processes used up to {max(loads):.1f} cores during the runs"
            + (f"; {busy} of {len(rows)} configurations ran on a busy machine" if busy else "")
        )
    return notes


def rich_table(result: dict[str, Any], wide: bool = False) -> Table:
    """The compare table: by default the columns that vary and fit 80 columns; `wide` shows every column."""
    rows = result["rows"]
    if wide:
        cols = columns(rows)
        shared = [f"{label} {rows[0][key]}" for key, label in (("prompt_len", "prompt"), ("gen_len", "generate"),
                  ("batch", "batch")) if rows and not _varying(rows, key)]  # fmt: skip
        caption = "\n".join(env_lines(result["env"]))
    else:
        cols, shared = narrow_columns(rows)
        caption = (
            "\n".join(env_lines(result["env"])[:3])
            + "\ntok/s: decode, median; ±: half the spread; work: prompt, generate, batch; --wide: every column"
        )
    title = "gen compare" + (f": {', '.join(shared)}" if shared else "")
    table = Table(title=title, caption=caption, caption_justify="left", box=None if not wide else box.HEAVY_HEAD,
                  pad_edge=False, collapse_padding=not wide)  # fmt: skip
    for head, _ in cols:
        left = head in (
            "attention kv/heads",
            "attn",
            "pos",
            "greedy vs fp32 oracle",
            "oracle",
            "KV cache",
            "cache",
        )
        table.add_column(head, justify="left" if left else "right", no_wrap=not wide)
    for r in rows:
        cells = [fn(r) for _, fn in cols]
        style = "red" if r.get("greedy_match") is False else None
        table.add_row(*cells, style=style)
    return table


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cols = columns(rows)
    lines = ["# gen compare", "", *[f"- {line}" for line in env_lines(result["env"])], ""]
    lines.append("| " + " | ".join(h for h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fn(r).replace("|", "\\|") for _, fn in cols) + " |")
    return "\n".join(lines) + "\n"


def flat_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every row key except the raw samples (csv keeps one value per cell)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k != "samples" and k not in keys]
    return keys


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=flat_keys(result["rows"]), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({"env": result["env"], "rows": result["rows"]}, indent=2) + "\n"


def to_jsonl(result: dict[str, Any]) -> str:
    lines = [json.dumps({"env": result["env"]})] + [json.dumps(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def table_text(result: dict[str, Any], width: int = 200) -> str:
    """The Rich table as plain text (for --output FILE with the table format)."""
    console = Console(file=io.StringIO(), width=width, no_color=True, highlight=False)
    console.print(rich_table(result, wide=True))
    for note in footnotes(result):
        console.print(note)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def render(result: dict[str, Any], fmt: str) -> str:
    """The result as text in one of FORMATS."""
    return {"table": table_text, "md": to_markdown, "csv": to_csv, "json": to_json, "jsonl": to_jsonl}[fmt](result)


# ---------------------------------------------------------------------------------------------
# Chart data


def plot_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
