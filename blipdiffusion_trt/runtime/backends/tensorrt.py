"""Native TensorRT backend: runs the plans ``blipdiffusion-trt build`` wrote, without torch.

One :class:`TensorRTEngine` per component: the deserialized plan, one execution context and one
CUDA stream, name-based I/O (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``,
TensorRT 10 and 11). Device buffers are allocated once per tensor and reallocated only when a
shape grows; numpy inputs and outputs go through pinned host buffers (one ``cudaMemcpyAsync``
each way). Outputs named in ``keep`` are returned as :class:`DeviceTensor` handles and accepted as
inputs by any engine of this backend without a host copy: the ControlNet residuals reach the UNet
on the GPU, and only latents, noise predictions and images cross to numpy.

CUDA binding: cuda-python (``cuda.bindings.runtime``), not CuPy. The runtime needs a dozen thin
CUDA runtime calls (malloc, pinned malloc, async copies, streams, graph capture); cuda-python is
exactly those calls, is NVIDIA's own binding used by TensorRT's samples, is already in the ``trt``
extra, and brings no array library, kernels or memory pool of its own. CuPy would add a large,
CUDA-version-specific wheel (``cupy-cuda12x``) and a second allocator competing with TensorRT's
for GPU memory, to use none of its array features.

Loading checks the plan against its record in ``engines.json`` (GPU architecture, TensorRT
version, sha256, source graph; :mod:`blipdiffusion_trt.engines.plans`): a mismatch is an :class:`EngineError` naming what the plan was
built for, what is running, and the ``blipdiffusion-trt build`` command that fixes it.

A batchable component fed fewer host rows than its plan's smallest batch runs them padded
(:func:`~..engine.rows_to_pad`): the DDIM inversion feeds ``unet_plain`` one row, which a static
engine built for a guided generation (two rows) runs as two.

``use_cuda_graph=True`` (:class:`TensorRTOptions`; default: ``BLIPDIFFUSION_TRT_CUDA_GRAPH=1``)
captures ``execute_async_v3`` in a CUDA graph and replays it while shapes and buffer
addresses stay the same; a new shape or address triggers one eager run and a new capture.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...components import ComponentSpec
from ...engines.environment import import_cudart, import_tensorrt, make_logger, running_environment
from ...engines.plans import BuildOptions, locate_plan, read_plan, rebuild_command
from ...engines.profiles import check_shape
from ...errors import EngineError, InputError, PackageError, first_line
from ...package import ModelPackage
from . import ort_install
from ..engine import Engine, check_graph_io, pad_rows, rows_to_pad
from .base import Backend, BackendOptions, Capabilities, option

logger = logging.getLogger(__name__)

CUDA_GRAPH_ENV = "BLIPDIFFUSION_TRT_CUDA_GRAPH"
_MIN_ALLOCATION = 256


def _cuda_graph_default() -> bool:
    return os.environ.get(CUDA_GRAPH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """``use_cuda_graph``: capture each engine's execution in a CUDA graph and replay it while shapes
    and buffers stay the same (default: ``BLIPDIFFUSION_TRT_CUDA_GRAPH=1``)."""

    use_cuda_graph: bool = option(default_factory=_cuda_graph_default,
                                  help=f"capture each engine in a CUDA graph (default: {CUDA_GRAPH_ENV}=1)")

    def __post_init__(self) -> None:
        if not isinstance(self.use_cuda_graph, bool):
            raise InputError(f"use_cuda_graph must be True or False, got {self.use_cuda_graph!r}",
                             field="use_cuda_graph")


# ------------------------------------------------------------------------------------------------
# Device memory
# ------------------------------------------------------------------------------------------------

@dataclass
class DeviceTensor:
    """A tensor in an engine's device memory: pointer, shape, dtype.

    Valid until the next ``infer`` of the engine that produced it (its buffers are reused), or, for
    an uploaded tensor (:meth:`TensorRTEngine.upload`), until the next upload into the same buffer;
    :class:`TensorRTEngine` checks this when one is fed. ``numpy()`` copies it to the host.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any = field(default=None, repr=False)
    generation: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def valid(self) -> bool:
        return self.owner is None or (getattr(self.owner, "_generation", None) == self.generation
                                      and not getattr(self.owner, "closed", False))

    def numpy(self) -> np.ndarray:
        """A host copy, made on the owner's stream (after the work that wrote it there), then
        synchronised: the legacy default stream would serialise with every stream, and is refused
        while any stream captures a CUDA graph."""
        if not self.valid:
            raise EngineError("this DeviceTensor was overwritten by a later call of the engine that produced it")
        cudart = import_cudart()
        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes:
            stream = getattr(self.owner, "_stream", None) or 0
            _check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync")
            _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return out

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


def _check(cudart, result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple; raise EngineError on an error code."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else (values or None)


class _Buffer:
    """Device memory plus a pinned host mirror, grown (never shrunk) to the largest size seen."""

    def __init__(self, cudart, host: bool) -> None:
        self.cudart = cudart
        self.host = host
        self.device_ptr = 0
        self.host_ptr = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True when the device address changed."""
        if nbytes <= self.capacity:
            return False
        self.free()
        size = max(int(nbytes), _MIN_ALLOCATION)
        self.device_ptr = int(_check(self.cudart, self.cudart.cudaMalloc(size), "cudaMalloc"))
        if self.host:
            self.host_ptr = int(_check(self.cudart, self.cudart.cudaMallocHost(size), "cudaMallocHost"))
        self.capacity = size
        return True

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy view of the pinned host buffer."""
        count = int(np.prod(shape, dtype=np.int64))
        raw = (ctypes.c_byte * max(self.capacity, 1)).from_address(self.host_ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.device_ptr:
            self.cudart.cudaFree(self.device_ptr)
        if self.host_ptr:
            self.cudart.cudaFreeHost(self.host_ptr)
        self.device_ptr = self.host_ptr = self.capacity = 0


class _Upload:
    """The owner of an uploaded :class:`DeviceTensor`: one buffer of an engine, valid while the
    engine is open and until the next upload into it (``_generation``)."""

    def __init__(self, engine: "TensorRTEngine", buffer: _Buffer) -> None:
        self.engine, self.buffer, self._generation = engine, buffer, 0

    @property
    def closed(self) -> bool:
        return self.engine.closed

    @property
    def _stream(self):
        return self.engine._stream


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------

class TensorRTEngine(Engine):
    """A TensorRT plan behind the :class:`Engine` interface (see the module docstring)."""

    def __init__(self, spec: ComponentSpec, plan: str | Path, *, plan_bytes: bytes | None = None,
                 use_cuda_graph: bool = False, package: str | Path = "PACKAGE") -> None:
        """``package``: the package's directory, named in rebuild commands."""
        self.spec = spec
        self.plan = Path(plan)
        self.package = Path(package)
        self.closed = True
        self._generation = 0
        self.use_cuda_graph = use_cuda_graph
        self._buffers: dict[str, _Buffer] = {}
        self._uploads: dict[tuple, _Upload] = {}
        self._graph = self._graph_exec = self._graph_key = None
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self._logger = make_logger(trt)
        if plan_bytes is None:
            try:
                plan_bytes = self.plan.read_bytes()
            except OSError as error:
                raise EngineError(f"cannot read {self.plan}: {error.strerror or error}") from None
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_bytes)
        if self._engine is None:
            raise EngineError(f"{self.plan}: TensorRT cannot deserialize it ({self._logger.last_error()}); "
                              f"rebuild: {rebuild_command(self.package, None, [spec.name])}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{self.plan}: TensorRT cannot create an execution context "
                              f"({self._logger.last_error('out of GPU memory?')})")
        self._stream = _check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self._stream_handle = int(self._stream)
        self.closed = False

        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._profiles: dict[str, tuple[tuple[int, ...], ...]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            self._dtypes[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(name)
                dims = tuple(self._engine.get_tensor_shape(name))
                if any(d < 0 for d in dims):
                    low, opt, high = self._engine.get_tensor_profile_shape(name, 0)
                    self._profiles[name] = (tuple(low), tuple(opt), tuple(high))
                else:
                    self._profiles[name] = (dims, dims, dims)
            else:
                self._outputs.append(name)
        declared_in, declared_out = set(spec.input_names), set(spec.output_names)
        if not set(self._inputs) <= declared_in or set(self._outputs) != declared_out:
            raise EngineError(
                f"{self.plan}: its tensors (inputs {self._inputs}, outputs {self._outputs}) differ from the {spec.name} "
                f"declaration; rebuild: {rebuild_command(self.package, None, [spec.name])}"
            )
        # dtypes, ranks and fixed dimensions against the declaration, as every backend checks its graphs
        tensors = {name: (name, self._dtypes[name].name, tuple(self._engine.get_tensor_shape(name)))
                   for name in (*self._inputs, *self._outputs)}
        try:
            check_graph_io(spec, self.plan, [tensors[n] for n in self._inputs], [tensors[n] for n in self._outputs],
                           built=True, advice=f"rebuild: {rebuild_command(self.package, None, [spec.name])}")
        except PackageError as error:
            raise EngineError(str(error)) from None
        self._buffers.update({name: _Buffer(cudart, host=True) for name in (*self._inputs, *self._outputs)})
        # Inputs without dynamic dimensions take no set_input_shape call.
        self._static_inputs = {n for n in self._inputs if self._profiles[n][0] == tuple(self._engine.get_tensor_shape(n))}
        # The smallest batch of the plan: a batchable component's fewer rows are padded to it.
        lowest = self._profiles[self._inputs[0]][0] if self._inputs else ()
        self._min_batch = lowest[0] if lowest else None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    # --------------------------------------------------------------------------------------------

    def upload(self, name: str, value: Any) -> Any:
        """``value`` in this engine's device memory for input ``name``: one buffer per name, shape
        and dtype, rewritten by the next upload to it (the DeviceTensor of the previous one is then
        refused). Copied through pinned memory on this engine's stream."""
        self.check_open()
        if isinstance(value, DeviceTensor):
            return value
        if name not in self._inputs:
            raise InputError(f"{self.spec.name}: no input named {name} (inputs: {', '.join(self._inputs)})")
        array = np.ascontiguousarray(value, dtype=self._dtypes[name])
        key = (name, array.shape, array.dtype.str)
        upload = self._uploads.get(key)
        if upload is None:
            upload = self._uploads[key] = _Upload(self, _Buffer(self._cudart, host=True))
        upload.buffer.ensure(array.nbytes)
        upload._generation += 1  # the previous upload's DeviceTensor is stale from here on
        if array.nbytes:
            np.copyto(upload.buffer.host_array(array.shape, array.dtype), array)
            _check(self._cudart, self._cudart.cudaMemcpyAsync(
                upload.buffer.device_ptr, upload.buffer.host_ptr, array.nbytes,
                self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream), "cudaMemcpyAsync")
            _check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return DeviceTensor(upload.buffer.device_ptr, array.shape, array.dtype, owner=upload,
                            generation=upload._generation)

    @property
    def profiles(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes of the plan's optimization profile."""
        return dict(self._profiles)

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        self.check_open()
        rows = rows_to_pad(self.spec, feed, self._min_batch)
        if not rows:
            return self._infer(feed, keep)
        # rare (the DDIM inversion's one row): an uploaded input is padded from its host copy
        padded = {name: pad_rows(self.to_host(feed[name]), self._min_batch) for name in self._inputs}
        return {name: _first_rows(value, rows) for name, value in self._infer(padded, keep).items()}

    def _infer(self, feed: Mapping[str, Any], keep: Sequence[str]) -> dict[str, Any]:
        cudart, stream = self._cudart, self._stream
        context = self._context
        host_inputs: list[tuple[str, np.ndarray]] = []

        for name in self._inputs:
            if name not in feed:
                raise InputError(f"{self.spec.name}: input {name} is missing")
            value = feed[name]
            if isinstance(value, DeviceTensor):
                if value.owner is self:
                    raise EngineError(f"{self.spec.name}: input {name} is this engine's own kept output, which this "
                                      f"call would overwrite; pass value.numpy() instead")
                if not value.valid:
                    raise EngineError(f"{self.spec.name}: input {name} is a DeviceTensor overwritten by a later call of its engine")
                if np.dtype(value.dtype) != self._dtypes[name]:
                    raise EngineError(f"{self.spec.name}: input {name} is {np.dtype(value.dtype)} on the GPU, the engine takes {self._dtypes[name]}")
                shape, address = tuple(value.shape), int(value.ptr)
            else:
                array = np.ascontiguousarray(value, dtype=self._dtypes[name])
                shape = array.shape
                buffer = self._buffers[name]
                buffer.ensure(array.nbytes)
                address = buffer.device_ptr
                host_inputs.append((name, array))
            problem = check_shape(name, shape, self._profiles[name])
            if problem:
                raise EngineError(f"{self.spec.name}: {problem}; rebuild for these shapes: "
                                  f"{rebuild_command(self.package, BuildOptions(shapes='dynamic'))}")
            if self._shapes.get(name) != shape and name not in self._static_inputs:
                if not context.set_input_shape(name, shape):
                    raise EngineError(f"{self.spec.name}: TensorRT refused shape {list(shape)} for {name} ({self._logger.last_error()})")
                self._shapes[name] = shape
            if self._addresses.get(name) != address:
                context.set_tensor_address(name, address)
                self._addresses[name] = address

        out_shapes: dict[str, tuple[int, ...]] = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.spec.name}: output {name} has unresolved shape {list(shape)}")
            out_shapes[name] = shape
            buffer = self._buffers[name]
            buffer.ensure(int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize)
            if self._addresses.get(name) != buffer.device_ptr:
                context.set_tensor_address(name, buffer.device_ptr)
                self._addresses[name] = buffer.device_ptr

        self._generation += 1  # kept outputs of the previous call are overwritten from here on
        for name, array in host_inputs:
            buffer = self._buffers[name]
            if array.nbytes:
                np.copyto(buffer.host_array(array.shape, array.dtype), array)
                _check(cudart, cudart.cudaMemcpyAsync(buffer.device_ptr, buffer.host_ptr, array.nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync")
        self._execute()
        for name in self._outputs:
            if name in keep:
                continue
            nbytes = int(np.prod(out_shapes[name], dtype=np.int64)) * self._dtypes[name].itemsize
            if nbytes:
                buffer = self._buffers[name]
                _check(cudart, cudart.cudaMemcpyAsync(buffer.host_ptr, buffer.device_ptr, nbytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync")
        # Synchronous at the boundary: kept outputs are complete when another engine's stream reads them.
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

        result: dict[str, Any] = {}
        for name in self._outputs:
            shape, dtype, buffer = out_shapes[name], self._dtypes[name], self._buffers[name]
            if name in keep:
                result[name] = DeviceTensor(buffer.device_ptr, shape, dtype, owner=self, generation=self._generation)
            else:
                result[name] = buffer.host_array(shape, dtype).copy()
        return result

    def _execute(self) -> None:
        if not self.use_cuda_graph:
            self._enqueue()
            return
        key = tuple((n, self._shapes.get(n), self._addresses.get(n)) for n in (*self._inputs, *self._outputs))
        if key == self._graph_key and self._graph_exec is not None:
            _check(self._cudart, self._cudart.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
            return
        # New shapes or addresses: one eager run (TensorRT finishes deferred setup there; its
        # outputs are this call's result), then capture the same call for the next ones.
        self._enqueue()
        self._capture(key)

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream_handle):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed ({self._logger.last_error()})")

    def _capture(self, key: tuple) -> None:
        cudart = self._cudart
        self._destroy_graph()
        _check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        try:
            _check(cudart, cudart.cudaStreamBeginCapture(
                self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
            ok = False
            try:
                ok = self._context.execute_async_v3(self._stream_handle)
            finally:
                # always ended, also when TensorRT raises: a stream left capturing fails every later call
                self._graph = _check(cudart, cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
            if not ok:
                raise EngineError("execute_async_v3 refused capture")
            self._graph_exec = _check(cudart, cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
            self._graph_key = key
        except Exception as error:  # TensorRT's own exceptions too: this call's result came from the eager run
            logger.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.spec.name,
                           first_line(error))
            self._destroy_graph()
            self.use_cuda_graph = False

    def _destroy_graph(self) -> None:
        cudart = self._cudart
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = self._graph_key = None

    def close(self) -> None:
        """Free device and pinned memory, the CUDA graph and the stream (also done on deletion)."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        try:
            self._cudart.cudaStreamSynchronize(self._stream)
            self._destroy_graph()
            for buffer in (*self._buffers.values(), *(u.buffer for u in self._uploads.values())):
                buffer.free()
            self._cudart.cudaStreamDestroy(self._stream)
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
        self._context = None
        self._engine = None

    def __del__(self) -> None:
        self.close()


def _first_rows(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of an output: a view of a host array, or of a device tensor (rows are
    contiguous from its start)."""
    if isinstance(value, DeviceTensor):
        return DeviceTensor(value.ptr, (rows, *value.shape[1:]), value.dtype, owner=value.owner,
                            generation=value.generation)
    return value[:rows]


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------

def make_tensorrt_engine(package: ModelPackage, component: str, precision: str,
                         options: TensorRTOptions) -> TensorRTEngine:
    """This GPU's checked plan of ``component``, built from the package's fp16 graph."""
    if precision != "fp16":
        raise EngineError(
            "the tensorrt backend runs engines built from the package's fp16 graphs: pass --precision fp16 "
            "(precision='fp16')"
        )
    package.require_precision(precision)
    spec = package.specs[component]
    import_tensorrt()  # "not installed" before anything else
    running = _running_here()
    plan, record, warning = locate_plan(package.root, component, running, onnx_sha256=package.graph_sha256(component, precision))
    if warning:
        logger.warning(warning)
    data = read_plan(plan, record, running, package.root, component)
    return TensorRTEngine(spec, plan, plan_bytes=data, use_cuda_graph=options.use_cuda_graph, package=package.root)


@functools.lru_cache(maxsize=1)
def _running_here() -> dict[str, str]:
    return running_environment()


def tensorrt_installed() -> bool:
    """Whether TensorRT's Python package is installed (found, not imported)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_available() -> bool:
    """TensorRT is installed and the CUDA driver sees a GPU."""
    return tensorrt_installed() and ort_install.cuda_device_count() > 0


TENSORRT = Backend("tensorrt", "TensorRT engines from `blipdiffusion-trt build` (needs --precision fp16)",
                   TensorRTOptions, make_tensorrt_engine, Capabilities(device_outputs=True, precisions=("fp16",)),
                   device="cuda", is_available=tensorrt_available)

__all__ = ["CUDA_GRAPH_ENV", "DeviceTensor", "TENSORRT", "TensorRTEngine", "TensorRTOptions", "make_tensorrt_engine"]
