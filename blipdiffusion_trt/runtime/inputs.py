"""Checked call arguments of a generation: one-line :class:`InputError` naming the field.

:class:`GenerationInputs` is what ``BlipDiffusionRuntime._check_inputs`` returns: every argument
of a call, normalised (lists per prompt, default sizes filled in, latents as float32).
:data:`LIMITS` bounds every input that costs memory or time; the Python API, the CLI and the
Triton pipeline model all check requests against it (the package's own declarations bound the
rest: image sizes, batch, text lengths in tokens).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..fsutil import open_regular
from .text import text_problem

OUTPUT_TYPES = ("pil", "np")


@dataclass(frozen=True)
class RequestLimits:
    """What one generation may ask for, besides the package's declared ranges (docs/limits.md).

    ``max_text_characters``: the prompt and the negative prompt (tokens past the text encoder's
    length are cut, with a warning); ``max_subject_characters``: a subject category word (its
    tokens must also fit the Q-Former's declared text length); ``guidance_scale`` and
    ``max_latent_magnitude``: beyond them the float32 loop overflows; ``max_image_pixels``: an
    input image's decoded size (the Triton model's is set per repository); ``seed``: numpy's
    generator takes any non-negative integer, Triton's input is an INT64.
    """

    max_steps: int = 1000
    max_text_characters: int = 2000
    max_subject_characters: int = 200
    guidance_scale: tuple[float, float] = (0.0, 100.0)
    controlnet_conditioning_scale: tuple[float, float] = (-100.0, 100.0)
    max_latent_magnitude: float = 1e4
    max_image_pixels: int = 64_000_000
    seed: tuple[int, int] = (0, 2**63 - 1)


LIMITS = RequestLimits()
MAX_STEPS = LIMITS.max_steps


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
    seed: int | None = None
    prompt_strength: float = 1.0
    prompt_reps: int = 20

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def uses_control(self) -> bool:
        return self.condition_image is not None or self.canny_image is not None


def check_text(name: str, value: Any, max_characters: int, *, allow_empty: bool = False) -> str:
    """A text argument: a string of valid UTF-8 (no lone surrogates, which is how Python holds
    the undecodable bytes of a command line), non-blank unless ``allow_empty``, of at most
    ``max_characters`` characters."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__}", field=name)
    if len(value) > max_characters:
        raise InputError(f"{name} has {len(value)} characters, more than the limit of {max_characters}", field=name)
    problem = text_problem(value)
    if problem:
        raise InputError(f"{name} {problem}", field=name)
    if not allow_empty and not value.strip():
        raise InputError(f"{name} must be a non-empty string", field=name)
    return value


def check_prompts(prompt: Any, max_batch_size: int, limits: RequestLimits = LIMITS) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt must be a non-empty string or a list of non-empty strings", field="prompt")
    if len(prompts) > max_batch_size:
        raise InputError(f"prompt: batch of {len(prompts)} exceeds the package's max_batch_size {max_batch_size}",
                         field="prompt")
    for p in prompts:
        check_text("prompt", p, limits.max_text_characters)
    return prompts


def check_prompt_repetition(prompt_strength: Any, prompt_reps: Any) -> tuple[float, int]:
    """``prompt_strength`` (finite, >= 0) and ``prompt_reps`` (an integer >= 1) whose product
    repeats the prompt at least once (diffusers would silently use an empty prompt). No upper
    bound: repetitions past what the text encoder keeps are never built."""
    if isinstance(prompt_reps, bool) or not isinstance(prompt_reps, (int, np.integer)) or prompt_reps < 1:
        raise InputError(f"prompt_reps must be an integer >= 1, got {shown(prompt_reps)}", field="prompt_reps")
    strength = check_float("prompt_strength", prompt_strength)
    if strength < 0:
        raise InputError(f"prompt_strength must be a finite number >= 0, got {prompt_strength!r}", field="prompt_strength")
    if strength * min(int(prompt_reps), 2**53) < 1:
        raise InputError(f"prompt_strength x prompt_reps must be >= 1 (the prompt is repeated int(product) times), "
                         f"got {strength:g} x {prompt_reps}", field="prompt_strength")
    return strength, int(prompt_reps)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}], got {shown(value)}", field=name)
    return int(value)


def check_size(name: str, value: Any, low: int, high: int, multiple: int) -> int:
    """A pixel height or width: an integer in [low, high], a multiple of ``multiple``."""
    check_int(name, value, low, high)
    if value % multiple:
        raise InputError(f"{name} must be a multiple of {multiple} in [{low}, {high}], got {value}", field=name)
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number (in ``[low, high]`` when given)."""
    allowed = f" in [{low:g}, {high:g}]" if low is not None and high is not None else ""
    number = real_number(value)
    if number is None or not math.isfinite(number):
        raise InputError(f"{name} must be a finite number{allowed}, got {shown(value)}", field=name)
    if (low is not None and number < low) or (high is not None and number > high):
        raise InputError(f"{name} must be a finite number{allowed}, got {shown(value)}", field=name)
    return number


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (an error quotes a 401-digit
    integer's start, an array's first values)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def real_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (int, float, numpy scalar; not a boolean, a
    string such as "7.5" or an array), else None; an integer too large for a float is inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # 10**400
        return math.inf


def check_callable(name: str, value: Any) -> Any:
    """None or a callable (``callback``)."""
    if value is not None and not callable(value):
        raise InputError(f"{name} must be a function or None, got {type(value).__name__}", field=name)
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False (numpy's bool too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}", field=name)
    return bool(value)


def check_seed(seed: Any, limits: RequestLimits = LIMITS) -> int | None:
    """None (a random seed) or an integer in ``limits.seed``."""
    if seed is None:
        return None
    low, high = limits.seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not low <= seed <= high:
        raise InputError(f"seed must be an integer in [{low}, {high}], got {shown(seed)}", field="seed")
    return int(seed)


def broadcast(name: str, value: Any, batch: int, max_characters: int = LIMITS.max_subject_characters) -> list[str]:
    """One non-empty string per prompt (one value is repeated for every prompt)."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{name} must be a non-empty string (or one per prompt)", field=name)
    for v in values:
        check_text(name, v, max_characters)
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


def check_latents(latents: Any, shape: Sequence[int], max_magnitude: float = LIMITS.max_latent_magnitude) -> np.ndarray:
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
    largest = float(np.abs(latents).max()) if latents.size else 0.0
    if largest > max_magnitude:
        raise InputError(f"latents must lie within +-{max_magnitude:g} (standard normal noise, as diffusers' "
                         f"randn_tensor makes it), got a value of magnitude {largest:.3g}", field="latents")
    return latents.astype(np.float32)


NPZ_MAGIC = b"PK\x03\x04"


def read_npy(path: str | os.PathLike, *, field: str = "latents", max_elements: int) -> np.ndarray:
    """A float32 array from a ``.npy`` file, checked before anything is allocated: a regular file
    (a FIFO would block), not an ``.npz`` archive, a valid header whose shape holds at most
    ``max_elements`` values, and exactly as many bytes as that header promises."""
    try:
        f = open_regular(path, InputError, what=f"{field} file")
    except FileNotFoundError:
        raise InputError(f"{field}: file {path} not found", field=field) from None
    except InputError as error:
        raise InputError(f"{field}: {error}", field=field) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InputError(f"{field}: {path} is empty (0 bytes), not a numpy .npy array", field=field)
        head = f.read(len(NPZ_MAGIC))
        if head == NPZ_MAGIC:
            raise InputError(f"{field}: {path} is an .npz archive; give one array saved with numpy.save (.npy)",
                             field=field)
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError, EOFError) as error:
            reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"{field}: {path} is not a numpy .npy array ({reason})", field=field) from None
        if dtype != np.float32:
            raise InputError(f"{field}: {path} holds {dtype}, expected float32", field=field)
        count = math.prod(shape)
        if count > max_elements:
            raise InputError(f"{field}: {path} claims shape {list(shape)} ({count} values), more than the "
                             f"{max_elements} the package's largest latents hold", field=field)
        expected = f.tell() + count * dtype.itemsize
        if size != expected:
            raise InputError(f"{field}: {path} has {size} bytes, its header promises {expected} "
                             f"(truncated or not one .npy array)", field=field)
        data = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    order = "F" if fortran_order else "C"
    return data.reshape(shape, order=order).astype(np.float32, order="C")
