"""Options several commands share, declared once: the same flag means the same thing everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

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
