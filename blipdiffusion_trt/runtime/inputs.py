"""Checked call arguments of a generation: one-line :class:`InputError` naming the field.

:class:`GenerationInputs` is what ``BlipDiffusionRuntime.check_inputs`` returns: every argument
of a call, normalised (lists per prompt, default sizes filled in, latents as float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

MAX_STEPS = 1000
OUTPUT_TYPES = ("pil", "np")


@dataclass(frozen=True)
class GenerationInputs:
    prompts: list[str]
    targets: list[str]  # target subject category per prompt
    sources: list[str] | None  # source subject category per prompt (None with a precomputed subject)
    references: list[Any] | None  # subject image per prompt (None with a precomputed subject)
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    latent_shape: tuple[int, int, int, int]
    latents: np.ndarray | None
    neg_prompt: str
    scheduler: str
    output_type: str
    condition_image: Any = None
    canny_image: Any = None
    controlnet_conditioning_scale: float = 1.0

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def uses_control(self) -> bool:
        return self.condition_image is not None or self.canny_image is not None


def check_prompts(prompt: Any, max_batch_size: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError("prompt must be a non-empty string or a list of non-empty strings", field="prompt")
    if len(prompts) > max_batch_size:
        raise InputError(f"prompt: batch of {len(prompts)} exceeds the package's max_batch_size {max_batch_size}",
                         field="prompt")
    return prompts


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}], got {value!r}", field=name)
    return int(value)


def check_size(name: str, value: Any, low: int, high: int, multiple: int) -> int:
    """A pixel height or width: an integer in [low, high], a multiple of ``multiple``."""
    check_int(name, value, low, high)
    if value % multiple:
        raise InputError(f"{name} must be a multiple of {multiple} in [{low}, {high}], got {value}", field=name)
    return int(value)


def check_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a finite number, got {value!r}", field=name) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}", field=name)
    return number


def broadcast(name: str, value: Any, batch: int) -> list[str]:
    """One non-empty string per prompt (one value is repeated for every prompt)."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{name} must be a non-empty string (or one per prompt)", field=name)
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise InputError(f"{name}: {len(values)} values for {batch} prompts", field=name)
    return values


def broadcast_images(name: str, value: Any, batch: int) -> list[Any]:
    """One image per prompt (one image is repeated for every prompt)."""
    images = list(value) if isinstance(value, (list, tuple)) else [value] * batch
    if len(images) != batch:
        raise InputError(f"{name}: {len(images)} images for {batch} prompts", field=name)
    return images


def check_latents(latents: Any, shape: Sequence[int]) -> np.ndarray:
    shape = tuple(shape)
    if not isinstance(latents, np.ndarray):
        raise InputError(f"latents must be a numpy float32 array of shape {list(shape)}, got {type(latents).__name__}",
                         field="latents")
    if latents.dtype not in (np.float32, np.float16, np.float64):
        raise InputError(f"latents must be float32 (or float16/float64), got {latents.dtype}", field="latents")
    if tuple(latents.shape) != shape:
        raise InputError(f"latents must have shape {list(shape)} for this batch and size, got {list(latents.shape)}",
                         field="latents")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf", field="latents")
    return latents.astype(np.float32)
