"""BLIP-Diffusion generation on exported engines: numpy scheduler loop, no torch.

:class:`BlipDiffusionRuntime` is called like diffusers' ``BlipDiffusionPipeline`` (and the
ControlNet variant) and computes the same thing; ``__call__`` is written as the same numbered
blocks. Differences, on purpose:

- ``scale_model_input`` is called every step. diffusers' BLIP pipelines never call it, which is
  harmless for PNDM/DDIM (identity) and wrong for Euler.
- A long negative prompt is truncated to the text encoder's length (diffusers crashes).
- One subject image/word is broadcast over a batch of prompts.
- Random latents come from numpy's generator (``seed``), not torch's; pass ``latents`` to
  reproduce a diffusers run exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from . import images as imgs
from .editing import EditingMixin
from .engine import Engine, default_threads, engine_factory
from .package import ModelPackage
from .schedulers import scheduler_from_config
from .text import ClipTextTokenizer, QFormerTokenizer, build_prompts

logger = logging.getLogger(__name__)

MAX_STEPS = 1000


@dataclass(frozen=True)
class SubjectEmbedding:
    """Query embeddings of one subject ([num_query_tokens, hidden]), reusable across calls."""

    embeddings: np.ndarray
    label: str = ""


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 [B, H, W, 3] in [0, 1]
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable[[], Any]):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        if self.size > 0:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


class BlipDiffusionRuntime(EditingMixin):
    """Subject-driven generation from a model package on ONNX Runtime (CPU, CUDA, TensorRT EP)."""

    def __init__(self, package: ModelPackage, engines: dict[str, Engine], *, cache_size: int = 32):
        self.package = package
        self.config = package.config
        self.engines = engines
        self.scheduler_config = package.scheduler_config()
        clip = package.tokenizer_settings("tokenizer")
        bert = package.tokenizer_settings("qformer_tokenizer")
        self.tokenizer = ClipTextTokenizer.from_file(package.root / "tokenizer" / "tokenizer.json", clip["pad_token_id"])
        self.qformer_tokenizer = QFormerTokenizer.from_file(package.root / "qformer_tokenizer" / "tokenizer.json", bert["pad_token_id"])
        self._subject_cache = _LRU(cache_size)
        self._negative_cache = _LRU(8)

    @classmethod
    def from_package(
        cls, path: str | Path, backend: str = "cpu", *, precision: str = "fp32", verify: bool = True,
        threads: int | None = None, graph_optimization: str = "all", optimized_cache: str | Path | None = None,
        memory_arena: str = "loop", cpu_fused: bool = True, cache_size: int = 32,
    ) -> "BlipDiffusionRuntime":
        """Load a package's graphs on ``backend`` ("cpu", "cuda", "ort-tensorrt", "tensorrt").

        ``graph_optimization`` ("all", "extended", "basic", "disabled") is ONNX Runtime's: "all"
        runs fastest, "extended" loads several times faster (see ``engine.GRAPH_OPTIMIZATIONS``).
        ``optimized_cache`` (a directory) keeps ONNX Runtime's optimised CPU graphs between runs,
        giving both: fast steps and a fast start after the first load (costs a copy of the weights).
        ``memory_arena`` ("loop", "all", "none"): which ONNX Runtime CPU sessions keep a memory
        arena; "loop" (UNet/ControlNet only) frees the once-per-image components' activations
        after each call (see ``engine.MEMORY_ARENAS``).
        ``cpu_fused``: on the cpu backend, load the package's CPU-fused fp32 graphs where it has them
        (fused attention in the UNet and ControlNet; ``blipdiffusion-trt fuse`` adds them to a package).
        """
        make_engine = engine_factory(backend)
        package = ModelPackage.open(path, verify=verify)
        needed = ["qformer", "text_encoder", "text_encoder_plain", "vae_decoder"]
        needed += ["unet", "controlnet"] if package.config.has_controlnet else ["unet_plain"]
        threads = threads or default_threads()
        fused = cpu_fused and precision == "fp32" and getattr(make_engine, "runs_cpu_fused_graphs", False)
        engines = {
            name: make_engine(package.specs[name],
                              package.onnx_path(name, precision, cpu_fused=fused and package.has_cpu_fused(name)),
                              threads=threads,
                              graph_optimization=graph_optimization, optimized_cache=optimized_cache,
                              memory_arena=memory_arena)
            for name in needed
        }
        return cls(package, engines, cache_size=cache_size)

    # ------------------------------------------------------------------------------------------
    # Reusable pieces
    # ------------------------------------------------------------------------------------------

    def encode_subject(self, image: Any, category: str) -> SubjectEmbedding:
        """Q-Former query embeddings of a subject image and its category word (LRU-cached)."""
        cfg = self.config
        pil = imgs.load_image(image, field="reference_image")
        pixels = imgs.preprocess_reference(pil, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resample)
        tokens = self.qformer_tokenizer.encode([category], field="source_subject_category")
        key = (hashlib.sha256(pixels.tobytes()).hexdigest(), category)

        def run() -> SubjectEmbedding:
            out = self.engines["qformer"].infer(
                {"pixel_values": pixels, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
            )
            return SubjectEmbedding(out["query_embeds"][0], label=category)

        return self._subject_cache.get_or(key, run)

    @staticmethod
    def mix_subjects(subjects: Sequence[tuple[SubjectEmbedding, float]]) -> SubjectEmbedding:
        """Weighted average of subject embeddings (the paper's subject interpolation)."""
        if not subjects:
            raise InputError("mix_subjects needs at least one (subject, weight) pair")
        try:
            weights = np.array([float(w) for _, w in subjects], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"mix_subjects weights must be finite numbers, got {[w for _, w in subjects]!r}") from None
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise InputError(f"mix_subjects weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
        shapes = {s.embeddings.shape for s, _ in subjects}
        if len(shapes) != 1:
            raise InputError(f"mix_subjects: subjects have different shapes {sorted(shapes)}")
        mixed = sum(w * s.embeddings.astype(np.float64) for (s, _), w in zip(subjects, weights)) / weights.sum()
        label = "+".join(f"{w:g}*{s.label}" for s, w in subjects)
        return SubjectEmbedding(mixed.astype(np.float32), label=label)

    def encode_prompt(self, prompts: list[str], subject_embeddings: np.ndarray) -> np.ndarray:
        """Text embeddings with the subject spliced in: [B, text_max_length, hidden]."""
        tokens = self.tokenizer.encode(prompts, self.config.text_length, field="prompt")
        out = self.engines["text_encoder"].infer({"input_ids": tokens.input_ids, "ctx_embeddings": subject_embeddings})
        return out["text_embeddings"]

    def encode_negative_prompt(self, neg_prompt: str) -> np.ndarray:
        """Plain text embeddings of the negative prompt, [1, text_max_length, hidden] (cached)."""

        def run() -> np.ndarray:
            tokens = self.tokenizer.encode([neg_prompt], self.config.text_max_length, field="neg_prompt", allow_empty=True)
            if tokens.truncated[0]:
                logger.warning("negative prompt truncated to %d tokens", self.config.text_max_length)
            return self.engines["text_encoder_plain"].infer({"input_ids": tokens.input_ids})["text_embeddings"]

        return self._negative_cache.get_or(neg_prompt, run)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        reference_image: Any = None,
        source_subject_category: str | list[str] | None = None,
        target_subject_category: str | list[str] | None = None,
        *,
        subject: SubjectEmbedding | None = None,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        neg_prompt: str = "",
        prompt_strength: float = 1.0,
        prompt_reps: int = 20,
        scheduler: str = "pndm",
        output_type: str = "pil",
        condition_image: Any = None,
        canny_image: Any = None,
        canny_low_threshold: int = 100,
        canny_high_threshold: int = 200,
        controlnet_conditioning_scale: float = 1.0,
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Generate images of the subject in ``reference_image`` following ``prompt``.

        ``callback(step_index, timestep, latents)`` is called after every scheduler step.
        """
        cfg = self.config
        timer = _Timer()
        start = time.perf_counter()

        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise InputError("prompt must be a non-empty string or a list of non-empty strings")
        batch = len(prompts)
        if batch > cfg.max_batch_size:
            raise InputError(f"prompt: batch of {batch} exceeds the package's max_batch_size {cfg.max_batch_size}")
        height = cfg.default_height if height is None else height
        width = cfg.default_width if width is None else width
        for name, value in (("height", height), ("width", width)):
            _check_int(name, value, cfg.min_image_size, cfg.max_image_size)
            if value % cfg.image_multiple:
                raise InputError(f"{name} must be a multiple of {cfg.image_multiple} in [{cfg.min_image_size}, {cfg.max_image_size}], got {value}")
        _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        guidance_scale = _check_float("guidance_scale", guidance_scale)
        controlnet_conditioning_scale = _check_float("controlnet_conditioning_scale", controlnet_conditioning_scale)
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if not isinstance(neg_prompt, str):
            raise InputError("neg_prompt must be a string")
        targets = _broadcast("target_subject_category", target_subject_category, batch)
        uses_control = condition_image is not None or canny_image is not None
        if uses_control and not cfg.has_controlnet:
            raise InputError("condition_image/canny_image given, but this package has no ControlNet")
        if cfg.has_controlnet and not uses_control:
            raise InputError("this package has a ControlNet: pass condition_image or canny_image")
        if condition_image is not None and canny_image is not None:
            raise InputError("pass either condition_image or canny_image, not both")
        latent_shape = (batch, cfg.latent_channels, height // cfg.latent_scale_factor, width // cfg.latent_scale_factor)
        if latents is not None:
            latents = _check_latents(latents, latent_shape)
        sched = scheduler_from_config(scheduler, self.scheduler_config)
        sched.set_timesteps(num_inference_steps)

        # 2. Encode the subject (Q-Former), reusing cached embeddings
        with timer("qformer"):
            if subject is not None:
                if reference_image is not None:
                    raise InputError("pass either subject or reference_image, not both")
                subject_embeds = np.repeat(subject.embeddings[None], batch, axis=0)
            else:
                if reference_image is None:
                    raise InputError("reference_image is required (or a precomputed subject)")
                sources = _broadcast("source_subject_category", source_subject_category, batch)
                references = reference_image if isinstance(reference_image, (list, tuple)) else [reference_image] * batch
                if len(references) != batch:
                    raise InputError(f"reference_image: {len(references)} images for {batch} prompts")
                # one Q-Former call (and one image decode) per distinct reference and word, not per prompt
                unique: dict[tuple[int, str], np.ndarray] = {}
                for r, s in zip(references, sources):
                    if (id(r), s) not in unique:
                        unique[(id(r), s)] = self.encode_subject(r, s).embeddings
                subject_embeds = np.stack([unique[(id(r), s)] for r, s in zip(references, sources)])

        # 3. Encode the text: "a {target} {prompt}" x reps with the subject, and the negative prompt
        with timer("text_encoder"):
            texts = build_prompts(prompts, targets, prompt_strength=prompt_strength, prompt_reps=prompt_reps)
            # The repetitions are meant to fill the text encoder and be cut; warn only when a single
            # "a {target} {prompt}" does not fit, i.e. when words the user wrote are lost.
            single = build_prompts(prompts, targets, prompt_strength=1.0, prompt_reps=1)
            if any(self.tokenizer.encode(single, cfg.text_length, field="prompt").truncated):
                logger.warning("prompt truncated to %d tokens (the text encoder's limit with the subject)", cfg.text_length)
            text_embeddings = self.encode_prompt(texts, subject_embeds)
            do_cfg = guidance_scale > 1.0
            if do_cfg:
                negative = self.encode_negative_prompt(neg_prompt)
                text_embeddings = np.concatenate([np.repeat(negative, batch, axis=0), text_embeddings])

        # 4. Prepare latents (and the condition image)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)
        latents = (latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        control_feed: dict[str, np.ndarray] = {}
        if uses_control:
            with timer("condition_image"):
                if canny_image is not None:
                    cond = imgs.canny_condition(imgs.load_image(canny_image, field="canny_image"), canny_low_threshold, canny_high_threshold)
                else:
                    cond = imgs.load_image(condition_image, field="condition_image")
                cond = imgs.preprocess_condition(cond, height, width)
                cond = np.repeat(cond, batch * (2 if do_cfg else 1), axis=0)
                control_feed = {"controlnet_cond": cond, "conditioning_scale": np.array([controlnet_conditioning_scale], np.float32)}
        unet = self.engines["unet"] if uses_control else self.engines["unet_plain"]
        controlnet = self.engines.get("controlnet") if uses_control else None

        # 5. Denoise
        steps = sched.timesteps
        iterator = _progress(steps, progress)
        loop_start = time.perf_counter()
        for i, t in enumerate(iterator):
            model_input = np.concatenate([latents, latents]) if do_cfg else latents
            model_input = sched.scale_model_input(model_input, t).astype(np.float32, copy=False)
            feed = {
                "sample": model_input,
                "timestep": np.full((model_input.shape[0],), t, dtype=np.float32),
                "encoder_hidden_states": text_embeddings,
            }
            if controlnet is not None:
                with timer("controlnet"):
                    feed.update(controlnet.infer({**feed, **control_feed}, keep=controlnet.output_names))
            with timer("unet"):
                noise_pred = unet.infer(feed)["noise_pred"]
            if do_cfg:
                noise_uncond, noise_text = noise_pred[:batch], noise_pred[batch:]
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            with timer("scheduler"):
                latents = sched.step(noise_pred, t, latents).astype(np.float32, copy=False)
            if callback is not None:
                callback(i, float(t), latents)
        timer.timings["denoise_loop"] = time.perf_counter() - loop_start

        # 6. Decode
        with timer("vae_decoder"):
            decoded = self.engines["vae_decoder"].infer({"latents": latents / np.float32(cfg.vae_scaling_factor)})["image"]
        image = imgs.postprocess(decoded)
        timer.timings["total"] = time.perf_counter() - start
        timer.timings["steps"] = float(len(steps))
        return PipelineOutput(images=imgs.to_pil(image) if output_type == "pil" else image, timings=timer.timings)


def _progress(steps, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="denoise", unit="step")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


def _broadcast(name: str, value: Any, batch: int) -> list[str]:
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{name} must be a non-empty string (or one per prompt)")
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise InputError(f"{name}: {len(values)} values for {batch} prompts")
    return values


def _check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(latents, np.ndarray):
        raise InputError(f"latents must be a numpy float32 array of shape {list(shape)}, got {type(latents).__name__}")
    if latents.dtype not in (np.float32, np.float16, np.float64):
        raise InputError(f"latents must be float32 (or float16/float64), got {latents.dtype}")
    if tuple(latents.shape) != shape:
        raise InputError(f"latents must have shape {list(shape)} for this batch and size, got {list(latents.shape)}")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf")
    return latents.astype(np.float32)
