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

Each numbered stage of ``__call__`` is a method other flows reuse: :meth:`_check_inputs`, the
subject (:meth:`encode_subject`, :meth:`_encode_subjects`), the text (:meth:`_encode_prompt`,
:meth:`_encode_plain_prompt`, :meth:`_encode_text`), the latents and control map
(:meth:`_prepare_scheduler`, :meth:`_prepare_latents`, :meth:`_prepare_control`), the denoising loop
(:meth:`_denoise` over :meth:`_guided_noise` over :meth:`_predict_noise`, the raw UNet/ControlNet call
on any batch) and :meth:`_decode_latents`. They are private: a user calls ``__call__``,
:meth:`edit`, :meth:`invert`, :meth:`encode_subject` and :meth:`mix_subjects`. Editing
(:mod:`.editing`, the runtime's :class:`~.editing.Editor`) is built on the same stages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..components import generation_components
from ..errors import EngineError, InputError, PackageError
from ..package import ModelPackage, layout
from . import images as imgs
from .backends import BackendOptions, get_backend
from .editing import EditArguments, EditCallback, Editor, EditOutput
from .engine import Engine
from .inputs import (
    LIMITS,
    MAX_STEPS,
    OUTPUT_TYPES,
    GenerationInputs,
    broadcast,
    broadcast_images,
    check_bool,
    check_callable,
    check_float,
    check_int,
    check_latents,
    check_prompt_repetition,
    check_prompts,
    check_seed,
    check_size,
    check_text,
    real_number,
    shown,
)
from .schedulers import DDIMInverseScheduler, check_scheduler_name, scheduler_from_config
from .step_cache import StepCache, check_cache_interval, require_step_cache
from .text import ClipTextTokenizer, QFormerTokenizer, build_prompts, max_useful_reps
from .timing import StageTimer

logger = logging.getLogger(__name__)

# (latents, timestep) -> noise prediction for those latents: one denoising step's model call
NoisePredictor = Callable[[np.ndarray, Any], np.ndarray]
# callback(step_index, timestep, latents) after every scheduler step
StepCallback = Callable[[int, float, np.ndarray], None]
# after_step(step_index, latents) -> latents: changes the latents after a scheduler step (editing's local blend)
AfterStep = Callable[[int, np.ndarray], np.ndarray]
# component name -> its engine, made on first use (the editing graphs)
EngineLoader = Callable[[str], Engine]

__all__ = ["MAX_STEPS", "BlipDiffusionRuntime", "PipelineOutput", "SubjectEmbedding"]


@dataclass(frozen=True)
class SubjectEmbedding:
    """Query embeddings of one subject ([num_query_tokens, hidden]), reusable across calls.

    ``embeddings``: a 2-D float array, kept as float32 (the text encoder's input; a float16 or
    float64 array is converted); anything else is an :class:`InputError` naming ``subject``. The
    package's own shape and finite values are checked where it is used (``check_subject``).
    """

    embeddings: np.ndarray
    label: str = ""

    def __post_init__(self) -> None:
        embeddings = self.embeddings
        if not isinstance(embeddings, np.ndarray) or embeddings.dtype.kind != "f" or embeddings.ndim != 2:
            got = (f"{embeddings.dtype} array of shape {list(embeddings.shape)}" if isinstance(embeddings, np.ndarray)
                   else type(embeddings).__name__)
            raise InputError(f"subject embeddings must be a 2-D float array [num_query_tokens, hidden], got {got}",
                             field="subject")
        if not isinstance(self.label, str):
            raise InputError(f"subject label must be a string, got {type(self.label).__name__}", field="subject")
        if embeddings.dtype != np.float32:
            object.__setattr__(self, "embeddings", embeddings.astype(np.float32))


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 [B, H, W, 3] in [0, 1]
    timings: dict[str, float] = field(default_factory=dict)


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


def _check_cache_sizes(cache_size: Any, negative_cache_size: Any) -> None:
    for name, value in (("cache_size", cache_size), ("negative_cache_size", negative_cache_size)):
        check_int(name, value, 0, MAX_CACHE_ENTRIES)


# subject/negative prompt embeddings a runtime may keep (each a few hundred KB at full size)
MAX_CACHE_ENTRIES = 100_000


class BlipDiffusionRuntime:
    """Subject-driven generation (``__call__``) and editing (:meth:`edit`, :meth:`invert`; its flow
    is the runtime's :class:`~.editing.Editor`) from a model package on any backend of
    :mod:`.backends` (ONNX Runtime CPU/CUDA/TensorRT EP, TensorRT, OpenVINO) or Triton."""

    def __init__(self, package: ModelPackage, engines: dict[str, Engine], *, load_engine: EngineLoader | None = None,
                 cache_size: int = 32, negative_cache_size: int = 8):
        """``engines``: one per component of :func:`~blipdiffusion_trt.components.generation_components`.

        ``load_engine(component)``: makes the engine of a component the runtime needs later (the
        editing graphs), on the same backend with the same options (:meth:`from_package` passes
        its backend's); None: only ``engines`` can run. ``cache_size``: subject embeddings kept
        (LRU; 0: none); ``negative_cache_size``: negative prompt embeddings kept.
        """
        _check_cache_sizes(cache_size, negative_cache_size)
        self.package = package
        self.config = package.config
        self.engines = engines
        self.load_engine = load_engine
        self.scheduler_config = package.scheduler_config()
        clip = package.tokenizer_settings(layout.CLIP_TOKENIZER)
        bert = package.tokenizer_settings(layout.QFORMER_TOKENIZER)
        self.tokenizer = ClipTextTokenizer.from_file(package.tokenizer_json(layout.CLIP_TOKENIZER), clip["pad_token_id"])
        self.qformer_tokenizer = QFormerTokenizer.from_file(package.tokenizer_json(layout.QFORMER_TOKENIZER), bert["pad_token_id"])
        self._check_vocabularies(clip, bert)
        self._subject_cache = _LRU(cache_size)
        self._negative_cache = _LRU(negative_cache_size)
        self._editor = Editor(self)

    @classmethod
    def from_package(
        cls, path: str | Path, backend: str = "cpu", *, precision: str = "fp32", verify: bool = True,
        options: BackendOptions | None = None, cache_size: int = 32, negative_cache_size: int = 8,
        **option_values: Any,
    ) -> "BlipDiffusionRuntime":
        """Load a package's graphs on ``backend`` (``runtime.backends.BACKENDS``: "cpu", "cuda",
        "ort-tensorrt", "tensorrt", "openvino").

        The backend's start-up options are ``options`` (its options class) and/or keyword
        arguments naming its fields. Each options class declares its fields with their defaults
        and help, which are also the command line's backend flags:
        :class:`~.backends.onnxruntime.OnnxRuntimeOptions` (``cpu``),
        :class:`~.backends.onnxruntime_gpu.OnnxRuntimeGpuOptions` (``cuda``, ``ort-tensorrt``),
        :class:`~.backends.tensorrt.TensorRTOptions` (``tensorrt``) and
        :class:`~.backends.openvino.OpenVINOOptions` (``openvino``). An option the backend does
        not have is an :class:`InputError`.
        """
        # every argument checked before anything is read or loaded
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a package directory (str or path), got {type(path).__name__}", field="path")
        chosen = get_backend(backend)
        layout.check_precision(precision)
        check_bool("verify", verify)
        _check_cache_sizes(cache_size, negative_cache_size)
        backend_options = chosen.options(options, **option_values)
        package = ModelPackage.open(path, verify=verify)
        engines = chosen.load(package, generation_components(package.config), precision, backend_options)

        def load_engine(component: str) -> Engine:
            return chosen.make_engine(package, component, precision, backend_options)

        return cls(package, engines, load_engine=load_engine, cache_size=cache_size,
                   negative_cache_size=negative_cache_size)

    def _check_vocabularies(self, clip: dict[str, Any], bert: dict[str, Any]) -> None:
        """Every id a tokenizer can produce must index its model's word embeddings (an id past
        them is a traceback on one backend, a silently zero embedding on another): below the
        vocabulary pipeline.json declares (exports since it is recorded) and below the
        ``vocab_size`` of the tokenizer's own settings."""
        cfg = self.config
        for tokenizer, folder, settings, declared, key in (
                (self.tokenizer, layout.CLIP_TOKENIZER, clip, cfg.text_vocab_size, "text_vocab_size"),
                (self.qformer_tokenizer, layout.QFORMER_TOKENIZER, bert, cfg.qformer_vocab_size, "qformer_vocab_size")):
            limits = [(declared, f"{layout.PIPELINE_CONFIG} {key}")] if declared else []
            if settings.get("vocab_size"):
                limits.append((settings["vocab_size"], f"{layout.tokenizer_settings_file(folder)} vocab_size"))
            largest = tokenizer.largest_id
            for limit, where in limits:
                if largest >= limit:
                    raise PackageError(f"{self.package.root / layout.tokenizer_file(folder)}: token id {largest} is past "
                                       f"the vocabulary of {limit} ({where}); the tokenizer does not belong to this "
                                       "package: re-export it")

    def engine(self, component: str) -> Engine:
        """The engine of ``component``; one not loaded yet is made by ``load_engine`` (on the
        runtime's backend, with its options) and kept."""
        engine = self.engines.get(component)
        if engine is None:
            if component not in self.package.specs:
                raise PackageError(f"{self.package.root}: the package has no {component} graph")
            if self.load_engine is None:
                raise EngineError(f"no {component} engine: this runtime was made without a way to load engines "
                                  "(BlipDiffusionRuntime.from_package loads them on its backend)")
            engine = self.engines[component] = self.load_engine(component)
        return engine

    def engine_details(self) -> dict[str, dict[str, Any]]:
        """Per component, what its backend chose beyond the graph (:meth:`Engine.details`: e.g. the
        precision OpenVINO computes in); components whose backend chose nothing are left out."""
        return {name: details for name, engine in self.engines.items() if (details := engine.details())}

    def close(self) -> None:
        """Close every engine (sessions, device memory); the runtime cannot generate afterwards."""
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> "BlipDiffusionRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # 1. Inputs
    # ------------------------------------------------------------------------------------------

    def _check_inputs(
        self,
        prompt: Any,
        reference_image: Any = None,
        source_subject_category: Any = None,
        target_subject_category: Any = None,
        *,
        subject: SubjectEmbedding | None = None,
        guidance_scale: Any = 7.5,
        height: Any = None,
        width: Any = None,
        num_inference_steps: Any = 50,
        latents: Any = None,
        neg_prompt: Any = "",
        scheduler: Any = "pndm",
        output_type: Any = "pil",
        condition_image: Any = None,
        canny_image: Any = None,
        controlnet_conditioning_scale: Any = 1.0,
        controlnet: bool = True,
        seed: Any = None,
        prompt_strength: Any = 1.0,
        prompt_reps: Any = 20,
        canny_low_threshold: Any = 100,
        canny_high_threshold: Any = 200,
        callback: Any = None,
        progress: Any = False,
    ) -> GenerationInputs:
        """Every argument of a call checked (one-line :class:`InputError` naming the field and its
        limit) and normalised, before any work: the package's declared ranges (sizes, batch, the
        Q-Former's text length) and :data:`~.inputs.LIMITS` (text, steps, guidance, latents, seed).

        Images are not decoded here: a file that cannot be read is reported when its stage loads it.
        ``controlnet``: whether the call runs the package's ControlNet (and so needs a control
        map); editing does not.
        """
        cfg = self.config
        prompts = check_prompts(prompt, cfg.max_batch_size)
        batch = len(prompts)
        height, width = self._check_image_size(height, width)
        num_inference_steps = self._check_steps(scheduler, num_inference_steps)
        guidance_scale = check_float("guidance_scale", guidance_scale, *LIMITS.guidance_scale)
        controlnet_conditioning_scale = check_float("controlnet_conditioning_scale", controlnet_conditioning_scale,
                                                    *LIMITS.controlnet_conditioning_scale)
        seed = check_seed(seed)
        prompt_strength, prompt_reps = check_prompt_repetition(prompt_strength, prompt_reps)
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be 'pil' or 'np', got {shown(output_type)}", field="output_type")
        imgs.check_canny_thresholds(canny_low_threshold, canny_high_threshold,
                                    names=("canny_low_threshold", "canny_high_threshold"))
        check_callable("callback", callback)
        check_bool("progress", progress)
        check_text("neg_prompt", neg_prompt, LIMITS.max_text_characters, allow_empty=True)
        targets = broadcast("target_subject_category", target_subject_category, batch)
        self._check_control(condition_image, canny_image, controlnet)
        latent_shape = (batch, cfg.latent_channels, height // cfg.latent_scale_factor, width // cfg.latent_scale_factor)
        if latents is not None:
            latents = check_latents(latents, latent_shape)
        sources = references = None
        if subject is not None:
            if reference_image is not None:
                raise InputError("subject and reference_image given: pass either subject or reference_image, not both",
                                 field="subject")
            self._check_subject(subject)
        else:
            if reference_image is None:
                raise InputError("reference_image is required (or a precomputed subject)", field="reference_image")
            sources = broadcast("source_subject_category", source_subject_category, batch)
            for category in dict.fromkeys(sources):
                self._subject_tokens(category)
            references = broadcast_images("reference_image", reference_image, batch)
        return GenerationInputs(
            prompts=prompts, targets=targets, sources=sources, references=references, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latent_shape=latent_shape,
            latents=latents, neg_prompt=neg_prompt, scheduler=scheduler, output_type=output_type,
            condition_image=condition_image, canny_image=canny_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale, seed=seed,
            prompt_strength=prompt_strength, prompt_reps=prompt_reps,
        )

    def _check_steps(self, scheduler: Any, num_inference_steps: Any, *, inverse: bool = False) -> int:
        """``num_inference_steps`` for scheduler ``scheduler`` (a name of ``SCHEDULER_NAMES``; with
        ``inverse``, the DDIM inversion's), checked before any work: within :data:`~.inputs.LIMITS`
        and what the package's scheduler config can step through (its ``num_train_timesteps``,
        ``timestep_spacing`` and ``steps_offset``)."""
        check_int("num_inference_steps", num_inference_steps, 1, LIMITS.max_steps)
        if inverse:
            sched = DDIMInverseScheduler.from_config(self.scheduler_config)
        else:
            sched = scheduler_from_config(check_scheduler_name(scheduler), self.scheduler_config)
        return sched.check_num_inference_steps(num_inference_steps)

    def _check_image_size(self, height: Any, width: Any) -> tuple[int, int]:
        """The generated image's (height, width): the package's default size where None, else checked."""
        cfg = self.config
        height = cfg.default_height if height is None else height
        width = cfg.default_width if width is None else width
        for name, value in (("height", height), ("width", width)):
            check_size(name, value, cfg.min_image_size, cfg.max_image_size, cfg.image_multiple)
        return int(height), int(width)

    def _check_subject(self, subject: Any) -> SubjectEmbedding:
        """A precomputed subject: a :class:`SubjectEmbedding` of [num_query_tokens, text_hidden_size]
        finite float values."""
        if not isinstance(subject, SubjectEmbedding):
            raise InputError(f"subject must be a SubjectEmbedding (from encode_subject or mix_subjects), "
                             f"got {type(subject).__name__}", field="subject")
        embeddings = subject.embeddings
        shape = (self.config.num_query_tokens, self.config.text_hidden_size)
        if not isinstance(embeddings, np.ndarray) or embeddings.dtype.kind != "f" or embeddings.shape != shape:
            got = (f"{embeddings.dtype} array of shape {list(embeddings.shape)}" if isinstance(embeddings, np.ndarray)
                   else type(embeddings).__name__)
            raise InputError(f"subject embeddings must be a float array of shape {list(shape)} for this package, "
                             f"got {got}", field="subject")
        if not np.isfinite(embeddings).all():
            raise InputError("subject embeddings contain NaN or inf", field="subject")
        return subject

    def _subject_tokens(self, category: str, *, field: str = "source_subject_category"):
        """The Q-Former's tokens of a subject word; more than its declared text length is an
        :class:`InputError` (the graph's position table would be overrun, or silently extended)."""
        check_text(field, category, LIMITS.max_subject_characters)
        tokens = self.qformer_tokenizer.encode([category], field=field)
        limit = self.package.specs["qformer"].axes["qformer_text_length"].max
        if tokens.input_ids.shape[1] > limit:
            raise InputError(f"{field} {category[:40]!r} is {tokens.input_ids.shape[1]} Q-Former tokens, more than "
                             f"the {limit} its graph is declared for", field=field)
        return tokens

    def _check_control(self, condition_image: Any, canny_image: Any, controlnet: bool = True) -> None:
        uses_control = condition_image is not None or canny_image is not None
        if uses_control and not (self.config.has_controlnet and controlnet):
            given = "canny_image" if canny_image is not None else "condition_image"
            reason = "this package has no ControlNet" if controlnet else "this call does not run the ControlNet"
            raise InputError(f"{given} given, but {reason}", field=given)
        if self.config.has_controlnet and controlnet and not uses_control:
            raise InputError("condition_image: this package has a ControlNet: pass condition_image or canny_image",
                             field="condition_image")
        if condition_image is not None and canny_image is not None:
            raise InputError("canny_image and condition_image given: pass either condition_image or canny_image, "
                             "not both", field="canny_image")

    # ------------------------------------------------------------------------------------------
    # 2. The subject
    # ------------------------------------------------------------------------------------------

    def encode_subject(self, image: Any, category: str) -> SubjectEmbedding:
        """Q-Former query embeddings of a subject image and its category word (LRU-cached)."""
        cfg = self.config
        tokens = self._subject_tokens(category)
        pil = imgs.load_image(image, field="reference_image", max_pixels=LIMITS.max_image_pixels)
        pixels = imgs.preprocess_reference(pil, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_resample)
        key = (hashlib.sha256(pixels.tobytes()).hexdigest(), category)

        def run() -> SubjectEmbedding:
            out = self.engine("qformer").infer(
                {"pixel_values": pixels, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
            )
            return SubjectEmbedding(out["query_embeds"][0], label=category)

        return self._subject_cache.get_or(key, run)

    @staticmethod
    def mix_subjects(subjects: Sequence[tuple[SubjectEmbedding, float]]) -> SubjectEmbedding:
        """Weighted average of subject embeddings (the paper's subject interpolation)."""
        if not isinstance(subjects, (list, tuple)) or not subjects:
            raise InputError("subjects: mix_subjects needs a non-empty list of (SubjectEmbedding, weight) pairs, "
                             f"got {shown(subjects)}", field="subjects")
        for i, pair in enumerate(subjects):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], SubjectEmbedding)
                    or real_number(pair[1]) is None):
                raise InputError(f"subjects[{i}]: expected a (SubjectEmbedding, weight) pair; mix_subjects weights are numbers, "
                                 f"got {shown(pair)}", field="subjects")
        weights = np.array([real_number(w) for _, w in subjects], dtype=np.float64)
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise InputError(f"mix_subjects weights must be finite, >= 0 and not all 0, got {weights.tolist()}",
                             field="subjects")
        shapes = {s.embeddings.shape for s, _ in subjects}
        if len(shapes) != 1:
            raise InputError(f"mix_subjects: subjects have different shapes {sorted(shapes)}", field="subjects")
        mixed = sum(w * s.embeddings.astype(np.float64) for (s, _), w in zip(subjects, weights)) / weights.sum()
        label = "+".join(f"{w:g}*{s.label}" for s, w in subjects)
        return SubjectEmbedding(mixed.astype(np.float32), label=label)

    def _encode_subjects(self, references: Sequence[Any], categories: Sequence[str]) -> np.ndarray:
        """Query embeddings per prompt, [B, num_query_tokens, hidden]: one Q-Former call (and one
        image decode) per distinct reference image and word, not per prompt."""
        unique: dict[tuple[int, str], np.ndarray] = {}
        for reference, category in zip(references, categories):
            if (id(reference), category) not in unique:
                unique[(id(reference), category)] = self.encode_subject(reference, category).embeddings
        return np.stack([unique[(id(r), c)] for r, c in zip(references, categories)])

    # ------------------------------------------------------------------------------------------
    # 3. The text
    # ------------------------------------------------------------------------------------------

    def _encode_prompt(self, prompts: list[str], subject_embeddings: np.ndarray) -> np.ndarray:
        """Text embeddings with the subject spliced in: [B, text_max_length, hidden]."""
        tokens = self.tokenizer.encode(prompts, self.config.text_length, field="prompt")
        out = self.engine("text_encoder").infer({"input_ids": tokens.input_ids, "ctx_embeddings": subject_embeddings})
        return out["text_embeddings"]

    def _encode_plain_prompt(self, prompts: list[str], *, field: str = "prompt", allow_empty: bool = False) -> np.ndarray:
        """Text embeddings without a subject (the plain CLIP text encoder): [B, text_max_length, hidden].

        Prompts longer than the text encoder are truncated (with a warning).
        """
        length = self.config.text_max_length
        tokens = self.tokenizer.encode(prompts, length, field=field, allow_empty=allow_empty)
        if any(tokens.truncated):
            logger.warning("%s truncated to %d tokens", "negative prompt" if field == "neg_prompt" else field, length)
        return self.engine("text_encoder_plain").infer({"input_ids": tokens.input_ids})["text_embeddings"]

    def _encode_negative_prompt(self, neg_prompt: str) -> np.ndarray:
        """Plain text embeddings of the negative prompt, [1, text_max_length, hidden] (cached)."""
        return self._negative_cache.get_or(
            neg_prompt, lambda: self._encode_plain_prompt([neg_prompt], field="neg_prompt", allow_empty=True))

    def _encode_text(self, prompts: list[str], targets: list[str], subject_embeddings: np.ndarray, *,
                    prompt_strength: float = 1.0, prompt_reps: int = 20, guidance_scale: float = 7.5,
                    neg_prompt: str = "") -> np.ndarray:
        """The UNet's ``encoder_hidden_states``: "a {target} {prompt}" x reps with the subject, preceded
        by the negative prompt's embeddings when guidance is on ([2B, ...]; else [B, ...])."""
        # No work past what the text encoder keeps: repetitions it would cut are not built.
        budget = self.config.text_length - self.tokenizer.num_special_tokens
        texts = build_prompts(prompts, targets, prompt_strength=prompt_strength, prompt_reps=prompt_reps,
                              max_reps=max_useful_reps(budget))
        # The repetitions are meant to fill the text encoder and be cut; warn only when a single
        # "a {target} {prompt}" does not fit, i.e. when words the user wrote are lost.
        single = build_prompts(prompts, targets, prompt_strength=1.0, prompt_reps=1)
        if any(self.tokenizer.encode(single, self.config.text_length, field="prompt").truncated):
            logger.warning("prompt truncated to %d tokens (the text encoder's limit with the subject)",
                           self.config.text_length)
        text_embeddings = self._encode_prompt(texts, subject_embeddings)
        if guidance_scale > 1.0:
            negative = self._encode_negative_prompt(neg_prompt)
            text_embeddings = np.concatenate([np.repeat(negative, len(prompts), axis=0), text_embeddings])
        return text_embeddings

    # ------------------------------------------------------------------------------------------
    # 4. Scheduler, latents, control map
    # ------------------------------------------------------------------------------------------

    def _prepare_scheduler(self, name: str, num_inference_steps: int):
        """Scheduler ``name`` from the package's scheduler config, with its timesteps set."""
        scheduler = scheduler_from_config(name, self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    @staticmethod
    def _prepare_latents(shape: Sequence[int], scheduler, *, latents: np.ndarray | None = None,
                        seed: int | None = None) -> np.ndarray:
        """Initial latents: ``latents`` (or standard normal ones from ``seed``) times the scheduler's
        initial noise sigma."""
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
        return (latents * np.float32(scheduler.init_noise_sigma)).astype(np.float32)

    def _prepare_control(self, height: int, width: int, unet_batch: int, *, condition_image: Any = None,
                        canny_image: Any = None, canny_low_threshold: int = 100, canny_high_threshold: int = 200,
                        conditioning_scale: float = 1.0) -> dict[str, np.ndarray]:
        """The ControlNet's extra inputs for a UNet batch of ``unet_batch``: the control map (given,
        or canny edges of ``canny_image``) at the generation size, and the conditioning scale."""
        if canny_image is not None:
            condition = imgs.canny_condition(imgs.load_image(canny_image, field="canny_image"),
                                             canny_low_threshold, canny_high_threshold)
        else:
            condition = imgs.load_image(condition_image, field="condition_image")
        condition = np.repeat(imgs.preprocess_condition(condition, height, width), unet_batch, axis=0)
        return {"controlnet_cond": condition, "conditioning_scale": np.array([conditioning_scale], np.float32)}

    # ------------------------------------------------------------------------------------------
    # 5. Denoising
    # ------------------------------------------------------------------------------------------

    def _predict_noise(self, sample: np.ndarray, timestep: Any, encoder_hidden_states: np.ndarray,
                       control: dict[str, np.ndarray] | None = None, *, timer: StageTimer | None = None,
                       step_cache: StepCache | None = None) -> np.ndarray:
        """One UNet call (after the ControlNet's, with ``control``) on whatever batch ``sample`` holds;
        with ``step_cache``, fast mode's full or shallow step (:mod:`.step_cache`)."""
        timer = timer or StageTimer()
        feed: dict[str, Any] = {
            "sample": sample,
            "timestep": np.full((sample.shape[0],), timestep, dtype=np.float32),
            "encoder_hidden_states": encoder_hidden_states,
        }
        if step_cache is not None:
            return step_cache.predict(self.engine, feed, control, timer)
        if control:
            controlnet = self.engine("controlnet")
            with timer("controlnet"):  # residuals may stay on the device until the UNet reads them
                feed.update(controlnet.infer({**feed, **control}, keep=controlnet.output_names))
        # every engine through self.engine(): a ControlNet package's generations load no
        # unet_plain, its inversion loads it on first use
        unet = self.engine("unet" if control else "unet_plain")
        with timer("unet"):
            return unet.infer(feed)["noise_pred"]

    def _guided_noise(self, latents: np.ndarray, timestep: Any, text_embeddings: np.ndarray, scheduler, *,
                     guidance_scale: float, control: dict[str, np.ndarray] | None = None,
                     timer: StageTimer | None = None, step_cache: StepCache | None = None) -> np.ndarray:
        """The noise prediction with classifier-free guidance (the UNet runs on [negative; positive]
        when ``guidance_scale > 1``)."""
        do_cfg = guidance_scale > 1.0
        model_input = np.concatenate([latents, latents]) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, timestep).astype(np.float32, copy=False)
        noise_pred = self._predict_noise(model_input, timestep, text_embeddings, control, timer=timer,
                                         step_cache=step_cache)
        if do_cfg:
            batch = latents.shape[0]
            noise_uncond, noise_text = noise_pred[:batch], noise_pred[batch:]
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        return noise_pred

    def _denoise(self, latents: np.ndarray, scheduler, text_embeddings: np.ndarray | None = None, *,
                guidance_scale: float = 7.5, control: dict[str, np.ndarray] | None = None,
                predict: NoisePredictor | None = None, after_step: AfterStep | None = None,
                callback: StepCallback | None = None, progress: bool | str = False,
                timer: StageTimer | None = None, cache_interval: int = 1) -> np.ndarray:
        """The scheduler loop: every timestep, a noise prediction, then a scheduler step.

        The prediction is :meth:`_guided_noise` (``text_embeddings``, ``guidance_scale``,
        ``control``) unless ``predict(latents, timestep)`` is given: another flow's own UNet feed
        (editing's). ``after_step(step_index, latents)`` returns the latents the loop goes on with
        (editing's local blend; prompt-to-prompt's ``step_callback``). ``callback(step_index,
        timestep, latents)`` runs after every step. ``progress``: a progress bar (a string: its
        label). Records ``denoise_loop`` (and the engines' and scheduler's times) in ``timer``.

        ``cache_interval`` N > 1 (with :meth:`_guided_noise` only): fast mode (:mod:`.step_cache`),
        a full UNet step on call 0 and every N-th call, shallow steps on the cached deep feature
        between; 1 runs the exact mode's graphs.

        What every step feeds unchanged (the text embeddings, the control map and its scale) is
        uploaded once, before the loop (:meth:`Engine.upload`: device memory on a GPU backend, the
        arrays themselves on the CPU). The latents stay on the host: the scheduler is numpy, and a
        step moves them and the noise prediction once each way, microseconds next to a UNet call.
        """
        timer = timer or StageTimer()
        cache_interval = check_cache_interval(cache_interval)
        step_cache = None
        if cache_interval > 1:
            if predict is not None:
                raise ValueError("cache_interval > 1 runs the generation's own UNet feed, not a predict function")
            step_cache = StepCache(cache_interval, require_step_cache(self.package, bool(control), cache_interval))
        if predict is None:
            if text_embeddings is None:
                raise ValueError("denoise needs text_embeddings or a predict function")
            if step_cache is not None:
                unet = self.engine(step_cache.graphs.full)
            else:
                unet = self.engine("unet" if control else "unet_plain")
            text_embeddings = unet.upload("encoder_hidden_states", text_embeddings)
            if control:
                controlnet = self.engine("controlnet")
                control = {name: controlnet.upload(name, value) for name, value in control.items()}

            def predict(sample: np.ndarray, timestep: Any) -> np.ndarray:
                return self._guided_noise(sample, timestep, text_embeddings, scheduler, guidance_scale=guidance_scale,
                                          control=control, timer=timer, step_cache=step_cache)

        loop_start = time.perf_counter()
        steps = len(scheduler.timesteps)
        for i, t in enumerate(_progress(scheduler.timesteps, progress)):
            noise_pred = predict(latents, t)
            with timer("scheduler"):
                latents = scheduler.step(noise_pred, t, latents).astype(np.float32, copy=False)
            if after_step is not None:
                latents = after_step(i, latents)
            if not np.isfinite(latents).all():  # cheap next to a UNet call; NaN would decode to a black image
                raise InputError(f"the denoising loop overflowed at step {i + 1} of {steps} (non-finite latents): "
                                 f"guidance_scale {guidance_scale:g} or the given latents are too large for this "
                                 f"model", field=None)
            if callback is not None:
                callback(i, float(t), latents)
        timer.timings["denoise_loop"] = time.perf_counter() - loop_start
        return latents

    # ------------------------------------------------------------------------------------------
    # 6. Decoding
    # ------------------------------------------------------------------------------------------

    def _decode_latents(self, latents: np.ndarray, *, timer: StageTimer | None = None) -> np.ndarray:
        """Images from latents: float32 [B, H, W, 3] in [0, 1]."""
        timer = timer or StageTimer()
        with timer("vae_decoder"):
            decoded = self.engine("vae_decoder").infer({"latents": latents / np.float32(self.config.vae_scaling_factor)})
        if not np.isfinite(decoded["image"]).all():
            raise InputError(f"the VAE decoder overflowed (non-finite pixels) on latents of magnitude up to "
                             f"{float(np.abs(latents).max()):.3g}: the guidance scale or the given latents are too "
                             f"large for this model", field=None)
        return imgs.postprocess(decoded["image"])

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
        callback: StepCallback | None = None,
        progress: bool = False,
        cache_interval: int = 1,
    ) -> PipelineOutput:
        """Generate images of the subject in ``reference_image`` following ``prompt``.

        ``callback(step_index, timestep, latents)`` is called after every scheduler step.
        ``cache_interval`` N > 1: fast mode (approximate; :mod:`.step_cache`), the UNet in full
        every N calls and shallow in between; 1 (the default): the exact mode.
        """
        timer = StageTimer()
        start = time.perf_counter()

        # 1. Check inputs
        inputs = self._check_inputs(
            prompt, reference_image, source_subject_category, target_subject_category, subject=subject,
            guidance_scale=guidance_scale, height=height, width=width, num_inference_steps=num_inference_steps,
            latents=latents, neg_prompt=neg_prompt, scheduler=scheduler, output_type=output_type,
            condition_image=condition_image, canny_image=canny_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale, seed=seed, prompt_strength=prompt_strength,
            prompt_reps=prompt_reps, canny_low_threshold=canny_low_threshold,
            canny_high_threshold=canny_high_threshold, callback=callback, progress=progress,
        )
        cache_interval = check_cache_interval(cache_interval)
        if cache_interval > 1:  # before any work: a package without the graphs says how to re-export
            require_step_cache(self.package, inputs.uses_control, cache_interval)

        # 2. Encode the subject (Q-Former), reusing cached embeddings
        with timer("qformer"):
            if subject is not None:
                subject_embeds = np.repeat(subject.embeddings[None], inputs.batch, axis=0)
            else:
                subject_embeds = self._encode_subjects(inputs.references, inputs.sources)

        # 3. Encode the text: "a {target} {prompt}" x reps with the subject, and the negative prompt
        with timer("text_encoder"):
            text_embeddings = self._encode_text(
                inputs.prompts, inputs.targets, subject_embeds, prompt_strength=inputs.prompt_strength,
                prompt_reps=inputs.prompt_reps, guidance_scale=inputs.guidance_scale, neg_prompt=inputs.neg_prompt,
            )

        # 4. Prepare the timesteps, the latents and the control map
        sched = self._prepare_scheduler(inputs.scheduler, inputs.num_inference_steps)
        latents = self._prepare_latents(inputs.latent_shape, sched, latents=inputs.latents, seed=inputs.seed)
        control = None
        if inputs.uses_control:
            with timer("condition_image"):
                control = self._prepare_control(
                    inputs.height, inputs.width, text_embeddings.shape[0], condition_image=inputs.condition_image,
                    canny_image=inputs.canny_image, canny_low_threshold=canny_low_threshold,
                    canny_high_threshold=canny_high_threshold, conditioning_scale=inputs.controlnet_conditioning_scale,
                )

        # 5. Denoise
        latents = self._denoise(latents, sched, text_embeddings, guidance_scale=inputs.guidance_scale, control=control,
                                callback=callback, progress=progress, timer=timer, cache_interval=cache_interval)

        # 6. Decode
        images = self._decode_latents(latents, timer=timer)
        timer.timings["total"] = time.perf_counter() - start
        timer.timings["steps"] = float(len(sched.timesteps))
        return PipelineOutput(images=imgs.to_pil(images) if inputs.output_type == "pil" else images,
                              timings=timer.timings)


    # ------------------------------------------------------------------------------------------
    # Editing (runtime/editing.py)
    # ------------------------------------------------------------------------------------------

    def edit(self, prompt: str, reference_image: Any, source_subject_category: str, target_subject_category: str,
             original_subject: str, *, callback: EditCallback | None = None, progress: bool = False,
             **arguments: Any) -> EditOutput:
        """Replace ``original_subject`` in an image by the subject of ``reference_image``.

        The other arguments are :class:`~.editing.EditArguments`' by name: ``image`` (a real
        image, inverted with DDIM first) or ``latents``/``seed`` (the image generated with the
        source prompt "a {original_subject} {prompt}"), ``num_inference_steps``, ``guidance_scale``,
        ``neg_prompt``, ``cross_replace_steps``, ``self_replace_steps``, ``blend_threshold``,
        ``height``, ``width``, ``scheduler``, ``sample_posterior``, ``output_type``,
        ``cache_interval`` (other than 1 refused). Returns the
        source image (a real image's reconstruction) and the edited image.
        ``callback(step_index, timestep, latents [2, C, h, w])`` runs after every step.
        """
        edit = EditArguments(prompt, reference_image, source_subject_category, target_subject_category,
                             original_subject, **arguments)
        return self._editor.edit(edit, callback=callback, progress=progress)

    def invert(self, image: Any, prompt: str, original_subject: str, num_inference_steps: int = 50,
               height: int | None = None, width: int | None = None, *, sample_posterior: bool = False,
               seed: int | None = None, callback: EditCallback | None = None, progress: bool = False,
               cache_interval: int = 1) -> np.ndarray:
        """DDIM inversion of a real image -> the latent [1, C, h, w] float32 that DDIM sampling with the
        source prompt ``"a {original_subject} {prompt}"`` turns back into the image (usable as
        ``latents=`` of a generation or an edit). Guidance 1, the VAE posterior's mean (or a sample
        seeded by ``seed`` with ``sample_posterior``). ``cache_interval`` other than 1 is refused:
        fast mode is for generation only."""
        return self._editor.invert(image, prompt, original_subject, num_inference_steps, height, width,
                                   sample_posterior=sample_posterior, seed=seed, callback=callback, progress=progress,
                                   cache_interval=cache_interval)


def _progress(steps, enabled: bool | str):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=enabled if isinstance(enabled, str) else "denoise", unit="step")
