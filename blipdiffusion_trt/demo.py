"""``blipdiffusion-trt demo``: the whole path on a tiny random-weight checkpoint.

Builds a real diffusers BLIP-Diffusion checkpoint with random weights (no download), exports it
to a package, generates one image with the torch-free runtime and prints per-stage timings.
The image shows noise-like shapes: the weights are random, not trained.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path


logger = logging.getLogger(__name__)


def synthetic_subject(size: int = 96):
    """A simple drawn subject (a red disc on a blue background) as the reference image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (40, 70, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=(200, 40, 40))
    return image


def run_demo(out: Path, *, controlnet: bool = False) -> Path:
    from .export.exporter import export_package
    from .export.random_checkpoint import build_random_checkpoint
    from .runtime.images import save_image
    from .runtime.pipeline import BlipDiffusionRuntime
    from .runtime.timing import format_timings

    out.mkdir(parents=True, exist_ok=True)
    checkpoint, package = out / "checkpoint", out / "package"
    for path in (checkpoint, package):
        shutil.rmtree(path, ignore_errors=True)
    build_random_checkpoint(checkpoint, "tiny", controlnet=controlnet)
    report = export_package(checkpoint, package, precisions=("fp32", "fp16"))
    print(report.summary())
    reference = synthetic_subject()
    reference.save(out / "reference.png")
    runtime = BlipDiffusionRuntime.from_package(package)
    kwargs = {"canny_image": reference} if controlnet else {}
    result = runtime(
        "swimming underwater", reference, "dog", "dog", num_inference_steps=25, seed=0,
        neg_prompt="low quality", output_type="np", progress=True, **kwargs,
    )
    image_path = save_image(result.images[0], out / "image.png", field="demo")
    print(f"generated {image_path} ({result.images.shape[2]}x{result.images.shape[1]}, random weights)")
    print(format_timings(result.timings))
    return image_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="blipdiffusion-demo", help="directory for the checkpoint, package and image")
    p.add_argument("--controlnet", action="store_true", help="use a ControlNet checkpoint (canny edges)")


def run(args) -> int:
    run_demo(Path(args.out), controlnet=args.controlnet)
    return 0
