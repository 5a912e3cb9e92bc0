"""Options several commands share, declared once: the same flag means the same thing everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

from gen_cli.errors import UsageError

Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Sample among the k most likely tokens.", show_default=False)]
TopP = Annotated[
    float | None,
    typer.Option("--top-p", help="Nucleus: smallest set reaching this probability.", show_default=False),
]
MinP = Annotated[
    float | None, typer.Option("--min-p", help="Drop tokens below min-p × the top probability.", show_default=False)
]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", help="CTRL penalty; 1 = off.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: torch's).", show_default=False)]
KvDtype = Annotated[
    str | None,
    typer.Option(
        "--kv-dtype", help="KV cache kind for K and V: fp32, bf16, fp16, int8, int4 (default: --dtype).",
        show_default=False,
    ),
]  # fmt: skip
KvDtypeK = Annotated[str | None, typer.Option("--kv-dtype-k", help="KV cache kind for K only.", show_default=False)]
KvDtypeV = Annotated[str | None, typer.Option("--kv-dtype-v", help="KV cache kind for V only.", show_default=False)]


def kv_kinds_of(both: str | None, k: str | None, v: str | None) -> tuple[str | None, str | None] | None:
    """(K, V) cache kinds from --kv-dtype and --kv-dtype-k/-v (None: the compute dtype, unquantized)."""
    from gen_cli.cache.kinds import KV_KINDS, parse_kv_kinds

    if both is None and k is None and v is None:
        return None
    if both is not None and (k is not None or v is not None):
        raise UsageError("give --kv-dtype for both, or --kv-dtype-k/--kv-dtype-v, not both forms")
    for flag, kind in (("--kv-dtype-k", k), ("--kv-dtype-v", v)):
        if kind is not None and kind not in KV_KINDS:
            raise UsageError(f"unknown {flag} {kind!r}; choose {', '.join(KV_KINDS)}")
    try:
        return parse_kv_kinds(both) if both is not None else (k, v)
    except UsageError as e:
        raise UsageError(f"--kv-dtype: {e}") from None
