"""Where a decode step's time goes, per operation class: gen's `--profile`.

The native C step times its own phases (`start_profile` / `stop_profile` on the decoder); the PyTorch
path is timed by forward hooks on the model's modules, each class getting its modules' *own* time (a
module's time less its timed children's), and RoPE by wrapping the function attention calls. Sampling
is timed around `sample_next`; "python" is the rest of the step's wall time (the interpreter between
ops, the hooks themselves, allocation): so the classes always add up to the measured step time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import gen_cli.model.transformer as transformer_module
from gen_cli.infer.generate import decode_step, new_cache, prefill
from gen_cli.infer.options import SamplingConfig
from gen_cli.infer.sampling import sample_next
from gen_cli.model.transformer import MLP, Attention, Transformer
from gen_cli.runtime import synchronize

# The native step's timer keys, in the order a layer runs them; then what the step's wall time adds.
CLASSES = ("embed", "norm", "qkv", "rope", "attention", "attn_out", "mlp_in", "mlp_act", "mlp_out", "lm_head")
REST = ("sampling", "python")
LABELS = {
    "embed": "embedding row",
    "norm": "norms",
    "qkv": "QKV matmul",
    "rope": "RoPE",
    "attention": "attention over the cache",
    "attn_out": "attention output matmul",
    "mlp_in": "MLP in (gate+up) matmul",
    "mlp_act": "MLP activation",
    "mlp_out": "MLP out (down) matmul",
    "lm_head": "lm_head matmul",
    "sampling": "sampling",
    "python": "Python overhead, rest",
    "untimed": "native step (no timers)",
}
# Modules by attribute name; Attention's and MLP's own time is what is left once their children are timed.
_BY_NAME = {"tok_emb": "embed", "pos_emb": "embed", "wqkv": "qkv", "wo": "attn_out", "w13": "mlp_in",
            "w1": "mlp_in", "w3": "mlp_in", "w2": "mlp_out", "lm_head": "lm_head"}  # fmt: skip


@dataclass
class StepProfile:
    """Seconds per decode step in each class (CLASSES + REST, summing to `step_s`), averaged over `steps`."""

    path: str  # "native" or "torch"
    steps: int
    step_s: float
    seconds: dict[str, float]
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shares(self) -> dict[str, float]:
        """Each class's fraction of the step's wall time."""
        return {k: v / self.step_s if self.step_s > 0 else 0.0 for k, v in self.seconds.items()}


def module_class(name: str, module: nn.Module) -> str | None:
    """The class a module's own time belongs to, or None when it is not timed (blocks, containers)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _BY_NAME:
        return _BY_NAME[leaf]
    if leaf.endswith("norm") or isinstance(module, nn.RMSNorm | nn.LayerNorm):
        return "norm"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, MLP):
        return "mlp_act"
    return None


class ModuleTimer:
    """Accumulates each class's own time from hooks; nested frames subtract from their parent's time."""

    def __init__(self, clock: Callable[[], float], device: torch.device) -> None:
        self.clock, self.device = clock, device
        self.totals = dict.fromkeys(CLASSES, 0.0)
        self._stack: list[list[Any]] = []  # [class, start, children's time]

    def _now(self) -> float:
        synchronize(self.device)  # a GPU op's time lands in the module that launched it
        return self.clock()

    def push(self, cls: str) -> None:
        self._stack.append([cls, self._now(), 0.0])

    def pop(self) -> None:
        cls, start, children = self._stack.pop()
        elapsed = self._now() - start
        self.totals[cls] += elapsed - children
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Hooks on every timed module and a timed RoPE while inside; everything restored after."""
        handles = []
        for name, module in model.named_modules():
            if (cls := module_class(name, module)) is not None:
                handles.append(module.register_forward_pre_hook(lambda _m, _a, c=cls: self.push(c)))
                handles.append(module.register_forward_hook(lambda _m, _a, _o: self.pop()))
        rope = transformer_module.apply_rope

        def timed_rope(*args: Any) -> torch.Tensor:
            self.push("rope")
            try:
                return rope(*args)
            finally:
                self.pop()

        transformer_module.apply_rope = timed_rope  # attention looks the function up at call time
        try:
            yield
        finally:
            transformer_module.apply_rope = rope
            for h in handles:
                h.remove()


@torch.inference_mode()
def profile_decode(
    model: Transformer,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> StepProfile:
    """Prefill `prompt_ids` (1, T), then time `new_tokens - 1` decode steps class by class."""
    sampling = sampling or SamplingConfig(temperature=0.0)
    device = prompt_ids.device
    cache = new_cache(model, prompt_ids, new_tokens)
    token = sample_next(prefill(model, prompt_ids, cache), None, sampling, generator)[:, None]  # (B, 1)
    native = model.native_decoder
    on_native = native is not None and native.accepts(token.shape[0], cache)
    c_argmax = on_native and sampling.greedy and sampling.repetition_penalty == 1 and hasattr(native, "argmax_into")
    timer = ModuleTimer(clock, device)
    timers = on_native and hasattr(native, "start_profile")
    steps, wall, sample_s, step_s = max(new_tokens - 1, 0), 0.0, 0.0, 0.0
    with contextlib.ExitStack() as stack:
        if timers:
            native.start_profile()
        elif not on_native:
            stack.enter_context(timer.attached(model))
        for _ in range(steps):
            synchronize(device)
            t0 = clock()
            logits = decode_step(model, token, cache)
            synchronize(device)
            t1 = clock()
            picked = torch.empty(token.shape[0], dtype=torch.long)  # (B,)
            if not (c_argmax and native.argmax_into(logits, picked)):  # greedy picks in C, as generate does
                picked = sample_next(logits, None, sampling, generator)
            token = picked[:, None]  # (B, 1)
            synchronize(device)
            t2 = clock()
            wall, sample_s, step_s = wall + t2 - t0, sample_s + t2 - t1, step_s + t1 - t0
        totals = {**dict.fromkeys(CLASSES, 0.0), **native.stop_profile()} if timers else timer.totals
    note = None
    if on_native and not timers:
        note = "this build of the native step has no timers: its step is one 'untimed' class"
    elif not on_native:
        note = "PyTorch path, timed by module hooks: 'python' includes the hooks' own cost"
    n = max(steps, 1)
    seconds = {k: totals.get(k, 0.0) / n for k in CLASSES}
    if on_native and not timers:
        seconds["untimed"] = step_s / n
    seconds["sampling"] = sample_s / n
    seconds["python"] = wall / n - sum(seconds.values())  # what no class accounts for
    return StepProfile("native" if on_native else "torch", steps, wall / n, seconds, note)


def shown(profile: StepProfile) -> list[str]:
    """The classes to draw: all of them, but only the measured ones when the native step had no timers."""
    untimed = "untimed" in profile.seconds
    return [k for k, v in profile.seconds.items() if not (untimed and k in CLASSES and v == 0.0)]


def bar_lines(profile: StepProfile, width: int = 30) -> list[str]:
    """The profile as plain-text rows: class, ms per step, share, and a bar scaled to the largest class."""
    shares = profile.shares()
    top = max(shares.values(), default=0.0) or 1.0
    lines = [f"{profile.path} step: {1000 * profile.step_s:.3f} ms over {profile.steps} steps"]
    for key in shown(profile):
        ms, share = 1000 * profile.seconds.get(key, 0.0), shares.get(key, 0.0)
        bar = "#" * round(width * max(share, 0.0) / top)
        lines.append(f"  {LABELS[key]:<26} {ms:9.3f} ms {100 * share:6.1f}%  {bar}")
    return lines
