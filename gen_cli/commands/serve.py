"""`gen serve`: an OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

import typer

from gen_cli.commands.common import err
from gen_cli.commands.options import (
    Act,
    Device,
    Dtype,
    KvDtype,
    KvDtypeK,
    KvDtypeV,
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

SERVER = "Server"


def serve_command(
    model_dir: Model = None,
    preset: Preset = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback only by default).", rich_help_panel=SERVER)
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).", rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            help="Require `Authorization: Bearer KEY`.",
            show_default=False,
            envvar="GEN_API_KEY",
            rich_help_panel=SERVER,
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", metavar="N", help="Requests decoded together.", rich_help_panel=SERVER)
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", metavar="N", help="Requests waiting beyond those (more: 429).", rich_help_panel=SERVER
        ),
    ] = 64,
    kv_budget_mb: Annotated[
        float | None,
        typer.Option(
            "--kv-budget-mb",
            metavar="MB",
            help="KV cache all running requests may hold.",
            show_default="no limit",
            rich_help_panel=SERVER,
        ),
    ] = None,
    kv_blocks: Annotated[
        int | None,
        typer.Option(
            "--kv-blocks",
            metavar="N",
            min=1,
            help="A paged KV cache of N blocks: requests wait until their blocks are free, and prompts that "
            "start alike share their cached full blocks (see docs/serving.md).",
            show_default="one cache per request",
            rich_help_panel=SERVER,
        ),
    ] = None,
    block_tokens: Annotated[
        int,
        typer.Option(
            "--block-tokens", metavar="N", min=1, help="Tokens per KV block (--kv-blocks).", rich_help_panel=SERVER
        ),
    ] = 16,
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule",
            metavar="MODE",
            help="continuous, static (batch by batch) or single (one at a time).",
            rich_help_panel=SERVER,
        ),
    ] = "continuous",
    decode: Annotated[
        str,
        typer.Option(
            "--decode",
            metavar="HOW",
            help="batched (one PyTorch step for all running requests) or rows (gen's single-sequence step per "
            "request: faster on small models, see docs/serving.md).",
            rich_help_panel=SERVER,
        ),
    ] = "batched",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="ID",
            help="The model id clients send.",
            show_default="the folder's name",
            rich_help_panel=SERVER,
        ),
    ] = None,
    prompt_lookup: PromptLookup = 0,
    drain_s: Annotated[
        float,
        typer.Option(
            "--drain-s",
            metavar="S",
            help="On Ctrl-C/SIGTERM, seconds in-flight requests may finish before they are cancelled "
            "(a second signal exits at once).",
            rich_help_panel=SERVER,
        ),
    ] = 5.0,
    kv_dtype: KvDtype = None,
    kv_dtype_k: KvDtypeK = None,
    kv_dtype_v: KvDtypeV = None,
    device: Device = "auto",
    dtype: Dtype = None,
    threads: Threads = None,
    native: Native = True,
    act: Act = None,
) -> None:
    """Serve a model over HTTP as the OpenAI API does: /v1/completions, /v1/chat/completions, /v1/models."""
    from gen_cli.cache.spec import CacheSpec
    from gen_cli.infer.engine import open_model
    from gen_cli.infer.options import EngineOptions
    from gen_cli.infer.options import Preset as PresetSource
    from gen_cli.serve.server import ServeOptions, listen, served, uvicorn_server

    if model_dir is not None and preset is not None:
        raise UsageError("give --model or --preset, not both")
    if model_dir is not None:
        check_model_path(model_dir, "serve")
    if decode not in ("batched", "rows"):
        raise UsageError(f"--decode takes batched or rows, got {decode!r}")
    if not 0 <= drain_s <= 3600:
        raise UsageError(f"--drain-s must be between 0 and 3600, got {drain_s}")
    if kv_budget_mb is not None and not kv_budget_mb > 0:
        raise UsageError(f"--kv-budget-mb must be > 0, got {kv_budget_mb}")
    source = PresetSource(preset) if preset is not None else (model_dir or default_model_dir())
    kinds = kv_kinds_of(kv_dtype, kv_dtype_k, kv_dtype_v) or (None, None)
    engine = open_model(source, EngineOptions(device, dtype, threads, native=native, act=act))
    budget = int(kv_budget_mb * 2**20) if kv_budget_mb is not None else None
    options = ServeOptions(
        max_batch, max_queue, budget, mode=schedule, cache=CacheSpec(*kinds), api_key=api_key,
        by_row=decode == "rows", drain_s=drain_s, kv_blocks=kv_blocks, block_tokens=block_tokens,
        speculate=prompt_lookup,
    )  # fmt: skip
    model_id = name or (preset if preset is not None else Path(source).name)  # type: ignore[arg-type]
    sock = listen(host, port)  # bound here so that --port 0 reports the port it got
    port = sock.getsockname()[1]
    server = uvicorn_server(app_served := served(engine, model_id, options), host, port, options)
    server.install_signals()  # before the line below: a client may signal as soon as it reads it
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err.print(f"[yellow]listening on {host} without --api-key: anyone who can reach it can use it[/]")
    err.print(
        f"[dim]serving {engine.source} as {model_id!r} on http://{host}:{port}/v1 ({schedule}, batch {max_batch}"
        + (f", prompt lookup {prompt_lookup}" if prompt_lookup else "")
        + ")[/]"
    )
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # re-raised in the main thread
            failed.append(e)

    loop = threading.Thread(target=http, name="gen-http", daemon=True)
    loop.start()
    try:  # the model steps here, in the thread that loaded it (gen_cli/serve/worker.py says why)
        app_served.worker.run_here(loop.is_alive)
        loop.join()
    finally:
        app_served.worker.stop()
        sock.close()
    if failed:
        raise failed[0]


def register(app: typer.Typer) -> None:
    from gen_cli.commands.bench import bench_app
    from gen_cli.commands.serve_bench import bench_serve_command

    app.command("serve")(serve_command)
    # `gen bench serve` belongs with the server it measures; it joins the bench group from here.
    bench_app.command("serve")(bench_serve_command)
