"""`gen bench serve`: closed-loop clients on the scheduler, one-at-a-time vs static vs continuous batching,
and batched decode rates per batch size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gen_cli.commands.common import err, out_console, print_json
from gen_cli.commands.options import (
    Device,
    Json,
    KvDtype,
    MaxNewTokensOrNone,
    Model,
    Native,
    Preset,
    PromptLookup,
    Threads,
    check_model_path,
    kv_kinds_of,
)
from gen_cli.errors import UsageError
from gen_cli.resources import default_model_dir


def bench_serve_command(
    model_dir: Model = None,
    preset: Preset = None,
    clients: Annotated[int, typer.Option("--clients", metavar="N", min=1, help="Closed-loop clients.")] = 8,
    requests: Annotated[int, typer.Option("--requests", metavar="N", min=1, help="Requests in all, per mode.")] = 48,
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", min=1, help="Rounds, the modes interleaved.")] = 3,
    modes: Annotated[
        str,
        typer.Option("--modes", help="Scheduling modes to compare; +rows: each row through the single-sequence step."),
    ] = "continuous,continuous+rows,static,single",
    batches: Annotated[
        str | None,
        typer.Option(
            "--batches",
            metavar="B,…",
            help="Also batched decode rates at these batch sizes, e.g. 1,8,32.",
            show_default=False,
        ),
    ] = None,
    llama_server: Annotated[
        Path | None,
        typer.Option(
            "--llama-server",
            metavar="PATH",
            help="llama.cpp's llama-server: also serve the --model .gguf file with it and with gen serve over HTTP "
            "on loopback, the same clients, threads and parallel slots, rounds alternating.",
            show_default=False,
        ),
    ] = None,
    shared_prefix: Annotated[
        int | None,
        typer.Option(
            "--shared-prefix",
            metavar="TOKENS",
            min=1,
            help="Instead of the modes: every request starts with one TOKENS-token system prompt; continuous "
            "batching on a paged KV cache with its prefix cache on and off (TTFT, KV bytes held).",
            show_default=False,
        ),
    ] = None,
    turns: Annotated[
        int | None,
        typer.Option(
            "--turns",
            metavar="N",
            min=2,
            help="Instead of the modes: --requests/N chats of N turns (each prompt the last one + its answer of -n "
            "tokens + a new message); continuous batching on a paged KV cache with its prefix cache on and off "
            "(TTFT, prompt tokens served from the cache, KV bytes held). With --llama-server, over HTTP too.",
            show_default=False,
        ),
    ] = None,
    prompt_lookup: PromptLookup = 0,
    answer: MaxNewTokensOrNone = None,  # 8-64 at random on the scheduler, 128 over HTTP and per --turns answer
    kv_dtype: KvDtype = None,  # the requests' caches in the scheduler's modes and the --batches rates
    device: Device = "auto",
    threads: Threads = None,
    native: Native = True,
    as_json: Json = False,
) -> None:
    """Serving throughput, time to first token and inter-token latency per scheduling mode, on the scheduler
    itself; with --llama-server, also gen serve against llama-server over HTTP on the same GGUF file. Each
    request asks for -n tokens: by default 8-64 at random on the scheduler, 128 over HTTP and per answer with
    --turns."""
    from rich.table import Table

    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.infer.options import Preset as PresetSource
    from gen_cli.infer.scheduler import MODES
    from gen_cli.lab.batch_bench import batch_rates
    from gen_cli.lab.serve_bench import compare_modes, summary

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    unknown = [m for m in chosen if m.removesuffix("+rows") not in MODES]
    if unknown or not chosen:
        raise UsageError(
            f"unknown mode {', '.join(unknown) or modes!r}; choose from {', '.join(MODES)}, each also with +rows"
        )
    if prompt_lookup and (shared_prefix is not None or turns is not None):
        raise UsageError("--prompt-lookup runs with the modes, not with --shared-prefix or --turns")
    sizes = _sizes(batches)
    if model_dir is not None and preset is not None:
        raise UsageError("give --model or --preset, not both")
    if model_dir is not None:
        check_model_path(model_dir, "bench serve")
    if llama_server is not None:
        _check_llama_server(llama_server, model_dir)
    source = PresetSource(preset) if preset is not None else (model_dir or default_model_dir())
    engine = open_model(source, EngineOptions(device, threads=threads, native=native))
    err.print(f"[dim]{engine.source}: {clients} clients, {requests} requests, {rounds} rounds[/]")
    new_tokens = answer or 128
    if shared_prefix is not None and turns is not None:
        raise UsageError("give --shared-prefix or --turns, not both")
    if shared_prefix is not None:
        _shared_prefix(engine.model, clients, requests, rounds, shared_prefix, as_json)
        return
    if turns is not None:
        from gen_cli.lab.serve_bench import longest_conversation
        from gen_cli.model.transformer import check_context

        check_context(engine.model.config, 0, longest_conversation(turns, new_tokens))
        rows = _multi_turn(engine.model, clients, requests, rounds, turns, new_tokens)
        if llama_server is not None and model_dir is not None:
            from gen_cli.lab.http_load import compare_servers
            from gen_cli.runtime import set_threads

            del engine
            count = set_threads(threads)
            err.print(f"[dim]over HTTP: gen serve and llama-server, {count} threads, {clients} slots, {turns} turns[/]")
            context = turns * (new_tokens + 32) + 64  # a chat's prompt text + answers, with room for tokenizing
            http = compare_servers(
                model_dir, llama_server, count, clients, requests, rounds, new_tokens, context, turns
            )
            rows += [{**r, "mode": f"{r['mode']} (http)"} for r in summary(http)]
        _print_turns(rows, as_json)
        return
    if answer is not None:
        from gen_cli.model.transformer import check_context

        check_context(engine.model.config, 64, answer)  # the longest prompt of the workload, then the answer
    spec = CacheSpec(*(kv_kinds_of(kv_dtype, None, None) or (None, None)))
    spec.check(engine.model.config)
    encode = engine.encode if engine.tokenizer is not None else None  # prompt lookup's passage-rewriting workload
    runs = compare_modes(engine.model, clients, requests, rounds, chosen, new=answer, spec=spec,
                         speculate=prompt_lookup, encode=encode)  # fmt: skip
    rows = summary(runs)
    rates = batch_rates(engine.model, sizes, rounds=rounds, spec=spec) if sizes else []
    http_rows: list[dict[str, float | str]] = []
    if llama_server is not None and model_dir is not None:
        from gen_cli.lab.http_load import compare_servers
        from gen_cli.runtime import set_threads

        del engine  # the servers load the file themselves: this process's copy would only compete with them
        count = set_threads(threads)
        err.print(
            f"[dim]over HTTP: gen serve and llama-server, {count} threads, {clients} slots, {new_tokens} tokens[/]"
        )
        http_rows = summary(compare_servers(model_dir, llama_server, count, clients, requests, rounds, new_tokens,
                                            context=new_tokens + 64))  # fmt: skip
    if as_json:
        print_json({"modes": rows, "batches": [vars(r) for r in rates], "http": http_rows})
        return
    table = Table("mode", "tok/s", "range", "TTFT p50/p90/p99 ms", "inter-token p50/p90/p99 ms")
    if prompt_lookup:
        table.add_column("guesses kept")
    for r in rows:
        kept = [f"{r['kept']:.0%} of {r['guesses']}" if r["kept"] is not None else "—"] if prompt_lookup else []
        table.add_row(str(r["mode"]), f"{r['tokens_per_s']:.1f}", f"{r['low']:.1f}–{r['high']:.1f}",
                      _p3(r, "ttft", ".0f"),
                      _p3(r, "itl", ".1f"), *kept)  # fmt: skip
    for r in http_rows:
        table.add_row(f"{r['mode']} (http)", f"{r['tokens_per_s']:.1f}", f"{r['low']:.1f}–{r['high']:.1f}",
                      _p3(r, "ttft", ".0f"),
                      _p3(r, "itl", ".1f"))  # fmt: skip
    out_console().print(table)
    if rates:
        batch_table = Table("batch", "tok/s", "range", "× batch 1")
        for r in rates:
            ratio = r.tokens_per_s / rates[0].tokens_per_s if rates[0].tokens_per_s else 0.0
            batch_table.add_row(str(r.batch), f"{r.tokens_per_s:.1f}", f"{r.low:.1f}–{r.high:.1f}", f"{ratio:.2f}")
        out_console().print(batch_table)


def _shared_prefix(model, clients: int, requests: int, rounds: int, prefix: int, as_json: bool) -> None:
    """The prefix cache on and off: closed-loop TTFT and throughput, and the KV bytes `clients` requests hold."""
    from rich.table import Table

    from gen_cli.lab.serve_bench import shared_prefix_memory, shared_prefix_runs, summary
    from gen_cli.model.transformer import check_context

    check_context(model.config, 0, prefix + 32 + 16)
    rows = summary(shared_prefix_runs(model, clients, requests, prefix, rounds))
    memory = shared_prefix_memory(model, clients, prefix)
    if as_json:
        print_json({"shared_prefix": rows, "memory": memory})
        return
    table = Table("prefix cache", "tok/s", "range", "TTFT p50/p90/p99 ms", "TTFT p50 per round ms")
    for r in rows:
        per_round = ", ".join("—" if x is None else f"{x:.0f}" for x in r["ttft_p50_runs"])  # type: ignore[union-attr]
        table.add_row(str(r["mode"]).removeprefix("prefix cache "), f"{r['tokens_per_s']:.1f}",
                      f"{r['low']:.1f}–{r['high']:.1f}",
                      _p3(r, "ttft", ".0f"), per_round)  # fmt: skip
    out_console().print(table)
    kv = Table("prefix cache", "sequences", "blocks in use", "KV bytes (pool)", "analytic minimum", "unshared analytic")
    for m in memory:
        kv.add_row("on" if m["prefix_cache"] else "off", str(m["sequences"]), str(m["blocks_in_use"]),
                   f"{m['bytes_in_use']:,}", f"{m['analytic']:,}", f"{m['analytic_unshared']:,}")  # fmt: skip
    out_console().print(kv)


def _multi_turn(model, clients: int, requests: int, rounds: int, turns: int, new: int) -> list[dict]:
    """Chats on the scheduler, the prefix cache on and off."""
    from gen_cli.lab.serve_bench import multi_turn_runs, summary

    chats = max(1, requests // turns)
    return summary(multi_turn_runs(model, clients, chats, turns, rounds, new=new))


def _print_turns(rows: list[dict], as_json: bool) -> None:
    from rich.table import Table

    if as_json:
        print_json({"turns": rows})
        return
    table = Table("server, prefix cache", "tok/s", "range", "TTFT p50/p90/p99 ms", "prompt tokens cached", "KV peak")
    for r in rows:
        cached = "?" if r["cached_tokens"] is None else f"{r['cached_tokens']:,} of {r['prompt_tokens']:,}"
        table.add_row(str(r["mode"]), f"{r['tokens_per_s']:.1f}", f"{r['low']:.1f}–{r['high']:.1f}",
                      _p3(r, "ttft", ".0f"), cached,
                      f"{r['kv_peak'] / 1e6:.2f} MB" if r["kv_peak"] else "?")  # fmt: skip
    out_console().print(table)


def _p3(row: dict, key: str, spec: str) -> str:
    """A row's p50 / p90 / p99 of `key` (ttft, itl), or a dash where nothing was timed: a server that streamed
    no text (random weights decoding to unused tokens) gives no first-token time."""
    values = [row[f"{key}_p{q}"] for q in (50, 90, 99)]
    return "—" if values[0] is None else " / ".join(format(v, spec) for v in values)


def _check_llama_server(binary: Path, model_dir: Path | None) -> None:
    if model_dir is None or model_dir.suffix.lower() != ".gguf":
        raise UsageError("--llama-server serves a .gguf file: give it as --model", params=("llama_server",))
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise UsageError(f"--llama-server {binary}: not an executable file", params=("llama_server",))


def _sizes(batches: str | None) -> list[int]:
    if batches is None:
        return []
    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches takes batch sizes such as 1,8,32, got {batches!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batches takes batch sizes ≥ 1, got {batches!r}")
    return sizes
