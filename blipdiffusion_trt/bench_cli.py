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
  MatMul, Gemm, Einsum; 2 x MACs) and, where the device's peak is known, the fraction of it reached.

Every figure goes to ``bench.json`` (with the machine, library versions and settings), the p50s to a
Markdown table (``bench.md``, printed at the end) with a diffusers/ours ratio per backend, and a
chart of per-stage latency to ``bench.png``.

This module imports only the standard library at import time: ``blipdiffusion-trt --help`` stays
fast and the runtime side never needs torch. ``python -m blipdiffusion_trt.bench_cli --child SPEC``
is the cold-start child process.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .runtime.backends.onnxruntime import GRAPH_OPTIMIZATIONS, MEMORY_ARENAS
from .runtime.schedulers import SCHEDULER_NAMES
from .runtime.schedulers import SCHEDULERS as SCHEDULER_CLASSES

logger = logging.getLogger(__name__)

SCHEMA = "blipdiffusion-trt-bench/1"
PROMPT = "swimming underwater"
NEGATIVE_PROMPT = "low quality, blurry"
SUBJECT = "dog"
SCHEDULERS = SCHEDULER_NAMES
# our schedulers carry the names of the diffusers classes they port
DIFFUSERS_SCHEDULERS = {name: cls.__name__ for name, cls in SCHEDULER_CLASSES.items()}
# ORT provider each ONNX Runtime backend needs; the default backend list is those available here.
BACKEND_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}
FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")
CHILD_MARK = "BENCH_CHILD_RESULT "
DIFFUSERS = "diffusers"

# Dense peak TFLOP/s of known GPUs: (name substring, fp16 tensor-core, fp32 as TF32 tensor-core,
# which ORT's CUDA provider and cuDNN use for fp32 by default). First match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
    ("A10G", 125.0, 62.5),
    ("A10", 125.0, 62.5),
    ("T4", 65.0, 8.1),
)

# Table rows: key, label, unit, kind ("time": lower is better, "rate": higher is better, "memory").
STAGE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("qformer", "Q-Former (1 call)", "time"),
    ("text_encoder", "text encoder, with subject (1 call)", "time"),
    ("text_encoder_plain", "text encoder, plain (1 call)", "time"),
    ("controlnet", "ControlNet (1 call)", "time"),
    ("unet", "UNet with residuals (1 call)", "time"),
    ("unet_plain", "UNet (1 call)", "time"),
    ("vae_decoder", "VAE decoder (1 call)", "time"),
    ("scheduler_step", "scheduler step (numpy / torch)", "time"),
    ("host_overhead_per_step", "host overhead per step", "time"),
    ("denoise_loop", "denoising loop", "time"),
    ("generation", "whole generation", "time"),
    ("loop_it_per_s", "denoising loop (it/s)", "rate"),
    ("load_warm", "load, in process", "time"),
    ("cold_loaded", "cold start: process start -> loaded", "time"),
    ("cold_first_image", "cold start: process start -> first image", "time"),
    ("peak_rss_mb", "peak host RSS, cold process (MB)", "memory"),
    ("gpu_memory_mb", "GPU memory, cold process (MB)", "memory"),
)
COMPONENT_STAGES = ("qformer", "text_encoder", "text_encoder_plain", "controlnet", "unet", "unet_plain", "vae_decoder")


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
    gen.add_argument("--scheduler", default="pndm", choices=SCHEDULERS)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="our graphs (diffusers runs fp32, fp16 only on a GPU)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the latents and input images")
    run = p.add_argument_group("measurement")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default 1)")
    run.add_argument("--runs", type=int, default=3, help="timed runs of every measurement (default 3)")
    run.add_argument("--stage-runs", type=int, help="timed calls of each single-stage measurement (default: --runs)")
    run.add_argument("--backends", type=_csv,
                     help="comma-separated runtime backends (default: every one whose ONNX Runtime provider is available)")
    run.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and torch (default: their own)")
    ours = p.add_argument_group("our runtime's start-up options (as in `blipdiffusion-trt generate`)")
    ours.add_argument("--graph-optimization", default="all", choices=GRAPH_OPTIMIZATIONS,
                      help="ONNX Runtime graph optimisation level (default all)")
    ours.add_argument("--ort-cache", help="directory of ONNX Runtime's optimised CPU graphs (written on first load)")
    ours.add_argument("--memory-arena", default="loop", choices=MEMORY_ARENAS,
                      help="ONNX Runtime CPU sessions that keep a memory arena (default loop: UNet/ControlNet)")
    ours.add_argument("--no-cpu-fused", action="store_true",
                      help="cpu backend: the plain fp32 graphs even where the package has CPU-fused ones")
    run.add_argument("--no-diffusers", action="store_true", help="only our runtime")
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
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``bench/benchmark.py``)."""
    from .errors import run_reporting_errors

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: run_bench(args))


# ----------------------------------------------------------------------------------------------
# Statistics and small helpers
# ----------------------------------------------------------------------------------------------

def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of samples (linear interpolation between order statistics)."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("no samples")

    def pct(q: float) -> float:
        pos = (len(values) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": sum(values) / len(values),
            "min": values[0], "max": values[-1], "n": len(values)}


def time_calls(fn: Callable[[], Any], warmup: int, runs: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    from . import __version__

    versions = {"blipdiffusion-trt": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers",
                 "tokenizers", "tensorrt", "pillow", "matplotlib"):
        v = _version(dist)
        if v:
            versions[dist] = v
    return versions


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_info() -> dict[str, Any]:
    text = _read("/proc/cpuinfo")
    model, flags, cores = None, set(), set()
    physical = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
            cores.add((physical, core))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": len(cores) or None,
        "simd": [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma", "neon", "asimd") if f in flags],
    }


def ram_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def nvidia_smi(query: str, *, apps: bool = False) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    flag = "--query-compute-apps" if apps else "--query-gpu"
    try:
        out = subprocess.run([exe, f"{flag}={query}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def gpu_info() -> list[dict[str, Any]]:
    rows = nvidia_smi("name,memory.total,driver_version") or []
    return [{"name": r[0], "memory_mb": _num(r[1]), "driver": r[2] if len(r) > 2 else None} for r in rows]


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def machine_info() -> dict[str, Any]:
    info = {"cpu": cpu_info(), "ram_gb": ram_gb(), "gpus": gpu_info(), "os": platform.platform(),
            "hostname": platform.node()}
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, which a child process inherits from
    the parent it was forked from (it survives ``execve``), so a cold-start child would report at
    least the benchmark process's own peak.
    """
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20  # Linux: KiB, macOS: bytes


def gpu_memory_used_mb(pid: int | None = None) -> tuple[float | None, str | None]:
    """(MB, method): this process's use from nvidia-smi, else the device's total use."""
    if pid is not None:
        rows = nvidia_smi("pid,used_memory", apps=True)
        for row in rows or []:
            if row and row[0] == str(pid):
                return _num(row[1]), "nvidia-smi per process"
    rows = nvidia_smi("memory.used")
    if rows:
        return sum(_num(r[0]) or 0.0 for r in rows), "nvidia-smi device total"
    return None, None


# ----------------------------------------------------------------------------------------------
# FLOPs from ONNX graphs
# ----------------------------------------------------------------------------------------------

def _shape_of(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _strip_weights(model) -> None:
    """Move large float initializers to graph inputs (shape kept, data dropped) for fast inference."""
    from onnx import TensorProto, helper

    keep, moved = [], []
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16) \
                and _prod(init.dims) > 64:
            moved.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    existing = {i.name for i in model.graph.input}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(v for v in moved if v.name not in existing)


def _infer_shapes(model):
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True), "onnxruntime symbolic_shape_infer"
    except Exception as error:  # fall back to onnx's own (data propagation resolves most Reshapes)
        logger.debug("symbolic shape inference failed (%s); using onnx.shape_inference", error)
        import onnx

        return onnx.shape_inference.infer_shapes(model, data_prop=True), "onnx.shape_inference"


def count_flops(model_or_path: Any, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """FLOPs (2 x multiply-accumulates) of Conv, ConvTranspose, MatMul, Gemm and Einsum nodes.

    ``input_shapes`` sets the graph inputs' dynamic dimensions; the rest comes from shape
    inference. Weights are never loaded (external data stays on disk). Nodes whose shapes stay
    unknown are counted in ``unresolved`` and contribute nothing.
    """
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    else:
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    input_shapes = dict(input_shapes or {})
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            shape = list(input_shapes[value.name])
            if len(dims) != len(shape):
                raise ValueError(f"input {value.name}: rank {len(dims)}, shape given {shape}")
            for dim, size in zip(dims, shape):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    _strip_weights(model)
    inferred, method = _infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[vi.name] = _shape_of(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    def known(name: str) -> list[int] | None:
        shape = shapes.get(name)
        return shape if shape is not None and all(d is not None for d in shape) else None  # type: ignore[return-value]

    by_op: dict[str, int] = {}
    nodes: dict[str, int] = {}
    unresolved = 0
    for node in inferred.graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        flops = node_flops(node, known)
        if flops is None:
            unresolved += 1
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    return {"flops": sum(by_op.values()), "by_op": by_op, "nodes": nodes, "unresolved": unresolved,
            "shape_inference": method}


def node_flops(node, known: Callable[[str], list[int] | None]) -> int | None:
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    if op == "Conv":
        w, y = known(node.input[1]), known(node.output[0])
        if w is None or y is None:
            return None
        # every output element: (C_in / group) * prod(kernel) MACs
        return 2 * _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = known(node.input[0]), known(node.input[1])
        if x is None or w is None:
            return None
        # every input element scatters into (C_out / group) * prod(kernel) outputs
        return 2 * _prod(x) * _prod(w[1:])
    if op == "MatMul":
        a, b = known(node.input[0]), known(node.input[1])
        if a is None or b is None:
            return None
        k = a[-1]
        m = a[-2] if len(a) > 1 else 1
        n = b[-1] if len(b) > 1 else 1
        batch = _broadcast_batch(a[:-2], b[:-2])
        return 2 * _prod(batch) * m * n * k
    if op == "Gemm":
        a, b = known(node.input[0]), known(node.input[1])
        if a is None or b is None:
            return None
        trans_a = attrs["transA"].i if "transA" in attrs else 0
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        n = b[0] if trans_b else b[1]
        return 2 * m * n * k
    if op == "Einsum":
        y = known(node.output[0])
        operands = [known(name) for name in node.input]
        if y is None or any(o is None for o in operands):
            return None
        equation = attrs["equation"].s.decode().replace(" ", "")
        lhs, _, rhs = equation.partition("->")
        sizes: dict[str, int] = {}
        for term, shape in zip(lhs.split(","), operands):
            before, dots, after = term.partition("...")
            pairs = list(zip(before, shape))
            if dots and after:
                pairs += list(zip(after, shape[len(shape) - len(after):]))
            for letter, size in pairs:
                sizes[letter] = max(sizes.get(letter, 1), size)
        if not rhs:  # implicit output: letters appearing once, sorted
            all_letters = "".join(lhs.split(","))
            rhs = "".join(sorted(c for c in set(all_letters) if c.isalpha() and all_letters.count(c) == 1))
        contracted = {c for c in sizes if c not in rhs}
        return 2 * _prod(y) * _prod(sizes[c] for c in contracted)
    return None


def _broadcast_batch(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [max(x, y) for x, y in zip(a, b)]


def component_point(spec, config, *, batch: int, height: int, width: int) -> dict[str, int]:
    """Axis values of one generation: batch, CFG-doubled UNet batch, latent sizes, full text."""
    f = config.latent_scale_factor
    point = {name: axis.opt for name, axis in spec.axes.items()}
    point.update(batch=batch, unet_batch=2 * batch, height=height, width=width,
                 latent_height=height // f, latent_width=width // f)
    for name in list(point):
        for base in ("latent_height_", "latent_width_"):
            if name.startswith(base):
                point[name] = point[base[:-1]] // int(name[len(base):])
    return point


def component_input_shapes(spec, config, *, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    point = component_point(spec, config, batch=batch, height=height, width=width)
    return {t.name: t.shape_at(point) for t in spec.inputs}


def peak_tflops(device: str, gpu_name: str | None, precision: str, cpu: Mapping[str, Any],
                threads: int | None, override: str | None) -> dict[str, Any] | None:
    """Peak dense TFLOP/s of the device a row ran on, with where the number comes from."""
    kind = "gpu" if device != "cpu" else "cpu"
    if override:
        parts = _csv(override)
        if len(parts) == 1 and "=" not in parts[0]:
            return {"tflops": float(parts[0]), "source": "--peak-tflops"}
        for part in parts:
            key, _, value = part.partition("=")
            if key.strip() == kind:
                return {"tflops": float(value), "source": f"--peak-tflops {kind}"}
    if kind == "gpu":
        for name, fp16, fp32 in GPU_PEAK_TFLOPS:
            if gpu_name and name.lower() in gpu_name.lower():
                value = fp16 if precision == "fp16" else fp32
                what = "fp16 tensor core" if precision == "fp16" else "TF32 tensor core"
                return {"tflops": value, "source": f"{name} dense {what} (datasheet)"}
        return None
    # CPUs: cores x nominal clock x fp32 FLOP/cycle, only where the model name states the clock.
    model = cpu.get("model") or ""
    ghz = None
    if "GHz" in model:
        try:
            ghz = float(model.split("@")[-1].strip().split("GHz")[0])
        except ValueError:
            ghz = None
    simd = cpu.get("simd", [])
    per_cycle = 64 if "avx512f" in simd else 32 if "avx2" in simd and "fma" in simd else None
    cores = threads or cpu.get("physical_cores") or cpu.get("usable_cores")
    if ghz is None or per_cycle is None or not cores:
        return None
    return {"tflops": cores * ghz * per_cycle / 1000.0,
            "source": f"estimate: {cores} cores x {ghz} GHz x {per_cycle} fp32 FLOP/cycle (nominal clock)"}


# ----------------------------------------------------------------------------------------------
# Inputs shared by every side (and the cold-start children)
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    height: int
    width: int
    steps: int
    batch: int
    scheduler: str
    guidance: float
    precision: str
    seed: int
    controlnet: bool
    latent_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def bench_inputs(settings: Settings):
    """Reference image, condition image (ControlNet) and latents, from the seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    reference = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) if settings.controlnet else None
    latents = rng.standard_normal(settings.latent_shape).astype(np.float32)
    return reference, condition, latents


def run_ours(runtime, settings: Settings, reference, condition, latents):
    return runtime(
        [PROMPT] * settings.batch, reference, SUBJECT, SUBJECT, latents=latents, height=settings.height,
        width=settings.width, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        neg_prompt=NEGATIVE_PROMPT, scheduler=settings.scheduler, output_type="np", condition_image=condition,
    )


def run_diffusers(pipe, settings: Settings, reference, condition, latents, device: str, dtype):
    import torch

    b = settings.batch
    args = ([PROMPT] * b, [reference] * b if b > 1 else reference)
    if condition is not None:
        args += (condition,)
    args += ([SUBJECT] * b, [SUBJECT] * b)
    with torch.no_grad():
        return pipe(*args, latents=torch.from_numpy(latents).to(device=device, dtype=dtype),
                    guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                    num_inference_steps=settings.steps, neg_prompt=NEGATIVE_PROMPT, output_type="np").images


def runtime_options(args) -> dict[str, Any]:
    """The start-up options our runtime is loaded with (recorded in bench.json, passed to children)."""
    return {"graph_optimization": args.graph_optimization, "optimized_cache": args.ort_cache,
            "memory_arena": args.memory_arena, "cpu_fused": not args.no_cpu_fused}


def _runtime_options_text(options: Mapping[str, Any] | None) -> str:
    if not options:
        return ""
    cache = "an optimised-graph cache" if options.get("optimized_cache") else "no optimised-graph cache"
    fused = "CPU-fused graphs where the package has them" if options.get("cpu_fused", True) else "plain fp32 graphs"
    return (f" Our runtime: ONNX Runtime graph optimisation {options.get('graph_optimization')}, memory arena "
            f"{options.get('memory_arena')}, {cache}, {fused}.")


def load_runtime(package: Path, backend: str, settings: Settings, *, verify: bool, threads: int | None,
                 options: Mapping[str, Any] | None = None):
    from .runtime.backends import get_backend
    from .runtime.pipeline import BlipDiffusionRuntime

    backend_options = get_backend(backend).options_from({"threads": threads, **(options or {})})
    # diffusers encodes the subject and the negative prompt every call; so do we here (no caches).
    return BlipDiffusionRuntime.from_package(package, backend, precision=settings.precision, verify=verify,
                                             options=backend_options, cache_size=0, negative_cache_size=0)


def load_diffusers(checkpoint: Path, device: str, settings: Settings, *, torch_compile: bool, threads: int | None):
    import torch

    from .export.exporter import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(checkpoint)
    dtype = torch.float16 if settings.precision == "fp16" and device != "cpu" else torch.float32
    pipe.to(device=device, dtype=dtype)
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[settings.scheduler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if torch_compile:
        pipe.unet = torch.compile(pipe.unet)
        if getattr(pipe, "controlnet", None) is not None:
            pipe.controlnet = torch.compile(pipe.controlnet)
    return pipe, dtype


# ----------------------------------------------------------------------------------------------
# Our runtime, one backend
# ----------------------------------------------------------------------------------------------

class _RecordingEngine:
    """Wraps an engine for one generation: remembers the first feed (and ``keep``) it was given."""

    def __init__(self, engine):
        self.engine = engine
        self.first: tuple[dict, tuple] | None = None

    def infer(self, feed, keep=()):
        if self.first is None:
            self.first = (dict(feed), tuple(keep))
        return self.engine.infer(feed, keep)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _generation_figures(timings: Sequence[Mapping[str, float]], engine_keys: Sequence[str]) -> dict[str, Any]:
    """Per-run whole-generation figures -> statistics."""
    out: dict[str, Any] = {}
    steps = [t["steps"] for t in timings]
    out["generation"] = summarize([t["total"] for t in timings])
    out["denoise_loop"] = summarize([t["denoise_loop"] for t in timings])
    out["host_overhead_per_step"] = summarize(
        [max(0.0, t["denoise_loop"] - sum(t.get(k, 0.0) for k in engine_keys)) / s for t, s in zip(timings, steps)])
    out["loop_it_per_s"] = summarize([s / t["denoise_loop"] for t, s in zip(timings, steps)])
    names = sorted({k for t in timings for k in t if k not in ("steps", "total", "denoise_loop")})
    out["in_generation"] = {k: summarize([t.get(k, 0.0) for t in timings]) for k in names}
    out["unet_calls"] = int(steps[0])
    return out


def bench_ours(backend: str, package: Path, settings: Settings, args, bar) -> dict[str, Any]:
    from .runtime.schedulers import scheduler_from_config

    result: dict[str, Any] = {"label": f"ours {backend}", "backend": backend, "precision": settings.precision,
                              "device": "cpu" if backend == "cpu" else "gpu"}
    reference, condition, latents = bench_inputs(settings)
    bar.set_postfix_str(f"ours {backend}: load")
    import onnxruntime  # noqa: F401  (imports are the cold start's; this times the loading)

    t0 = time.perf_counter()
    runtime = load_runtime(package, backend, settings, verify=not args.no_verify, threads=args.threads,
                           options=runtime_options(args))
    result["load_warm"] = summarize([time.perf_counter() - t0])
    bar.update(1)

    sync = device_sync(backend)
    recorders = {name: _RecordingEngine(engine) for name, engine in runtime.engines.items()}
    originals = dict(runtime.engines)
    timings, image = [], None
    for i in range(args.warmup + args.runs):
        bar.set_postfix_str(f"ours {backend}: generation {i + 1}/{args.warmup + args.runs}")
        if i == 0:
            runtime.engines.update(recorders)
        try:
            out = run_ours(runtime, settings, reference, condition, latents)
        finally:
            runtime.engines.update(originals)
        if i >= args.warmup:
            timings.append(out.timings)
        image = out.images
        bar.update(1)
    engine_keys = ("unet", "controlnet")
    result.update(_generation_figures(timings, engine_keys))
    result["image"] = image

    stages: dict[str, Any] = {}
    feeds: dict[str, dict[str, list[int]]] = {}
    stage_runs = args.stage_runs or args.runs
    for name, rec in recorders.items():
        bar.set_postfix_str(f"ours {backend}: {name}")
        if rec.first is None:
            bar.update(1)
            continue
        feed, keep = rec.first
        engine = originals[name]
        stages[name] = summarize(time_calls(lambda: engine.infer(feed, keep), args.warmup, stage_runs, sync))
        feeds[name] = {k: _value_shape(v) for k, v in feed.items()}
        bar.update(1)

    bar.set_postfix_str(f"ours {backend}: scheduler")
    stages["scheduler_step"] = summarize(_scheduler_samples_numpy(
        scheduler_from_config, runtime.scheduler_config, settings, args.warmup, stage_runs))
    bar.update(1)
    result["stages"] = stages
    result["feed_shapes"] = feeds
    del runtime, recorders, originals
    gc.collect()
    return result


def device_sync(backend: str) -> Callable[[], None]:
    """A synchronisation for timing GPU backends whose ``infer`` may return before the GPU is done
    (outputs kept on the device). ONNX Runtime's own run already waits; this is a cheap extra."""
    if backend == "cpu":
        return lambda: None
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            import importlib

            cudart = importlib.import_module(module)
        except ImportError:
            continue
        return lambda: cudart.cudaDeviceSynchronize()
    return lambda: None


def _value_shape(value) -> list[int]:
    """Shape of a numpy array, an ORT ``OrtValue`` (``shape()``) or a device tensor."""
    shape = value.shape
    return [int(d) for d in (shape() if callable(shape) else shape)]


def _scheduler_samples_numpy(make, config, settings: Settings, warmup: int, runs: int) -> list[float]:
    """Time every step of full scheduler passes (the multistep schedulers keep state)."""
    import numpy as np

    rng = np.random.default_rng(settings.seed + 1)
    noise = rng.standard_normal(settings.latent_shape).astype(np.float32)
    samples: list[float] = []
    for run in range(warmup + runs):
        sched = make(settings.scheduler, config)
        sched.set_timesteps(settings.steps)
        latents = rng.standard_normal(settings.latent_shape).astype(np.float32)
        for t in sched.timesteps:
            start = time.perf_counter()
            latents = sched.step(noise, t, latents).astype(np.float32, copy=False)
            if run >= warmup:
                samples.append(time.perf_counter() - start)
    return samples


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------

class _DiffusersProbe:
    """Forward hooks (and a wrapper on ``vae.decode``/``scheduler.step``) on diffusers' pipeline.

    Per generation: the time in each module, the loop time (first ControlNet/UNet call to the VAE
    decode) and the first call's arguments of each stage, for replay at the same shapes.
    """

    def __init__(self, pipe, sync: Callable[[], None]):
        self.pipe = pipe
        self.sync = sync
        self.times: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.recorded: dict[str, tuple[Callable, tuple, dict]] = {}
        self.loop_start: float | None = None
        self.loop_end: float | None = None
        self.handles: list = []
        self._starts: dict[str, float] = {}
        self._current: dict[str, str] = {}
        modules = {"qformer": pipe.qformer, "text_encoder": pipe.text_encoder, "unet": pipe.unet}
        if getattr(pipe, "controlnet", None) is not None:
            modules["controlnet"] = pipe.controlnet
        self.has_controlnet = "controlnet" in modules
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(key, module), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(key)))
        self._orig_decode = pipe.vae.decode
        self._orig_step = pipe.scheduler.step

        def decode(*a, **kw):
            self.loop_end = time.perf_counter() if self.loop_end is None else self.loop_end
            self._record("vae_decoder", self._orig_decode, a, kw)
            self.sync()
            start = time.perf_counter()
            out = self._orig_decode(*a, **kw)
            self.sync()
            self._add("vae_decoder", time.perf_counter() - start)
            return out

        def step(*a, **kw):
            start = time.perf_counter()
            out = self._orig_step(*a, **kw)
            self.sync()
            self._add("scheduler", time.perf_counter() - start)
            return out

        pipe.vae.decode = decode
        pipe.scheduler.step = step

    def _stage(self, key: str, args, kwargs) -> str:
        if key == "text_encoder":
            return "text_encoder" if kwargs.get("ctx_embeddings") is not None else "text_encoder_plain"
        if key == "unet" and not self.has_controlnet:
            return "unet_plain"
        return key

    def _pre(self, key: str, module):
        def hook(mod, args, kwargs):
            stage = self._stage(key, args, kwargs)
            if key in ("unet", "controlnet") and self.loop_start is None:
                self.loop_start = time.perf_counter()
            self._record(stage, module, args, kwargs)
            self.sync()
            self._current[key] = stage
            self._starts[key] = time.perf_counter()
            return None

        return hook

    def _post(self, key: str):
        def hook(mod, args, output):
            self.sync()
            self._add(self._current[key], time.perf_counter() - self._starts[key])
            return None

        return hook

    def _record(self, stage: str, fn, args, kwargs) -> None:
        if stage not in self.recorded:
            self.recorded[stage] = (fn, tuple(args), dict(kwargs))

    def _add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def reset(self) -> None:
        self.times, self.calls = {}, {}
        self.loop_start = self.loop_end = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.pipe.vae.decode = self._orig_decode
        self.pipe.scheduler.step = self._orig_step


def bench_diffusers(checkpoint: Path, device: str, settings: Settings, args, bar) -> dict[str, Any]:
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    result: dict[str, Any] = {"label": f"diffusers torch {device}", "device": "cpu" if device == "cpu" else "gpu",
                              "torch_device": device}
    reference, condition, latents = bench_inputs(settings)
    bar.set_postfix_str("diffusers: load")
    import diffusers.pipelines  # noqa: F401  (imports are the cold start's; this times the loading)
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    pipe, dtype = load_diffusers(checkpoint, device, settings, torch_compile=args.torch_compile, threads=args.threads)
    sync()
    result["load_warm"] = summarize([time.perf_counter() - t0])
    result["precision"] = "fp16" if dtype == torch.float16 else "fp32"
    result["torch_compile"] = bool(args.torch_compile)
    result["torch_threads"] = torch.get_num_threads()
    bar.update(1)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()

    probe = _DiffusersProbe(pipe, sync)
    timings, image = [], None
    try:
        for i in range(args.warmup + args.runs):
            bar.set_postfix_str(f"diffusers: generation {i + 1}/{args.warmup + args.runs}")
            probe.reset()
            sync()
            start = time.perf_counter()
            image = run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
            sync()
            total = time.perf_counter() - start
            if i >= args.warmup:
                run = dict(probe.times, total=total, steps=float(probe.calls.get("unet", probe.calls.get("unet_plain", 0))))
                run["denoise_loop"] = (probe.loop_end or start + total) - (probe.loop_start or start)
                timings.append(run)
            bar.update(1)
    finally:
        probe.remove()
    engine_keys = ("unet", "unet_plain", "controlnet")
    result.update(_generation_figures(timings, engine_keys))
    result["image"] = image

    stages: dict[str, Any] = {}
    stage_runs = args.stage_runs or args.runs
    for stage, (fn, a, kw) in probe.recorded.items():
        bar.set_postfix_str(f"diffusers: {stage}")
        with torch.no_grad():
            stages[stage] = summarize(time_calls(lambda: fn(*a, **kw), args.warmup, stage_runs, sync))
        bar.update(1)
    bar.set_postfix_str("diffusers: scheduler")
    stages["scheduler_step"] = summarize(_scheduler_samples_torch(pipe, settings, device, dtype, args.warmup, stage_runs, sync))
    bar.update(1)
    result["stages"] = stages
    if device != "cpu":
        result["gpu_memory_mb_in_process"] = torch.cuda.max_memory_allocated() / 2**20
    del pipe, probe
    gc.collect()
    return result


def _scheduler_samples_torch(pipe, settings: Settings, device: str, dtype, warmup: int, runs: int, sync) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(settings.seed + 1)
    noise = torch.randn(settings.latent_shape, generator=generator).to(device=device, dtype=dtype)
    samples: list[float] = []
    for run in range(warmup + runs):
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(settings.steps)
        latents = torch.randn(settings.latent_shape, generator=generator).to(device=device, dtype=dtype)
        for t in sched.timesteps:
            sync()
            start = time.perf_counter()
            latents = sched.step(noise, t, latents).prev_sample
            sync()
            if run >= warmup:
                samples.append(time.perf_counter() - start)
    return samples


# ----------------------------------------------------------------------------------------------
# Cold start: a fresh process per side
# ----------------------------------------------------------------------------------------------

def cold_start(spec: dict[str, Any], timeout: float = 7200.0) -> dict[str, Any]:
    """Spawn ``python -m blipdiffusion_trt.bench_cli --child SPEC``; times from just before the spawn."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = [sys.executable, "-m", "blipdiffusion_trt.bench_cli", "--child", json.dumps(spec)]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"cold-start process failed (exit {proc.returncode}): {' | '.join(tail)}")
    child = json.loads(lines[-1][len(CHILD_MARK):])
    return {
        "imports_done": child["t_imports"] - start,
        "loaded": child["t_loaded"] - start,
        "first_image": child["t_first_image"] - start,
        "first_generation": child["t_first_image"] - child["t_loaded"],
        "peak_rss_mb": child["peak_rss_mb"],
        "gpu_memory_mb": child.get("gpu_memory_mb"),
        "gpu_memory_method": child.get("gpu_memory_method"),
    }


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    settings = Settings(**{**spec["settings"], "latent_shape": tuple(spec["settings"]["latent_shape"])})
    out: dict[str, Any] = {}
    gpu_before = None
    if spec["kind"] == "ours":
        from .runtime import pipeline  # noqa: F401  (the imports a user of the runtime pays for)

        out["t_imports"] = time.time()
        if spec["device"] != "cpu":
            gpu_before, _ = gpu_memory_used_mb()
        runtime = load_runtime(Path(spec["package"]), spec["backend"], settings, verify=spec["verify"],
                               threads=spec.get("threads"), options=spec.get("runtime_options"))
        out["t_loaded"] = time.time()
        reference, condition, latents = bench_inputs(settings)
        run_ours(runtime, settings, reference, condition, latents)
        out["t_first_image"] = time.time()
    else:
        import torch
        import diffusers  # noqa: F401

        out["t_imports"] = time.time()
        device = spec["device"]
        pipe, dtype = load_diffusers(Path(spec["checkpoint"]), device, settings, torch_compile=spec["torch_compile"],
                                     threads=spec.get("threads"))
        if device != "cpu":
            torch.cuda.synchronize()
        out["t_loaded"] = time.time()
        reference, condition, latents = bench_inputs(settings)
        run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
        out["t_first_image"] = time.time()
        if device != "cpu":
            out["gpu_memory_mb"] = torch.cuda.max_memory_reserved() / 2**20
            out["gpu_memory_method"] = "torch.cuda.max_memory_reserved"
    if spec["kind"] == "ours" and spec["device"] != "cpu":
        used, method = gpu_memory_used_mb(os.getpid())
        if used is not None and method == "nvidia-smi device total" and gpu_before is not None:
            used, method = used - gpu_before, "nvidia-smi device total, minus before loading"
        out["gpu_memory_mb"], out["gpu_memory_method"] = used, method
    out["peak_rss_mb"] = peak_rss_mb()
    return out


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
    from .errors import InputError

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
            from .export.random_checkpoint import build_random_checkpoint

            logger.info("building a random-weight %s checkpoint in %s", name, checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(package, ignore_errors=True)
            build_random_checkpoint(checkpoint, args.size, controlnet=args.controlnet)
            marker.write_text("built by blipdiffusion-trt bench\n")
            built.append("checkpoint")
        precisions = ["fp32"] + (["fp16"] if args.precision == "fp16" else [])
        manifest = package / "manifest.json"
        have = json.loads(manifest.read_text()).get("precisions", []) if manifest.is_file() else []
        if not all(p in have for p in precisions):
            from .export.exporter import export_package

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


def default_backends() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [name for name, provider in BACKEND_PROVIDERS.items() if provider in available]


def resolve_settings(args, config, inputs: Inputs) -> Settings:
    from .errors import InputError

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
    return Settings(height=height, width=width, steps=steps, batch=args.batch, scheduler=args.scheduler,
                    guidance=args.guidance, precision=args.precision, seed=args.seed,
                    controlnet=config.has_controlnet,
                    latent_shape=(args.batch, config.latent_channels, height // f, width // f))


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
    from .components import declare_components, generation_components
    from .errors import InputError
    from .package import read_pipeline_config

    inputs = prepare_inputs(args)
    config = read_pipeline_config(inputs.package)
    settings = resolve_settings(args, config, inputs)
    backends = args.backends or default_backends()
    from .runtime.backends import BACKENDS

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    with_diffusers = not args.no_diffusers
    if with_diffusers and inputs.checkpoint is None:
        logger.warning("no --checkpoint: diffusers is not measured")
        with_diffusers = False
    device = args.diffusers_device
    if with_diffusers:
        if _version("torch") is None or _version("diffusers") is None:
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

    n_stages = len(generation_components(config)) + 1
    per_side = 1 + args.warmup + args.runs + n_stages
    total = per_side * (len(backends) + with_diffusers) + (0 if args.no_cold_start else len(backends) + with_diffusers) \
        + (0 if args.no_flops else 1)
    implementations: dict[str, dict[str, Any]] = {}
    images: dict[str, Any] = {}
    logger.info("benchmark: %dx%d, %d steps (%s), guidance %g, batch %d, %s; warm-up %d, runs %d; backends %s%s",
                settings.height, settings.width, settings.steps, settings.scheduler, settings.guidance,
                settings.batch, settings.precision, args.warmup, args.runs, ",".join(backends) or "none",
                f"; diffusers on {device}" if with_diffusers else "")
    started = time.perf_counter()
    with _progress(total, not args.no_progress) as bar:
        if with_diffusers:
            implementations[DIFFUSERS] = _guarded(
                "diffusers", lambda: bench_diffusers(inputs.checkpoint, device, settings, args, bar))
        for backend in backends:
            implementations[backend] = _guarded(
                f"ours {backend}", lambda b=backend: bench_ours(b, inputs.package, settings, args, bar))
        for key, impl in implementations.items():
            if "image" in impl:
                images[key] = impl.pop("image")
        if not args.no_cold_start:
            for key in implementations:
                bar.set_postfix_str(f"cold start: {key}")
                spec = {"kind": "diffusers" if key == DIFFUSERS else "ours", "settings": settings.to_dict(),
                        "package": str(inputs.package), "checkpoint": str(inputs.checkpoint), "backend": key,
                        "device": device if key == DIFFUSERS else ("cpu" if key == "cpu" else "cuda"),
                        "verify": not args.no_verify, "threads": args.threads, "torch_compile": args.torch_compile,
                        "runtime_options": runtime_options(args)}
                try:
                    implementations[key]["cold_start"] = cold_start(spec)
                except Exception as error:  # one failed side must not lose the others' figures
                    logger.error("cold start %s failed: %s", key, error)
                    implementations[key]["cold_start"] = {"error": str(error)}
                bar.update(1)
        flops: dict[str, Any] = {}
        if not args.no_flops:
            bar.set_postfix_str("FLOPs")
            flops = count_package_flops(inputs.package, config, specs, settings, implementations)
            bar.update(1)
    if with_diffusers and DIFFUSERS in images:
        for key in backends:
            if key in images and key in implementations:
                implementations[key]["max_abs_image_diff_vs_diffusers"] = float(abs(images[key] - images[DIFFUSERS]).max())

    gpu_name = machine["gpus"][0]["name"] if machine["gpus"] else None
    peaks = {key: peak_tflops(impl.get("device", "cpu"), gpu_name, impl.get("precision", settings.precision),
                              machine["cpu"], args.threads, args.peak_tflops)
             for key, impl in implementations.items()}
    try:
        machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    results = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["blipdiffusion-trt bench", *(getattr(args, "argv", None) or sys.argv[1:])],
        "machine": machine,
        "versions": library_versions(),
        "settings": {**settings.to_dict(), "warmup": args.warmup, "runs": args.runs,
                     "stage_runs": args.stage_runs or args.runs, "threads": args.threads,
                     "runtime_options": runtime_options(args),
                     "backends": backends, "diffusers": with_diffusers,
                     "diffusers_device": device if with_diffusers else None, "torch_compile": args.torch_compile,
                     "verify_package": not args.no_verify, "prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT,
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
    results["table"] = build_table(results)
    json_path, md_path, png_path = out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"
    json_path.write_text(json.dumps(results, indent=2, default=_json_default))
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


def _guarded(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    from .errors import BlipDiffusionTrtError

    try:
        return fn()
    except (BlipDiffusionTrtError, KeyboardInterrupt):
        raise
    except Exception as error:  # e.g. a GPU backend whose provider fails at load: keep the others
        logger.exception("%s failed", what)
        return {"label": what, "error": f"{type(error).__name__}: {error}"}


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def count_package_flops(package: Path, config, specs, settings: Settings, implementations) -> dict[str, Any]:
    """FLOPs of every loaded component at the shapes the benchmark fed it."""
    from .package import PackageLayout

    recorded: dict[str, dict[str, list[int]]] = {}
    for impl in implementations.values():
        for name, shapes in impl.get("feed_shapes", {}).items():
            recorded.setdefault(name, shapes)
    from .components import generation_components

    names = [n for n in specs if n in recorded] or [n for n in specs if n in generation_components(config)]
    out: dict[str, Any] = {}
    for name in names:
        shapes = recorded.get(name) or component_input_shapes(specs[name], config, batch=settings.batch,
                                                              height=settings.height, width=settings.width)
        path = PackageLayout(package).graph(name, settings.precision)
        try:
            counted = count_flops(path, shapes)
        except Exception as error:  # noqa: BLE001 -- a figure missing is better than no report
            logger.warning("FLOPs of %s: %s", name, error)
            out[name] = {"error": str(error)}
            continue
        out[name] = {**counted, "input_shapes": {k: list(v) for k, v in shapes.items()}}
    return out


# ----------------------------------------------------------------------------------------------
# Table, Markdown, chart
# ----------------------------------------------------------------------------------------------

def _row_value(impl: Mapping[str, Any], key: str) -> float | None:
    if "error" in impl:
        return None
    if key in COMPONENT_STAGES or key == "scheduler_step":
        stat = impl.get("stages", {}).get(key)
        return stat["p50"] if stat else None
    if key in ("host_overhead_per_step", "denoise_loop", "generation", "loop_it_per_s", "load_warm"):
        stat = impl.get(key)
        return stat["p50"] if stat else None
    cold = impl.get("cold_start") or {}
    if "error" in cold:
        return None
    return {"cold_loaded": cold.get("loaded"), "cold_first_image": cold.get("first_image"),
            "peak_rss_mb": cold.get("peak_rss_mb"), "gpu_memory_mb": cold.get("gpu_memory_mb")}.get(key)


def build_table(results: Mapping[str, Any]) -> dict[str, Any]:
    """Rows x implementations (p50), ratio diffusers/ours per backend (>1: ours faster/smaller)."""
    impls = results["implementations"]
    ours = [k for k in impls if k != DIFFUSERS]
    flops = results.get("flops", {})
    peaks = results.get("peak_tflops", {})
    rows = []
    for key, label, kind in STAGE_ROWS:
        values = {k: _row_value(impls[k], key) for k in impls}
        if all(v is None for v in values.values()):
            continue
        row: dict[str, Any] = {"key": key, "label": label, "kind": kind, "values": values, "ratio": {}}
        theirs = values.get(DIFFUSERS)
        for k in ours:
            mine = values.get(k)
            if theirs and mine:
                row["ratio"][k] = mine / theirs if kind == "rate" else theirs / mine
        count = flops.get(key, {}).get("flops")
        if count:
            row["gflop"] = count / 1e9
            row["tflops_achieved"] = {k: count / v / 1e12 for k, v in values.items() if v}
            row["fraction_of_peak"] = {k: row["tflops_achieved"][k] / peaks[k]["tflops"]
                                       for k in row["tflops_achieved"] if peaks.get(k)}
        rows.append(row)
    return {"columns": list(impls), "rows": rows,
            "ratio": "diffusers / ours for times and memory, ours / diffusers for it/s: above 1, ours is better"}


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        return f"{value:.2f} it/s"
    if kind == "memory":
        return f"{value:,.0f}"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def render_markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    impls = results["implementations"]
    table = results["table"]
    machine = results["machine"]
    cpu = machine["cpu"]
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "no GPU"
    versions = results["versions"]
    calls = next((v.get("unet_calls") for v in impls.values() if v.get("unet_calls")), None)
    lines = [
        f"### BLIP-Diffusion{' + ControlNet' if s['controlnet'] else ''}: {s['height']}x{s['width']}, "
        f"{s['steps']} steps ({s['scheduler']}{f', {calls} UNet calls' if calls else ''}), guidance {s['guidance']:g}, "
        f"batch {s['batch']}, {s['precision']}",
        "",
        f"{cpu['model']} ({cpu['usable_cores']} cores usable), {machine.get('ram_gb')} GB RAM, {gpus}; "
        f"onnxruntime {versions.get('onnxruntime') or versions.get('onnxruntime-gpu')}, torch {versions.get('torch', '–')}, "
        f"diffusers {versions.get('diffusers', '–')}. p50 of {s['runs']} runs after {s['warmup']} warm-up "
        f"(single stages: {s['stage_runs']} calls); p90/p99/mean in bench.json. Threads: "
        f"{s['threads'] or 'library defaults'}"
        + (f" (torch {impls[DIFFUSERS]['torch_threads']})" if impls.get(DIFFUSERS, {}).get("torch_threads") else "") + "."
        + _runtime_options_text(s.get("runtime_options")),
        "",
    ]
    ours = [k for k in impls if k != DIFFUSERS]
    header = ["stage", "GFLOP"]
    if DIFFUSERS in impls:
        header.append(impls[DIFFUSERS].get("label", DIFFUSERS))
    for k in ours:
        header.append(impls[k].get("label", k))
        if DIFFUSERS in impls:
            header.append(f"× ({k})")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in table["rows"]:
        cells = [row["label"], f"{row['gflop']:.3g}" if row.get("gflop") else ""]
        if DIFFUSERS in impls:
            cells.append(_fmt(row["values"].get(DIFFUSERS), row["kind"]))
        for k in ours:
            cells.append(_fmt(row["values"].get(k), row["kind"]))
            if DIFFUSERS in impls:
                ratio = row["ratio"].get(k)
                cells.append(f"{ratio:.2f}" if ratio else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"×: {table['ratio']}. Single calls replay the exact inputs of a generation (UNet and "
              "ControlNet at the guidance batch); host overhead per step = (denoising loop − UNet/ControlNet "
              "time) / UNet calls, so it includes the scheduler step; it/s counts UNet calls."]

    flop_rows = [r for r in table["rows"] if r.get("tflops_achieved")]
    if flop_rows:
        peaks = results.get("peak_tflops", {})
        lines += ["", "Achieved TFLOP/s (FLOPs from the ONNX graphs at these shapes, 2 x MACs of Conv/MatMul/Gemm/Einsum)"
                  + (" and fraction of the device's peak" if any(peaks.values()) else "; no device peak known, "
                     "pass --peak-tflops for the fraction of the physical floor") + ":", ""]
        header = ["stage", "GFLOP"] + [impls[k].get("label", k) for k in impls]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in flop_rows:
            cells = [row["label"], f"{row['gflop']:.3g}"]
            for k in impls:
                achieved = row["tflops_achieved"].get(k)
                frac = row.get("fraction_of_peak", {}).get(k)
                cells.append("–" if achieved is None else f"{achieved:.3g}" + (f" ({frac:.1%})" if frac is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
        known = {k: v for k, v in peaks.items() if v}
        if known:
            lines += [""] + [f"- peak of {impls[k].get('label', k)}: {v['tflops']:g} TFLOP/s ({v['source']})" for k, v in known.items()]
    notes = []
    for k in ours:
        diff = impls[k].get("max_abs_image_diff_vs_diffusers")
        if diff is not None:
            notes.append(f"max |image difference| {impls[k].get('label', k)} vs diffusers: {diff:.2e} (image in [0, 1])")
    for k, v in impls.items():
        if "error" in v:
            notes.append(f"{v.get('label', k)} failed: {v['error']}")
        elif (v.get("cold_start") or {}).get("error"):
            notes.append(f"{v.get('label', k)} cold start failed: {v['cold_start']['error']}")
    load = machine.get("load_average_at_start")
    if load and cpu.get("usable_cores") and load[0] > 0.5 * cpu["usable_cores"]:
        notes.append(f"the machine was busy (load average {load[0]:.1f} at start on {cpu['usable_cores']} cores): "
                     "timings are noisy")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_chart(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    impls = results["implementations"]
    rows = [r for r in table["rows"] if r["kind"] == "time" and any(r["values"].values())]
    keys = [k for k in impls if any(r["values"].get(k) for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(1, len(rows)) * max(1, len(keys)) + 1.5))
    height = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ys = [j + i * height for j in range(len(rows))]
        xs = [r["values"].get(key) or 0.0 for r in rows]
        p90 = [_p90(impls[key], r["key"]) for r in rows]
        errors = [[0.0] * len(rows), [max(0.0, (q or x) - x) for q, x in zip(p90, xs)]]
        ax.barh(ys, [x * 1e3 for x in xs], height=height, label=impls[key].get("label", key),
                xerr=[[e * 1e3 for e in errors[0]], [e * 1e3 for e in errors[1]]], capsize=2)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax.set_yticklabels([r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale; bar: p50, whisker: p90)")
    s = results["settings"]
    ax.set_title(f"BLIP-Diffusion {s['height']}x{s['width']}, {s['steps']} steps, batch {s['batch']}, {s['precision']}")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _p90(impl: Mapping[str, Any], key: str) -> float | None:
    stat = impl.get("stages", {}).get(key) if key in COMPONENT_STAGES or key == "scheduler_step" else impl.get(key)
    return stat.get("p90") if isinstance(stat, dict) else None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = _child(json.loads(sys.argv[2]))
        print(CHILD_MARK + json.dumps(result), flush=True)
        sys.exit(0)
    sys.exit(main())
