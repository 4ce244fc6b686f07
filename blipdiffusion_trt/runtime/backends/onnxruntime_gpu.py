"""ONNX Runtime's GPU backends: ``cuda`` (the CUDA provider) and ``ort-tensorrt`` (the TensorRT
provider, the CUDA provider for what TensorRT does not take).

Both drive the session through one IO binding per engine, reused for every call:

- inputs: a device value (``OrtValue``: another engine's kept output, or :meth:`~OnnxRuntimeGpuEngine.upload`)
  is bound as it is; a host array is copied once, by ONNX Runtime during the run
  (``bind_cpu_input``), or into this engine's own device buffer for a CUDA-graph run;
- outputs: preallocated on the device per output shape (the shapes come from the component's
  declaration: :meth:`~blipdiffusion_trt.components.ComponentSpec.output_shapes`), copied to the
  host with one ``copy_outputs_to_cpu()`` per call unless kept on the device (``keep``);
- CUDA graphs (``cuda``, ``cuda_graph="loop"``): the UNet and ControlNet sessions are created with
  ``enable_cuda_graph``. They run every denoising step at one shape per generation, every compute
  node of their graphs has a CUDA kernel (the CUDA-fused graphs' contrib ops included) and they
  have no control flow, so ONNX Runtime captures them; the once-per-generation components (text
  encoders, Q-Former, VAE decoder) would replay a graph at most once per generation and are run
  eagerly. One graph per input shape and device-input address (``gpu_graph_id``). ONNX Runtime
  1.31 captures inside the first call of an id: that call runs the graph regularly (its warm-up,
  for the memory allocations), captures it and replays it ("Start another run for necessary
  memory allocation or graph capture"); every later call of the id replays, reading and writing
  the addresses bound at capture: which is why host inputs go through this engine's own buffers.
  A session ONNX Runtime refuses to capture (a compute node not on the CUDA provider, or control
  flow), or a capture that fails, runs eagerly instead, with a warning.

The CUDA and cuDNN libraries are loaded before the first session (:mod:`.ort_install`): without
them ONNX Runtime silently runs the session on the CPU, which :meth:`_check_providers` turns into
one line naming what is missing. The ``cuda`` backend loads the package's CUDA-fused fp16 graphs
(``onnx/fp16-cuda``, ``blipdiffusion-trt fuse --target cuda``) where it has them.

``ort-tensorrt``: fp16 from the fp16 graph (``trt_fp16_enable``), one optimization profile over the
declared axis ranges (``trt_profile_*_shapes``, :mod:`blipdiffusion_trt.engines.profiles`), so a
new shape never rebuilds the engine, and the provider's engines and timing cache in the per-user
cache folder (:func:`blipdiffusion_trt.package.layout.user_cache_dir`), never inside the package.
The PyPI ``onnxruntime-gpu`` 1.31 TensorRT provider links ``libnvinfer.so.10`` (TensorRT 10), not
the TensorRT 11 the ``tensorrt`` backend may use; without that library ONNX Runtime silently drops
the provider, which is reported the same way.

Latents stay on the host: the scheduler is numpy (the runtime never imports torch or a GPU array
library), and a step moves the latents and the noise prediction once each way (tens of KB at
512x512), which costs microseconds next to a UNet call.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...components import ComponentSpec
from ...engines.profiles import component_profiles
from ...errors import EngineError, InputError, first_line
from ...package import ModelPackage, layout
from . import ort_install
from ..engine import Engine
from .ort_install import ensure_cuda_libraries, ensure_tensorrt_library, require_onnxruntime
from .base import Backend, Capabilities, option
from .onnxruntime import LOOP_COMPONENTS, OnnxRuntimeEngine, OnnxRuntimeOptions, provider_available, provider_name

logger = logging.getLogger(__name__)

# cuDNN's convolution algorithm choice per new shape. HEURISTIC: instant; EXHAUSTIVE (ONNX
# Runtime's own default) times every algorithm on the first call of each shape: seconds per shape,
# sometimes faster kernels afterwards; worth it for a server running one size.
CUDNN_CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
# Which sessions run under CUDA graphs: "loop" (UNet, ControlNet) or "none".
CUDA_GRAPH_POLICIES = ("loop", "none")
# CUDA graphs kept per engine (one per input shape and device-input address); further ones run eagerly.
MAX_CUDA_GRAPHS = 4
# Preallocated output sets kept per engine (one per output shape).
MAX_OUTPUT_SETS = 8
_NO_GRAPH = -1  # ONNX Runtime's gpu_graph_id for a regular run in a CUDA-graph session
# How ONNX Runtime words its refusal to capture a session, when the session is created. 1.31:
# "This session cannot use the graph capture feature as requested by the user  as all compute graph
# nodes have not been partitioned to the CUDAExecutionProvider" (or "... as the model has control
# flow nodes which can't be supported by CUDAExecutionProvider"); earlier releases: "... cannot use
# the CUDA Graph feature ...".
CUDA_GRAPH_REFUSALS = ("cannot use the graph capture feature", "cannot use the CUDA Graph feature")


@dataclass(frozen=True)
class OnnxRuntimeGpuOptions(OnnxRuntimeOptions):
    """:class:`OnnxRuntimeOptions` plus the GPU providers' own.

    ``device_id``: the GPU. ``use_tf32``: let fp32 matrix products and convolutions use TF32 (off:
    fp32 results match the CPU's to ~1e-6 relative, not ~1e-3). ``cudnn_conv_algo_search``
    (:data:`CUDNN_CONV_ALGO_SEARCHES`). ``prefer_nhwc``: the CUDA provider's channels-last layout
    for the plain graphs' convolutions (the CUDA-fused graphs already hold NHWC convolutions).
    ``cuda_graph`` (:data:`CUDA_GRAPH_POLICIES`): "loop" captures the UNet and ControlNet in CUDA
    graphs (``cuda`` backend only). ``cuda_fused``: load the package's CUDA-fused fp16 graphs where
    it has them (``cuda`` backend, fp16). ``cache_dir``: root of the TensorRT provider's engine and
    timing caches (default: the per-user cache folder). ``provider_options``: any other provider
    option, as ONNX Runtime spells it, applied last (e.g. ``{"cudnn_conv_use_max_workspace": "0"}``).
    """

    device_id: int = option(0, flag="--device-id", type=int, help="the GPU")
    use_tf32: bool = option(False, help="fp32 matrix products and convolutions in TF32")
    cudnn_conv_algo_search: str = option(
        "HEURISTIC", flag="--cudnn-conv-algo-search", choices=CUDNN_CONV_ALGO_SEARCHES,
        help="cuDNN's convolution algorithm search (EXHAUSTIVE: seconds on the first call of each size, for servers)")
    prefer_nhwc: bool = option(False, help="the CUDA provider's channels-last convolutions (plain graphs)")
    cuda_graph: str = option(
        "loop", flag="--cuda-graph", choices=CUDA_GRAPH_POLICIES,
        help="run the UNet and ControlNet under CUDA graphs (loop) or not (none); cuda backend only")
    cuda_fused: bool = option(True, help="load the package's CUDA-fused fp16 graphs where it has them")
    cache_dir: str | Path | None = option(None, help="root of the TensorRT provider's engine and timing caches")
    provider_options: Mapping[str, Any] = option(default_factory=dict,
                                                 help="any other provider option, as ONNX Runtime spells it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise InputError(f"device_id must be an integer >= 0, got {self.device_id!r}", field="device_id")
        for name in ("use_tf32", "prefer_nhwc", "cuda_fused"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}", field=name)
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCHES:
            raise InputError(f"cudnn_conv_algo_search must be one of {', '.join(CUDNN_CONV_ALGO_SEARCHES)}, "
                             f"got {self.cudnn_conv_algo_search!r}", field="cudnn_conv_algo_search")
        if self.cuda_graph not in CUDA_GRAPH_POLICIES:
            raise InputError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH_POLICIES)}, got {self.cuda_graph!r}",
                             field="cuda_graph")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise InputError(f"cache_dir must be a directory path or None, got {type(self.cache_dir).__name__}",
                             field="cache_dir")
        if not isinstance(self.provider_options, Mapping):
            raise InputError(f"provider_options must be a mapping, got {type(self.provider_options).__name__}",
                             field="provider_options")

    def uses_cuda_graph(self, component: str) -> bool:
        return self.cuda_graph == "loop" and component in LOOP_COMPONENTS

    def cuda_provider_options(self, *, cuda_graph: bool = False) -> dict[str, str]:
        """The CUDA provider's options, as the strings ONNX Runtime parses."""
        values = {
            "device_id": str(self.device_id),
            "use_tf32": "1" if self.use_tf32 else "0",
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            # grow the memory arena by what is asked, not to the next power of two (as ONNX Runtime's
            # Stable Diffusion demo does): the UNet's activations would otherwise reserve up to twice
            "arena_extend_strategy": "kSameAsRequested",
            "enable_cuda_graph": "1" if cuda_graph else "0",
        }
        if self.prefer_nhwc:  # named only when asked for (ONNX Runtime's default is off)
            values["prefer_nhwc"] = "1"
        return {**values, **{k: str(v) for k, v in self.provider_options.items()}}

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else layout.user_cache_dir()


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------

class OnnxRuntimeGpuEngine(OnnxRuntimeEngine):
    """One component on a GPU provider, through one reused IO binding (see the module docstring).

    ``cuda_graph``: run this component under CUDA graphs (eagerly when ONNX Runtime refuses).
    ``diagnose()``: why the first provider may not have started (missing libraries), for the error.
    """

    def __init__(self, spec: ComponentSpec, path: Path, options: OnnxRuntimeGpuOptions, *, providers: Sequence,
                 cuda_graph: bool = False, diagnose: Callable[[], str] | None = None):
        self.device_id = options.device_id
        self.cuda_graph = cuda_graph  # runs under CUDA graphs now
        self._graph_session = cuda_graph  # the session was created with enable_cuda_graph
        self._diagnose = diagnose or (lambda: "")
        super().__init__(spec, path, options, providers=providers, optimized_cache=False)
        self._binding = self.session.io_binding()  # one per engine: rebinding replaces, nothing accumulates
        self._bound: dict[str, Any] = {}  # name -> the OrtValue bound now (kept alive; rebinding it is skipped)
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._buffers: dict[tuple, Any] = {}  # (use, input name, shape, dtype) -> this engine's device buffer
        self._outputs: OrderedDict[tuple, dict[str, Any]] = OrderedDict()  # output shapes -> preallocated outputs
        self._graph_ids: dict[tuple, int] = {}
        self._graph_runs: dict[int, int] = {}
        self._run_options: dict[int, Any] = {}

    # -- session ---------------------------------------------------------------------------------

    def _create_session(self, ort, source: Path, session_options, providers: list):
        try:
            return ort.InferenceSession(str(source), session_options, providers=providers)
        except Exception as error:  # ORT raises its own exception types; the user needs one line
            if not (self.cuda_graph and any(refusal in str(error) for refusal in CUDA_GRAPH_REFUSALS)):
                raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({first_line(error)})") from None
            logger.warning("%s: ONNX Runtime refuses CUDA graphs for this graph (%s); running it without",
                           self.spec.name, first_line(error))
        self.cuda_graph = self._graph_session = False
        eager = [(name, {**opts, "enable_cuda_graph": "0"}) if name == "CUDAExecutionProvider" else (name, opts)
                 for name, opts in (p if not isinstance(p, str) else (p, {}) for p in providers)]
        return super()._create_session(ort, source, session_options, eager)

    def _check_providers(self, providers: list) -> None:
        wanted = provider_name(providers[0])
        active = self.session.get_providers()
        if not active or active[0] != wanted:
            why = self._diagnose()
            raise EngineError(f"{self.path}: {wanted} did not start and ONNX Runtime fell back to "
                              f"{active[0] if active else 'nothing'}{'; ' + why if why else ''}")

    # -- calls -----------------------------------------------------------------------------------

    def upload(self, name: str, value: Any) -> Any:
        ort = self._ort
        if isinstance(value, ort.OrtValue):
            return value
        return self._buffer("upload", name, self._host_array(name, value))

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        self.check_open()
        ort = self._ort
        host: dict[str, np.ndarray] = {}
        device: dict[str, Any] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.input_names:
            if name not in feed:
                raise InputError(f"{self.spec.name}: input {name} is missing")
            value = feed[name]
            if isinstance(value, ort.OrtValue):
                device[name] = value
                shapes[name] = tuple(value.shape())
            else:
                host[name] = self._host_array(name, value)
                shapes[name] = host[name].shape
        graph_id = self._graph_id(tuple((n, shapes[n], device[n].data_ptr() if n in device else None)
                                        for n in self.input_names))
        for name, array in host.items():
            if graph_id is None:
                self._binding.bind_cpu_input(name, array)  # copied to the device once, during the run
                self._bound.pop(name, None)
            else:  # a captured graph reads the addresses bound at capture: this engine's own buffers
                self._bind_input(name, self._buffer("input", name, array))
        for name, value in device.items():
            self._bind_input(name, value)
        outputs = self._output_buffers(shapes)
        for name in self.output_names:
            if outputs is None:
                self._binding.bind_output(name, "cuda", self.device_id)
                self._bound.pop(f"output:{name}", None)
            elif self._bound.get(f"output:{name}") is not outputs[name]:
                self._binding.bind_ortvalue_output(name, outputs[name])
                self._bound[f"output:{name}"] = outputs[name]
        self._run(graph_id)
        if not any(name in keep for name in self.output_names):
            return dict(zip(self.output_names, self._binding.copy_outputs_to_cpu()))  # one call for all outputs
        values = self._binding.get_outputs()
        return {name: (v if name in keep else v.numpy()) for name, v in zip(self.output_names, values)}

    def _host_array(self, name: str, value: Any) -> np.ndarray:
        dtype = self._dtypes.get(name)
        if dtype is None:
            raise InputError(f"{self.spec.name}: no input named {name} (inputs: {', '.join(self.input_names)})")
        return np.ascontiguousarray(value, dtype=dtype)

    def _buffer(self, use: str, name: str, array: np.ndarray):
        """This engine's device buffer for ``use`` ("upload" or "input") of input ``name`` at the
        array's shape, holding a copy of ``array`` (one host-to-device copy, same address every time)."""
        key = (use, name, array.shape, array.dtype.str)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(array.shape), array.dtype.type, "cuda", self.device_id)
        buffer.update_inplace(array)
        return buffer

    def _bind_input(self, name: str, value) -> None:
        if self._bound.get(name) is not value:
            self._binding.bind_ortvalue_input(name, value)
            self._bound[name] = value

    def _output_buffers(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """The preallocated outputs for these input shapes (None when the declaration does not fix
        an output's shape: ONNX Runtime then allocates it)."""
        out_shapes = self.spec.output_shapes(shapes)
        if out_shapes is None:
            return None
        key = tuple(out_shapes[name] for name in self.output_names)
        outputs = self._outputs.get(key)
        if outputs is None:
            outputs = {t.name: self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(out_shapes[t.name]), np.dtype(t.dtype).type, "cuda", self.device_id) for t in self.spec.outputs}
            self._outputs[key] = outputs
            while len(self._outputs) > MAX_OUTPUT_SETS:
                self._outputs.popitem(last=False)
        else:
            self._outputs.move_to_end(key)
        return outputs

    def _graph_id(self, key: tuple) -> int | None:
        if not self.cuda_graph:
            return None
        graph_id = self._graph_ids.get(key)
        if graph_id is None:
            if len(self._graph_ids) >= MAX_CUDA_GRAPHS:
                logger.info("%s: %d CUDA graphs captured already; this shape runs eagerly", self.spec.name,
                            MAX_CUDA_GRAPHS)
                return None
            graph_id = self._graph_ids[key] = len(self._graph_ids)
        return graph_id

    def _options_for(self, graph_id: int):
        options = self._run_options.get(graph_id)
        if options is None:
            options = self._run_options[graph_id] = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _run(self, graph_id: int | None) -> None:
        # in a CUDA-graph session every run names its graph (no id means graph 0): -1 for a regular run
        run_options = self._options_for(_NO_GRAPH if graph_id is None else graph_id) if self._graph_session else None
        try:
            self.session.run_with_iobinding(self._binding, run_options)
        except Exception as error:  # ORT raises its own exception types; the user needs one line
            if graph_id is None or self._graph_runs.get(graph_id, 0) >= 1:
                raise EngineError(f"{self.spec.name}: ONNX Runtime failed ({first_line(error)})") from None
            # the first call of an id (warm-up, capture, replay) failed: eager from now on
            logger.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.spec.name,
                           first_line(error))
            self.cuda_graph = False
            try:
                self.session.run_with_iobinding(self._binding, self._options_for(_NO_GRAPH))
            except Exception as again:
                raise EngineError(f"{self.spec.name}: ONNX Runtime failed ({first_line(again)})") from None
            return
        if graph_id is not None:
            self._graph_runs[graph_id] = self._graph_runs.get(graph_id, 0) + 1

    @property
    def cuda_graphs_captured(self) -> int:
        """How many CUDA graphs this engine has captured: ONNX Runtime 1.31 captures in the first
        call of each graph id, so every id whose first call succeeded (0 once it runs eagerly)."""
        return sum(1 for runs in self._graph_runs.values() if runs >= 1) if self.cuda_graph else 0

    def close(self) -> None:
        self._binding = None
        self._bound, self._buffers, self._outputs = {}, {}, OrderedDict()
        super().close()


# ------------------------------------------------------------------------------------------------
# Factories: (package, component, precision, options) -> Engine
# ------------------------------------------------------------------------------------------------

def cuda_providers(options: OnnxRuntimeGpuOptions, component: str = "") -> list:
    return [("CUDAExecutionProvider", options.cuda_provider_options(cuda_graph=options.uses_cuda_graph(component)))]


def make_cuda_engine(package: ModelPackage, component: str, precision: str, options: OnnxRuntimeGpuOptions) -> Engine:
    """The CUDA provider on the CUDA-fused fp16 graph where the package has one, else the plain graph."""
    ort = require_onnxruntime(["CUDAExecutionProvider"])
    libraries = ensure_cuda_libraries(ort)  # before the first CUDA session of this process
    fused = options.cuda_fused and precision == "fp16" and package.has_cuda_fused(component)
    path = package.onnx_path(component, precision, cuda_fused=fused)
    return OnnxRuntimeGpuEngine(package.specs[component], path, options, providers=cuda_providers(options, component),
                                cuda_graph=options.uses_cuda_graph(component),
                                diagnose=lambda: _why_cuda_did_not_start(libraries))


def _why_cuda_did_not_start(libraries) -> str:
    if libraries.missing:
        return f"CUDA/cuDNN libraries {libraries.describe()}; pip install 'blipdiffusion-trt[gpu]'"
    if ort_install.cuda_device_count() == 0:
        return f"no GPU visible to the CUDA driver (libcuda.so.1); {libraries.describe()}"
    return libraries.describe()


def tensorrt_profile_shapes(package: ModelPackage, component: str) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` over the declared axis ranges (dynamic inputs only), in
    the provider's ``name:d1xd2,...`` form: one engine for every size the package allows."""
    profile = component_profiles(package.config, "dynamic", components=[component])[component]
    dynamic = {t.name for t in package.specs[component].inputs if t.axes}
    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        out[key] = ",".join(f"{name}:{'x'.join(str(d) for d in shapes[i])}"
                            for name, shapes in profile.items() if name in dynamic)
    return out


def ort_tensorrt_providers(package: ModelPackage, component: str, precision: str, options: OnnxRuntimeGpuOptions) -> list:
    """The TensorRT provider (fp16 from the fp16 graph, a profile over the declared ranges, caches
    in the per-user cache folder), the CUDA provider for the rest."""
    digest = package.graph_sha256(component, precision)
    if digest is None:
        raise EngineError(f"{package.root}: {layout.graph_file(component, precision)} has no sha256 in the manifest; "
                          "re-export the package")
    engine_cache = layout.ort_trt_engine_cache(digest, options.cache_root)
    timing_cache = layout.ort_trt_timing_cache(options.cache_root)
    trt_options = {
        "device_id": str(options.device_id),
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(engine_cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(timing_cache),
        **tensorrt_profile_shapes(package, component),
        **{k: str(v) for k, v in options.provider_options.items()},
    }
    return [("TensorrtExecutionProvider", trt_options), ("CUDAExecutionProvider", options.cuda_provider_options())]


def make_ort_tensorrt_engine(package: ModelPackage, component: str, precision: str,
                             options: OnnxRuntimeGpuOptions) -> Engine:
    ort = require_onnxruntime(["TensorrtExecutionProvider"])
    libraries = ensure_cuda_libraries(ort)
    tensorrt = ensure_tensorrt_library(ort)
    providers = ort_tensorrt_providers(package, component, precision, options)
    trt_options = providers[0][1]
    for folder in (trt_options["trt_engine_cache_path"], trt_options["trt_timing_cache_path"]):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)  # the provider creates one level only
        except OSError as error:
            raise EngineError(f"TensorRT provider cache {folder}: not writable ({error.strerror}); "
                              "set cache_dir or BLIPDIFFUSION_TRT_CACHE") from None
    return OnnxRuntimeGpuEngine(package.specs[component], package.onnx_path(component, precision), options,
                                providers=providers,
                                diagnose=lambda: tensorrt.describe() if not tensorrt.loaded else libraries.describe())


def cuda_available() -> bool:
    """The CUDA provider is built in and the driver sees a GPU (the GPU wheel lists its providers anywhere)."""
    return provider_available("CUDAExecutionProvider")() and ort_install.cuda_device_count() > 0


def ort_tensorrt_available() -> bool:
    """As :func:`cuda_available`, and the TensorRT library the provider links can be loaded."""
    if not provider_available("TensorrtExecutionProvider")() or ort_install.cuda_device_count() == 0:
        return False
    import onnxruntime as ort

    return ort_install.find_tensorrt_library(ort).loaded


CUDA = Backend("cuda", "ONNX Runtime, CUDA provider with IO binding", OnnxRuntimeGpuOptions, make_cuda_engine,
               Capabilities(device_outputs=True, cuda_fused_graphs=True),
               device="cuda", is_available=cuda_available)
ORT_TENSORRT = Backend("ort-tensorrt", "ONNX Runtime, TensorRT execution provider", OnnxRuntimeGpuOptions,
                       make_ort_tensorrt_engine, Capabilities(device_outputs=True),
                       device="cuda", is_available=ort_tensorrt_available)

__all__ = ["CUDA", "CUDA_GRAPH_POLICIES", "CUDNN_CONV_ALGO_SEARCHES", "ORT_TENSORRT", "OnnxRuntimeGpuEngine",
           "OnnxRuntimeGpuOptions", "cuda_providers", "ort_tensorrt_providers", "tensorrt_profile_shapes"]
