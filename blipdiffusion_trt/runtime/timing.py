"""Per-stage wall-clock times of a generation, and their table."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# Stages timed once per denoising step: the table shows them per step too.
PER_STEP_STAGES = ("unet", "controlnet", "scheduler", "denoise_loop")


class StageTimer:
    """Accumulates seconds per stage name: ``with timer("unet"): ...``; ``timings`` holds them."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


def format_timings(timings: dict[str, float]) -> str:
    """A table of stage times (``steps`` gives the per-step figures)."""
    steps = int(timings.get("steps", 0)) or 1
    rows = ["stage               seconds"]
    for name, value in timings.items():
        if name == "steps":
            continue
        per = f"  ({value / steps * 1000:.1f} ms/step)" if name in PER_STEP_STAGES else ""
        rows.append(f"{name:<18} {value:8.3f}{per}")
    return "\n".join(rows)
