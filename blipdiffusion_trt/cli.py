"""``blipdiffusion-trt`` command line: export, build, generate, demo, bench.

Subcommands import what they need lazily, so ``generate`` never imports torch or diffusers.
User errors (:class:`~blipdiffusion_trt.errors.BlipDiffusionTrtError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import InputError, run_reporting_errors

logger = logging.getLogger("blipdiffusion_trt")


def _precisions(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a diffusers BLIP-Diffusion checkpoint to an ONNX model package")
    p.add_argument("checkpoint", help="diffusers-layout BLIP-Diffusion checkpoint directory")
    p.add_argument("--out", required=True, help="package directory to create")
    p.add_argument("--controlnet", help="ControlNetModel directory (SD1.5 ControlNet) to export with it")
    p.add_argument("--precision", default="fp32", type=_precisions, help="fp32 or fp32,fp16 (default fp32)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (14-21, default 17)")
    p.add_argument("--max-batch-size", type=int, default=4, help="largest batch the declarations allow")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-pickle", action="store_true", help="also load .bin (pickle) weights")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--no-cpu-fusions", action="store_true",
                   help="skip the CPU-fused fp32 graphs (onnx/fp32-fused: fused attention for the CPU runtime)")
    p.set_defaults(run=_run_export)


def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="add ONNX Runtime's CPU-fused fp32 graphs to an existing package (onnx/fp32-fused)")
    p.add_argument("package", help="model package directory (written in place)")
    p.set_defaults(run=_run_fuse)


def _run_fuse(args) -> int:
    from .export.cpu_fusions import fuse_package, fusion_summary

    report = fuse_package(args.package)
    for line in fusion_summary(report):
        print(line)
    return 0


def _run_export(args) -> int:
    from .export.exporter import export_package

    if args.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    report = export_package(
        args.checkpoint, args.out, controlnet=args.controlnet, precisions=args.precision, opset=args.opset,
        force=args.force, allow_pickle=args.allow_pickle, validate=not args.no_validate,
        max_batch_size=args.max_batch_size, cpu_fusions=not args.no_cpu_fusions,
    )
    print(report.summary())
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a tiny random-weight checkpoint, export it and generate an image")
    p.add_argument("--out", default="blipdiffusion-demo", help="directory for the checkpoint, package and image")
    p.add_argument("--controlnet", action="store_true", help="use a ControlNet checkpoint (canny edges)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), controlnet=args.controlnet)
    return 0


def _add_random_checkpoint(sub) -> None:
    p = sub.add_parser("random-checkpoint", help="build a diffusers BLIP-Diffusion checkpoint with random weights")
    p.add_argument("out", help="directory to write (diffusers layout)")
    p.add_argument("--size", default="tiny", choices=["tiny", "tiny-odd", "full"],
                   help="architecture: tiny test configs, or the full-size Salesforce/blipdiffusion one")
    p.add_argument("--controlnet", action="store_true", help="a BlipDiffusionControlNetPipeline checkpoint")
    p.add_argument("--controlnet-only", action="store_true", help="only a standalone ControlNetModel directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_random_checkpoint)


def _run_random_checkpoint(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipdiffusion-trt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_fuse(sub)
    from .engines.cli import add_build  # light: TensorRT is imported only when a build runs

    add_build(sub)
    try:
        from .runtime.cli import add_generate
    except ImportError:  # the runtime is optional only while it is being built
        pass
    else:
        add_generate(sub)
    _add_demo(sub)
    _add_random_checkpoint(sub)
    from .serving.triton.cli import add_triton  # light: writes configs, imports no server

    add_triton(sub)
    from .bench.cli import add_bench  # light: the benchmark imports its libraries when it runs

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
