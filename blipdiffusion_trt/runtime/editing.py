"""Subject-driven editing: prompt-to-prompt on generated images, real images through DDIM inversion.

LAVIS (``blip_diffusion.py``: ``generate_then_edit``, ``edit``, ``_ddim_inverse``) replaces the
subject of an image with the subject of a reference image while the rest of the scene stays.
Three words: the ``original_subject`` the image shows ("cat"), the reference image's category
for the Q-Former (``source_subject_category``) and the word for the new subject
(``target_subject_category``). Two prompts share one starting latent:

- source ``"a {original_subject} {prompt}"``, plain text encoder;
- target ``"a {target_subject_category} {prompt}"`` with the subject's query embeddings spliced in
  (no x20 repetition when editing);

and run through ``unet_p2p`` (export/p2p.py) as ``[uncond_src, uncond_tgt, cond_src, cond_tgt]``
with classifier-free guidance, the target's attention controlled from the source's
(runtime/p2p.py: token alignment, schedules, local blend). A real image is first encoded by the
VAE encoder (posterior mean, x scaling factor) and inverted with DDIM (source prompt, guidance
1, ``unet_plain``); the edit then starts from the inverted latent with DDIM, the source row
without guidance (it reconstructs the image) and the target with it (no ``uncond_src`` row).

:class:`EditingMixin` gives :class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime`
``invert`` and ``edit``; they drive engines through ``engines[name].infer(feed)`` only.
Deviations from LAVIS are listed in runtime/p2p.py and on the methods.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import EngineError, InputError, PackageError
from . import images as imgs
from .ddim_inverse import DDIMInverseScheduler
from .p2p import (
    LocalBlend,
    check_fraction,
    cross_replace_alphas,
    refinement_mapping,
    self_replace_calls,
    subject_token_positions,
    target_layout,
    token_map_matrix,
)
from .schedulers import scheduler_from_config
from .text import build_prompts

logger = logging.getLogger(__name__)

# the graphs editing runs besides the generation ones (unet_plain: the inversion; ControlNet
# packages do not load it for generation)
EDIT_COMPONENTS = ("unet_plain", "unet_p2p", "vae_encoder")
MAX_STEPS = 1000
# DDIM inversion is only inverted exactly by DDIM sampling
REAL_IMAGE_SCHEDULER = "ddim"
GENERATED_IMAGE_SCHEDULER = "pndm"


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class EditControl:
    """What ``unet_p2p`` is fed at each call, and the local blend's tokens.

    ``token_map``/``token_weights``: the alignment (runtime/p2p.py ``refinement_mapping``);
    ``cross_alphas``: per UNet call, 1 while cross-attention is controlled; ``self_calls``: how
    many first calls replace self-attention; ``blend_positions``: the original subject's tokens
    in the source prompt (None: no local blend).
    """

    token_map: np.ndarray
    token_weights: np.ndarray
    cross_alphas: np.ndarray
    self_calls: int
    blend_positions: tuple[int, ...] | None
    blend_threshold: float | None

    @cached_property
    def token_map_matrix(self) -> np.ndarray:
        return token_map_matrix(self.token_map)

    def feed(self, call: int) -> dict[str, np.ndarray]:
        alpha = self.cross_alphas[call] if call < len(self.cross_alphas) else np.float32(0)
        return {
            "cross_weights": (alpha * self.token_weights).astype(np.float32),
            "token_map": self.token_map_matrix,
            "self_gate": np.array([1.0 if call < self.self_calls else 0.0], dtype=np.float32),
        }


@dataclass
class EditRequest:
    """An edit ready to run (:meth:`EditingMixin.prepare_edit`): embeddings, control, start latents."""

    source_embeddings: np.ndarray  # [1, T, hidden], plain text encoder
    target_embeddings: np.ndarray  # [1, T, hidden], with the subject
    negative_embeddings: np.ndarray | None  # [1, T, hidden]; None: no classifier-free guidance
    control: EditControl
    latents: np.ndarray  # [2, C, h, w]: source, target (already x init_noise_sigma)
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    real_image: bool
    output_type: str = "pil"
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EditOutput:
    images: Any  # [source (or the real image's reconstruction), edited]: PIL images, or float32 [2, H, W, 3]
    latents: np.ndarray  # final latents [2, C, h, w]: source, edited
    mask: np.ndarray | None  # the last local-blend mask [h, w] (True: the edit's own latent), None without
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def source(self) -> Any:
        return self.images[0]

    @property
    def edited(self) -> Any:
        return self.images[1]


def preprocess_edit_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A real image -> [1, 3, height, width] float32 in [-1, 1] for the VAE encoder.

    Resized (bilinear) to cover height x width keeping its aspect, then centre-cropped: at a
    square size this is LAVIS's ``Resize(size)``, ``CenterCrop(size)``, ``ToTensor``, ``2x - 1``.
    """
    w0, h0 = image.size
    if width / w0 >= height / h0:
        size = (width, max(height, int(width * h0 / w0)))
    else:
        size = (max(width, int(height * w0 / h0)), height)
    resized = imgs.to_rgb(image).resize(size, resample=Image.Resampling.BILINEAR)
    top = int(round((size[1] - height) / 2.0))
    left = int(round((size[0] - width) / 2.0))
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
    tensor = pixels.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((tensor * 2 - 1).transpose(2, 0, 1)[None])


class _Timer(dict):
    def span(self, name: str):
        timings = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


class EditingMixin:
    """``invert`` and ``edit`` for :class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime`.

    Uses the runtime's ``package``, ``config``, ``engines``, ``scheduler_config``, ``tokenizer``,
    ``encode_subject``, ``encode_prompt`` and ``encode_negative_prompt``.
    """

    # ------------------------------------------------------------------------------------------
    # Engines
    # ------------------------------------------------------------------------------------------

    def _check_editing_package(self) -> None:
        missing = [name for name in EDIT_COMPONENTS if name not in self.package.specs]
        if missing:
            raise PackageError(
                f"{self.package.root}: no editing graphs ({', '.join(missing)}): the package was exported before "
                "editing existed or without it; re-export it: blipdiffusion-trt export CHECKPOINT --out PACKAGE"
            )

    def load_editing_engines(self, backend: str = "cpu", *, precision: str = "fp32", cpu_fused: bool = True,
                             **engine_options: Any) -> None:
        """Load the editing graphs this runtime has not loaded yet (``EDIT_COMPONENTS``) on ``backend``.

        ``edit``/``invert`` load them on the CPU by themselves when every engine of the runtime is
        an ONNX Runtime CPU engine; a runtime on another backend calls this first.
        ``engine_options``: as ``BlipDiffusionRuntime.from_package`` passes them (threads, ...).
        """
        from .engine import engine_factory

        self._check_editing_package()
        make_engine = engine_factory(backend)
        fused = cpu_fused and precision == "fp32" and getattr(make_engine, "runs_cpu_fused_graphs", False)
        for name in EDIT_COMPONENTS:
            if name not in self.engines:
                path = self.package.onnx_path(name, precision, cpu_fused=fused and self.package.has_cpu_fused(name))
                self.engines[name] = make_engine(self.package.specs[name], path, **engine_options)

    def _editing_engine(self, name: str):
        if name not in self.engines:
            from .engine import OnnxRuntimeEngine

            self._check_editing_package()
            if not all(type(engine) is OnnxRuntimeEngine for engine in self.engines.values()):
                raise EngineError(
                    f"the editing graph {name} is not loaded: call load_editing_engines(backend=...) with this "
                    "runtime's backend first"
                )
            self.load_editing_engines("cpu")
        return self.engines[name]

    # ------------------------------------------------------------------------------------------
    # Inversion
    # ------------------------------------------------------------------------------------------

    def encode_image(self, image: Any, height: int, width: int, *, sample_posterior: bool = False,
                     seed: int | None = None) -> np.ndarray:
        """A real image -> its scaled latent [1, C, h, w]: the VAE posterior's mean (LAVIS samples it,
        unseeded), or a sample with ``seed`` when ``sample_posterior``."""
        pil = imgs.load_image(image, field="image")
        pixels = preprocess_edit_image(pil, height, width)
        out = self._editing_engine("vae_encoder").infer({"image": pixels})
        latent = out["latent_mean"]
        if sample_posterior:
            noise = np.random.default_rng(seed).standard_normal(latent.shape, dtype=np.float32)
            latent = latent + np.exp(np.float32(0.5) * out["latent_logvar"]) * noise
        return (latent * np.float32(self.config.vae_scaling_factor)).astype(np.float32)

    def invert(
        self,
        image: Any,
        prompt: str,
        original_subject: str,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        *,
        sample_posterior: bool = False,
        seed: int | None = None,
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """DDIM inversion of a real image -> the latent [1, C, h, w] float32 that DDIM sampling with the
        source prompt ``"a {original_subject} {prompt}"`` turns back into the image (usable as
        ``latents=`` of a generation or an edit). Guidance 1, the VAE posterior's mean.

        LAVIS builds this prompt from the subject string zipped character by character ("a c ...").
        """
        self._check_editing_package()
        height, width = self._edit_size(height, width)
        _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        source_text = self._edit_text(prompt, original_subject, "original_subject")
        inverse = self._inverse_scheduler(num_inference_steps)
        pil = imgs.load_image(image, field="image")
        latents = self.encode_image(pil, height, width, sample_posterior=sample_posterior, seed=seed)
        embeddings = self._plain_embeddings(source_text)
        return self._invert_latents(latents, embeddings, inverse, callback=callback, progress=progress)

    def _inverse_scheduler(self, num_inference_steps: int) -> DDIMInverseScheduler:
        inverse = DDIMInverseScheduler.from_config(self.scheduler_config)
        inverse.set_timesteps(num_inference_steps)
        return inverse

    def _invert_latents(self, latents: np.ndarray, embeddings: np.ndarray, inverse: DDIMInverseScheduler, *,
                        callback=None, progress: bool = False) -> np.ndarray:
        unet = self._editing_engine("unet_plain")
        for i, t in enumerate(_progress(inverse.timesteps, progress, "invert")):
            feed = {"sample": latents, "timestep": np.full((1,), t, dtype=np.float32), "encoder_hidden_states": embeddings}
            noise_pred = unet.infer(feed)["noise_pred"]
            latents = inverse.step(noise_pred, t, latents).astype(np.float32, copy=False)
            if callback is not None:
                callback(i, float(t), latents)
        return latents

    # ------------------------------------------------------------------------------------------
    # Editing
    # ------------------------------------------------------------------------------------------

    def edit(
        self,
        prompt: str,
        reference_image: Any,
        source_subject_category: str,
        target_subject_category: str,
        original_subject: str,
        *,
        image: Any = None,
        latents: np.ndarray | None = None,
        seed: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        neg_prompt: str = "",
        cross_replace_steps: float = 0.8,
        self_replace_steps: float = 0.4,
        blend_threshold: float | None = 0.3,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        sample_posterior: bool = False,
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> EditOutput:
        """Replace ``original_subject`` in an image by the subject of ``reference_image``.

        ``image`` given: a real image, inverted with DDIM first (``scheduler`` must be "ddim", the
        default then); else the image generated from ``latents`` (or ``seed``) with the source
        prompt is edited (any scheduler, "pndm" by default). ``cross_replace_steps`` and
        ``self_replace_steps``: fractions of the steps whose cross-/self-attention the target
        takes from the source; ``blend_threshold``: the local blend's threshold (None: no local
        blend). Returns the source image (a real image's reconstruction) and the edited image.
        ``callback(call, timestep, latents [2, C, h, w])`` runs after every step.
        """
        request = self.prepare_edit(
            prompt, reference_image, source_subject_category, target_subject_category, original_subject,
            image=image, latents=latents, seed=seed, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, neg_prompt=neg_prompt, cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps, blend_threshold=blend_threshold, height=height, width=width,
            scheduler=scheduler, sample_posterior=sample_posterior, output_type=output_type, progress=progress,
        )
        return self.run_edit(request, callback=callback, progress=progress)

    def prepare_edit(
        self,
        prompt: str,
        reference_image: Any,
        source_subject_category: str,
        target_subject_category: str,
        original_subject: str,
        *,
        image: Any = None,
        latents: np.ndarray | None = None,
        seed: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        neg_prompt: str = "",
        cross_replace_steps: float = 0.8,
        self_replace_steps: float = 0.4,
        blend_threshold: float | None = 0.3,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        sample_posterior: bool = False,
        output_type: str = "pil",
        progress: bool = False,
    ) -> EditRequest:
        """Stages 1-5 of :meth:`edit`: checks, embeddings, control, starting latents (inversion)."""
        cfg = self.config
        timer = _Timer()

        # 1. Check inputs (before anything runs)
        self._check_editing_package()
        height, width = self._edit_size(height, width)
        _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        guidance_scale = _check_float("guidance_scale", guidance_scale)
        cross_replace_steps = check_fraction("cross_replace_steps", cross_replace_steps)
        self_replace_steps = check_fraction("self_replace_steps", self_replace_steps)
        if blend_threshold is not None:
            blend_threshold = check_fraction("blend_threshold", blend_threshold)
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if not isinstance(neg_prompt, str):
            raise InputError("neg_prompt must be a string")
        real_image = image is not None
        if real_image and latents is not None:
            raise InputError("pass either image (a real image to edit) or latents (an image to generate), not both")
        if scheduler is None:
            scheduler = REAL_IMAGE_SCHEDULER if real_image else GENERATED_IMAGE_SCHEDULER
        if real_image and scheduler != REAL_IMAGE_SCHEDULER:
            raise InputError(
                f"scheduler: a real image is inverted with DDIM and must be edited with scheduler='ddim', got {scheduler!r}"
            )
        sched = scheduler_from_config(scheduler, self.scheduler_config)  # unknown names: one line now
        sched.set_timesteps(num_inference_steps)
        if real_image:
            inverse = self._inverse_scheduler(num_inference_steps)
            image = imgs.load_image(image, field="image")
        latent_shape = (1, cfg.latent_channels, height // cfg.latent_scale_factor, width // cfg.latent_scale_factor)
        if latents is not None:
            latents = _check_latents(latents, latent_shape)
        source_text = self._edit_text(prompt, original_subject, "original_subject")
        target_text = self._edit_text(prompt, target_subject_category, "target_subject_category")
        subject_ids = self.tokenizer.word_ids(original_subject, field="original_subject")
        if not subject_ids:
            raise InputError(f"original_subject {original_subject!r}: the tokenizer keeps no token of it")
        source_ids = self.tokenizer.token_ids(source_text, cfg.text_max_length, field="prompt")
        blend_positions = subject_token_positions(source_ids, subject_ids)
        if not blend_positions:
            raise InputError(f"original_subject {original_subject!r}: its tokens do not fit the "
                             f"{cfg.text_max_length} text positions with this prompt; shorten the prompt")

        # 2. Encode the subject (Q-Former)
        with timer.span("qformer"):
            subject = self.encode_subject(reference_image, source_subject_category)

        # 3. Encode the texts: source (plain), target (with the subject), negative
        with timer.span("text_encoder"):
            target_tokens = self.tokenizer.encode([target_text], cfg.text_length, field="prompt")
            if target_tokens.truncated[0]:
                logger.warning("prompt truncated to %d tokens (the text encoder's limit with the subject)", cfg.text_length)
            source_embeddings = self._plain_embeddings(source_text)
            target_embeddings = self.encode_prompt([target_text], subject.embeddings[None])
            negative = self.encode_negative_prompt(neg_prompt) if guidance_scale > 1.0 else None

        # 4. Prompt-to-prompt control: token alignment, schedules, local-blend tokens
        target_ids = target_layout(self.tokenizer.token_ids(target_text, cfg.text_length, field="prompt"),
                                   cfg.ctx_begin_pos, cfg.num_query_tokens, cfg.text_max_length)
        token_map, token_weights = refinement_mapping(source_ids, target_ids, cfg.text_max_length)
        control = EditControl(
            token_map=token_map, token_weights=token_weights,
            cross_alphas=cross_replace_alphas(num_inference_steps, cross_replace_steps),
            self_calls=self_replace_calls(num_inference_steps, self_replace_steps),
            blend_positions=tuple(blend_positions) if blend_threshold is not None else None,
            blend_threshold=blend_threshold,
        )

        # 5. Starting latent: the inverted real image, or noise (given or seeded)
        if real_image:
            with timer.span("inversion"):
                start = self.encode_image(image, height, width, sample_posterior=sample_posterior, seed=seed)
                start = self._invert_latents(start, source_embeddings, inverse, progress=progress)
        else:
            start = latents if latents is not None else \
                np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)
            start = (start * np.float32(sched.init_noise_sigma)).astype(np.float32)
        return EditRequest(
            source_embeddings=source_embeddings, target_embeddings=target_embeddings,
            negative_embeddings=negative, control=control, latents=np.concatenate([start, start]),
            scheduler=scheduler, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            real_image=real_image, output_type=output_type, timings=dict(timer),
        )

    def run_edit(self, request: EditRequest, *, callback: Callable[[int, float, np.ndarray], None] | None = None,
                 progress: bool = False) -> EditOutput:
        """Stages 6-7 of :meth:`edit`: the controlled denoising loop of both prompts, decoding."""
        cfg = self.config
        timer = _Timer(request.timings)
        start = time.perf_counter()
        control = request.control
        sched = scheduler_from_config(request.scheduler, self.scheduler_config)
        sched.set_timesteps(request.num_inference_steps)
        unet = self._editing_engine("unet_p2p")

        # 6. Denoise [source, target] with the target's attention controlled from the source's.
        # Rows: [uncond_src, uncond_tgt, cond_src, cond_tgt]; a real image's source reconstructs
        # without guidance, so it has no uncond_src row; without guidance only the last two.
        rows, embeddings = self._edit_rows(request)
        blend = LocalBlend(control.blend_positions, control.blend_threshold) if control.blend_positions else None
        latents = request.latents
        loop_start = time.perf_counter()
        for call, t in enumerate(_progress(sched.timesteps, progress, "edit")):
            model_input = sched.scale_model_input(latents[rows], t).astype(np.float32, copy=False)
            feed = {
                "sample": model_input,
                "timestep": np.full((len(rows),), t, dtype=np.float32),
                "encoder_hidden_states": embeddings,
                **control.feed(call),
            }
            with timer.span("unet"):
                out = unet.infer(feed)
            noise_pred = self._guided_noise(out["noise_pred"], request)
            with timer.span("scheduler"):
                latents = sched.step(noise_pred, t, latents).astype(np.float32, copy=False)
            if blend is not None:
                blend.add(out["cross_attention_maps"])
                latents = blend(latents)
            if callback is not None:
                callback(call, float(t), latents)
        timer["denoise_loop"] = time.perf_counter() - loop_start

        # 7. Decode the source and the edited latent
        with timer.span("vae_decoder"):
            decoder = self.engines["vae_decoder"]
            scaled = latents / np.float32(cfg.vae_scaling_factor)
            if cfg.max_batch_size >= 2:
                decoded = decoder.infer({"latents": scaled})["image"]
            else:
                decoded = np.concatenate([decoder.infer({"latents": scaled[i:i + 1]})["image"] for i in range(2)])
        images = imgs.postprocess(decoded)
        timer["total"] = timer.get("total", 0.0) + time.perf_counter() - start
        timer["steps"] = float(len(sched.timesteps))
        return EditOutput(
            images=imgs.to_pil(images) if request.output_type == "pil" else images,
            latents=latents, mask=None if blend is None else blend.last_mask, timings=dict(timer),
        )

    # ------------------------------------------------------------------------------------------
    # Pieces
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _edit_rows(request: EditRequest) -> tuple[np.ndarray, np.ndarray]:
        """Which latent (0 source, 1 target) each UNet row takes, and the rows' text embeddings."""
        source, target, negative = request.source_embeddings, request.target_embeddings, request.negative_embeddings
        if negative is None:
            return np.array([0, 1]), np.concatenate([source, target])
        if request.real_image:
            return np.array([1, 0, 1]), np.concatenate([negative, source, target])
        return np.array([0, 1, 0, 1]), np.concatenate([negative, negative, source, target])

    @staticmethod
    def _guided_noise(noise_pred: np.ndarray, request: EditRequest) -> np.ndarray:
        """[source, target] noise from the UNet rows: classifier-free guidance where there are uncond rows."""
        if request.negative_embeddings is None:
            return noise_pred
        guidance = request.guidance_scale
        cond = noise_pred[-2:]
        if request.real_image:
            uncond_target = noise_pred[0]
            target = uncond_target + guidance * (cond[1] - uncond_target)
            return np.stack([cond[0], target])
        uncond = noise_pred[:2]
        return uncond + guidance * (cond - uncond)

    def _plain_embeddings(self, text: str) -> np.ndarray:
        """Plain text encoder embeddings [1, T, hidden] of a prompt (the source prompt)."""
        tokens = self.tokenizer.encode([text], self.config.text_max_length, field="prompt")
        if tokens.truncated[0]:
            logger.warning("source prompt truncated to %d tokens", self.config.text_max_length)
        return self.engines["text_encoder_plain"].infer({"input_ids": tokens.input_ids})["text_embeddings"]

    @staticmethod
    def _edit_text(prompt: Any, subject: Any, field_name: str) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string")
        if not isinstance(subject, str) or not subject.strip():
            raise InputError(f"{field_name} must be a non-empty string")
        return build_prompts([prompt], [subject.strip()], prompt_strength=1.0, prompt_reps=1)[0]

    def _edit_size(self, height: Any, width: Any) -> tuple[int, int]:
        cfg = self.config
        height = cfg.default_height if height is None else height
        width = cfg.default_width if width is None else width
        for name, value in (("height", height), ("width", width)):
            _check_int(name, value, cfg.min_image_size, cfg.max_image_size)
            if value % cfg.image_multiple:
                raise InputError(f"{name} must be a multiple of {cfg.image_multiple} in "
                                 f"[{cfg.min_image_size}, {cfg.max_image_size}], got {value}")
        return int(height), int(width)


def _progress(steps: Sequence, enabled: bool, what: str):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=what, unit="step")


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


def _check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(latents, np.ndarray) or latents.dtype not in (np.float16, np.float32, np.float64):
        raise InputError(f"latents must be a float32 numpy array of shape {list(shape)}")
    if tuple(latents.shape) != shape:
        raise InputError(f"latents must have shape {list(shape)} for this size, got {list(latents.shape)}")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf")
    return latents.astype(np.float32)
