"""The machine a benchmark runs on: CPU, RAM, GPUs, library versions, memory use, device peaks."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

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


def installed_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    from .. import __version__

    versions = {"blipdiffusion-trt": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "transformers",
                 "tokenizers", "tensorrt", "pillow", "matplotlib"):
        v = installed_version(dist)
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
        "simd": [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "avx2", "fma", "neon", "asimd")
                 if f in flags],
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


def rss_breakdown_mb() -> dict[str, float]:
    """This process's resident memory now, by kind (Linux): ``rss_anon_mb`` (heap, private) and
    ``rss_file_mb`` (memory-mapped files, e.g. weights mapped from a model file: page cache the
    kernel can reclaim, yet counted in the RSS and its peak). Empty where /proc is not there."""
    out = {}
    for line in _read("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[f"rss_{key[3:].lower()}_mb"] = int(value.split()[0]) / 1024.0
    return out



class GpuMemorySampler:
    """Peak GPU memory over a process's life, minus what the device held before it loaded anything:
    the same figure for every side of a benchmark, each measured in its own fresh process.

    The device's used memory from NVML (``nvidia-ml-py``), polled every ``interval`` seconds in a
    thread: it sees every allocator (ONNX Runtime's arenas, cuDNN/cuBLAS workspaces, torch's
    caching allocator, TensorRT, the CUDA context itself), which ``torch.cuda.max_memory_reserved``
    would not, and needs no per-process accounting (nvidia-smi shows none in some containers). The
    GPU must be otherwise idle for the figure to be this process's.
    """

    METHOD = "NVML device memory used: peak over the process minus before loading (fresh process, idle GPU)"

    def __init__(self, device_index: int = 0, interval: float = 0.01, nvml: Any = None) -> None:
        import threading

        self.device_index, self.interval, self._nvml = device_index, interval, nvml
        self.baseline = self.peak = 0.0
        self._read = None
        self._stop = threading.Event()
        self._thread = None
        self.problem: str | None = None

    def start(self) -> "GpuMemorySampler":
        import threading

        try:
            nvml = self._nvml
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._read = lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            self.baseline = self.peak = self._read()
        except Exception as error:  # noqa: BLE001 -- no NVML: no figure rather than a wrong one
            self.problem = f"NVML unavailable ({type(error).__name__}: {error}); pip install nvidia-ml-py"
            self._read = None
            return self
        self._thread = threading.Thread(target=self._poll, name="gpu-memory", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def stop(self) -> dict[str, Any]:
        """``{"mb", "method", "baseline_mb"}`` (``mb`` None without NVML, ``method`` then says why)."""
        if self._read is None:
            return {"mb": None, "method": self.problem, "baseline_mb": None}
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())
        return {"mb": round(self.peak - self.baseline, 1), "method": self.METHOD, "baseline_mb": round(self.baseline, 1)}


def native_bf16(cpu: Mapping[str, Any]) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX): where torch's and OpenVINO's bf16 pay off."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu.get("simd", [])))


def peak_tflops(device: str, gpu_name: str | None, precision: str, cpu: Mapping[str, Any],
                threads: int | None, override: str | None) -> dict[str, Any] | None:
    """Peak dense TFLOP/s of the device a row ran on, in the precision it computed in ("fp32",
    "fp16", "bf16"), with where the number comes from."""
    kind = "gpu" if device != "cpu" else "cpu"
    if override:
        parts = [p.strip() for p in override.split(",") if p.strip()]
        if len(parts) == 1 and "=" not in parts[0]:
            return {"tflops": float(parts[0]), "source": "--peak-tflops"}
        given = {key.strip(): value for key, _, value in (part.partition("=") for part in parts)}
        for key in (f"{kind}-{precision}", kind):  # "cpu-bf16=Y" before "cpu=X"
            if key in given:
                return {"tflops": float(given[key]), "source": f"--peak-tflops {key}"}
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
    what = "fp32"
    if precision == "bf16" and per_cycle:
        if "amx_bf16" in simd:
            return None  # AMX tiles: no simple per-core figure; pass --peak-tflops cpu-bf16=X
        if "avx512_bf16" in simd:  # VDPBF16PS: a pair of bf16 products per fp32 lane
            per_cycle, what = per_cycle * 2, "bf16 (AVX512-BF16)"
    cores = threads or cpu.get("physical_cores") or cpu.get("usable_cores")
    if ghz is None or per_cycle is None or not cores:
        return None
    return {"tflops": cores * ghz * per_cycle / 1000.0,
            "source": f"estimate: {cores} cores x {ghz} GHz x {per_cycle} {what} FLOP/cycle (nominal clock)"}
