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

:class:`Editor` is the part of :class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime`
that ``runtime.edit`` and ``runtime.invert`` call: numbered stages over the runtime's generation
stages, which :class:`GenerationStages` declares (checks, subject and text encoding, scheduler,
latents, the denoising loop, decoding). An edit's arguments have one home, :class:`EditArguments`.
What is editing's own is here: the edit's checks, the control, the UNet rows and their guidance,
the local blend after each step, the VAE encoder and the inversion. The editing graphs (``vae_encoder``,
``unet_plain``, ``unet_p2p``) load on first use through ``runtime.engine(name)``, on the
runtime's backend with its options. Deviations from LAVIS are listed in runtime/p2p.py, on the
methods and in docs/deviations-from-lavis.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import KW_ONLY, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError, PackageError
from . import images as imgs
from .inputs import LIMITS, GenerationInputs, check_bool, check_callable, check_seed, check_text
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
from .schedulers import DDIMInverseScheduler
from .step_cache import refuse_cache_interval
from .text import build_prompts
from .timing import StageTimer

if TYPE_CHECKING:
    from ..components import PipelineConfig
    from ..package import ModelPackage
    from .engine import Engine
    from .text import ClipTextTokenizer

logger = logging.getLogger(__name__)

# DDIM inversion is only inverted exactly by DDIM sampling
REAL_IMAGE_SCHEDULER = "ddim"
GENERATED_IMAGE_SCHEDULER = "pndm"
# callback(step_index, timestep, latents [2, C, h, w]) after every step
EditCallback = Callable[[int, float, np.ndarray], None]


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


@dataclass(frozen=True, eq=False)  # may hold arrays: compared by identity
class EditArguments:
    """The arguments of an edit, as given (``BlipDiffusionRuntime.edit`` takes the same, by name).

    ``image``: a real image to edit, inverted with DDIM first (``scheduler`` must be "ddim", the
    default then); else the image generated from ``latents`` (or ``seed``) with the source prompt
    ``"a {original_subject} {prompt}"`` is edited (any scheduler, "pndm" by default).
    ``cross_replace_steps``, ``self_replace_steps``: fractions of the steps whose cross-/self-
    attention the target takes from the source. ``blend_threshold``: the local blend's threshold
    (None: no local blend). ``sample_posterior``: with ``image``, sample the VAE posterior (seeded
    by ``seed``) instead of taking its mean. ``output_type``: "pil" or "np". ``cache_interval``
    other than 1 is refused: fast mode (:mod:`.step_cache`) is for generation only.
    """

    prompt: str
    reference_image: Any
    source_subject_category: str
    target_subject_category: str
    original_subject: str
    _: KW_ONLY
    image: Any = None
    latents: np.ndarray | None = None
    seed: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    neg_prompt: str = ""
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    blend_threshold: float | None = 0.3
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    sample_posterior: bool = False
    output_type: str = "pil"
    cache_interval: int = 1


@dataclass(frozen=True)
class EditInputs:
    """The checked arguments of an edit (from :class:`EditArguments`)."""

    generation: GenerationInputs  # prompt, reference image, words, size, steps, guidance, latents, scheduler, ...
    original_subject: str
    image: Image.Image | None  # the real image to edit, loaded; None: a generated one
    source_text: str  # "a {original_subject} {prompt}"
    source_ids: list[int]  # its token ids (bos ... eos, no padding)
    blend_positions: list[int]  # the original subject's tokens in it
    cross_replace_steps: float
    self_replace_steps: float
    blend_threshold: float | None
    sample_posterior: bool = False

    @property
    def real_image(self) -> bool:
        return self.image is not None


@dataclass
class EditRequest:
    """An edit ready to run (:meth:`Editor.prepare`): embeddings, control, start latents."""

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



class GenerationStages(Protocol):
    """What the :class:`Editor` uses of its runtime (:class:`~.pipeline.BlipDiffusionRuntime`): the
    package, its engines (``engine`` loads the editing graphs on first use, on the runtime's
    backend with its options) and the generation's stages, which are the runtime's own (private)."""

    package: ModelPackage
    config: PipelineConfig
    scheduler_config: dict[str, Any]
    tokenizer: ClipTextTokenizer

    def engine(self, component: str) -> Engine: ...

    def _check_inputs(self, prompt: Any, reference_image: Any = None, source_subject_category: Any = None,
                      target_subject_category: Any = None, **arguments: Any) -> GenerationInputs: ...

    def _check_image_size(self, height: Any, width: Any) -> tuple[int, int]: ...

    def _check_steps(self, scheduler: Any, num_inference_steps: Any, *, inverse: bool = False) -> int: ...

    def _encode_subjects(self, references: Sequence[Any], categories: Sequence[str]) -> np.ndarray: ...

    def _encode_plain_prompt(self, prompts: list[str], *, field: str = "prompt",
                             allow_empty: bool = False) -> np.ndarray: ...

    def _encode_negative_prompt(self, neg_prompt: str) -> np.ndarray: ...

    def _encode_text(self, prompts: list[str], targets: list[str], subject_embeddings: np.ndarray, *,
                     prompt_reps: int = 20, guidance_scale: float = 7.5) -> np.ndarray: ...

    def _prepare_scheduler(self, name: str, num_inference_steps: int) -> Any: ...

    def _prepare_latents(self, shape: Sequence[int], scheduler: Any, *, latents: np.ndarray | None = None,
                         seed: int | None = None) -> np.ndarray: ...

    def _denoise(self, latents: np.ndarray, scheduler: Any, text_embeddings: np.ndarray | None = None, *,
                 guidance_scale: float = 7.5, predict: Callable[[np.ndarray, Any], np.ndarray] | None = None,
                 after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
                 callback: EditCallback | None = None, progress: bool | str = False,
                 timer: StageTimer | None = None) -> np.ndarray: ...

    def _decode_latents(self, latents: np.ndarray, *, timer: StageTimer | None = None) -> np.ndarray: ...


class Editor:
    """``invert`` and ``edit`` of a runtime (``BlipDiffusionRuntime.edit``/``invert`` call these),
    written as numbered stages over the runtime's generation stages (:class:`GenerationStages`)."""

    def __init__(self, runtime: GenerationStages):
        self.runtime = runtime

    # ------------------------------------------------------------------------------------------
    # Engines
    # ------------------------------------------------------------------------------------------

    def check_package(self) -> None:
        """A :class:`PackageError` saying how to re-export when the package has no editing graphs."""
        package = self.runtime.package
        missing = [name for name in ("vae_encoder", "unet_p2p") if name not in package.specs]
        if missing:
            raise PackageError(
                f"{package.root}: no editing graphs ({', '.join(missing)}): the package was exported before "
                "editing existed or without it; re-export it: blipdiffusion-trt export CHECKPOINT --out PACKAGE"
            )

    # ------------------------------------------------------------------------------------------
    # Inversion
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _source_prompt(prompt: Any, original_subject: Any) -> str:
        """The source prompt ``"a {original_subject} {prompt}"`` (what the image shows).

        LAVIS builds the inversion prompt from the subject string zipped character by character
        ("a c ..."); this is the prompt it means.
        """
        check_text("prompt", prompt, LIMITS.max_text_characters)
        check_text("original_subject", original_subject, LIMITS.max_subject_characters)
        return build_prompts([prompt], [original_subject.strip()], prompt_strength=1.0, prompt_reps=1)[0]

    def encode_image(self, image: Any, height: int, width: int, *, sample_posterior: bool = False,
                     seed: int | None = None, timer: StageTimer | None = None) -> np.ndarray:
        """A real image -> its scaled latent [1, C, h, w]: the VAE posterior's mean (LAVIS samples it,
        unseeded), or a sample with ``seed`` when ``sample_posterior``."""
        timer = timer or StageTimer()
        pixels = preprocess_edit_image(imgs.load_image(image, field="image"), height, width)
        with timer("vae_encoder"):
            out = self.runtime.engine("vae_encoder").infer({"image": pixels})
        latent = out["latent_mean"]
        if sample_posterior:
            noise = np.random.default_rng(seed).standard_normal(latent.shape, dtype=np.float32)
            latent = latent + np.exp(np.float32(0.5) * out["latent_logvar"]) * noise
        return (latent * np.float32(self.runtime.config.vae_scaling_factor)).astype(np.float32)

    def _invert_latents(self, latents: np.ndarray, text_embeddings: np.ndarray, num_inference_steps: int, *,
                        callback: EditCallback | None = None, progress: bool = False,
                        timer: StageTimer | None = None) -> np.ndarray:
        """DDIM inversion: the runtime's denoising loop with the inverse DDIM scheduler (from the
        package's scheduler config, as diffusers' ``DDIMInverseScheduler.from_config``) at guidance 1."""
        inverse = DDIMInverseScheduler.from_config(self.runtime.scheduler_config)
        inverse.set_timesteps(num_inference_steps)
        return self.runtime._denoise(latents, inverse, text_embeddings, guidance_scale=1.0, callback=callback,
                                     progress="invert" if progress else False, timer=timer)

    def invert(self, image: Any, prompt: str, original_subject: str, num_inference_steps: int = 50,
               height: int | None = None, width: int | None = None, *, sample_posterior: bool = False,
               seed: int | None = None, callback: EditCallback | None = None, progress: bool = False,
               cache_interval: int = 1) -> np.ndarray:
        """``BlipDiffusionRuntime.invert``: DDIM inversion of a real image."""
        runtime = self.runtime

        # 1. Check inputs
        refuse_cache_interval(cache_interval, "invert")
        self.check_package()
        height, width = runtime._check_image_size(height, width)
        num_inference_steps = runtime._check_steps(None, num_inference_steps, inverse=True)
        seed = check_seed(seed)
        check_bool("sample_posterior", sample_posterior)
        check_callable("callback", callback)
        check_bool("progress", progress)
        source_text = self._source_prompt(prompt, original_subject)
        pil = imgs.load_image(image, field="image")

        # 2. Encode the source prompt (plain text encoder)
        text_embeddings = runtime._encode_plain_prompt([source_text])

        # 3. Encode the image (VAE encoder)
        latents = self.encode_image(pil, height, width, sample_posterior=sample_posterior, seed=seed)

        # 4. Invert
        return self._invert_latents(latents, text_embeddings, num_inference_steps, callback=callback, progress=progress)

    # ------------------------------------------------------------------------------------------
    # Editing
    # ------------------------------------------------------------------------------------------

    def edit(self, arguments: EditArguments, *, callback: EditCallback | None = None,
             progress: bool = False) -> EditOutput:
        """``BlipDiffusionRuntime.edit``: :meth:`prepare` (stages 1-5), then :meth:`run` (6-7)."""
        check_callable("callback", callback)  # before any work, with the arguments (prepare checks those)
        check_bool("progress", progress)
        return self.run(self.prepare(arguments, progress=progress), callback=callback, progress=progress)

    def _check(self, arguments: EditArguments) -> EditInputs:
        """Every argument of an edit checked (one-line :class:`InputError` naming the field), the
        generation's through the runtime's checks; the real image is loaded here."""
        runtime, a = self.runtime, arguments
        cfg = runtime.config
        refuse_cache_interval(a.cache_interval, "edit")
        self.check_package()
        if not isinstance(a.prompt, str):
            raise InputError("prompt must be one non-empty string (an edit makes one image)", field="prompt")
        real_image = a.image is not None
        if real_image and a.latents is not None:
            raise InputError("image and latents given: pass either image (a real image to edit) or latents "
                             "(the starting noise of an image to generate and edit), not both", field="image")
        scheduler = a.scheduler
        if scheduler is None:
            scheduler = REAL_IMAGE_SCHEDULER if real_image else GENERATED_IMAGE_SCHEDULER
        generation = runtime._check_inputs(
            a.prompt, a.reference_image, a.source_subject_category, a.target_subject_category,
            guidance_scale=a.guidance_scale, height=a.height, width=a.width, num_inference_steps=a.num_inference_steps,
            latents=a.latents, neg_prompt=a.neg_prompt, scheduler=scheduler, output_type=a.output_type,
            controlnet=False, seed=a.seed,
        )
        check_bool("sample_posterior", a.sample_posterior)
        if real_image and scheduler != REAL_IMAGE_SCHEDULER:
            raise InputError(f"scheduler: a real image is inverted with DDIM and must be edited with the "
                             f"{REAL_IMAGE_SCHEDULER} scheduler, got {scheduler!r}", field="scheduler")
        if real_image:  # the inversion's timesteps too
            runtime._check_steps(None, a.num_inference_steps, inverse=True)
        cross_replace_steps = check_fraction("cross_replace_steps", a.cross_replace_steps)
        self_replace_steps = check_fraction("self_replace_steps", a.self_replace_steps)
        blend_threshold = a.blend_threshold
        if blend_threshold is not None:
            blend_threshold = check_fraction("blend_threshold", blend_threshold, below_one=True)
        original_subject = a.original_subject
        source_text = self._source_prompt(a.prompt, original_subject)
        subject_ids = runtime.tokenizer.word_ids(original_subject, field="original_subject")
        if not subject_ids:
            raise InputError(f"original_subject {original_subject!r}: the tokenizer keeps no token of it",
                             field="original_subject")
        source_ids = runtime.tokenizer.token_ids(source_text, cfg.text_max_length, field="prompt")
        blend_positions = subject_token_positions(source_ids, subject_ids)
        if not blend_positions:
            raise InputError(f"original_subject {original_subject!r}: its tokens do not fit the "
                             f"{cfg.text_max_length} text positions with this prompt; shorten the prompt",
                             field="original_subject")
        return EditInputs(
            generation=generation, original_subject=original_subject.strip(),
            image=imgs.load_image(a.image, field="image") if real_image else None, source_text=source_text,
            source_ids=source_ids, blend_positions=blend_positions, cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps, blend_threshold=blend_threshold,
            sample_posterior=a.sample_posterior,
        )

    def _control(self, inputs: EditInputs) -> EditControl:
        """Prompt-to-prompt control: the target's tokens aligned with the source's, the replace
        schedules and the local blend's tokens."""
        cfg, tokenizer = self.runtime.config, self.runtime.tokenizer
        generation = inputs.generation
        target_text = build_prompts(generation.prompts, generation.targets, prompt_strength=1.0, prompt_reps=1)[0]
        target_ids = target_layout(tokenizer.token_ids(target_text, cfg.text_length, field="prompt"),
                                   cfg.ctx_begin_pos, cfg.num_query_tokens, cfg.text_max_length)
        token_map, token_weights = refinement_mapping(inputs.source_ids, target_ids, cfg.text_max_length)
        steps = generation.num_inference_steps
        return EditControl(
            token_map=token_map, token_weights=token_weights,
            cross_alphas=cross_replace_alphas(steps, inputs.cross_replace_steps),
            self_calls=self_replace_calls(steps, inputs.self_replace_steps),
            blend_positions=tuple(inputs.blend_positions) if inputs.blend_threshold is not None else None,
            blend_threshold=inputs.blend_threshold,
        )

    def prepare(self, arguments: EditArguments, *, progress: bool = False) -> EditRequest:
        """Stages 1-5 of an edit: checks, embeddings, control, starting latents (inversion)."""
        runtime = self.runtime
        timer = StageTimer()

        # 1. Check inputs (before any graph runs)
        inputs = self._check(arguments)
        generation = inputs.generation
        seed = generation.seed

        # 2. Encode the subject (Q-Former)
        with timer("qformer"):
            subject = runtime._encode_subjects(generation.references, generation.sources)

        # 3. Encode the texts: source (plain), target (with the subject, once), negative
        with timer("text_encoder"):
            source_embeddings = runtime._encode_plain_prompt([inputs.source_text])
            target_embeddings = runtime._encode_text(generation.prompts, generation.targets, subject, prompt_reps=1,
                                                     guidance_scale=1.0)
            negative = (runtime._encode_negative_prompt(generation.neg_prompt)
                        if generation.do_classifier_free_guidance else None)

        # 4. Prompt-to-prompt control: token alignment, schedules, local-blend tokens
        control = self._control(inputs)

        # 5. Starting latent: the inverted real image, or noise (given or seeded)
        if inputs.real_image:
            start = self.encode_image(inputs.image, generation.height, generation.width,
                                      sample_posterior=inputs.sample_posterior, seed=seed, timer=timer)
            inversion = StageTimer()
            start = self._invert_latents(start, source_embeddings, generation.num_inference_steps, progress=progress,
                                         timer=inversion)
            timer.add("inversion", inversion.timings["denoise_loop"])
        else:
            scheduler_ = runtime._prepare_scheduler(generation.scheduler, generation.num_inference_steps)
            start = runtime._prepare_latents(generation.latent_shape, scheduler_, latents=generation.latents, seed=seed)
        return EditRequest(
            source_embeddings=source_embeddings, target_embeddings=target_embeddings,
            negative_embeddings=negative, control=control, latents=np.concatenate([start, start]),
            scheduler=generation.scheduler, num_inference_steps=generation.num_inference_steps,
            guidance_scale=generation.guidance_scale, real_image=inputs.real_image,
            output_type=generation.output_type, timings=dict(timer.timings),
        )

    def run(self, request: EditRequest, *, callback: EditCallback | None = None,
            progress: bool = False) -> EditOutput:
        """Stages 6-7 of an edit: the controlled denoising loop of both prompts, decoding."""
        runtime = self.runtime
        timer = StageTimer()
        timer.timings.update(request.timings)
        start = time.perf_counter()

        # 6. Denoise [source, target], the target's attention controlled from the source's; the
        # local blend after every step
        scheduler = runtime._prepare_scheduler(request.scheduler, request.num_inference_steps)
        control = request.control
        blend = LocalBlend(control.blend_positions, control.blend_threshold) if control.blend_positions else None
        calls: list[np.ndarray] = []  # each UNet call's source cross-attention maps

        def predict(latents: np.ndarray, timestep: Any) -> np.ndarray:
            noise_pred, maps = self._predict_noise(latents, timestep, request, scheduler, call=len(calls),
                                                   timer=timer)
            calls.append(maps)
            return noise_pred

        def local_blend(step: int, latents: np.ndarray) -> np.ndarray:
            blend.add(calls[-1])
            return blend(latents)

        latents = runtime._denoise(request.latents, scheduler, predict=predict,
                                   after_step=local_blend if blend is not None else None, callback=callback,
                                   progress="edit" if progress else False, timer=timer)

        # 7. Decode the source and the edited latent (one row per call: fits every VAE decoder engine,
        # a static TensorRT one built for batch 1 too)
        images = np.concatenate([runtime._decode_latents(latents[i:i + 1], timer=timer) for i in range(len(latents))])
        timer.add("total", time.perf_counter() - start)
        timer.timings["steps"] = float(len(scheduler.timesteps))
        return EditOutput(
            images=imgs.to_pil(images) if request.output_type == "pil" else images,
            latents=latents, mask=None if blend is None else blend.last_mask, timings=timer.timings,
        )

    def _predict_noise(self, latents: np.ndarray, timestep: Any, request: EditRequest, scheduler, *, call: int,
                       timer: StageTimer | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One ``unet_p2p`` call for the latents [source, target]: their noise predictions (with
        classifier-free guidance where the rows have an unconditional half) and the source's
        cross-attention maps at the local-blend level. ``call``: the call's index (the control's
        schedules)."""
        timer = timer or StageTimer()
        rows, embeddings = edit_rows(request)
        model_input = scheduler.scale_model_input(latents[rows], timestep).astype(np.float32, copy=False)
        feed = {
            "sample": model_input,
            "timestep": np.full((len(rows),), timestep, dtype=np.float32),
            "encoder_hidden_states": embeddings,
            **request.control.feed(call),
        }
        with timer("unet"):
            out = self.runtime.engine("unet_p2p").infer(feed)
        return guided_edit_noise(out["noise_pred"], request), out["cross_attention_maps"]


def edit_rows(request: EditRequest) -> tuple[np.ndarray, np.ndarray]:
    """Which latent (0 source, 1 target) each ``unet_p2p`` row takes, and the rows' text embeddings.

    ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` with guidance; a real image's source
    reconstructs without guidance, so it has no ``uncond_src`` row; without guidance the last two.
    """
    source, target, negative = request.source_embeddings, request.target_embeddings, request.negative_embeddings
    if negative is None:
        return np.array([0, 1]), np.concatenate([source, target])
    if request.real_image:
        return np.array([1, 0, 1]), np.concatenate([negative, source, target])
    return np.array([0, 1, 0, 1]), np.concatenate([negative, negative, source, target])


def guided_edit_noise(noise_pred: np.ndarray, request: EditRequest) -> np.ndarray:
    """[source, target] noise from the rows of :func:`edit_rows`: classifier-free guidance where
    there are unconditional rows."""
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
