"""The workload every side of the benchmark runs: one setting, its prompts and its inputs.

Our runtime, diffusers and the cold-start children build the same reference image, condition
image and latents from the seed, so their images can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPT = "swimming underwater"
NEGATIVE_PROMPT = "low quality, blurry"
SUBJECT = "dog"
# --edit: the subject the generated image shows, which the edit replaces by SUBJECT's
ORIGINAL_SUBJECT = "cat"
# The key of diffusers' reference row among the implementations (the others are backend names, and
# diffusers in another torch dtype, "diffusers-bf16"): images and ratios are against this row.
DIFFUSERS = "diffusers"
# torch dtypes the diffusers side can run in
DIFFUSERS_PRECISIONS = ("fp32", "bf16", "fp16")


def diffusers_key(precision: str, reference: bool) -> str:
    """``diffusers`` for the reference row, ``diffusers-<precision>`` for the others."""
    return DIFFUSERS if reference else f"{DIFFUSERS}-{precision}"


def is_diffusers(key: str) -> bool:
    return key == DIFFUSERS or key.startswith(DIFFUSERS + "-")


@dataclass
class Settings:
    height: int
    width: int
    steps: int
    batch: int
    scheduler: str
    guidance: float
    precision: str
    seed: int
    controlnet: bool
    latent_shape: tuple[int, ...]
    edit: bool = False  # also an edit of the generated image (our runtime only)
    # fast mode's cache intervals measured beside the exact mode (our runtime only; 1 is the exact mode)
    cache_intervals: tuple[int, ...] = (1,)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def bench_inputs(settings: Settings):
    """Reference image, condition image (ControlNet) and latents, from the seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    reference = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) if settings.controlnet else None
    latents = rng.standard_normal(settings.latent_shape).astype(np.float32)
    return reference, condition, latents
