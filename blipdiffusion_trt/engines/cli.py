"""``blipdiffusion-trt build``: TensorRT fp16 engines for this GPU from a package's fp16 graphs.

Arguments are checked before TensorRT is imported, so a bad call gives its one-line error on any
machine; without TensorRT the command ends with a one-line error saying how to get it.
Registered by :mod:`blipdiffusion_trt.cli`.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from .profiles import SHAPE_MODES

DESCRIPTION = "Build TensorRT engines (strongly typed, fp16 inside) into PACKAGE/engines/<sm_XY>-trt<X.Y>/."


def _components(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package exported with --precision fp32,fp16")
    p.add_argument("--components", nargs="+", metavar="NAME",
                   help="components to build, space- or comma-separated (default: all of the package's)")
    # Checked by the builder (not argparse choices), so every mistake is one `error: ...` line.
    p.add_argument("--shapes", default="static",
                   help=f"{' or '.join(SHAPE_MODES)} (default static: one size, min=opt=max; "
                        "dynamic: the declared ranges, narrowed by --batch/--height/--width)")
    p.add_argument("--batch", help="prompts per call: N, or MIN:OPT:MAX with --shapes dynamic "
                                   "(the UNet/ControlNet run at twice that with guidance)")
    p.add_argument("--height", help="image height in pixels: H or MIN:OPT:MAX (default: the package's default)")
    p.add_argument("--width", help="image width in pixels: W or MIN:OPT:MAX (default: the package's default)")
    p.add_argument("--timing-cache", metavar="FILE",
                   help="TensorRT timing cache to load and update (default PACKAGE/engines/timing.cache)")
    p.add_argument("--workspace", metavar="GB", help="builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_build(args) -> int:
    from .build import build_engines

    components = None
    if args.components:
        components = [c for item in args.components for c in _components(item)]
        if not components:
            raise InputError("--components: give at least one component name")
    report = build_engines(
        args.package, components=components, shapes=args.shapes, batch=args.batch, height=args.height,
        width=args.width, timing_cache=args.timing_cache, workspace_gb=args.workspace,
        progress=not args.no_progress,
    )
    running = report.running
    print(f"built {len(report.components)} TensorRT engines in {report.seconds:.1f} s for {running['gpu_name']} "
          f"(compute capability {running['compute_capability']}, TensorRT {running['tensorrt_version']})")
    for name, entry in report.components.items():
        print(f"  {name:<20} {entry['seconds']:8.1f} s  {entry['size_bytes'] / 2**20:9.1f} MiB  {entry['plan']}")
    print(f"record: {report.record_path}")
    print(f"timing cache: {report.timing_cache}")
    return 0
