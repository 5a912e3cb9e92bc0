"""Long work says what it will do and how long, measured, before it is done."""

from __future__ import annotations

import time

from gen_cli.commands import train as train_cmd
from gen_cli.train.loop import StepEvent


def test_train_prints_an_estimate_after_a_few_measured_steps(monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr(train_cmd.err, "print", lambda *a, **k: printed.append(str(a[0])))
    monkeypatch.setattr(train_cmd, "progress_enabled", lambda: False)
    # The clock is read when step 1 arrives and when step 6 does: 0.5 s for 5 steps is 0.1 s a step,
    # and the 994 steps left take 99.4 s.
    readings = iter([100.0, 100.5])
    monkeypatch.setattr(time, "perf_counter", lambda: next(readings))
    renderer = train_cmd._Renderer()
    for step in range(1, 10):
        renderer(StepEvent(step, 1000, 5.0, 1e-3, 1.0, 100.0, 0.1 * step, 100.0))
    estimates = [p for p in printed if p.startswith("training 1,000 steps")]
    assert len(estimates) == 1
    assert estimates[0].startswith("training 1,000 steps: 0.10 s per step measured over 5 steps, about 1:39 to go")
