"""`gen demo`: the shipped model at a glance: a sample, then the same prompt with and without KV cache."""

from __future__ import annotations

import statistics
import sys
from contextlib import nullcontext

import typer
from rich.table import Table

from gen_cli.commands.common import err, out_console, print_json, progress_enabled, read_text_arg
from gen_cli.commands.options import INPUT, SAMPLING, Json, MaxNewTokens, Model, Repeats, Threads
from gen_cli.errors import UsageError
from gen_cli.resources import default_model_dir
from gen_cli.text.tokenizer import decode


def demo_command(
    prompt: str = typer.Option(
        "The for statement", "--prompt", metavar="TEXT", help="Prompt for every run.", rich_help_panel=INPUT
    ),
    model_dir: Model = None,
    sample_tokens: int = typer.Option(
        120, "--sample-tokens", metavar="N", min=1, help="Length of the sampled continuation.", rich_help_panel=SAMPLING
    ),
    max_new_tokens: MaxNewTokens = 256,
    repeats: Repeats = 3,
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Sample from the shipped model, then time the same greedy generation with and without KV cache.

    The sample is --sample-tokens long; each timed run generates --max-new-tokens greedy tokens, and
    both settings must produce identical tokens (the cache is an optimisation, not an approximation).
    The table shows decode speed, time to first token and the speed-up the cache buys, with the
    spread over repeats and the machine's load (a ratio whose spreads overlap is not claimed).
    """
    for flag, value, least in (("--max-new-tokens", max_new_tokens, 2), ("--repeats", repeats, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    import torch

    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions, SamplingConfig
    from gen_cli.model.info import parameter_count
    from gen_cli.runtime import LoadProbe, spread_verdict

    engine = open_model(model_dir or default_model_dir(), EngineOptions(device="cpu", threads=threads))
    ids = engine.encode(read_text_arg(prompt))
    config = engine.model.config
    err.print(
        f"[bold]{engine.source}[/]: {parameter_count(config) / 1e6:.1f}M parameters, {config.attention_kind}, "
        f"{config.pos_encoding}; cpu, float32, {torch.get_num_threads()} threads"
    )

    sample = engine.generate(ids, sample_tokens, SamplingConfig(temperature=0.8, top_k=50), seed=0)
    sample_text = decode(engine.tokenizer, sample.tokens[0].tolist())
    if not as_json:
        out_console().print(f"[bold]{prompt}[/]{sample_text}", markup=True, highlight=False)

    greedy = SamplingConfig(temperature=0.0)
    runs: dict[bool, list] = {True: [], False: []}
    engine.generate(ids, 8, greedy, stop_ids=())  # warm-up: first calls pay one-off costs
    with (
        err.status(f"timing {repeats} runs with and without KV cache", spinner="dots")
        if progress_enabled()
        else nullcontext(),
        LoadProbe() as probe,
    ):
        for _ in range(repeats):
            for use_cache in (True, False):  # interleaved, so machine noise hits both alike
                spec = CacheSpec() if use_cache else None
                runs[use_cache].append(engine.generate(ids, max_new_tokens, greedy, spec, stop_ids=()))
    identical = all(torch.equal(a.tokens, b.tokens) for a in runs[True] for b in runs[False])
    rows = {}
    for use_cache, results in runs.items():
        rates = [r.stats.decode_tokens_per_s for r in results]
        rows["on" if use_cache else "off"] = {
            "decode_tokens_per_s": statistics.median(rates),
            "decode_tokens_per_s_samples": rates,
            "ttft_s": statistics.median(r.stats.ttft_s for r in results),
            "kv_cache_bytes": results[0].stats.kv_cache_bytes,
            "kv_cache_bytes_analytic": results[0].stats.kv_cache_bytes_analytic,
            "decode_path": results[0].stats.decode_path,
        }
    speedup = rows["on"]["decode_tokens_per_s"] / rows["off"]["decode_tokens_per_s"]
    load = probe.load
    significance = spread_verdict(
        rows["on"]["decode_tokens_per_s_samples"], rows["off"]["decode_tokens_per_s_samples"], load.busy
    )
    if as_json:
        print_json(
            {
                "sample": sample_text,
                "prompt": prompt,
                "tokens": max_new_tokens,
                "kv_cache": rows,
                "speedup": speedup,
                "speedup_significance": significance or "significant",
                "greedy_identical": identical,
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "machine_load": load.to_dict(),
            }
        )
        return
    table = Table(
        title=f"greedy, {len(ids)}-token prompt + {max_new_tokens} new tokens, median of {repeats}, "
        f"{torch.get_num_threads()} threads"
    )
    for column in ("KV cache", "decode tok/s", "± spread", "ms/token", "TTFT ms", "KV bytes", "path"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        samples = row["decode_tokens_per_s_samples"]
        table.add_row(
            name,
            f"{row['decode_tokens_per_s']:,.0f}",
            f"±{50 * (max(samples) - min(samples)) / row['decode_tokens_per_s']:.0f}%",  # half the min-max range
            f"{1000 / row['decode_tokens_per_s']:.2f}",
            f"{row['ttft_s'] * 1000:.1f}",
            f"{row['kv_cache_bytes']:,}",
            row["decode_path"],
        )
    sys.stdout.write("\n")
    out_console().print(table)
    verdict = "identical" if identical else "DIFFERENT (a bug: please report it)"
    claim = f"[bold]{speedup:.1f}×[/]" + (f" ({significance})" if significance else "")
    out_console().print(f"KV cache speed-up: {claim}\ngreedy tokens with and without cache: {verdict}")
    err.print(f"during the timed runs: {load.describe()}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
