"""`gen demo`: the shipped model at a glance: a sample, then the same prompt with and without KV cache."""

from __future__ import annotations

import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import typer
from rich.table import Table

from gen_cli.commands.common import err, out_console, print_json, progress_enabled
from gen_cli.commands.options import Threads
from gen_cli.resources import default_model_dir


def demo_command(
    prompt: str = typer.Option("The for statement", "--prompt", help="Prompt for every run."),
    model_dir: Path = typer.Option(
        None, "--model", help="Model directory (default: the shipped model).", show_default=False
    ),
    sample_tokens: int = typer.Option(120, "--sample-tokens", min=1, help="Length of the sampled continuation."),
    tokens: int = typer.Option(256, "--tokens", min=2, help="Greedy tokens for the cache on/off comparison."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per setting; the median is shown."),
    threads: Threads = None,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
) -> None:
    """Sample from the shipped model, then time the same greedy generation with and without KV cache.

    Both runs must produce identical tokens (the cache is an optimisation, not an approximation);
    the table shows decode speed, time to first token and the speed-up the cache buys, with the
    spread over repeats and the machine's load (a ratio whose spreads overlap is not claimed).
    """
    import torch

    from gen_cli.formats.checkpoint import load_model
    from gen_cli.infer.generate import run_generation
    from gen_cli.infer.optimize import optimize_for_decode
    from gen_cli.infer.sampling import SamplingConfig
    from gen_cli.runtime import LoadProbe, set_threads, spread_verdict
    from gen_cli.text.tokenizer import decode, encode, special_id

    set_threads(threads)
    directory = model_dir or default_model_dir()
    model, tok = load_model(directory)
    params = model.num_parameters()
    model = optimize_for_decode(model)  # the inference path `gen generate` runs
    prompt_ids = torch.tensor([encode(tok, prompt)], dtype=torch.long)  # (1, T)
    err.print(
        f"[bold]{directory}[/]: {params / 1e6:.1f}M parameters, {model.config.attention_kind}, "
        f"{model.config.pos_encoding}; cpu, float32, {torch.get_num_threads()} threads"
    )

    sample = run_generation(
        model,
        prompt_ids,
        sample_tokens,
        SamplingConfig(temperature=0.8, top_k=50),
        generator=torch.Generator().manual_seed(0),
        stop_token_id=special_id(tok),
    )
    sample_text = decode(tok, sample.tokens[0].tolist())
    if not as_json:
        out_console().print(f"[bold]{prompt}[/]{sample_text}", markup=True, highlight=False)

    greedy = SamplingConfig(temperature=0.0)
    runs: dict[bool, list] = {True: [], False: []}
    run_generation(model, prompt_ids, 8, greedy, use_cache=True)  # warm-up: first calls pay one-off costs
    with (
        err.status(f"timing {repeats} runs with and without KV cache", spinner="dots")
        if progress_enabled()
        else nullcontext(),
        LoadProbe() as probe,
    ):
        for _ in range(repeats):
            for use_cache in (True, False):  # interleaved, so machine noise hits both alike
                runs[use_cache].append(run_generation(model, prompt_ids, tokens, greedy, use_cache=use_cache))
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
                "tokens": tokens,
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
        title=f"greedy, {prompt_ids.shape[1]}-token prompt + {tokens} new tokens, median of {repeats}, "
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
