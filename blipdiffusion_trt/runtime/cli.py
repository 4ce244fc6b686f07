"""``blipdiffusion-trt generate``: run a package from the command line (no torch needed)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from .engine import BACKENDS, GRAPH_OPTIMIZATIONS, MEMORY_ARENAS
from .openvino_engine import add_openvino_arguments, describe_precisions, openvino_options_from_args

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = ("pndm", "ddim", "euler", "dpmpp-2m")
# Python argument -> CLI option, so that errors name what the user typed.
CLI_OPTIONS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "reference_image": "--reference-image",
    "source_subject_category": "--source-subject", "target_subject_category": "--target-subject",
    "neg_prompt": "--negative-prompt", "condition_image": "--condition-image", "canny_image": "--canny",
    "controlnet_conditioning_scale": "--controlnet-scale", "height": "--height", "width": "--width",
    "latents": "--latents", "prompt": "--prompt", "prompt_strength": "--prompt-strength", "prompt_reps": "--prompt-reps",
}
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate an image of a subject from a model package")
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
    p.add_argument("--backend", default="cpu", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--precision", default="fp32", help="fp32 or fp16 (the package must hold fp16 graphs)")
    p.add_argument("--graph-optimization", default="all", choices=GRAPH_OPTIMIZATIONS,
                   help="ONNX Runtime graph optimisation: all (fastest steps) or extended (much faster start)")
    p.add_argument("--ort-cache", help="directory keeping ONNX Runtime's optimised CPU graphs between runs "
                   "(fast start and fast steps; costs a copy of the weights on disk)")
    p.add_argument("--memory-arena", default="loop", choices=MEMORY_ARENAS,
                   help="ONNX Runtime CPU sessions that keep a memory arena: loop (UNet/ControlNet, default), all, none")
    p.add_argument("--no-cpu-fused", action="store_true",
                   help="cpu backend: load the plain fp32 graphs even where the package has CPU-fused ones")
    add_openvino_arguments(p)
    p.add_argument("--no-verify", action="store_true", help="skip checking the package files' sha256")
    p.add_argument("--timings", action="store_true", help="print per-stage times")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from .images import save_image
    from .pipeline import BlipDiffusionRuntime

    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out must end in one of {', '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    if not out.parent.resolve().is_dir():
        raise InputError(f"--out: directory {out.parent} does not exist")
    if args.scheduler not in SCHEDULER_NAMES:
        raise InputError(f"--scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {args.scheduler!r}")
    latents = load_latents(args.latents) if args.latents else None
    runtime = BlipDiffusionRuntime.from_package(
        args.package, args.backend, precision=args.precision, verify=not args.no_verify,
        graph_optimization=args.graph_optimization, optimized_cache=args.ort_cache, memory_arena=args.memory_arena,
        cpu_fused=not args.no_cpu_fused, options=openvino_options_from_args(args),
    )
    try:
        result = _generate(runtime, args, latents)
    except InputError as error:
        raise InputError(_cli_names(str(error))) from None
    save_image(result.images[0], out, field="--out")
    print(f"wrote {out}")
    if args.timings:
        print(format_timings(result.timings))
        precisions = describe_precisions(runtime.engines)
        if precisions:
            print(precisions)
    return 0


def _cli_names(message: str) -> str:
    for name, option in CLI_OPTIONS.items():
        message = re.sub(rf"(?<![\w-]){name}(?![\w-])", option, message)
    return message


def _generate(runtime, args, latents):
    return runtime(
        args.prompt, args.reference_image, args.source_subject, args.target_subject,
        guidance_scale=args.guidance, height=args.height, width=args.width, num_inference_steps=args.steps,
        seed=args.seed, latents=latents, neg_prompt=args.negative_prompt, prompt_strength=args.prompt_strength,
        prompt_reps=args.prompt_reps, scheduler=args.scheduler, output_type="np",
        condition_image=args.condition_image, canny_image=args.canny, canny_low_threshold=args.canny_low,
        canny_high_threshold=args.canny_high, controlnet_conditioning_scale=args.controlnet_scale, progress=True,
    )


def load_latents(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--latents: file {path} not found") from None
    except (OSError, ValueError) as error:
        raise InputError(f"--latents: {path} is not a numpy .npy array ({error})") from None
    if array.dtype != np.float32:
        raise InputError(f"--latents: {path} holds {array.dtype}, expected float32")
    return array


def format_timings(timings: dict[str, float]) -> str:
    steps = int(timings.get("steps", 0)) or 1
    rows = ["stage               seconds"]
    for name, value in timings.items():
        if name == "steps":
            continue
        per = f"  ({value / steps * 1000:.1f} ms/step)" if name in ("unet", "controlnet", "scheduler", "denoise_loop") else ""
        rows.append(f"{name:<18} {value:8.3f}{per}")
    return "\n".join(rows)
