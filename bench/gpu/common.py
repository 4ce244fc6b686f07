"""Shared by ``validate.py`` (the orchestrating process) and ``sides.py`` (one measured side per process).

A :class:`Mode` says where things run. ``gpu``: full-size random weights, our ``cuda`` backend on
fp16 graphs (the CUDA-fused ones where the package has them), diffusers fp16 on CUDA. ``dry-run``:
the same code on the CPU with a tiny checkpoint, our ``cpu`` backend on fp32 graphs and diffusers
fp32, so that the script is known to work before a GPU is at hand.

The workload is the benchmark's (:mod:`blipdiffusion_trt.bench.settings`: one ``Settings`` per
pipeline, the same prompts and seeded inputs on every side), and so are the statistics
(:mod:`blipdiffusion_trt.bench.stats`) and our runtime's call (:func:`blipdiffusion_trt.bench.ours.run_ours`).
This module imports only the standard library at import time: the side that measures our runtime
must never import torch (it would also take GPU memory for torch's CUDA context).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.gpu")


@dataclass(frozen=True)
class Mode:
    name: str  # "gpu" or "dry-run"
    size: str  # random-checkpoint architecture: "full" or "tiny"
    device: str  # torch device of the references and of diffusers: "cuda" or "cpu"
    backend: str  # our runtime's backend: "cuda" or "cpu"
    precision: str  # our graphs: "fp16" or "fp32"
    diffusers_precision: str  # the benchmark's name of diffusers' torch dtype: "fp16" or "fp32"
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # our cuda backend's cuDNN convolution algorithm search
    cuda_graph: str = "loop"  # our cuda backend: the UNet and ControlNet under ONNX Runtime CUDA graphs

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


GPU = Mode("gpu", "full", "cuda", "cuda", "fp16", "fp16")
DRY_RUN = Mode("dry-run", "tiny", "cpu", "cpu", "fp32", "fp32")
SCHEDULER = "pndm"


def settings_of(*, height: int, width: int, steps: int, controlnet: bool, latent_shape, precision: str):
    """One pipeline's workload, as the benchmark declares it: batch 1, PNDM, guidance 7.5, seed 0."""
    from blipdiffusion_trt.bench.settings import Settings

    return Settings(height=height, width=width, steps=steps, batch=1, scheduler=SCHEDULER, guidance=7.5,
                    precision=precision, seed=0, controlnet=controlnet, latent_shape=tuple(latent_shape))


def settings_from_dict(data: dict[str, Any]):
    from blipdiffusion_trt.bench.settings import Settings

    return Settings(**{**data, "latent_shape": tuple(data["latent_shape"])})


# ------------------------------------------------------------------------------------------------
# Our runtime on the mode's backend
# ------------------------------------------------------------------------------------------------

def backend_options(mode: Mode):
    """Our backend's start-up options for the measured runs (the backend registry's options class).

    GPU: fp32 nodes (the Casts around the fp16 graphs) compute in fp32 (``use_tf32`` off), as the
    PyTorch references here do; cuDNN's algorithm search is the mode's (EXHAUSTIVE costs seconds on
    the first call of every new shape, which the warm-up absorbs); the UNet and ControlNet run under
    CUDA graphs (``cuda_graph``), the CUDA-fused graphs load where the package has them. Dry run:
    one thread (a shared CPU: steady, not fast) and the plain fp32 graphs.
    """
    from blipdiffusion_trt.runtime.backends import get_backend

    backend = get_backend(mode.backend)
    if mode.gpu:
        return backend.options(device_id=0, use_tf32=False, cudnn_conv_algo_search=mode.cudnn_conv_algo_search,
                               cuda_graph=mode.cuda_graph, cuda_fused=True)
    return backend.options(threads=1, cpu_fused=False)


def make_engine(package, name: str, mode: Mode):
    """One component's engine from the backend registry: the backend's factory picks the graph
    (on CUDA the CUDA-fused fp16 one where the package has it)."""
    from blipdiffusion_trt.runtime.backends import get_backend

    return get_backend(mode.backend).make_engine(package, name, mode.precision, backend_options(mode))


def graph_of(engine, package) -> str:
    """The package file an engine loaded (manifest name)."""
    return package.layout.name_of(engine.path)


def load_our_runtime(package_dir: Path, mode: Mode):
    """Our runtime with the mode's engines (one generation's components), no caches (as diffusers)."""
    from blipdiffusion_trt.components import generation_components
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    package = ModelPackage.open(package_dir)  # (the cuda backend loads the CUDA libraries before its first session)
    engines = {name: make_engine(package, name, mode) for name in generation_components(package.config)}
    # diffusers encodes the subject and the negative prompt every call; so do we here
    runtime = BlipDiffusionRuntime(package, engines, cache_size=0, negative_cache_size=0)
    return runtime, {name: graph_of(engine, package) for name, engine in engines.items()}


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------

def compare(got, expected) -> dict[str, Any]:
    """Cosine, max abs, relative L2 (float64) and finiteness of ``got`` against ``expected`` (lists of arrays)."""
    import numpy as np

    g = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in got])
    e = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in expected])
    finite = bool(np.isfinite(g).all())
    ng, ne = np.linalg.norm(g), np.linalg.norm(e)
    if not finite:
        cosine = float("nan")
    elif ng == 0 or ne == 0:
        cosine = 1.0 if ng == ne else 0.0
    else:
        cosine = float(g @ e / (ng * ne))
    diff = np.abs(g - e)
    return {"cosine": cosine, "max_abs": float(diff.max()) if diff.size else 0.0,
            "rel_l2": float(np.linalg.norm(g - e) / ne) if ne else float(ng), "finite": finite,
            "max_abs_reference": float(np.abs(e).max()) if e.size else 0.0}


def psnr(a, b) -> float:
    """PSNR (dB) of two images in [0, 1]; inf when identical."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------
# Memory, measured the same way for every side
# ------------------------------------------------------------------------------------------------

class MemorySampler:
    """Peak memory over a side's life, minus what was in use before it loaded anything.

    GPU: :class:`blipdiffusion_trt.bench.machine.GpuMemorySampler`, the benchmark's own figure
    (NVML device memory polled every 10 ms: ONNX Runtime's arena, cuDNN/cuBLAS workspaces, torch's
    caching allocator and CUDA contexts alike). Each side runs in its own process on an otherwise
    idle GPU, so the device figure is that process's. CPU (dry run): the process's peak RSS
    (VmHWM) minus its RSS at start.
    """

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self._gpu_sampler = None
        self.baseline = 0.0

    def start(self) -> "MemorySampler":
        if self.gpu:
            from blipdiffusion_trt.bench.machine import GpuMemorySampler

            self._gpu_sampler = GpuMemorySampler().start()
            if self._gpu_sampler.problem:
                logger.warning("GPU memory not measured: %s", self._gpu_sampler.problem)
        else:
            self.baseline = _rss_mb()
        return self

    def stop(self) -> dict[str, Any]:
        if self._gpu_sampler is not None:
            return self._gpu_sampler.stop()
        return {"mb": round(_peak_rss_mb() - self.baseline, 1), "method": "peak RSS (VmHWM) minus RSS at start",
                "baseline_mb": round(self.baseline, 1)}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def write_json(path: Path, data: Any) -> None:
    """Atomically (the benchmark's writer): a run killed at its time limit leaves the last
    complete results, never half a file."""
    from blipdiffusion_trt.bench.report import write_json as write_atomically

    write_atomically(path, data)


class Budget:
    """Wall-clock budget of the whole run: optional steps run only when their estimate still fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    @property
    def used(self) -> float:
        return time.monotonic() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.used

    def fits(self, estimate: float) -> bool:
        return self.left >= estimate
