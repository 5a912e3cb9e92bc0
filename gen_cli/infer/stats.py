"""What one generation measured, as `--stats` and `--json` report it (no torch: the torch-free path fills it too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """What one generation measured. Rates count every row; ms_per_token is per decode step."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    ms_per_token: float | None
    kv_cache_bytes: int
    kv_cache_bytes_analytic: int
    peak_memory_bytes: int
    memory_method: str
    device: str
    dtype: str
    threads: int
    batch: int
    decode_path: str  # "native" (gen's C step) or "torch"
    kv_dtype_k: str = ""  # how the cache stores K and V ("" without a cache)
    kv_dtype_v: str = ""
    kv_window: int = 0  # a window cache's recent slots (0: the cache holds every position)
    kv_sinks: int = 0
    decode_path_reason: str = ""  # why the native step did not decode, when one was attached
    machine_load: dict[str, Any] = field(default_factory=dict)  # MachineLoad.to_dict() over the run
    reused_prompt_tokens: int = 0  # prompt tokens whose k/v came from a prompt-cache file, not prefilled
    per_token_latencies: list[float] = field(default_factory=list)
    speculation: dict[str, Any] = field(default_factory=dict)  # SpeculationStats.to_dict() when it speculated
    native_threads: dict[str, Any] = field(default_factory=dict)  # ThreadGovernor.report(): threads per step, why

    def to_dict(self, latencies: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not latencies:
            data.pop("per_token_latencies")
        if not self.speculation:
            data.pop("speculation")
        if not self.native_threads:
            data.pop("native_threads")
        return data
