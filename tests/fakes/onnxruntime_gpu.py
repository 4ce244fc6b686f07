"""A stand-in for the ``onnxruntime`` module of the ``onnxruntime-gpu`` 1.31.1 wheel (its Python API):
the calls the ``cuda`` and ``ort-tensorrt`` backends make, with "device memory" in host arrays and
the compute done by the real (CPU) ONNX Runtime on the same graph.

What it assumes of the real package, each as onnxruntime-gpu 1.31.1 behaves:

- ``get_available_providers()`` lists the TensorRT and CUDA providers on any machine (they are
  built in; whether they can start is only known when a session is created).
- ``preload_dlls()`` prints what it could not load and never raises.
- A session asking for the CUDA provider whose CUDA/cuDNN libraries are not loaded does not fail:
  the provider is dropped and the session runs on the CPU provider; ``get_providers()`` says so.
  The same for the TensorRT provider (it falls back to the next provider asked for) unless the
  libraries its ``libonnxruntime_providers_tensorrt.so`` links were loaded before (ELF NEEDED
  entries of the 1.31.1 wheel's library: ``libnvinfer.so.10``, ``libnvonnxparser.so.10``, and the
  CUDA provider's cuDNN/cuBLAS/cudart; no RUNPATH, so nothing else finds them); the plugin library
  ``libnvinfer_plugin.so.10`` is dlopened and may be absent ("Default plugin library is not on the
  path and is therefore ignored"). Here the CUDA libraries are "loaded" when
  :attr:`FakeGpu.cuda_libraries` is True and ``preload_dlls()`` ran; a TensorRT library when it is
  in :attr:`FakeGpu.tensorrt_libraries` (what can be found) and the backend loaded it
  (:attr:`FakeGpu.loaded_libraries`, kept by the test's loader).
- Provider options are strings; ``cudnn_conv_algo_search`` outside EXHAUSTIVE/HEURISTIC/DEFAULT is
  a session-creation error.
- ``enable_cuda_graph``: creating the session fails when a compute node would not run on the CUDA
  provider (here: graph files whose stem is in :attr:`FakeGpu.cpu_nodes`) or the graph has control
  flow (:attr:`FakeGpu.control_flow`), with the words of the 1.31.1 library (``strings`` of
  ``libonnxruntime.so.1.31.1``: "This session cannot use the graph capture feature as requested by
  the user  as all compute graph nodes have not been partitioned to the " + the provider's name;
  "... as the model has control flow nodes which can't be supported by " + the name), raised as
  ``[ONNXRuntimeError] : 1 : FAIL : ...``.
- Per ``gpu_graph_id`` run option (default 0; -1: a regular run), the first call of an id does
  everything inside that one call, as ``InferenceSession::Run`` in 1.31 does ("Start another run
  for necessary memory allocation or graph capture."): a regular run (the warm-up), the capture,
  a replay; recorded as one "capture" entry in :attr:`FakeGpu.runs`. Every later call replays:
  it reads the inputs and writes the outputs bound at capture, whatever is bound now. A capture
  with an input bound from host memory, or an output left to the session, fails (the copy would
  be captured with a stale host pointer); so does a capture of a graph whose stem is in
  :attr:`FakeGpu.capture_fails` (as a kernel that cannot be captured fails).
- ``OrtValue`` on "cuda": ``ortvalue_from_shape_and_type`` allocates (no copy),
  ``ortvalue_from_numpy`` and ``update_inplace`` copy host to device (same address afterwards),
  ``numpy()`` copies device to host; ``data_ptr()`` is the address.
- ``IOBinding``: ``bind_cpu_input`` copies host to device during each run; an output bound by
  device type gets fresh memory from the session each run; an output bound to an ``OrtValue``
  must have exactly the computed shape; ``copy_outputs_to_cpu()`` copies every output.

Every host/device copy, binding, session and run is counted in :class:`FakeGpu`.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

API_VERSION = "1.31.1"
CUDA_VERSION = "13.0"
CUDNN_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
TENSORRT_SONAMES = ("libnvinfer.so.10", "libnvonnxparser.so.10", "libnvinfer_plugin.so.10")
TENSORRT_NEEDED = ("libnvinfer.so.10", "libnvonnxparser.so.10")  # the provider library's NEEDED entries
CUDA_GRAPH_REFUSAL = ("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested "
                      "by the user  as all compute graph nodes have not been partitioned to the CUDAExecutionProvider")
CUDA_GRAPH_REFUSAL_CONTROL_FLOW = ("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as "
                                   "requested by the user as the model has control flow nodes which can't be supported "
                                   "by CUDAExecutionProvider")
CAPTURE_FAILURE = "CUDA failure 900: operation not permitted when stream is capturing"
_addresses = itertools.count(0x7F0000000000, 0x100000)


@dataclass
class FakeGpu:
    """The fake device's state and counters."""

    cuda_libraries: bool = True  # the CUDA/cuDNN libraries can be found by preload_dlls()
    tensorrt_libraries: set = field(default_factory=lambda: set(TENSORRT_SONAMES))  # the ones that can be found
    loaded_libraries: set = field(default_factory=set)  # sonames the backend loaded (the test's loader records them)
    cpu_nodes: set = field(default_factory=set)  # graph stems with a compute node ONNX Runtime puts on the CPU
    control_flow: set = field(default_factory=set)  # graph stems with control flow (If, Loop, Scan)
    capture_fails: set = field(default_factory=set)  # graph stems whose capture fails
    libraries_loaded: bool = False
    preload_calls: int = 0
    events: list = field(default_factory=list)  # ("preload_dlls",) / ("session", path) in call order
    sessions: list = field(default_factory=list)
    h2d: list = field(default_factory=list)  # (what, input name (bind_cpu_input) or device address, nbytes)
    d2h: list = field(default_factory=list)  # (what, nbytes)
    bound: dict = field(default_factory=dict)  # input name -> device addresses ever bound to it
    io_bindings: int = 0
    copy_outputs_calls: int = 0
    runs: list = field(default_factory=list)  # (graph stem, "regular" | "capture" | "replay", graph id)
    graphs_captured: int = 0

    def h2d_of(self, name: str) -> int:
        """Host-to-device copies of what input ``name`` read: bound from host memory, or copied
        into a device buffer that was bound to it."""
        addresses = self.bound.get(name, set())
        return sum(1 for _, where, _ in self.h2d if where == name or where in addresses)


@dataclass(frozen=True)
class NodeArg:
    """What ``InferenceSession.get_inputs()``/``get_outputs()`` return: name, type, shape."""

    name: str
    type: str
    shape: list


def onnx_tensor_type_name(elem_type: int) -> str:
    """ONNX Runtime's spelling of an ONNX element type: "float", "float16", "int64", ..."""
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower()


class OrtValue:
    """Device memory is a host array; the class is bound to one :class:`FakeGpu` (``_gpu``)."""

    _gpu: FakeGpu

    def __init__(self, array: np.ndarray, device: str = "cuda", device_id: int = 0):
        self._array, self._device, self._device_id = array, device, device_id
        self._ptr = next(_addresses)

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        value = cls(np.array(array, copy=True), device_type, device_id)
        if device_type == "cuda":
            cls._gpu.h2d.append(("ortvalue_from_numpy", value._ptr, value._array.nbytes))
        return value

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, element_type, device_type="cpu", device_id=0):
        return cls(np.zeros(tuple(shape), dtype=element_type), device_type, device_id)

    def update_inplace(self, array) -> None:
        array = np.asarray(array)
        if array.shape != self._array.shape or array.dtype != self._array.dtype:
            raise RuntimeError("update_inplace: shape or type differs from the OrtValue's")
        np.copyto(self._array, array)
        if self._device == "cuda":
            self._gpu.h2d.append(("update_inplace", self._ptr, array.nbytes))

    def numpy(self) -> np.ndarray:
        if self._device == "cuda":
            self._gpu.d2h.append(("numpy", self._array.nbytes))
        return self._array.copy()

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def data_ptr(self) -> int:
        return self._ptr

    def device_name(self) -> str:
        return self._device


class RunOptions:
    def __init__(self):
        self.entries: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


class IOBinding:
    def __init__(self, session: "InferenceSession"):
        self.session = session
        self.inputs: dict[str, tuple[str, Any]] = {}
        self.outputs: dict[str, tuple[str, Any]] = {}
        self.results: dict[str, OrtValue] = {}

    def bind_cpu_input(self, name, array):
        self.inputs[name] = ("host", np.asarray(array))

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = ("device", value)
        self.session.gpu.bound.setdefault(name, set()).add(value.data_ptr())

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.outputs[name] = ("allocate", device_type, device_id)

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = ("device", value)

    def clear_binding_inputs(self):
        self.inputs.clear()

    def clear_binding_outputs(self):
        self.outputs.clear()

    def synchronize_inputs(self):
        pass

    def synchronize_outputs(self):
        pass

    def get_outputs(self) -> list[OrtValue]:
        return [self.results[name] for name in self.session.output_names]

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        self.session.gpu.copy_outputs_calls += 1
        out = []
        for name in self.session.output_names:
            value = self.results[name]
            self.session.gpu.d2h.append(("copy_outputs_to_cpu", value._array.nbytes))
            out.append(value._array.copy())
        return out


class InferenceSession:
    def __init__(self, path, sess_options=None, providers=None, provider_options=None, *, _fake):
        gpu, real = _fake.gpu, _fake.real
        self._fake, self.gpu, self.path = _fake, gpu, Path(path)
        gpu.events.append(("session", self.path.name))
        self.requested = [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in (providers or [])]
        self.active: list[str] = []
        self.options: dict[str, dict[str, str]] = {}
        for name, options in self.requested:
            self.options[name] = {k: str(v) for k, v in options.items()}
            if name == "CUDAExecutionProvider":
                search = self.options[name].get("cudnn_conv_algo_search", "EXHAUSTIVE")
                if search not in CUDNN_SEARCHES:
                    raise RuntimeError(f"[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : cudnn_conv_algo_search {search}")
                if not gpu.libraries_loaded:
                    continue  # dropped silently
                if self.options[name].get("enable_cuda_graph") == "1":
                    if self.path.stem in gpu.cpu_nodes:
                        raise RuntimeError(CUDA_GRAPH_REFUSAL)
                    if self.path.stem in gpu.control_flow:
                        raise RuntimeError(CUDA_GRAPH_REFUSAL_CONTROL_FLOW)
                self.active.append(name)
            elif name == "TensorrtExecutionProvider":
                if gpu.libraries_loaded and set(TENSORRT_NEEDED) <= gpu.loaded_libraries:
                    self.active.append(name)
            elif name == "CPUExecutionProvider":
                self.active.append(name)
        if "CPUExecutionProvider" not in self.active:
            self.active.append("CPUExecutionProvider")
        self.cuda_graph = self.active[0] == "CUDAExecutionProvider" and \
            self.options["CUDAExecutionProvider"].get("enable_cuda_graph") == "1"
        self._real_module = real
        self._sess_options = sess_options
        self._real = None  # the real CPU session, made on the first run
        self._graph = None  # the ONNX graph without weights, read on the first get_inputs/get_outputs
        self.captured: dict[int, tuple[dict, dict]] = {}
        gpu.sessions.append(self)

    def get_providers(self) -> list[str]:
        return list(self.active)

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {name: dict(self.options.get(name, {})) for name in self.active}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.get_outputs()]

    def _session(self):
        if self._real is None:
            self._real = self._real_module.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return self._real

    def _graph_io(self, which: str) -> list[NodeArg]:
        """The graph's declared inputs or outputs, as the real session's ``NodeArg``s say them
        (type "tensor(float16)", dims as ints or dim_param names), read from the ONNX file without
        its weights: a real CPU session cannot be made for graphs whose contrib ops (NhwcConv,
        GroupNorm, ...) have CUDA kernels only, and the real GPU session answers this from the graph."""
        if self._graph is None:
            import onnx

            self._graph = onnx.load(str(self.path), load_external_data=False).graph
        args = []
        for value in getattr(self._graph, which):
            tensor = value.type.tensor_type
            dtype = onnx_tensor_type_name(tensor.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
            args.append(NodeArg(value.name, f"tensor({dtype})", dims))
        return args

    def get_inputs(self):
        return self._graph_io("input")

    def get_outputs(self):
        return self._graph_io("output")

    def io_binding(self) -> IOBinding:
        self.gpu.io_bindings += 1
        return IOBinding(self)

    def run(self, output_names, feed, run_options=None):
        return self._session().run(output_names, feed)

    def run_with_iobinding(self, binding: IOBinding, run_options: RunOptions | None = None) -> None:
        graph_id = int((run_options.entries if run_options else {}).get("gpu_graph_id", "0"))
        if self.cuda_graph and graph_id != -1:
            if graph_id in self.captured:  # replay: the addresses bound at capture, not the current binding
                inputs, outputs = self.captured[graph_id]
                self.gpu.runs.append((self.path.stem, "replay", graph_id))
                self._compute({k: v._array for k, v in inputs.items()}, outputs)
                return
            # the first call of this id: warm-up run, capture and replay, all in this call
            host = [name for name, (kind, _) in binding.inputs.items() if kind == "host"]
            allocated = [name for name, entry in binding.outputs.items() if entry[0] != "device"]
            if host or allocated:
                raise RuntimeError(f"CUDA graph capture with host-bound inputs {host} or unbound outputs {allocated}")
            if self.path.stem in self.gpu.capture_fails:
                raise RuntimeError(CAPTURE_FAILURE)
            self.captured[graph_id] = ({k: v for k, (_, v) in binding.inputs.items()},
                                       {k: entry[1] for k, entry in binding.outputs.items()})
            self.gpu.graphs_captured += 1
            self.gpu.runs.append((self.path.stem, "capture", graph_id))
        else:
            self.gpu.runs.append((self.path.stem, "regular", -1))
        feed = {}
        for name, (kind, value) in binding.inputs.items():
            if kind == "host":
                self.gpu.h2d.append(("bind_cpu_input", name, value.nbytes))
                feed[name] = value
            else:
                feed[name] = value._array
        outputs = {}
        for name in self.output_names:
            kind, value = binding.outputs.get(name, ("allocate", "cpu"))[:2]
            outputs[name] = value if kind == "device" else None
        binding.results = self._compute(feed, outputs)

    def _compute(self, feed: dict[str, np.ndarray], outputs: dict[str, Any]) -> dict[str, OrtValue]:
        wanted = {i.name for i in self._session().get_inputs()}
        values = self._session().run(None, {k: v for k, v in feed.items() if k in wanted})
        results = {}
        for name, array in zip(self.output_names, values):
            target = outputs.get(name)
            if target is None:
                results[name] = self._fake.OrtValue(array.copy(), "cuda")
                continue
            if tuple(target._array.shape) != array.shape:
                raise RuntimeError(f"[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : output {name} bound with shape "
                                   f"{list(target._array.shape)}, the graph computes {list(array.shape)}")
            np.copyto(target._array, array)
            results[name] = target
        return results


def make_fake_onnxruntime_gpu(real, gpu: FakeGpu | None = None) -> types.ModuleType:
    """The fake ``onnxruntime`` module over the real (CPU) one, with its device state in ``.gpu``."""
    fake = types.ModuleType("onnxruntime")
    fake.__version__ = API_VERSION
    fake.__file__ = str(Path("/nonexistent/onnxruntime/__init__.py"))
    fake.gpu = gpu or FakeGpu()
    fake.real = real
    fake.SessionOptions = real.SessionOptions
    fake.GraphOptimizationLevel = real.GraphOptimizationLevel
    fake.RunOptions = RunOptions
    fake.OrtValue = type("OrtValue", (OrtValue,), {"_gpu": fake.gpu})

    def session(path, sess_options=None, providers=None, provider_options=None):
        return InferenceSession(path, sess_options, providers, provider_options, _fake=fake)

    fake.InferenceSession = session

    def preload_dlls(cuda=True, cudnn=True, msvc=True, directory=None):
        fake.gpu.preload_calls += 1
        fake.gpu.events.append(("preload_dlls",))
        if fake.gpu.cuda_libraries:
            fake.gpu.libraries_loaded = True
        else:
            print("Failed to load libcudart.so.13: libcudart.so.13: cannot open shared object file")

    fake.preload_dlls = preload_dlls
    fake.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    fake.build_and_package_info = types.SimpleNamespace(cuda_version=CUDA_VERSION)
    return fake
