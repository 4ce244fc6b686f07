"""Statistics of timed samples."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of samples (linear interpolation between order statistics)."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("no samples")

    def pct(q: float) -> float:
        pos = (len(values) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": sum(values) / len(values),
            "min": values[0], "max": values[-1], "n": len(values)}


def time_calls(fn: Callable[[], Any], warmup: int, runs: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def generation_figures(timings: Sequence[Mapping[str, float]], engine_keys: Sequence[str]) -> dict[str, Any]:
    """Per-run whole-generation figures -> statistics."""
    out: dict[str, Any] = {}
    steps = [t["steps"] for t in timings]
    out["generation"] = summarize([t["total"] for t in timings])
    out["denoise_loop"] = summarize([t["denoise_loop"] for t in timings])
    out["host_overhead_per_step"] = summarize(
        [max(0.0, t["denoise_loop"] - sum(t.get(k, 0.0) for k in engine_keys)) / s for t, s in zip(timings, steps)])
    out["loop_it_per_s"] = summarize([s / t["denoise_loop"] for t, s in zip(timings, steps)])
    names = sorted({k for t in timings for k in t if k not in ("steps", "total", "denoise_loop")})
    out["in_generation"] = {k: summarize([t.get(k, 0.0) for t in timings]) for k in names}
    out["unet_calls"] = int(steps[0])
    return out
