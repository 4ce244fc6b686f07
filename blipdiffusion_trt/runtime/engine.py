"""Inference backends behind one small interface.

An :class:`Engine` runs one component: ``infer(feed, keep=())`` takes named inputs and returns
named outputs. Outputs named in ``keep`` may stay in the backend's own (device) memory and be fed
to another engine of the same backend as they are: that is how ControlNet residuals reach the
UNet without a round trip through the host on a GPU. On the CPU everything is numpy.

The pipeline picks the backend once, when the package is loaded; the denoising loop never asks
which backend it drives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..components import ComponentSpec
from ..errors import EngineError, InputError, first_line

logger = logging.getLogger(__name__)


class Engine(ABC):
    """One component's compiled graph: name-based inputs and outputs, and ``infer``."""

    spec: ComponentSpec

    @property
    def input_names(self) -> list[str]:
        return self.spec.input_names

    @property
    def output_names(self) -> list[str]:
        return self.spec.output_names

    @abstractmethod
    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        """Run once. Outputs in ``keep`` may be backend-native (device) values, the rest numpy."""


# ONNX Runtime graph optimisation. "all" adds the CPU layout transformations (NCHWc): measured on
# the full-size UNet at 256x256 on 2 cores, session creation 18.9 s vs 2.1 s for "extended", one
# UNet call 1.45 s vs 1.63 s. "all" pays off for servers and long runs, "extended" for one-shot
# generations with few steps.
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")

# Which sessions keep ONNX Runtime's CPU memory arena. An arena never returns memory, so each
# session holds its high-water mark for the life of the runtime. "loop" keeps it only for the
# components called every step (UNet, ControlNet: 16% slower calls without it at 512x512); the
# once-per-image ones free their activations after each call (VAE decoder at 512x512: 2.3 GB vs
# 1.3 GB peak, 0.8% slower). In a full-size 512x512 generation this took the cold-process peak
# from 12.1 to 11.8 GB: the UNet's attention buffers dominate, and the CPU-fused graphs are what
# shrink those (export/cpu_fusions.py). Measurements: bench/results/cpu-speed.
MEMORY_ARENAS = ("loop", "all", "none")
LOOP_COMPONENTS = frozenset({"unet", "unet_plain", "controlnet"})


def uses_memory_arena(component: str, policy: str) -> bool:
    if policy not in MEMORY_ARENAS:
        raise InputError(f"memory_arena must be one of {', '.join(MEMORY_ARENAS)}, got {policy!r}")
    return policy == "all" or (policy == "loop" and component in LOOP_COMPONENTS)


def ort_session_options(threads: int | None = None, graph_optimization: str = "all", memory_arena: bool = True):
    import onnxruntime as ort

    if graph_optimization not in GRAPH_OPTIMIZATIONS:
        raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}, got {graph_optimization!r}")
    level = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "disabled": "ORT_DISABLE_ALL"}
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level[graph_optimization])
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    return options


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def optimized_cache_path(cache_dir: Path, source: Path, graph_optimization: str) -> Path:
    """Where the optimised copy of ``source`` lives: keyed by the graph file, ORT and the CPU.

    "all"-level graphs hold CPU-specific layouts (NCHWc blocks sized to the SIMD width), so the
    key includes the CPU model; a changed graph file (size, mtime) gets a new entry.
    """
    import onnxruntime as ort

    stat = source.stat()
    key = "|".join([str(source.resolve()), str(stat.st_size), str(stat.st_mtime_ns), ort.__version__,
                    _cpu_model_name(), graph_optimization])
    return cache_dir / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the CPU: plain ``session.run`` on numpy arrays.

    With ``optimized_cache``, the session's optimised graph is saved there on first load and
    loaded as it is afterwards: measured on the full-size UNet, session creation 21.6 s the first
    time, 1.7 s from the cache, identical outputs and step time.
    """

    providers: tuple = ("CPUExecutionProvider",)
    # Graphs optimised for the CUDA/TensorRT providers are not saved: EP-specific nodes.
    supports_optimized_cache = True
    # The package's CPU-fused fp32 graphs (fused attention) are validated and measured on the CPU only.
    runs_cpu_fused_graphs = True

    def __init__(self, spec: ComponentSpec, path: Path, *, threads: int | None = None, graph_optimization: str = "all",
                 optimized_cache: str | Path | None = None, memory_arena: str = "loop", providers: Sequence | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.path = path
        providers = list(providers or self.providers)
        arena = uses_memory_arena(spec.name, memory_arena)
        options = ort_session_options(threads, graph_optimization, arena)
        source = Path(path)
        if optimized_cache is not None and self.supports_optimized_cache:
            source = self._cached_graph(Path(optimized_cache), source, options, providers, graph_optimization)
            options = ort_session_options(threads, "disabled", arena)
        self.loaded_from = source
        try:
            self.session = ort.InferenceSession(str(source), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types; the user needs one line
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({first_line(error)})") from None
        missing = [p if isinstance(p, str) else p[0] for p in providers]
        active = self.session.get_providers()
        if missing[0] not in active:
            raise EngineError(f"{path}: {missing[0]} is not available here (active: {', '.join(active)})")

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        outputs = self.session.run(None, {name: feed[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))

    @staticmethod
    def _cached_graph(cache_dir: Path, source: Path, options, providers, graph_optimization: str) -> Path:
        """The optimised graph from the cache, writing it first when missing (atomically)."""
        import onnxruntime as ort

        target = optimized_cache_path(cache_dir, source, graph_optimization)
        if target.is_file():
            return target
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
        except OSError as error:
            raise EngineError(f"optimized_cache {cache_dir}: not writable ({error.strerror})") from None
        try:
            options.optimized_model_filepath = str(scratch / target.name)
            data_name = target.name + ".data"
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            try:
                ort.InferenceSession(str(source), options, providers=providers)
            except Exception as error:  # ORT raises its own exception types; the user needs one line
                raise EngineError(f"{source}: ONNX Runtime cannot load it ({first_line(error)})") from None
            # data first: the graph names its data file, so a visible graph always has its data
            if (scratch / data_name).exists():
                os.replace(scratch / data_name, cache_dir / data_name)
            os.replace(scratch / target.name, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target


class OnnxRuntimeCudaEngine(OnnxRuntimeEngine):
    """ONNX Runtime with the CUDA provider and IO binding.

    Outputs stay on the GPU (as ``OrtValue``) when asked to be kept and are bound as they are
    when fed back; host inputs are copied once per call by ``bind_cpu_input``.
    """

    providers = ("CUDAExecutionProvider",)
    supports_optimized_cache = False
    runs_cpu_fused_graphs = False

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name in self.input_names:
            value = feed[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: (v if name in keep else v.numpy()) for name, v in zip(self.output_names, values)}


class OnnxRuntimeTensorRTEngine(OnnxRuntimeCudaEngine):
    """ONNX Runtime's TensorRT execution provider (CUDA for nodes TensorRT does not take).

    Engines are cached next to the package's graphs; fp16 comes from the fp16 graph.
    """

    def __init__(self, spec: ComponentSpec, path: Path, *, threads: int | None = None, graph_optimization: str = "all",
                 optimized_cache: str | Path | None = None, memory_arena: str = "loop", providers: Sequence | None = None):
        cache = path.parent.parent.parent / "engines" / "ort-trt"
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True}
        super().__init__(spec, path, threads=threads, graph_optimization=graph_optimization, memory_arena=memory_arena,
                         providers=providers or [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"])


def _tensorrt_engine(spec: ComponentSpec, path: Path, **kwargs) -> Engine:
    from .tensorrt_engine import tensorrt_engine_factory  # lazy: TensorRT and CUDA are optional

    return tensorrt_engine_factory(spec, path, **kwargs)


def _openvino_engine(spec: ComponentSpec, path: Path, **kwargs) -> Engine:
    from .openvino_engine import openvino_engine_factory  # lazy: OpenVINO is optional

    return openvino_engine_factory(spec, path, **kwargs)


_openvino_engine.takes_options = True  # OpenVINOOptions (from_package's ``options``)


# name -> (engine factory, description)
BACKENDS: dict[str, tuple[Callable[..., Engine], str]] = {
    "cpu": (OnnxRuntimeEngine, "ONNX Runtime, CPU"),
    "cuda": (OnnxRuntimeCudaEngine, "ONNX Runtime, CUDA provider with IO binding"),
    "ort-tensorrt": (OnnxRuntimeTensorRTEngine, "ONNX Runtime, TensorRT execution provider"),
    "tensorrt": (_tensorrt_engine, "TensorRT engines from `blipdiffusion-trt build` (needs --precision fp16)"),
    "openvino": (_openvino_engine, "OpenVINO, CPU: the fp32 graphs in bf16 where the CPU has it (--inference-precision)"),
}


def engine_factory(backend: str) -> Callable[..., Engine]:
    try:
        return BACKENDS[backend][0]
    except KeyError:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}") from None


def default_threads() -> int | None:
    value = os.environ.get("BLIPDIFFUSION_TRT_THREADS")
    return int(value) if value else None
