"""The running machine for TensorRT: the GPU, the TensorRT and cuda-python modules, a TensorRT logger.

TensorRT and cuda-python are imported when a function here is called, never at import time, and
their absence is one :class:`EngineError` line saying how to get them. Used by the builder
(:mod:`.build`) and the run-time TensorRT backend alike.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from ..errors import EngineError, first_line
from .plans import format_compute_capability

logger = logging.getLogger(__name__)

NOT_INSTALLED = "TensorRT is not installed: pip install .[trt] on a machine with an NVIDIA GPU, or use Dockerfile.trt"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


def parse_nvidia_smi(text: str, index: int = 0) -> GpuInfo:
    """A row of ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    rows = [r.strip() for r in text.strip().splitlines() if r.strip()]
    if not rows or index >= len(rows):
        raise ValueError(f"nvidia-smi listed {len(rows)} GPUs, wanted GPU {index}")
    name, _, cc = rows[index].rpartition(",")
    return GpuInfo(name.strip(), format_compute_capability(cc.strip()))


def _visible_index() -> int:
    """nvidia-smi ignores CUDA_VISIBLE_DEVICES; CUDA's device 0 is its first entry."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def gpu_info() -> GpuInfo:
    """Name and compute capability of the current CUDA device (cuda-python, else nvidia-smi)."""
    reasons = []
    try:
        cudart = import_cudart()
    except EngineError as error:
        reasons.append(f"cuda-python: {error}")
    else:
        err, device = cudart.cudaGetDevice()
        if _ok(cudart, err):
            err, props = cudart.cudaGetDeviceProperties(device)
        if _ok(cudart, err):
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return GpuInfo(name.split("\x00")[0].strip(), f"{props.major}.{props.minor}")
        reasons.append(f"cuda-python: {_error_name(err)}")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return parse_nvidia_smi(out.stdout, _visible_index())
        reasons.append(f"nvidia-smi: {(out.stderr or out.stdout).strip().splitlines()[0] if (out.stderr or out.stdout).strip() else out.returncode}")
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        reasons.append(f"nvidia-smi: {error}")
    raise EngineError(f"no usable NVIDIA GPU ({'; '.join(reasons)}); TensorRT engines are built and run on the GPU they are for")


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            raise EngineError("cuda-python is not installed: pip install .[trt]") from None
    return cudart


def _ok(cudart, err) -> bool:
    return err == cudart.cudaError_t.cudaSuccess


def _error_name(err) -> str:
    return getattr(err, "name", str(err))


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(NOT_INSTALLED) from None
    except Exception as error:  # a tensorrt stub wheel or missing libnvinfer raises other errors
        raise EngineError(f"{NOT_INSTALLED} (import failed: {first_line(error)})") from None
    if not hasattr(trt, "Builder"):
        raise EngineError(NOT_INSTALLED)
    return trt


def running_environment(trt=None) -> dict[str, str]:
    """``{"tensorrt_version", "compute_capability", "gpu_name"}`` of this process."""
    trt = trt or import_tensorrt()
    gpu = gpu_info()
    return {"tensorrt_version": str(trt.__version__), "compute_capability": gpu.compute_capability, "gpu_name": gpu.name}


def make_logger(trt):
    """An ``ILogger`` that keeps errors (for one-line messages) and forwards the rest to logging."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                logger.debug("TensorRT error: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.INFO:
                logger.debug("TensorRT: %s", msg)

        def last_error(self, default: str = "see the log above") -> str:
            return first_line(self.errors[-1]) if self.errors else default

    return _Logger()

