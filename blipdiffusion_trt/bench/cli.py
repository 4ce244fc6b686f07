"""``blipdiffusion-trt bench``: latency of every stage, side by side with diffusers, in one run.

For one setting (size, steps, scheduler, guidance, batch, precision) this measures, on every
requested backend of the runtime and on diffusers' own ``BlipDiffusionPipeline`` (or its ControlNet
variant) on the same device with the same latents:

- one call of each component (Q-Former, text encoder with and without the subject, ControlNet,
  UNet, VAE decoder) at exactly the shapes a generation feeds it (the feeds are recorded during a
  generation and replayed), and one scheduler step;
- the whole generation, its denoising loop (it/s) and the host overhead per step: loop time minus
  the time spent in the UNet/ControlNet, over the number of steps (so it includes the scheduler);
- cold start in a fresh process: process start -> package (pipeline) loaded -> first image, with
  the peak host RSS of that process and its GPU memory on a GPU;
- FLOPs of each component from its ONNX graph at the benchmark's shapes (Conv, ConvTranspose,
  MatMul, Gemm, Einsum; 2 x MACs) and, where the device's peak is known, the fraction of it reached;
- with ``--edit``, on our side: an edit of the generated image (prompt-to-prompt, ``unet_p2p`` on
  [uncond, uncond, source, target] with guidance) against the generation, per denoising step and
  per UNet call (``unet_p2p`` at 4 rows against ``unet_plain`` at 2, with guidance and batch 1).

Every figure goes to ``bench.json`` (with the machine, library versions and settings), the p50s to a
Markdown table (``bench.md``, printed at the end) with a diffusers/ours ratio per backend, and a
chart of per-stage latency to ``bench.png``.

The backends are the runtime's registry (:mod:`blipdiffusion_trt.runtime.backends`): any of its
names can be benchmarked, and by default every one available on this machine for the precision.
Importing this module imports no torch, diffusers or ONNX Runtime: ``blipdiffusion-trt --help``
stays fast and the runtime side never needs torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..components import declare_components, generation_components, step_cache_graphs
from ..errors import BlipDiffusionTrtError, InputError, PackageError, run_reporting_errors
from ..package import ModelPackage, read_pipeline_config
from ..package.manifest import read_manifest
from ..runtime.backends import BACKENDS, add_option_arguments, get_backend, given_flags
from ..runtime.schedulers import SCHEDULERS
from .cold_start import INDUCTOR_CACHE_ENV, cold_start, inductor_cache_dir
from .diffusers_side import bench_diffusers
from .flops import count_package_flops
from .machine import installed_version, library_versions, machine_info, native_bf16, peak_rss_mb, peak_tflops
from .ours import bench_ours, runtime_options
from .report import build_table, render_chart, render_markdown, write_json
from .settings import (DIFFUSERS, DIFFUSERS_PRECISIONS, NEGATIVE_PROMPT, ORIGINAL_SUBJECT, PROMPT, Settings,
                       diffusers_key, is_diffusers)

logger = logging.getLogger(__name__)

SCHEMA = "blipdiffusion-trt-bench/1"
HELP = "benchmark every stage against diffusers (latency, memory, FLOPs)"
DESCRIPTION = __doc__.splitlines()[0]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to benchmark")
    src.add_argument("--package", help="model package directory (ours)")
    src.add_argument("--checkpoint", help="diffusers checkpoint the package was exported from (diffusers side)")
    src.add_argument("--size", choices=["tiny", "full"],
                     help="build a random-weight checkpoint of this architecture and export it (into --workdir)")
    src.add_argument("--workdir", type=Path, default=Path("bench-work"),
                     help="where --size puts its checkpoint and package (reused when already there)")
    src.add_argument("--controlnet", action="store_true", help="with --size: a ControlNet checkpoint and package")
    gen = p.add_argument_group("generation settings")
    gen.add_argument("--height", type=int, help="image height (default: the package's default size)")
    gen.add_argument("--width", type=int, help="image width (default: the package's default size)")
    gen.add_argument("--steps", type=int, help="inference steps requested (default 3 for full-size models, 10 for tiny)")
    gen.add_argument("--batch", type=int, default=1, help="prompts per generation (default 1)")
    gen.add_argument("--scheduler", default="pndm", choices=list(SCHEDULERS))
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="our graphs (diffusers runs fp32, fp16 only on a GPU)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the latents and input images")
    gen.add_argument("--edit", action="store_true",
                     help="also time an edit of the generated image on our backends (prompt-to-prompt: one unet_p2p "
                          "call per step on 4 rows with guidance) against the generation: cost per step and per "
                          "UNet call; needs the package's editing graphs (exported by default)")
    gen.add_argument("--cache-interval", dest="cache_intervals", type=_csv, default=["1"], metavar="N,N,...",
                     help="fast mode (DeepCache step caching) side by side with the exact mode on our backends: "
                          "comma-separated cache intervals, e.g. 1,3,5 (1: the exact mode, always measured); per "
                          "UNet call (full and shallow), loop, generation and the image's difference from the exact "
                          "mode's; needs the package's step-cache graphs (exported by default)")
    run = p.add_argument_group("measurement")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default 1)")
    run.add_argument("--runs", type=int, default=3, help="timed runs of every measurement (default 3)")
    run.add_argument("--stage-runs", type=int, help="timed calls of each single-stage measurement (default: --runs)")
    run.add_argument("--backends", type=_csv,
                     help=f"comma-separated runtime backends, of {', '.join(BACKENDS)} (default: every one available "
                          "here for --precision; one of those that fails to load is reported, not fatal)")
    ours = p.add_argument_group(
        "our runtime's start-up options (as in `blipdiffusion-trt generate`; each backend benchmarked takes "
        "those it has)", "--threads also sets torch's threads on the diffusers side; --openvino-cache "
        "defaults to a fresh folder under --workdir, removed at the end (the in-process load converts the "
        "graphs, the cold start reads the cache)")
    add_option_arguments(ours)
    run.add_argument("--no-diffusers", action="store_true", help="only our runtime")
    run.add_argument("--diffusers-precisions", type=_csv,
                     help=f"torch dtypes of the diffusers rows, of {', '.join(DIFFUSERS_PRECISIONS)}; the first is the "
                          "reference of the ratios and image differences (default: on the CPU fp32, plus bf16 where the "
                          "CPU computes bf16 natively; on a GPU --precision)")
    run.add_argument("--diffusers-device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="device of the diffusers side (auto: cuda when torch sees a GPU)")
    run.add_argument("--torch-compile", action="store_true", help="torch.compile diffusers' UNet/ControlNet (GPU only)")
    run.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocesses")
    run.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    run.add_argument("--no-verify", action="store_true", help="do not check the package's sha256 when loading it")
    run.add_argument("--peak-tflops",
                     help="device peak for the fraction-of-floor column: one number for every row, or cpu=X,gpu=Y "
                          "(default: known GPUs, CPUs whose clock is in /proc/cpuinfo; otherwise omitted)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output directory for bench.json, bench.md, bench.png "
                                              "(default: WORKDIR/results with --size, else bench-results)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (the repository's ``bench/benchmark.py``)."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: run_bench(args))


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    package: Path
    checkpoint: Path | None
    size: str | None = None
    built: list[str] = field(default_factory=list)


def prepare_inputs(args) -> Inputs:
    """The package and checkpoint to measure: given, or built with random weights (``--size``)."""
    if args.size:
        if args.package or args.checkpoint:
            raise InputError("pass either --size or --package/--checkpoint, not both")
        name = args.size + ("-controlnet" if args.controlnet else "")
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint, package = workdir / f"{name}-checkpoint", workdir / f"{name}-package"
        built = []
        marker = checkpoint / ".bench-complete"
        if not marker.is_file():
            from ..export.random_checkpoint import build_random_checkpoint

            logger.info("building a random-weight %s checkpoint in %s", name, checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(package, ignore_errors=True)
            build_random_checkpoint(checkpoint, args.size, controlnet=args.controlnet)
            marker.write_text("built by blipdiffusion-trt bench\n")
            built.append("checkpoint")
        precisions = ["fp32"] + (["fp16"] if args.precision == "fp16" else [])
        manifest = package / "manifest.json"
        try:
            have = read_manifest(package).get("precisions", []) if manifest.is_file() else []
            # a package exported before editing existed lacks the editing graphs --edit runs
            stale = args.edit and manifest.is_file() and not read_pipeline_config(package).has_editing
        except PackageError as error:
            logger.warning("%s; exporting it again", error)
            have, stale = [], True
        if not all(p in have for p in precisions) or stale:
            from ..export.exporter import export_package

            logger.info("exporting %s to %s (%s)%s", checkpoint.name, package, ",".join(precisions),
                        "; the full-size export takes about 20 minutes" if args.size == "full" else "")
            export_package(checkpoint, package, precisions=precisions, force=True)
            built.append("package")
        else:
            logger.info("reusing %s", package)
        return Inputs(package, checkpoint, args.size, built)
    if not args.package:
        raise InputError("pass --package (and --checkpoint for diffusers), or --size tiny|full")
    package = Path(args.package).resolve()
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else None
    return Inputs(package, checkpoint)


def default_backends(precision: str) -> list[str]:
    """The registry's backends available on this machine that run ``precision``."""
    chosen = []
    for name in BACKENDS:
        backend = get_backend(name)
        if precision in backend.capabilities.precisions and backend.is_available():
            chosen.append(name)
    return chosen


def diffusers_precisions(requested: list[str] | None, device: str, precision: str, cpu: dict[str, Any]) -> list[str]:
    """The torch dtypes of the diffusers rows, the reference first."""
    if not requested:
        if device != "cpu":
            return [precision]
        return ["fp32"] + (["bf16"] if native_bf16(cpu) else [])
    bad = [p for p in requested if p not in DIFFUSERS_PRECISIONS]
    if bad:
        raise InputError(f"--diffusers-precisions: unknown {', '.join(bad)} (known: {', '.join(DIFFUSERS_PRECISIONS)})")
    if device == "cpu" and "fp16" in requested:
        raise InputError("--diffusers-precisions: fp16 runs diffusers on a GPU only (on the CPU: fp32, bf16)")
    return list(dict.fromkeys(requested))


def resolve_settings(args, config, inputs: Inputs) -> Settings:
    height = args.height or config.default_height
    width = args.width or config.default_width
    for name, value in (("--height", height), ("--width", width)):
        if not config.min_image_size <= value <= config.max_image_size or value % config.image_multiple:
            raise InputError(f"{name} must be a multiple of {config.image_multiple} in "
                             f"[{config.min_image_size}, {config.max_image_size}], got {value}")
    full = inputs.size == "full" or (inputs.size is None and max(config.unet_block_out_channels) >= 1280)
    steps = args.steps if args.steps is not None else (3 if full else 10)
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if not 1 <= args.batch <= config.max_batch_size:
        raise InputError(f"--batch must be in [1, {config.max_batch_size}], got {args.batch}")
    if args.warmup < 0 or args.runs < 1 or (args.stage_runs is not None and args.stage_runs < 1):
        raise InputError("--warmup must be >= 0, --runs and --stage-runs >= 1")
    f = config.latent_scale_factor
    if args.edit and not config.has_editing:
        raise InputError(f"--edit: {inputs.package} has no editing graphs (exported without them or before editing "
                         "existed); re-export it: blipdiffusion-trt export CHECKPOINT --out PACKAGE")
    intervals = _cache_intervals(args.cache_intervals)
    if any(n > 1 for n in intervals) and not config.has_step_cache:
        raise InputError(f"--cache-interval: {inputs.package} has no step-cache graphs (exported with --no-step-cache or "
                         "before fast mode); re-export it: blipdiffusion-trt export CHECKPOINT --out PACKAGE")
    return Settings(height=height, width=width, steps=steps, batch=args.batch, scheduler=args.scheduler,
                    guidance=args.guidance, precision=args.precision, seed=args.seed,
                    controlnet=config.has_controlnet,
                    latent_shape=(args.batch, config.latent_channels, height // f, width // f), edit=args.edit,
                    cache_intervals=intervals)


def _cache_intervals(values: Sequence[str]) -> tuple[int, ...]:
    """--cache-interval's values: integers in [1, 1000], the exact mode (1) first, each once."""
    intervals = [1]
    for value in values:
        if not value.isdigit() or not 1 <= int(value) <= 1000:
            raise InputError(f"--cache-interval must list integers in [1, 1000], got {value!r}")
        intervals.append(int(value))
    return tuple(dict.fromkeys(intervals))


@contextmanager
def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, desc="bench", unit="task", disable=not enabled, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if enabled else nullcontext():
            yield bar
    finally:
        bar.close()


def run_bench(args) -> int:
    inputs = prepare_inputs(args)
    package = ModelPackage.open(inputs.package, verify=not args.no_verify)  # checked as `generate` checks it
    config = package.config
    settings = resolve_settings(args, config, inputs)
    backends = args.backends or default_backends(settings.precision)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    with_diffusers = not args.no_diffusers
    if with_diffusers and inputs.checkpoint is None:
        logger.warning("no --checkpoint: diffusers is not measured")
        with_diffusers = False
    device = args.diffusers_device
    if with_diffusers:
        if installed_version("torch") is None or installed_version("diffusers") is None:
            logger.warning("torch/diffusers not installed (pip install blipdiffusion-trt[export]): diffusers is not measured")
            with_diffusers = False
        elif device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.torch_compile and device == "cpu":
        logger.warning("--torch-compile is for GPU runs; ignored on the CPU")
        args.torch_compile = False
    if args.torch_compile and args.warmup < 1:
        logger.warning("--torch-compile compiles during the first run: --warmup raised to 1")
        args.warmup = 1
    out_dir = (args.out or ((args.workdir / "results") if args.size else Path("bench-results"))).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    specs = declare_components(config)
    precisions = diffusers_precisions(args.diffusers_precisions, device, settings.precision, machine["cpu"]) \
        if with_diffusers else []
    diffusers_sides = {diffusers_key(p, i == 0): p for i, p in enumerate(precisions)}
    scratch_cache = None
    if "openvino" in backends and args.openvino_cache is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        scratch_cache = Path(tempfile.mkdtemp(prefix="openvino-cache-", dir=args.workdir.resolve()))
        args.openvino_cache = str(scratch_cache)
    try:
        return _run(args, inputs, package, settings, backends, diffusers_sides, device, out_dir, machine, specs,
                    fresh_openvino_cache=scratch_cache is not None)
    finally:
        if scratch_cache is not None:
            shutil.rmtree(scratch_cache, ignore_errors=True)
            args.openvino_cache = None


def _run(args, inputs: Inputs, package: ModelPackage, settings: Settings, backends: list[str],
         diffusers_sides: dict[str, str], device: str, out_dir: Path, machine: dict[str, Any], specs, *,
         fresh_openvino_cache: bool) -> int:
    config = package.config
    with_diffusers = bool(diffusers_sides)

    n_stages = len(generation_components(config)) + 1  # each component's call, and a scheduler step
    per_side = 1 + args.warmup + args.runs + n_stages
    sides = len(backends) + len(diffusers_sides)
    edit_tasks = (args.warmup + args.runs + 1) * len(backends) if settings.edit else 0  # edits, a unet_p2p call
    graphs = step_cache_graphs(config, control=settings.controlnet)
    fast_modes = sum(1 for n in settings.cache_intervals if n > 1)
    fast_tasks = fast_modes * (args.warmup + args.runs + len(graphs.names)) * len(backends) if graphs else 0
    total = per_side * sides + (0 if args.no_cold_start else sides) + (0 if args.no_flops else 1) + edit_tasks + fast_tasks
    implementations: dict[str, dict[str, Any]] = {}
    images: dict[str, Any] = {}
    logger.info("benchmark: %dx%d, %d steps (%s), guidance %g, batch %d, %s; warm-up %d, runs %d; backends %s%s",
                settings.height, settings.width, settings.steps, settings.scheduler, settings.guidance,
                settings.batch, settings.precision, args.warmup, args.runs, ",".join(backends) or "none",
                f"; diffusers on {device} ({', '.join(diffusers_sides.values())})" if with_diffusers else "")
    started = time.perf_counter()
    if args.torch_compile:  # one persistent kernel cache for this process and every cold-start child
        os.environ.setdefault(INDUCTOR_CACHE_ENV, inductor_cache_dir())
    partial = dict(command=getattr(args, "argv", None), machine=machine, settings=settings, args=args, config=config,
                   inputs=inputs, backends=backends, diffusers_sides=diffusers_sides, device=device, started=started,
                   fresh_openvino_cache=fresh_openvino_cache)

    def keep(key: str, impl: dict[str, Any]) -> None:
        """One side's figures, written to bench.json at once: a later side failing or the run
        being stopped loses nothing measured before it."""
        if "image" in impl:
            images[key] = impl.pop("image")
        implementations[key] = impl
        write_json(out_dir / "bench.json", _results(implementations, {}, complete=False, **partial))

    with _progress(total, not args.no_progress) as bar:
        for key, precision in diffusers_sides.items():
            keep(key, _guarded(key, lambda p=precision: bench_diffusers(inputs.checkpoint, device, settings, args, bar, p)))
        for backend in backends:
            # a backend the user named must work; one chosen by default may fail (e.g. no plans built)
            keep(backend, _guarded(f"ours {backend}", lambda b=backend: bench_ours(b, inputs.package, settings, args, bar),
                                   strict=bool(args.backends)))
        if not args.no_cold_start:
            for key in implementations:
                if "error" in implementations[key]:  # it did not load in this process either
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"cold start: {key}")
                spec = {"kind": "diffusers" if is_diffusers(key) else "ours", "settings": settings.to_dict(),
                        "package": str(inputs.package), "checkpoint": str(inputs.checkpoint), "backend": key,
                        "device": device if is_diffusers(key) else get_backend(key).device,
                        "precision": diffusers_sides.get(key), "verify": not args.no_verify, "threads": args.threads,
                        "torch_compile": args.torch_compile, "option_flags": given_flags(args),
                        "inductor_cache": os.environ.get(INDUCTOR_CACHE_ENV) if args.torch_compile else None}
                try:
                    implementations[key]["cold_start"] = cold_start(spec)
                except Exception as error:  # one failed side must not lose the others' figures
                    logger.error("cold start %s failed: %s", key, error)
                    implementations[key]["cold_start"] = {"error": str(error)}
                write_json(out_dir / "bench.json", _results(implementations, {}, complete=False, **partial))
                bar.update(1)
        flops: dict[str, Any] = {}
        if not args.no_flops:
            bar.set_postfix_str("FLOPs")
            flops = count_package_flops(package, config, specs, settings, implementations)
            bar.update(1)
    if DIFFUSERS in images:  # every other row against diffusers' reference row (fp32 on the CPU)
        for key, image in images.items():
            if key != DIFFUSERS:
                difference = abs(image.astype("float64") - images[DIFFUSERS].astype("float64"))
                implementations[key]["max_abs_image_diff_vs_diffusers"] = float(difference.max())
                implementations[key]["mean_abs_image_diff_vs_diffusers"] = float(difference.mean())

    results = _results(implementations, flops, complete=True, **partial)
    results["table"] = build_table(results)
    json_path, md_path, png_path = out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"
    write_json(json_path, results)
    markdown = render_markdown(results)
    md_path.write_text(markdown)
    try:
        render_chart(results, png_path)
    except ImportError:
        logger.warning("matplotlib is not installed (pip install blipdiffusion-trt[dev]): no %s", png_path.name)
    logger.info("wrote %s, %s, %s", json_path, md_path, png_path)
    print(markdown)
    failed = [k for k, v in implementations.items() if "error" in v]
    return 1 if failed and len(failed) == len(implementations) else 0


def _results(implementations: dict[str, Any], flops: dict[str, Any], *, complete: bool, command, machine, settings,
             args, config, inputs: Inputs, backends, diffusers_sides: dict[str, str], device: str,
             started: float, fresh_openvino_cache: bool) -> dict[str, Any]:
    """bench.json's content: the figures so far (``complete`` False while sides are still running)."""
    with_diffusers = bool(diffusers_sides)
    gpu_name = machine["gpus"][0]["name"] if machine["gpus"] else None
    peaks = {key: peak_tflops(impl.get("device", "cpu"), gpu_name,
                              impl.get("compute_precision", impl.get("precision", settings.precision)),
                              machine["cpu"], args.threads, args.peak_tflops)
             for key, impl in implementations.items()}
    if complete:
        try:
            machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            pass
    return {
        "schema": SCHEMA,
        "complete": complete,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["blipdiffusion-trt bench", *(command or sys.argv[1:])],
        "machine": machine,
        "versions": library_versions(),
        "settings": {**settings.to_dict(), "warmup": args.warmup, "runs": args.runs,
                     "stage_runs": args.stage_runs or args.runs, "threads": args.threads,
                     "runtime_options": runtime_options(args),
                     "backends": backends, "diffusers": with_diffusers,
                     "diffusers_device": device if with_diffusers else None,
                     "diffusers_precisions": list(diffusers_sides.values()),
                     "image_reference": DIFFUSERS if with_diffusers else None,
                     "openvino_cache": ("fresh for this run (in-process load: conversion; cold start: from the cache)"
                                        if fresh_openvino_cache else args.openvino_cache) if "openvino" in backends else None,
                     "torch_compile": args.torch_compile,
                     "inductor_cache": os.environ.get(INDUCTOR_CACHE_ENV) if args.torch_compile else None,
                     "verify_package": not args.no_verify, "prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT,
                     **({"edit_original_subject": ORIGINAL_SUBJECT} if settings.edit else {}),
                     "caches": "disabled: subject and negative prompt encoded every generation, as diffusers does",
                     "units": "seconds unless the key says otherwise"},
        "package": {"path": str(inputs.package), "checkpoint": str(inputs.checkpoint) if inputs.checkpoint else None,
                    "size": inputs.size, "built_now": inputs.built, "has_controlnet": config.has_controlnet,
                    "default_size": [config.default_height, config.default_width]},
        "bench_seconds": round(time.perf_counter() - started, 2),
        "process_peak_rss_mb": peak_rss_mb(),
        "flops": flops,
        "peak_tflops": peaks,
        "implementations": implementations,
    }


def _guarded(what: str, fn: Callable[[], dict[str, Any]], *, strict: bool = True) -> dict[str, Any]:
    """``fn()``, or its error as the side's result. A user error (bad package, missing plans)
    stops the benchmark when ``strict``."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except BlipDiffusionTrtError as error:
        if strict:
            raise
        logger.warning("%s: %s", what, error)
        return {"label": what, "error": str(error)}
    except Exception as error:  # e.g. a GPU backend whose provider fails at load: keep the others
        logger.exception("%s failed", what)
        return {"label": what, "error": f"{type(error).__name__}: {error}"}
