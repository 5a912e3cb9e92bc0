"""How `gen generate` reports a run on stderr: the --stats lines and what the prompt cache did."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from gen_cli.commands.common import err


def reuse_note(pc: dict[str, Any]) -> str:
    """What the prompt cache did, in one line for stderr."""
    if pc["action"] == "created":
        return f"prompt cache: saved {pc['file_tokens']} prompt tokens to {pc['file']}"
    reused = f"reused {pc['reused_tokens']} of {pc['prompt_tokens']} prompt tokens from {pc['file']}"
    if pc["action"] == "reused":
        return f"prompt cache: {reused}"
    return f"prompt cache: {reused}; its prompt differs from this one, so it was rewritten with this prompt"


def print_stats(stats: dict[str, Any], source: str, path_note: str = "", from_bos: bool = False) -> None:
    """--stats: the run's figures, one labelled line each, on stderr."""

    def rate(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.1f} tok/s"

    ms = "n/a" if stats["ms_per_token"] is None else f"{stats['ms_per_token']:.2f} ms"
    match = "agree" if stats["kv_cache_bytes"] == stats["kv_cache_bytes_analytic"] else "DIFFER"
    lines = [
        f"model            {escape(source)}",
        f"load             {stats['load_s']:.2f} s, peak memory {stats['load_peak_memory_bytes']:,} B",
        f"prompt tokens    {stats['prompt_tokens']}{' (empty prompt: starting from BOS)' if from_bos else ''}"
        f"   new tokens {stats['new_tokens']}   batch {stats['batch']}",
        f"time to first    {stats['ttft_s'] * 1000:.1f} ms   (prefill {rate(stats['prefill_tokens_per_s'])})",
        f"decode           {rate(stats['decode_tokens_per_s'])}   {ms} per step",
        f"KV cache         {stats['kv_cache_bytes_analytic']:,} B analytic, {stats['kv_cache_bytes']:,} B actual"
        + (f" ({match})" if stats["kv_cache_bytes"] else " (cache off)"),
        f"peak memory      {stats['peak_memory_bytes']:,} B ({stats['memory_method']})",
        f"device           {stats['device']}   dtype {stats['dtype']}   threads {stats['threads']}   "
        f"decode path {stats['decode_path']}{path_note}",
        f"KV kinds         K {stats['kv_dtype_k'] or '-'}   V {stats['kv_dtype_v'] or '-'}"
        + (f"   window {stats['kv_window']} + {stats['kv_sinks']} sinks" if stats.get("kv_window") else "")
        + (f"   (PyTorch decodes: {escape(stats['decode_path_reason'])})" if stats.get("decode_path_reason") else ""),
    ]
    if load := stats.get("machine_load"):
        from gen_cli.runtime import MachineLoad

        busy = MachineLoad(load["cores"], load["others_cores"], load["load_avg_1m"])
        lines.append(f"machine          {busy.describe()}; one run, no spread (gen bench decode repeats)")
    if choice := stats.get("native_threads"):
        from gen_cli.native.threads import describe

        lines.append(f"native threads   {escape(describe(choice))}")
    if sp := stats.get("speculation"):
        kept = "n/a" if sp["acceptance_rate"] is None else f"{sp['acceptance_rate']:.0%}"
        per = "n/a" if sp["tokens_per_forward"] is None else f"{sp['tokens_per_forward']:.2f}"
        k = f"K {sp['k']}" + (" adaptive" if sp["adaptive"] else "")
        lines.append(
            f"speculation      {sp['proposer']}, {k}: {sp['accepted']} of {sp['proposed']} guesses kept ({kept}), "
            f"{per} tokens per target forward ({sp['rounds']} forwards); target {sp['target_s'] * 1000:.0f} ms, "
            f"proposer {sp['draft_s'] * 1000:.0f} ms"
        )
        if sp["adaptive"]:  # what the planner chose from the measured forward costs
            ks = ", ".join(f"K{k}×{n}" for k, n in sp["k_counts"].items()) or "no guesses"
            rows = ", ".join(f"{n} rows {c:.1f}" for n, c in sp["verify_steps"].items())
            lines.append(
                f"speculation K    chose {ks}; {sp['held']} plain steps where no K paid ({sp['probes']} probes); "
                f"forward cost in steps: {rows or 'none measured'}"
            )
    if pc := stats.get("prompt_cache"):
        lines.append(
            f"prompt cache     {pc['reused_tokens']} of {pc['prompt_tokens']} prompt tokens reused, "
            f"{pc['prompt_tokens'] - pc['reused_tokens']} prefilled (file read in {pc['read_s'] * 1000:.1f} ms, "
            "not in the time to first token)"
        )
    if stats.get("compile_s") is not None:
        lines.append(f"compile          {stats['compile_s']:.1f} s before generating (torch.compile; not in the rates)")
    if weights := stats.get("weights"):
        total = sum(e["bytes"] for e in weights.values())
        parts = [f"{cls} {'+'.join(e['types'])} {e['bytes']:,} B" for cls, e in weights.items()]
        lines.append(f"weights          {total:,} B in memory: " + "; ".join(parts))
    if act := stats.get("activations"):  # block weights only: what their products multiply
        lines.append(f"activations      {act} in block weights' products")
    err.print("\n".join(lines))
