"""`--profile`: a decode step's time per operation class, adding up to the measured step time."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_config

import gen_cli.model.transformer as transformer_module
from gen_cli.infer.generate import run_generation
from gen_cli.infer.optimize import optimize_for_decode
from gen_cli.infer.options import SamplingConfig
from gen_cli.lab.profile import CLASSES, REST, ModuleTimer, StepProfile, bar_lines, module_class, profile_decode
from gen_cli.model.transformer import random_model

PROMPT = torch.tensor([[1, 2, 3, 4]])


def torch_model():
    return optimize_for_decode(random_model(tiny_config()).eval(), native=False)


def test_torch_path_classes_fit_in_the_step_and_every_op_class_is_seen():
    import time

    model = torch_model()
    start = time.perf_counter()
    p = profile_decode(model, PROMPT, 8)
    outside = time.perf_counter() - start  # measured here, around the whole call (prefill included)
    assert p.path == "torch" and p.steps == 7 and set(p.seconds) == {*CLASSES, *REST}
    for key in ("embed", "norm", "qkv", "rope", "attention", "attn_out", "mlp_in", "mlp_act", "mlp_out", "lm_head"):
        assert p.seconds[key] > 0, key
    # Own times are intervals nested inside each step's clock reads: none negative, and the named classes
    # (all but the remainder 'python') sum to no more than the step; the steps fit in the call's wall time.
    assert all(v >= 0 for v in p.seconds.values()), p.seconds
    assert sum(v for k, v in p.seconds.items() if k != "python") <= p.step_s
    assert 0 < p.step_s * p.steps <= outside


def test_profiling_leaves_the_model_as_it_was():
    model = torch_model()
    before = run_generation(model, PROMPT, 6, SamplingConfig(temperature=0.0)).tokens
    rope = transformer_module.apply_rope
    profile_decode(model, PROMPT, 6)
    assert transformer_module.apply_rope is rope
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(run_generation(model, PROMPT, 6, SamplingConfig(temperature=0.0)).tokens, before)


def test_nested_frames_count_only_their_own_time():
    ticks = iter([0.0, 1.0, 3.0, 10.0])  # attention starts at 0, rope runs 1→3, attention ends at 10
    timer = ModuleTimer(lambda: next(ticks), torch.device("cpu"))
    timer.push("attention")
    timer.push("rope")
    timer.pop()
    timer.pop()
    assert timer.totals["rope"] == 2.0 and timer.totals["attention"] == 8.0


def test_module_classes():
    model = random_model(tiny_config())
    names = {name: module_class(name, m) for name, m in model.named_modules()}
    assert names["layers.0.attn.wqkv"] == "qkv" and names["layers.1.mlp.w2"] == "mlp_out"
    assert names["layers.0.attn_norm"] == "norm" and names["layers.0.attn"] == "attention"
    assert names["layers.0"] is None and names["lm_head"] == "lm_head" and names["tok_emb"] == "embed"


class FakeNative:
    """A native step with timers: each step takes 10 fake ms, of which its profile accounts for 6."""

    def __init__(self, model, clock) -> None:
        self.model, self.clock, self.steps = model, clock, 0

    def accepts(self, batch, cache) -> bool:
        return True

    def __call__(self, token, cache):
        self.clock.now += 0.010
        self.steps += 1
        return self.model(token, cache=cache)[:, -1]

    def start_profile(self) -> None:
        self.steps = 0

    def stop_profile(self) -> dict[str, float]:
        return {"qkv": 0.002 * self.steps, "mlp_in": 0.003 * self.steps, "lm_head": 0.001 * self.steps}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_native_timers_and_the_rest_under_a_fake_clock():
    model = torch_model()
    clock = FakeClock()
    model.native_decoder = FakeNative(model, clock)
    p = profile_decode(model, PROMPT, 5, clock=clock)
    assert p.path == "native" and p.steps == 4
    assert p.step_s == pytest.approx(0.010)
    assert p.seconds["qkv"] == pytest.approx(0.002) and p.seconds["mlp_in"] == pytest.approx(0.003)
    assert p.seconds["sampling"] == 0.0 and p.seconds["python"] == pytest.approx(0.004)
    assert p.shares()["lm_head"] == pytest.approx(0.1)
    lines = bar_lines(p, width=10)
    assert len(lines) == 1 + len(CLASSES) + len(REST)
    assert any("Python" in line and line.endswith(" " + "#" * 10) for line in lines)  # the largest: a full bar
    assert any("MLP in" in line and line.endswith(" " + "#" * 8) for line in lines)  # 3 ms of 4


def test_to_dict_round_trips():
    p = StepProfile("torch", 3, 0.5, dict(zip((*CLASSES, *REST), itertools.repeat(0.0))))
    assert StepProfile(**p.to_dict()) == p


def test_generate_profile_in_json_and_as_bars(model_dir):
    import json

    from typer.testing import CliRunner

    from gen_cli.cli import app

    def run(*args):
        base = ["generate", "hi", "--model", str(model_dir), "--max-new-tokens", "6", "--device", "cpu"]
        return CliRunner().invoke(app, [*base, *args])

    r = run("--profile", "--json", "--no-native")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["stats"]["profile"]
    assert p["path"] == "torch" and p["steps"] == 5 and all(v >= 0 for v in p["seconds"].values())
    assert 0 < sum(v for k, v in p["seconds"].items() if k != "python") <= p["step_s"]
    r = run("--profile", "--no-stream", "--no-native")
    assert r.exit_code == 0, r.output
    assert "decode step:" in r.stderr and "lm_head matmul" in r.stderr and "%" in r.stderr
    r = run("--profile", "--no-kv-cache")
    assert r.exit_code == 2 and "--profile" in r.output
