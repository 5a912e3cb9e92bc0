"""How `gen bench decode` and `--profile` draw their results in the terminal: the decode table and the
per-class profile of a decode step as a table with bars (plain text when stdout is not a terminal)."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from gen_cli.lab.decode_bench import Row
from gen_cli.lab.profile import LABELS, StepProfile, bar_lines, shown


def _pm(xs: list[float]) -> str:
    return f"± {statistics.stdev(xs):,.1f}" if len(xs) > 1 else ""


def decode_table(rows: list[Row], context: dict[str, Any], repeats: int, new_tokens: int) -> Table:
    """One row per shape × mode: decode and prefill rates, ratios, deviation and the ceilings."""
    peaks = context.get("peak_gflops") or {}
    title = (
        f"decode (tg{new_tokens}) and prefill (pp{context['prefill_prompt']}), batch 1, {context['device']}, "
        f"{context['threads']} threads, median of {repeats}; bandwidth measured beside each shape: "
        + ", ".join(f"{shape} {gb_s:.1f} GB/s" for shape, gb_s in context["bandwidth_gb_s"].items())
        + "; best GEMM seen: "
        + ", ".join(
            " / ".join(f"{v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s {k}" for k, v in p.items())
            for p in peaks.values()
        )
    )
    table = Table(title=title)
    columns = ("shape", "mode", "path", "decode tok/s", "±", "× HF", "× C ref", "prefill tok/s", "± ", "% peak",
               "max |Δlogit|", "greedy =", "MB/token", "ceiling tok/s", "% ceiling", "compile s")  # fmt: skip
    for c in columns:
        table.add_column(c, justify="left" if c in ("shape", "mode", "path") else "right")
    for r in rows:
        pct_peak = 100 * r.prefill_tok_s * r.prefill_flops_per_token / (r.peak_gflops * 1e9) if r.peak_gflops else None
        table.add_row(
            r.shape,
            r.mode,
            r.path,
            f"{r.decode_tok_s:,.1f}",
            _pm(r.decode_runs),
            (f"{r.vs_hf:.2f}×" + (" ns" if r.vs_hf_note else "")) if r.vs_hf else "",
            f"{r.vs_c:.2f}×" if r.vs_c else "",
            f"{r.prefill_tok_s:,.0f}",
            _pm(r.prefill_runs),
            f"{pct_peak:.0f}% {r.peak_dtype}" if pct_peak is not None else "",
            f"{r.max_logit_diff:.2g}",
            f"{r.greedy_agree}/{r.new_tokens}",
            f"{r.bytes_per_token / 1e6:.1f}",
            f"{r.ceiling_tok_s:,.0f}",
            f"{100 * r.decode_tok_s / r.ceiling_tok_s:.0f}%",
            f"{r.compile_s:.0f}" if r.compile_s else "",
        )
    return table


def act_table(rows: list[Row]) -> Table:
    """Block modes per activation precision: decode and prefill rates, the decode rate over the same weights with
    int8 activations (same run), and the quality against fp32 activations on real text (a real model only)."""
    from gen_cli.lab.decode_bench import ACT_SEP, split_mode

    table = Table(
        title="activation precision of block weights: speed, and agreement with fp32 activations on real text"
    )
    columns = ("shape", "mode", "act", "decode tok/s", "range", "× int8", "prefill tok/s", "KL mean", "KL max",
               "top-1 =", "greedy =")  # fmt: skip
    for c in columns:
        table.add_column(c, justify="left" if c in ("shape", "mode", "act") else "right")
    by_mode = {(r.shape, r.mode): r for r in rows}
    for r in rows:
        base, act = split_mode(r.mode)
        if act is None:
            continue
        int8 = by_mode.get((r.shape, f"{base}{ACT_SEP}int8"))
        q = r.extra.get("act_quality")
        table.add_row(
            r.shape, base, act, f"{r.decode_tok_s:,.1f}", f"{min(r.decode_runs):,.0f}–{max(r.decode_runs):,.0f}",
            f"{r.decode_tok_s / int8.decode_tok_s:.2f}×" if int8 and int8.decode_tok_s else "",
            f"{r.prefill_tok_s:,.0f}",
            *((f"{q['kl_mean']:.1e}", f"{q['kl_max']:.1e}", f"{100 * q['top1_agreement']:.1f}%",
               f"{q['greedy_agree']}/{q['greedy_tokens']}") if q else ("", "", "", "")),
        )  # fmt: skip
    return table


def profile_table(title: str, profile: StepProfile, width: int = 30) -> Table:
    """A profile as a rich table with a bar per class, scaled to the largest."""
    shares = profile.shares()
    top = max(shares.values(), default=0.0) or 1.0
    table = Table(title=f"{title}: {profile.path} step {1000 * profile.step_s:.3f} ms ({profile.steps} steps)")
    for c, justify in (("class", "left"), ("ms / step", "right"), ("share", "right"), ("", "left")):
        table.add_column(c, justify=justify)
    for key in shown(profile):
        seconds, share = profile.seconds[key], shares[key]
        table.add_row(LABELS[key], f"{1000 * seconds:.3f}", f"{100 * share:.1f}%",
                      "[cyan]" + "█" * round(width * max(share, 0.0) / top) + "[/]")  # fmt: skip
    return table


def print_profile(title: str, profile: StepProfile, console: Console) -> None:
    """A rich table on a terminal, the plain-text bars otherwise; a note on how it was measured."""
    if console.is_terminal and not console.no_color:
        console.print(profile_table(title, profile))
    else:
        console.print("\n".join([f"{title}:", *bar_lines(profile)]), markup=False, highlight=False, soft_wrap=True)
    if profile.note:
        console.print(f"  ({profile.note})", markup=False, highlight=False)


def print_profiles(rows: list[Row], console: Console) -> None:
    """The profile of every row that has one (`gen bench decode --profile`)."""
    for r in rows:
        p = r.extra.get("profile")
        if p is None:
            continue
        if "seconds" not in p:
            console.print(f"{r.shape} {r.mode}: {p.get('note', 'no profile')}", markup=False)
            continue
        print_profile(f"{r.shape} {r.mode}", StepProfile(**p), console)
