"""A stand-in for the ``tensorrt`` module: the builder's calls and the runtime's (deserialize,
execution context, name-based I/O, ``execute_async_v3``), as the Python bindings of exactly one of
two versions have them (:data:`TENSORRT_10`, :data:`TENSORRT_11`, the newest of each major on
PyPI, ``tensorrt-cu12-bindings``), with that version's enums:

- 10.16: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0`` (deprecated, ignored: networks are
  always explicit batch), ``STRONGLY_TYPED = 1``; ``BuilderFlag.FP16`` exists.
- 11.4: strongly typed networks only (weak typing removed, the flag is accepted and ignored):
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED = 0`` and no ``EXPLICIT_BATCH``; no
  ``BuilderFlag.FP16`` (removed in 11, NVIDIA's 10.x-to-11.x Python API migration guide).

The builder side checks what TensorRT would (every dynamic input has a profile shape of the right
rank, fixed dims agree, min <= opt <= max) and writes a JSON echo as the plan. The runtime side
deserializes that echo into an engine whose execution context runs the component's fp32 graph on
ONNX Runtime, reading inputs from and writing outputs to the (fake, host) device addresses of
:mod:`.cuda`.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path

import numpy as np

from helpers import onnx_inputs

from .cuda import FAKE_CUDA

TENSORRT_10 = "10.16.1.11"
TENSORRT_11 = "11.4.0.106"
FAKE_VERSION = TENSORRT_10
# The GPU the stand-ins report (tests patch ``engines.environment.gpu_info`` with it) and what a
# build on it records.
FAKE_GPU = ("Fake GPU 80GB", "8.6")
FAKE_RUNNING = {"tensorrt_version": FAKE_VERSION, "compute_capability": FAKE_GPU[1], "gpu_name": FAKE_GPU[0]}


def make_fake_tensorrt(version: str = FAKE_VERSION) -> types.ModuleType:
    """The calls build.py makes, with TensorRT's names, signatures and enum values of ``version``
    (:data:`TENSORRT_10` or :data:`TENSORRT_11`).

    ``build_serialized_network`` checks what TensorRT would: every dynamic input has a profile
    shape of the right rank, fixed dims agree, min <= opt <= max. The plan is a JSON echo.
    """
    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec callers (torch, diffusers)
    major = int(version.split(".")[0])
    if version not in (TENSORRT_10, TENSORRT_11):
        raise ValueError(f"the stand-in imitates TensorRT {TENSORRT_10} or {TENSORRT_11}, not {version}")
    trt.__version__ = version
    trt.calls = []

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        pass

    ILogger.Severity = Severity
    ILogger.__init__ = lambda self: None

    if major == 10:
        class NetworkDefinitionCreationFlag(enum.IntEnum):
            EXPLICIT_BATCH = 0
            STRONGLY_TYPED = 1

        class BuilderFlag(enum.IntEnum):
            FP16 = 0
            INT8 = 1
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4
    else:
        class NetworkDefinitionCreationFlag(enum.IntEnum):
            STRONGLY_TYPED = 0

        class BuilderFlag(enum.IntEnum):  # FP16, INT8, FP8, BF16, INT4, FP4 and the precision constraints: removed
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class IProgressMonitor:
        def __init__(self):
            pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.path = flags, [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            self.network.path = path
            for name, dims in onnx_inputs(Path(path)).items():
                self.network.inputs.append(Tensor(name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)))
            return True

        def get_error(self, i):
            return "no error"

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.profiles, self.pool, self.cache, self.progress_monitor = [], {}, None, None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def create_timing_cache(self, data):
            trt.calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch=False):
            self.cache = cache
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            strongly_typed = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            # 10: fp16 inside the graph needs a strongly typed network; 11: every network is one
            assert network.flags == strongly_typed if major == 10 else network.flags in (0, strongly_typed)
            shapes = config.profiles[0].shapes if config.profiles else {}
            for tensor in network.inputs:
                if -1 not in tensor.shape:
                    continue
                low, opt, high = shapes[tensor.name]
                assert len(low) == len(tensor.shape)
                for d, a, b, c in zip(tensor.shape, low, opt, high):
                    assert d == -1 or a == b == c == d
                    assert 1 <= a <= b <= c
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building", None, 2)
                config.progress_monitor.step_complete("Building", 0)
                config.progress_monitor.step_complete("Building", 1)
                config.progress_monitor.phase_finish("Building")
            trt.calls.append(("build", Path(network.path).name, dict(config.pool)))
            config.cache.data += b"+"  # builds add their timings to the attached cache
            echo = {"graph": Path(network.path).name, "path": str(network.path),
                    "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
            return json.dumps(echo).encode()

    for obj in (ILogger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, IProgressMonitor, OnnxParser,
                Builder):
        setattr(trt, obj.__name__, obj)
    _add_fake_runtime(trt)
    return trt


def _add_fake_runtime(trt: types.ModuleType) -> None:
    """``trt.Runtime`` for the stand-in plans: the execution context runs the component's fp32 graph
    on ONNX Runtime, reading inputs from and writing outputs to the (fake) device addresses."""
    import ctypes

    import onnxruntime as ort

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    np_types = {1: np.float32, 7: np.int64, 10: np.float16, 6: np.int32}

    class Engine:
        def __init__(self, echo):
            import onnx

            path = Path(echo["path"])
            self.graph32 = path.parent.parent / "fp32" / path.name
            model = onnx.load(str(path), load_external_data=False)
            self.io = []  # (name, mode, dtype, dims)
            for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
                for v in values:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                    self.io.append((v.name, mode, np.dtype(np_types[v.type.tensor_type.elem_type]), dims))
            self.profile = {k: tuple(tuple(x) for x in v) for k, v in echo["profile"].items()}
            self.session = ort.InferenceSession(str(self.graph32), providers=["CPUExecutionProvider"])
            self.shape_cache = {}
            self.runs = 0

        @property
        def num_io_tensors(self):
            return len(self.io)

        def _find(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return self._find(name)[1]

        def get_tensor_dtype(self, name):
            return self._find(name)[2]

        def get_tensor_shape(self, name):
            return self._find(name)[3]

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return list(self.profile[name])

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile[name]
            if not all(a <= d <= b for d, a, b in zip(shape, low, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def _input_shape(self, name):
            dims = self.engine.get_tensor_shape(name)
            return self.shapes[name] if -1 in dims else dims

        def get_tensor_shape(self, name):
            inputs = [t for t in self.engine.io if t[1] == TensorIOMode.INPUT]
            key = tuple(self._input_shape(t[0]) for t in inputs)
            if key not in self.engine.shape_cache:
                zeros = {t[0]: np.zeros(self._input_shape(t[0]), t[2]) for t in inputs}
                outs = self.engine.session.run(None, zeros)
                self.engine.shape_cache[key] = {o.name: r.shape for o, r in zip(self.engine.session.get_outputs(), outs)}
            return self.engine.shape_cache[key][name]

        def execute_async_v3(self, stream_handle):
            def run():
                feed = {}
                for name, mode, dtype, _ in self.engine.io:
                    if mode == TensorIOMode.INPUT:
                        shape = self._input_shape(name)
                        count = int(np.prod(shape))
                        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
                        feed[name] = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
                outs = self.engine.session.run(None, feed)
                for out, value in zip(self.engine.session.get_outputs(), outs):
                    value = np.ascontiguousarray(value, dtype=self.engine.get_tensor_dtype(out.name))
                    ctypes.memmove(self.addresses[out.name], value.ctypes.data, value.nbytes)
                self.engine.runs += 1

            return FAKE_CUDA.enqueue(stream_handle, run)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    trt.TensorIOMode = TensorIOMode
    trt.Runtime = Runtime
    trt.nptype = lambda dtype: dtype
