"""``blipdiffusion-trt generate``, ``edit`` and ``invert``: run a package from the command line (no
torch needed).

Registered by :mod:`blipdiffusion_trt.cli`. Errors about a call argument
(:class:`~blipdiffusion_trt.errors.InputError` with its ``field``) name the CLI option instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..components import PipelineConfig
from ..errors import InputError
from ..fsutil import write_atomic
from ..package import read_pipeline_config
from .editing import EditArguments
from .backends import BACKENDS, REGISTRY, add_option_arguments, flag_names, given_flags, options_from_flags
from .inputs import read_npy
from .schedulers import SCHEDULER_NAMES, check_scheduler_name
from .step_cache import check_cache_interval

logger = logging.getLogger(__name__)

# Python argument (an InputError's field) -> CLI option, so that errors name what the user typed.
# The backend options' flags come from their declarations (backends.flag_names).
CLI_OPTIONS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "reference_image": "--reference-image",
    "source_subject_category": "--source-subject", "target_subject_category": "--target-subject",
    "neg_prompt": "--negative-prompt", "condition_image": "--condition-image", "canny_image": "--canny",
    "controlnet_conditioning_scale": "--controlnet-scale", "height": "--height", "width": "--width",
    "latents": "--latents", "prompt": "--prompt", "prompt_strength": "--prompt-strength", "prompt_reps": "--prompt-reps",
    "scheduler": "--scheduler", "backend": "--backend", "low_threshold": "--canny-low",
    "high_threshold": "--canny-high", "canny_low_threshold": "--canny-low",
    "canny_high_threshold": "--canny-high", "precision": "--precision", "seed": "--seed", "out": "--out",
    # editing
    "original_subject": "--original-subject", "image": "--image", "cross_replace_steps": "--cross-replace-steps",
    "self_replace_steps": "--self-replace-steps", "blend_threshold": "--blend-threshold",
    "source_out": "--source-out",
    "cache_interval": "--cache-interval",
}
LATENT_SUFFIXES = (".npy",)
# The edit's defaults are EditArguments' (one home for the edit's arguments).
EDIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EditArguments)}


def naming_options(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a call argument's :class:`InputError` renamed to the CLI option of that argument."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except InputError as error:
            names = dict(CLI_OPTIONS)
            if getattr(args, "backend", None) in REGISTRY:
                names.update(flag_names(args.backend))
            option = names.get(error.field or "")
            if option is None:
                raise
            raise error.renamed(option) from None

    return wrapped


# --------------------------------------------------------------------------------------------
# Options every command that runs a package has
# --------------------------------------------------------------------------------------------

def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="cpu", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--precision", default="fp32", help="fp32 or fp16 (the package must hold fp16 graphs)")
    # Every backend's options (backends.add_option_arguments): None unless given, and then an error
    # on a backend without them.
    add_option_arguments(p)
    p.add_argument("--no-verify", action="store_true", help="skip checking the package files' sha256")


def open_runtime(args: argparse.Namespace):
    """The package's runtime on the backend and with the options of the command line."""
    from .pipeline import BlipDiffusionRuntime

    return BlipDiffusionRuntime.from_package(args.package, args.backend, precision=args.precision,
                                             verify=not args.no_verify, options=backend_options(args))


def save_array(array: np.ndarray, path: Path) -> None:
    """A .npy file written atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getbuffer(), InputError)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (from `blipdiffusion-trt export`)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--reference-image", required=True, help="image of the subject")
    p.add_argument("--source-subject", required=True, help="category word of the subject in the image, e.g. dog")
    p.add_argument("--target-subject", required=True, help="category word to generate, e.g. dog")
    p.add_argument("--out", required=True, help="output .png/.jpg (image) or .npy (float32 HxWx3 in [0,1])")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latents", help="float32 .npy of shape [1, C, H/f, W/f] (f: the package's latent factor)")
    p.add_argument("--scheduler", default="pndm", help=f"one of {', '.join(SCHEDULER_NAMES)}")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--prompt-strength", type=float, default=1.0)
    p.add_argument("--prompt-reps", type=int, default=20)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--condition-image", help="control map for a ControlNet package (canny, depth, scribble)")
    group.add_argument("--canny", help="image to compute canny edges from (OpenCV) as the control map")
    p.add_argument("--canny-low", type=int, default=100)
    p.add_argument("--canny-high", type=int, default=200)
    p.add_argument("--controlnet-scale", type=float, default=1.0)
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="fast mode (approximate; DeepCache step caching): the UNet in full every N calls, shallow "
                        "in between (default 1: exact)")
    add_backend_arguments(p)
    p.add_argument("--timings", action="store_true",
                   help="print per-stage times (and what the backend chose, e.g. the precision OpenVINO ran)")


@naming_options
def run_generate(args) -> int:
    from .images import check_output_path, save_image

    # Everything a user typed is checked before the package loads and long before the image is
    # written: the output path (never one of the inputs), then the latents file.
    out = check_output_path(args.out, field="out", inputs={
        "--reference-image": args.reference_image, "--latents": args.latents,
        "--condition-image": args.condition_image, "--canny": args.canny})
    check_scheduler_name(args.scheduler)
    if check_cache_interval(args.cache_interval) > 1 and not read_pipeline_config(args.package).has_step_cache:
        raise InputError(f"cache_interval {args.cache_interval} needs the step-cache graphs, which the package "
                         f"{args.package} lacks (exported with --no-step-cache or before fast mode): re-export it with "
                         f"`blipdiffusion-trt export CHECKPOINT --out DIR`", field="cache_interval")
    latents = load_latents(args.latents, read_pipeline_config(args.package)) if args.latents else None
    with open_runtime(args) as runtime:
        result = runtime(
            args.prompt, args.reference_image, args.source_subject, args.target_subject,
            guidance_scale=args.guidance, height=args.height, width=args.width, num_inference_steps=args.steps,
            seed=args.seed, latents=latents, neg_prompt=args.negative_prompt, prompt_strength=args.prompt_strength,
            prompt_reps=args.prompt_reps, scheduler=args.scheduler, output_type="np",
            condition_image=args.condition_image, canny_image=args.canny, canny_low_threshold=args.canny_low,
            canny_high_threshold=args.canny_high, controlnet_conditioning_scale=args.controlnet_scale, progress=True,
            cache_interval=args.cache_interval,
        )
        details = runtime.engine_details()
    save_image(result.images[0], out, field="--out")
    print(f"wrote {out}")
    if args.timings:
        print_timings(args.backend, result.timings, details)
    return 0


def backend_options(args):
    """The chosen backend's options from the flags given (a flag the backend lacks is an error)."""
    return options_from_flags(args.backend, given_flags(args))


def print_timings(backend: str, timings: dict[str, float], details: dict[str, dict]) -> None:
    """--timings: the per-stage times, then what the backend chose (where it chose anything)."""
    from .timing import format_timings

    print(format_timings(timings))
    chosen = describe_engine_details(backend, details)
    if chosen:
        print(chosen)


def describe_engine_details(backend: str, details: dict[str, dict]) -> str | None:
    """"inference precision: bf16 (openvino)" (per component where they differ), and which
    components have INT8 weights; None where the backend chose no precision."""
    ran = {name: d["inference_precision"] for name, d in details.items() if "inference_precision" in d}
    if not ran:
        return None
    if len(set(ran.values())) == 1:
        line = f"inference precision: {next(iter(ran.values()))} ({backend})"
    else:
        line = "inference precision: " + ", ".join(f"{name} {precision}" for name, precision in ran.items())
    compressed = [name for name, d in details.items() if d.get("int8_weights")]
    return line + (f"; int8 weights: {', '.join(compressed)}" if compressed else "")


# --------------------------------------------------------------------------------------------
# edit, invert
# --------------------------------------------------------------------------------------------

EDIT_DESCRIPTION = (
    "Replace the subject of an image (--original-subject, e.g. cat) by the subject of --reference-image "
    "(prompt-to-prompt). With --image, a real photo is inverted with DDIM first (scheduler ddim); without, the "
    "image generated from --latents or --seed with the prompt 'a {original subject} {prompt}' is edited. "
    "Needs a package exported with the editing graphs (the default of `export`)."
)
INVERT_DESCRIPTION = (
    "DDIM inversion of a real image: the latent [1, C, H/f, W/f] (float32 .npy) that DDIM sampling with the "
    "prompt 'a {original subject} {prompt}' turns back into the image; usable as --latents of generate and edit."
)


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (from `blipdiffusion-trt export`, with editing graphs)")
    p.add_argument("--prompt", required=True, help="the scene, without the subject: 'sitting on a sofa'")
    p.add_argument("--reference-image", required=True, help="image of the new subject")
    p.add_argument("--source-subject", required=True, help="category word of the subject in --reference-image")
    p.add_argument("--target-subject", required=True, help="word for the new subject in the edited prompt")
    p.add_argument("--original-subject", required=True, help="the subject the image to edit shows, e.g. cat")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--image", help="a real image to edit (inverted with DDIM first)")
    start.add_argument("--latents", help="float32 .npy [1, C, H/f, W/f]: the starting noise of the image to "
                       "generate and edit (e.g. from `invert`)")
    p.add_argument("--seed", type=int, default=0, help="starting noise without --latents (and the posterior "
                   "sample with --sample-posterior)")
    p.add_argument("--steps", type=int, default=EDIT_DEFAULTS["num_inference_steps"])
    p.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULER_NAMES)} (default: ddim with --image, "
                   "which needs it; else pndm)")
    p.add_argument("--guidance", type=float, default=EDIT_DEFAULTS["guidance_scale"])
    p.add_argument("--negative-prompt", default=EDIT_DEFAULTS["neg_prompt"])
    p.add_argument("--cross-replace-steps", type=float, default=EDIT_DEFAULTS["cross_replace_steps"],
                   help="fraction of the steps whose cross-attention the edit takes from the source (default %(default)s)")
    p.add_argument("--self-replace-steps", type=float, default=EDIT_DEFAULTS["self_replace_steps"],
                   help="fraction of the steps whose small-layer self-attention the edit takes from the source "
                        "(default %(default)s)")
    blend = p.add_mutually_exclusive_group()
    blend.add_argument("--blend-threshold", type=float, default=EDIT_DEFAULTS["blend_threshold"],
                       help="local blend: the edit changes only where the original subject's attention exceeds "
                            "this fraction of its maximum (default %(default)s)")
    blend.add_argument("--no-local-blend", action="store_true", help="no local blend: the edit may change everything")
    p.add_argument("--sample-posterior", action="store_true",
                   help="with --image: sample the VAE posterior (seeded by --seed) instead of its mean")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", required=True, help="the edited image: .png/.jpg, or .npy (float32 HxWx3 in [0,1])")
    p.add_argument("--source-out", help="the source image (a real image's reconstruction): .png/.jpg/.npy")
    add_backend_arguments(p)
    p.add_argument("--timings", action="store_true", help="print per-stage times")


@naming_options
def run_edit(args) -> int:
    from .images import check_output_path, save_image

    inputs = {"--reference-image": args.reference_image, "--image": args.image, "--latents": args.latents}
    out = check_output_path(args.out, field="out", inputs=inputs)
    source_out = None
    if args.source_out is not None:
        source_out = check_output_path(args.source_out, field="source_out", inputs={**inputs, "--out": args.out})
    if args.scheduler is not None:
        check_scheduler_name(args.scheduler)
    latents = load_latents(args.latents, read_pipeline_config(args.package)) if args.latents else None
    with open_runtime(args) as runtime:
        result = runtime.edit(
            args.prompt, args.reference_image, args.source_subject, args.target_subject, args.original_subject,
            image=args.image, latents=latents, seed=args.seed, num_inference_steps=args.steps,
            guidance_scale=args.guidance, neg_prompt=args.negative_prompt,
            cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
            blend_threshold=None if args.no_local_blend else args.blend_threshold, height=args.height,
            width=args.width, scheduler=args.scheduler, sample_posterior=args.sample_posterior, output_type="np",
            progress=True,
        )
        details = runtime.engine_details()
    save_image(result.edited, out, field="--out")
    print(f"wrote {out}")
    if source_out is not None:
        save_image(result.source, source_out, field="--source-out")
        print(f"wrote {source_out}")
    if args.timings:
        print_timings(args.backend, result.timings, details)
    return 0


def add_invert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (from `blipdiffusion-trt export`, with editing graphs)")
    p.add_argument("--image", required=True, help="the real image to invert")
    p.add_argument("--prompt", required=True, help="the scene, without the subject: 'sitting on a sofa'")
    p.add_argument("--original-subject", required=True, help="the subject the image shows, e.g. cat")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (sample back with as many)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--sample-posterior", action="store_true",
                   help="sample the VAE posterior (seeded by --seed) instead of its mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the inverted latent: float32 .npy [1, C, H/f, W/f]")
    add_backend_arguments(p)


@naming_options
def run_invert(args) -> int:
    from .images import check_output_path

    out = check_output_path(args.out, field="out", inputs={"--image": args.image}, suffixes=LATENT_SUFFIXES)
    with open_runtime(args) as runtime:
        latents = runtime.invert(args.image, args.prompt, args.original_subject, num_inference_steps=args.steps,
                                 height=args.height, width=args.width, sample_posterior=args.sample_posterior,
                                 seed=args.seed, progress=True)
    save_array(latents, out)
    print(f"wrote {out} (latent {list(latents.shape)})")
    return 0


def load_latents(path: str, config: PipelineConfig) -> np.ndarray:
    """The ``--latents`` file: its header is checked against the largest latents of one image the
    package declares (``max_image_size``) before anything is allocated (:func:`.inputs.read_npy`)."""
    side = config.max_image_size // config.latent_scale_factor
    return read_npy(path, field="latents", max_elements=config.latent_channels * side * side)
