"""``blipdiffusion-trt triton PACKAGE --out REPOSITORY [...]``: write a Triton model repository.

:func:`add_arguments` and :func:`run_triton` are the command's arguments and its run (registered by
``blipdiffusion_trt.cli``). Importing this module imports no server and no heavy library.
"""

from __future__ import annotations

import argparse

from .configs import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT_MS
from .repository import DEFAULT_MAX_IMAGE_PIXELS, write_triton_repository

HELP = "write a Triton model repository (component models + BLS pipeline) for a package"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="model package directory (from `blipdiffusion-trt export`)")
    p.add_argument("--out", required=True, help="model repository directory to create")
    p.add_argument("--flavor", default="python-cpu",
                   help="tensorrt (TensorRT plans from `build`), onnxruntime (ONNX + TensorRT EP fp16) or "
                        "python-cpu (python backend, ONNX Runtime on the CPU); default python-cpu")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="largest generation batch the component models accept (default: the package's; 0: no batching)")
    p.add_argument("--instances", type=int, default=1,
                   help="instances of every model: generations run at once, and copies of each component (default 1)")
    p.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
                   help="requests that may wait for a pipeline instance; Triton rejects more at once "
                        f"(default {DEFAULT_MAX_QUEUE_SIZE})")
    p.add_argument("--queue-timeout-ms", type=int, default=DEFAULT_QUEUE_TIMEOUT_MS,
                   help="milliseconds a request may wait in that queue before Triton rejects it; a request's "
                        f"own shorter timeout overrides it (default {DEFAULT_QUEUE_TIMEOUT_MS}; 0: no limit)")
    p.add_argument("--progress-model", action="store_true",
                   help="also write blip_diffusion_progress: decoupled, a progress response per step, then the image")
    p.add_argument("--name-prefix", default="", help="prefix of every model name (several packages on one server)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest input image the BLS model accepts, in pixels (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--cpu-threads", type=int, default=0, help="ONNX Runtime threads per python-cpu model (0: default)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip checking the package files' sha256")


def run_triton(args: argparse.Namespace) -> int:
    repository = write_triton_repository(
        args.package, args.out, args.flavor, args.max_batch_size, args.instances, name_prefix=args.name_prefix,
        max_image_pixels=args.max_image_pixels, cpu_threads=args.cpu_threads, force=args.force,
        verify=not args.no_verify, max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
        progress_model=args.progress_model,
    )
    print(f"wrote {repository.path} ({repository.flavor})")
    for entry in repository.models.values():
        batching = f"max_batch_size {entry.max_batch_size}" if entry.max_batch_size else "no batching"
        print(f"  {entry.name:<28} {batching}")
    return 0
