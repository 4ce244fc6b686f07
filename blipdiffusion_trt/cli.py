"""``blipdiffusion-trt`` command line: export, build, generate, edit, serve (Triton), benchmark.

Every subcommand is registered here, and only here (:data:`COMMANDS`). Its arguments and its run
live with the code it drives (``engines/cli.py``, ``runtime/cli.py``, ``demo.py``, ...), except
the export side's, which are below: ``blipdiffusion_trt.export`` imports torch, so it is imported
only when an export command runs. Building the parser imports no heavy library (torch, diffusers,
ONNX Runtime, TensorRT), so ``generate`` never imports torch or diffusers. User errors
(:class:`~blipdiffusion_trt.errors.BlipDiffusionTrtError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import demo
from .bench import cli as bench_cli
from .engines import cli as build_cli
from .components import MAX_DECLARED_BATCH_SIZE
from .errors import InputError, run_reporting_errors
from .package import layout
from .runtime import cli as generate_cli
from .serving.triton import cli as triton_cli
from .serving.triton import probe as triton_probe

logger = logging.getLogger("blipdiffusion_trt")


# --------------------------------------------------------------------------------------------
# export, fuse, random-checkpoint
# --------------------------------------------------------------------------------------------

def _precisions(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="diffusers-layout BLIP-Diffusion checkpoint directory, or a Hugging Face Hub "
                   "repository id (Salesforce/blipdiffusion: the files export reads are downloaded into the Hugging "
                   "Face cache; HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_CACHE apply)")
    p.add_argument("--revision", help="with a Hub repository id: the branch, tag or commit (default main)")
    p.add_argument("--out", required=True, help="package directory to create")
    p.add_argument("--controlnet", help="ControlNetModel directory (SD1.5 ControlNet) to export with it, or its Hub "
                   "repository id")
    p.add_argument("--precision", default="fp32", type=_precisions, help="fp32 or fp32,fp16 (default fp32)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (14-21, default 17)")
    p.add_argument("--max-batch-size", type=int, default=4, help="largest batch the declarations allow")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-pickle", action="store_true", help="also load .bin (pickle) weights")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--no-cpu-fusions", action="store_true",
                   help=f"skip the CPU-fused fp32 graphs ({layout.GRAPHS_DIR}/{layout.CPU_FUSED}: "
                        "fused attention for the CPU runtime)")
    p.add_argument("--no-editing", action="store_true",
                   help="skip the editing graphs (vae_encoder, unet_p2p) that `edit` and `invert` run: a package "
                        "that only generates, exported faster")
    p.add_argument("--no-step-cache", action="store_true",
                   help="skip fast mode's step-cache graphs (DeepCache: UNet full/shallow steps, shallow ControlNet) "
                        "that `generate --cache-interval N` (N > 1) runs")
    p.add_argument("--gpu-fusions", action="store_true",
                   help=f"also write fp16 graphs with ONNX Runtime's CUDA fusions ({layout.GRAPHS_DIR}/{layout.CUDA_FUSED}, "
                        "CUDA provider only)")
    p.add_argument("--jobs", type=int, default=1,
                   help="components exported at once, one process each (default 1; full size: ~17 GB RAM per job)")


def run_export(args) -> int:
    from .export.exporter import export_package

    if not 1 <= args.max_batch_size <= MAX_DECLARED_BATCH_SIZE:
        raise InputError(f"--max-batch-size must be in [1, {MAX_DECLARED_BATCH_SIZE}], got {args.max_batch_size}")
    report = export_package(
        args.checkpoint, args.out, controlnet=args.controlnet, precisions=args.precision, opset=args.opset,
        force=args.force, allow_pickle=args.allow_pickle, validate=not args.no_validate,
        max_batch_size=args.max_batch_size, cpu_fusions=not args.no_cpu_fusions, editing=not args.no_editing,
        step_cache=not args.no_step_cache, gpu_fusions=args.gpu_fusions, jobs=args.jobs, revision=args.revision,
    )
    print(report.summary())
    return 0


def add_fuse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (written in place)")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help=f"cpu: fp32 graphs with CPU fusions ({layout.GRAPHS_DIR}/{layout.CPU_FUSED}, default); "
                        f"cuda: fp16 graphs with CUDA fusions ({layout.GRAPHS_DIR}/{layout.CUDA_FUSED})")


def run_fuse(args) -> int:
    if args.target == "cuda":
        from .export.gpu_fusions import cuda_fusion_summary, fuse_package_for_cuda

        lines = cuda_fusion_summary(fuse_package_for_cuda(args.package))
    else:
        from .export.cpu_fusions import fuse_package, fusion_summary

        lines = fusion_summary(fuse_package(args.package))
    for line in lines:
        print(line)
    return 0


def add_random_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write (diffusers layout)")
    p.add_argument("--size", default="tiny", choices=["tiny", "tiny-odd", "full"],
                   help="architecture: tiny test configs, or the full-size Salesforce/blipdiffusion one")
    p.add_argument("--controlnet", action="store_true", help="a BlipDiffusionControlNetPipeline checkpoint")
    p.add_argument("--controlnet-only", action="store_true", help="only a standalone ControlNetModel directory")
    p.add_argument("--seed", type=int, default=0)


def run_random_checkpoint(args) -> int:
    from .export.random_checkpoint import build_random_checkpoint, build_random_controlnet

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output directory {out} exists and is not empty")
    if args.controlnet_only:
        build_random_controlnet(out, args.size, seed=args.seed)
    else:
        build_random_checkpoint(out, args.size, controlnet=args.controlnet, seed=args.seed)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: tuple[Command, ...] = (
    Command("export", "export a diffusers BLIP-Diffusion checkpoint to an ONNX model package",
            add_export_arguments, run_export),
    Command("fuse", "add ONNX Runtime's fused graphs to an existing package (cpu: fp32, cuda: fp16)",
            add_fuse_arguments, run_fuse),
    Command("build", "build TensorRT fp16 engines for this GPU from a package's fp16 graphs",
            build_cli.add_arguments, build_cli.run_build, build_cli.DESCRIPTION),
    Command("generate", "generate an image of a subject from a model package",
            generate_cli.add_arguments, generate_cli.run_generate),
    Command("edit", "replace the subject of an image (generated, or a real one) by a reference image's subject",
            generate_cli.add_edit_arguments, generate_cli.run_edit, generate_cli.EDIT_DESCRIPTION),
    Command("invert", "DDIM-invert a real image into the latent that regenerates it (for generate/edit --latents)",
            generate_cli.add_invert_arguments, generate_cli.run_invert, generate_cli.INVERT_DESCRIPTION),
    Command("demo", "build a tiny random-weight checkpoint, export it and generate an image",
            demo.add_arguments, demo.run),
    Command("random-checkpoint", "build a diffusers BLIP-Diffusion checkpoint with random weights",
            add_random_checkpoint_arguments, run_random_checkpoint),
    Command("triton", triton_cli.HELP, triton_cli.add_arguments, triton_cli.run_triton),
    Command("triton-probe", "liveness probe of a served blip_diffusion model: one real tiny generation",
            triton_probe.add_arguments, triton_probe.run_probe, triton_probe.__doc__.splitlines()[0]),
    Command("bench", bench_cli.HELP, bench_cli.add_arguments, bench_cli.run_bench, bench_cli.DESCRIPTION),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipdiffusion-trt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
