"""OpenVINO backend (``openvino``): the package's fp32 ONNX graphs on OpenVINO's CPU plugin, in bf16
where the CPU has it.

Graphs: the plain fp32 ones (``onnx/fp32``), read as they are with ``Core.read_model``; the user
runs no conversion step. Not the CPU-fused copies (``onnx/fp32-fused``): those hold ONNX Runtime
contrib ops (``com.microsoft`` Attention, MultiHeadAttention, SkipLayerNormalization) shaped for
ONNX Runtime's kernels, which OpenVINO's ONNX reader supports only in part and would unpack again
before its own attention fusion (scaled dot-product attention), which it does on the plain graph
too; and the plain graph is the one export validated against PyTorch.

Precision (``inference_precision``): "f32" computes in fp32 (the exact mode: within the
components' tolerance of PyTorch, tests/test_openvino.py); "bf16" runs OpenVINO's bf16 kernels
and keeps activations in bf16 (inputs and outputs stay float32), except the timestep embedding's
sinusoids, kept in f32 as diffusers' bf16 does (:func:`keep_sinusoid_inputs_in_f32`); "auto" is
bf16 where OpenVINO's CPU plugin lists BF16 in ``OPTIMIZATION_CAPABILITIES`` (AVX512-BF16, AMX or
AVX2-VNNI-2 CPUs) and f32 elsewhere. "bf16" on a CPU without it is an error naming the CPU, not a
silent fallback: "auto" is the fallback. :attr:`OpenVINOEngine.inference_precision` says what the
compiled model runs.

Shapes: OpenVINO runs static shapes fastest. Each engine reshapes its model to the input shapes
of a call and compiles it on first use; compiled models are kept per input-shape signature in a
small LRU (``max_shapes``), so a generation compiles each component once.

Model cache (``cache_dir``, default ``openvino`` in the per-user cache folder,
:func:`~blipdiffusion_trt.package.layout.user_cache_dir`; ``model_cache=False`` turns it off): one
directory (entry) per graph, named after the graph's sha256 in the package manifest (graph and
external data; plus ``-int8`` with compressed weights). A changed graph has another sha256, hence
another entry: nothing stale can be served even if OpenVINO's own model hash missed the change.
Each entry holds

- the converted graph as OpenVINO IR (``model.xml``/``model.bin``, after INT8 compression where
  asked) and its record (sizes, sha256), read memory-mapped: reading the ONNX graph and
  compressing weights cost every process seconds (minutes for INT8 at full size), reading the IR
  a fraction of a second. The entry is built in a staging folder beside it and published by one
  rename, so a reader sees a whole entry or none; an entry that does not match its record (or is
  a file, or a symlink leading out of the cache) is built again and replaced as a whole;
- OpenVINO's compiled blobs (its ``CACHE_DIR``), one per input shape and precision, "weightless"
  (``CACHE_MODE=OPTIMIZE_SIZE``, weights taken from the IR's ``model.bin``): a blob costs about 2%
  of the weights instead of another copy of them, so the disk used is about one copy of the
  graphs plus a few MB per generation size. Measurements: ``bench/openvino_load.py`` and docs/backends.md.

Processes sharing a cache (two CLI runs, two servers starting): OpenVINO writes a blob in place
(truncating a file another process may have memory-mapped: SIGBUS) and a reader that finds a blob
half-written deletes it under its writer. So each entry has a lock file beside it
(``.<entry>.lock``): compiling with ``CACHE_DIR`` and building the IR hold it exclusively, reading
the IR holds it shared. Waiting is bounded (:data:`CACHE_LOCK_TIMEOUT_S`), then the engine runs
without the cache. A staging folder left by a killed writer is removed by the next writer
(:class:`~blipdiffusion_trt.fsutil.StagingDir`). A cache that cannot be written or read costs the
cache, with a warning naming its folder, never the run. docs/caches.md has the summary.

Once compiled from the IR, the engine drops its ``openvino.Model``: a compiled model loaded from
a blob holds its own weights, and keeping the model too held them twice (the process's peak
memory); another shape reads the memory-mapped IR again. Without the cache, the model read from
ONNX is kept for later shapes.

Weight compression (``compress_weights``, off by default): NNCF's data-free INT8 weight-only
compression (asymmetric, per output channel) of the UNet, ControlNet and VAE decoder graphs, done
on the OpenVINO model after reading ONNX and cached in the IR; activations stay in the inference
precision. For machines
short of memory; its effect on memory, speed and images is measured, not assumed.

Intermediate memory (``memory_arena``, the ONNX Runtime backends' option and values): a compiled
model keeps the buffers of its intermediate tensors between calls. "loop" (default) keeps them
only for the components called every denoising step (UNet, ControlNet); the others hand them back
after each call (``CompiledModel.release_memory``), so the VAE decoder's buffers, the largest at
512x512, are not held from one image to the next, nor the Q-Former's while the UNet runs.
"loop-shrink" and "none" hand every component's back after each call; "all" keeps every one.
The values computed are the same under every policy.

Threads: ``threads`` is OpenVINO's ``INFERENCE_NUM_THREADS`` (unset: ``BLIPDIFFUSION_TRT_THREADS``, as
for the ONNX Runtime backends, else all cores).

Imports: ``openvino`` (and ``nncf``) only when an engine is made; never torch. Registered in
:data:`~blipdiffusion_trt.runtime.backends.REGISTRY` as ``openvino`` (:data:`OPENVINO`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...components import CONTROLNET_STEP_CACHE, PLAIN_STEP_CACHE, ComponentSpec
from ...errors import EngineError, InputError, first_line
from ...fsutil import LOCKS_AVAILABLE, LockTimeout, StagingDir, confined_path, locked, remove_entry, replace_dir
from ...package import ModelPackage, layout
from ..engine import Engine, check_graph_io, check_output_shapes
from .base import Backend, BackendOptions, Capabilities, default_threads, option, threads_option
from .cache_record import check_record, write_record
from .mapped_files import release_mapped_file
from .onnxruntime import LOOP_COMPONENTS, MEMORY_ARENAS, memory_arena_option

logger = logging.getLogger(__name__)

INFERENCE_PRECISIONS = ("auto", "f32", "bf16")
# The large convolutional graphs: weights dominate their memory. The encoders run once per image
# and feed every step, so they keep their fp32 weights.
WEIGHT_COMPRESSED_COMPONENTS = frozenset({"unet", "unet_plain", "unet_p2p", "controlnet", "vae_decoder",
                                          *PLAIN_STEP_CACHE.names, *CONTROLNET_STEP_CACHE.names})
DEVICE = "CPU"
# The converted (and, with compress_weights, compressed) graph in a cache entry: OpenVINO IR.
IR_XML, IR_BIN = "model.xml", "model.bin"
# The sizes and sha256 of the IR, written after it: an IR that does not match is converted again.
IR_RECORD = "model.json"
# The files of an entry besides OpenVINO's blobs.
IR_FILES = (IR_XML, IR_BIN, IR_RECORD)
# Longest wait for another process's hold on a cache entry (converting a full-size UNet to INT8
# IR takes minutes); past it, the engine runs without the cache.
CACHE_LOCK_TIMEOUT_S = 900.0
INSTALL_HINT = "pip install 'blipdiffusion-trt[openvino]'"


@dataclass(frozen=True)
class OpenVINOOptions(BackendOptions):
    """How the openvino backend compiles and runs the graphs.

    ``inference_precision``: "auto" (bf16 where the CPU has it, else f32), "f32" (exact) or "bf16".
    ``threads``: OpenVINO's ``INFERENCE_NUM_THREADS`` (None: ``BLIPDIFFUSION_TRT_THREADS``, else
    all cores; 0: all cores). ``cache_dir``: root of the model cache (None: :func:`default_cache_dir`);
    ``model_cache=False`` turns the cache off. ``compress_weights``: INT8 weight-only compression
    of the UNet, ControlNet and VAE decoder (needs NNCF). ``max_shapes``: compiled models kept per
    component (one per distinct input-shape signature, LRU). ``memory_arena`` (the ONNX Runtime
    backends' values): "loop" keeps intermediate buffers between calls for the per-step components
    only, "all" for every component, "none" / "loop-shrink" for none.
    """

    inference_precision: str = option(
        "auto", flag="--inference-precision", choices=INFERENCE_PRECISIONS,
        help="auto (bf16 where the CPU has it, else f32), f32 (exact), bf16 (an error on a CPU without it)")
    threads: int | None = threads_option()
    cache_dir: str | Path | None = option(
        None, flag="--openvino-cache", metavar="DIR",
        help="model cache directory (default: openvino/ in the per-user cache folder, "
             "$BLIPDIFFUSION_TRT_CACHE, else $XDG_CACHE_HOME/blipdiffusion-trt or ~/.cache/blipdiffusion-trt)")
    model_cache: bool = option(True, flag="--no-openvino-cache", help="no model cache")
    compress_weights: bool = option(
        False, flag="--openvino-int8-weights",
        help="INT8 weight-only compression of the UNet, ControlNet and VAE decoder "
             "(needs NNCF; for machines short of memory)")
    max_shapes: int = option(4, help="compiled models kept per component (one per input-shape signature, LRU)")
    memory_arena: str = memory_arena_option()

    def __post_init__(self) -> None:
        if self.memory_arena not in MEMORY_ARENAS:
            raise InputError(f"memory_arena must be one of {', '.join(MEMORY_ARENAS)}, got {self.memory_arena!r}",
                             field="memory_arena")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise InputError(f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, "
                             f"got {self.inference_precision!r}", field="inference_precision")
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())
        elif isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise InputError(f"threads must be an integer >= 0, got {self.threads!r}", field="threads")
        if isinstance(self.max_shapes, bool) or not isinstance(self.max_shapes, int) or self.max_shapes < 1:
            raise InputError(f"max_shapes must be an integer >= 1, got {self.max_shapes!r}", field="max_shapes")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise InputError(f"cache_dir must be a directory path, got {type(self.cache_dir).__name__}",
                             field="cache_dir")
        for name in ("model_cache", "compress_weights"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}", field=name)


def default_cache_dir() -> Path:
    """``openvino`` in the per-user cache folder (``$BLIPDIFFUSION_TRT_CACHE``, else
    ``$XDG_CACHE_HOME/blipdiffusion-trt`` or ``~/.cache/blipdiffusion-trt``)."""
    return layout.user_cache_dir() / layout.OPENVINO_CACHE


def openvino_installed() -> bool:
    """Whether OpenVINO's Python package is installed (found, not imported)."""
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    try:
        import openvino
    except ImportError as error:
        raise EngineError(f"the openvino backend needs OpenVINO: {INSTALL_HINT} ({first_line(error)})") from None
    return openvino


@functools.lru_cache(maxsize=1)
def openvino_core():
    """One OpenVINO Core per process (it holds the loaded device plugins)."""
    return import_openvino().Core()


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU device (e.g. BF16, FP32, INT8)."""
    return tuple(openvino_core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def cpu_name() -> str:
    try:
        return str(openvino_core().get_property(DEVICE, "FULL_DEVICE_NAME"))
    except Exception:  # a name for a message only
        return "this CPU"


def resolve_inference_precision(requested: str) -> str:
    """"auto" -> "bf16" where the CPU runs it natively, else "f32"; "bf16" without it is an error."""
    if requested not in INFERENCE_PRECISIONS:
        raise InputError(f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {requested!r}",
                         field="inference_precision")
    native_bf16 = "BF16" in cpu_capabilities()
    if requested == "auto":
        if not native_bf16:
            _log_auto_fallback()
        return "bf16" if native_bf16 else "f32"
    if requested == "bf16" and not native_bf16:
        raise InputError(
            f"inference_precision bf16: {cpu_name()} has no native bf16 (OpenVINO CPU capabilities: "
            f"{', '.join(cpu_capabilities())}); use auto or f32", field="inference_precision"
        )
    return requested


@functools.lru_cache(maxsize=1)
def _log_auto_fallback() -> None:
    logger.info("openvino: inference precision auto -> f32: %s has no native bf16", cpu_name())


@contextmanager
def _torch_hidden():
    """Hide torch from NNCF, which imports it when installed (to register its tensor functions).

    The OpenVINO path of NNCF never needs torch, and the runtime never imports it.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # importing it now raises ImportError
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def compress_weights(model):
    """NNCF's data-free INT8 weight-only compression (int8_asym, per channel) of an OpenVINO model."""
    with _torch_hidden():
        try:
            import nncf
        except ImportError as error:
            raise EngineError(f"compress_weights needs NNCF: {INSTALL_HINT} ({first_line(error)})") from None
        nncf_logger = logging.getLogger("nncf")
        level = nncf_logger.level
        nncf_logger.setLevel(logging.ERROR)  # its per-model statistics table
        try:
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        finally:
            nncf_logger.setLevel(level)


def keep_sinusoid_inputs_in_f32(model) -> int:
    """Keep the arguments of the graph's Sin/Cos nodes (the timestep embedding) in f32 under bf16.

    OpenVINO's bf16 mode stores activations in bf16 except in the graph's tail: the nodes between
    an output and the last matmul/convolution before it. The timestep embedding's sin(t * f) and
    cos(t * f) then take t and t * f rounded to 8 significant bits: t = 981 becomes 980 and the
    high-frequency phases are lost (the UNet's output moves as far as cosine 0.99 from f32 where
    the rest of bf16 costs 0.9999). diffusers' bf16 computes these sinusoids in fp32. Making the
    Sin/Cos outputs extra model outputs (ignored by ``infer``) puts their input chain in the tail,
    which OpenVINO keeps in f32. Returns how many nodes it marked.
    """
    sinusoids = [op.output(0) for op in model.get_ops() if op.get_type_name() in ("Sin", "Cos")]
    if sinusoids:
        model.add_outputs(sinusoids)
    return len(sinusoids)


def _precision_name(value: Any) -> str:
    """OpenVINO's element type (``<Type: 'bfloat16'>``) -> "bf16" / "f32" (its short names)."""
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)


class OpenVINOEngine(Engine):
    """One component's fp32 ONNX graph on OpenVINO's CPU plugin, compiled per input shape.

    ``graph_sha256`` (the package manifest's digest of the graph and its data) names the model-cache
    directory. Thread-safe: calls on one engine are serialised (an OpenVINO infer request runs one
    call at a time, and each call already uses all the threads it is given).
    """

    def __init__(self, spec: ComponentSpec, path: str | Path, graph_sha256: str, options: OpenVINOOptions):
        self.spec = spec
        self.path = Path(path)
        self.options = options
        self.requested_precision = resolve_inference_precision(options.inference_precision)
        # What the compiled model runs, read back from it after compiling (see ``_compile``).
        self.inference_precision = self.requested_precision
        self.weights_compressed = options.compress_weights and spec.name in WEIGHT_COMPRESSED_COMPONENTS
        self.f32_sinusoids = 0  # Sin/Cos nodes whose inputs bf16 mode keeps in f32 (keep_sinusoid_inputs_in_f32)
        self.cache_root: Path | None = None
        self.cache_dir = self._cache_directory(graph_sha256)  # the entry (made when first published)
        self.ir_path = self.cache_dir / IR_XML if self.cache_dir is not None else None
        # where the latest model came from: "ir cache", "onnx, cached as ir" (converted now) or "onnx" (no IR cache)
        self.model_source: str | None = None
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()  # shape signature -> infer request
        self._lock = threading.Lock()
        self.compilations = 0
        self.compile_seconds = 0.0
        self.loaded_from_cache: bool | None = None  # of the latest compilation
        self.model = self._load_model()  # read now, so a broken graph fails the load, not the first call

    # -- the model --------------------------------------------------------------------------------

    def _load_model(self):
        """The graph as an ``openvino.Model``: from the IR cache, else from ONNX (then cached as IR)."""
        model = self._load_cached_or_convert() if self.cache_dir is not None else None
        if model is None:
            model, self.model_source = self._convert(), "onnx"
        if self.requested_precision == "bf16":
            self.f32_sinusoids = keep_sinusoid_inputs_in_f32(model)
        return model

    def _convert(self):
        """The package's ONNX graph as an ``openvino.Model`` (weights compressed where asked)."""
        model = self._read_graph(self.path, "OpenVINO cannot read it")
        if self.weights_compressed:
            start = time.perf_counter()
            model = compress_weights(model)
            logger.info("openvino: %s weights compressed to int8 in %.1f s", self.spec.name,
                        time.perf_counter() - start)
        return model

    def _load_cached_or_convert(self):
        """The cached IR; else the graph converted, published as the entry and read back from it.
        None when the cache cannot be used (warned): the caller converts without it."""
        with self._entry_lock(shared=True) as held:
            if held is None:
                return None
            model = self._read_cached_ir(quiet=True)  # a missing or damaged entry is rebuilt below
        if model is not None:
            self.model_source = "ir cache"
            return model
        # Exclusively: one process converts, the others wait and read what it published.
        with self._entry_lock() as held:
            if held is None:
                return None
            model = self._read_cached_ir()
            if model is not None:
                self.model_source = "ir cache"
                return model
            model = self._convert()
            self.model_source = "onnx"
            if self._publish_ir(model):
                # The memory-mapped IR replaces the copy read from ONNX, and every process then
                # compiles the same model (OpenVINO's blob key is a hash of the model).
                cached = self._read_cached_ir(verify=False)  # just written and recorded: not hashed twice
                if cached is not None:
                    model, self.model_source = cached, "onnx, cached as ir"
            return model

    def _read_graph(self, path: Path, failure: str):
        try:
            model = openvino_core().read_model(str(path))
        except Exception as error:  # OpenVINO raises RuntimeError subclasses with multi-line text
            raise EngineError(f"{path}: {failure} ({first_line(error)})") from None
        check_graph_io(self.spec, self.path, _io(model.inputs), _io(model.outputs))  # the package graph (or its IR)
        return model

    def _read_cached_ir(self, verify: bool = True, quiet: bool = False):
        """The cached IR (weights memory-mapped), or None when there is no entry, it does not
        match its record (truncated, altered; checked with ``verify``), it cannot be read, or it
        is not a directory inside the cache (a file; a symlink leading out of it): said in a
        warning unless ``quiet``."""
        entry = self.cache_dir
        assert entry is not None and self.cache_root is not None and self.ir_path is not None
        if not entry.exists() and not entry.is_symlink():
            return None
        try:
            for path in (entry, *(entry / name for name in IR_FILES)):
                confined_path(self.cache_root, path, EngineError, what="cache")
            if not entry.is_dir():
                raise EngineError(f"cache entry {entry} is not a directory")
            if verify:
                check_record(entry / IR_RECORD, allowed=(IR_XML, IR_BIN), required=(IR_XML, IR_BIN))
            return self._read_graph(self.ir_path, "cached OpenVINO IR unreadable")
        except FileNotFoundError as error:
            reason = f"cached IR of {self.spec.name} incomplete ({Path(error.filename or '?').name} missing)"
        except EngineError as error:
            reason = str(error)
        if not quiet:
            logger.warning("openvino: %s; converting %s again", reason, self.path.name)
        return None

    def _publish_ir(self, model) -> bool:
        """Save ``model`` as the cache entry's IR with its record: built in a staging folder beside
        the entry (:class:`StagingDir`, which also removes those of killed writers), then renamed
        into place as a whole, replacing a damaged entry. Call it holding the entry's lock. False
        (with a warning naming the cache) if it cannot: a full disk, a read-only cache."""
        assert self.cache_dir is not None
        staging = None
        try:
            staging = StagingDir(self.cache_dir, EngineError)
            xml, bin_ = staging.path / IR_XML, staging.path / IR_BIN
            import_openvino().save_model(model, str(xml), compress_to_fp16=False)
            write_record(staging.path / IR_RECORD, [xml, bin_])
            replace_dir(staging.path, self.cache_dir)
        except Exception as error:  # a full disk, a read-only cache: run without the IR cache
            logger.warning("openvino: %s not cached as IR in %s (%s)", self.spec.name, self.cache_root,
                           first_line(error))
            return False
        finally:
            if staging is not None:
                staging.close()
        return True

    @property
    def model_from_ir(self) -> bool:
        """Whether the model is the cache entry's IR (weights memory-mapped from its ``model.bin``)."""
        return self.model_source in ("ir cache", "onnx, cached as ir")

    # -- cache ----------------------------------------------------------------------------------

    def keeps_intermediate_memory(self) -> bool:
        """Whether the compiled model keeps its intermediate buffers between calls (``memory_arena``)."""
        policy = self.options.memory_arena
        return policy == "all" or (policy == "loop" and self.spec.name in LOOP_COMPONENTS)

    def _cache_directory(self, graph_sha256: str) -> Path | None:
        """The graph's cache entry (None: no cache); its folder, the cache root, is made now."""
        options = self.options
        if not options.model_cache:
            return None
        root = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not root.is_dir():
                raise NotADirectoryError(20, "not a directory")
        except OSError as error:
            if options.cache_dir is not None:
                raise EngineError(f"openvino cache_dir {root}: not writable ({error.strerror or error})") from None
            logger.warning("openvino: model cache off, %s is not writable (%s)", root, error.strerror or error)
            return None
        self.cache_root = root
        return root / f"{self.spec.name}-{graph_sha256[:16]}{'-int8' if self.weights_compressed else ''}"

    @contextmanager
    def _entry_lock(self, shared: bool = False):
        """Hold the entry's lock file (``.<entry>.lock`` beside it): yields True, or False for a
        shared hold where the lock file cannot be made (a read-only cache: reading goes on), or
        None when waiting timed out or an exclusive hold is impossible (warned: the caller runs
        without the cache)."""
        assert self.cache_dir is not None
        lock = self.cache_dir.with_name(f".{self.cache_dir.name}.lock")
        with ExitStack() as stack:
            try:
                held = stack.enter_context(locked(lock, shared=shared, timeout=CACHE_LOCK_TIMEOUT_S))
                if not held and not shared and LOCKS_AVAILABLE:
                    raise EngineError(f"cannot lock {lock}")
            except (LockTimeout, EngineError) as error:
                logger.warning("openvino: %s without the model cache %s (%s)", self.spec.name, self.cache_root, error)
                held = None
            yield held

    def _config(self, cache: bool) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.requested_precision, "PERFORMANCE_HINT": "LATENCY"}
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        if cache:
            assert self.cache_dir is not None and self.model_from_ir
            config["CACHE_DIR"] = str(self.cache_dir)
            # weightless blobs: the compiled model takes its weights from the cached IR, so a
            # blob per shape and precision costs its graph, not another copy of the weights
            config["CACHE_MODE"] = "OPTIMIZE_SIZE"
            config["WEIGHTS_PATH"] = str(self.cache_dir / IR_BIN)
        return config

    def _entry_ready_for_blobs(self) -> bool:
        """The entry is a directory inside the cache (OpenVINO writes its blobs there, following
        symlinks): anything in it but the IR files and plain blob files (a symlink, a folder such as
        a killed writer's scratch) is removed first. Call it holding the entry's lock."""
        entry = self.cache_dir
        assert entry is not None and self.cache_root is not None
        try:
            confined_path(self.cache_root, entry, EngineError, what="cache")
            if entry.is_symlink() or not entry.is_dir():
                return False
            for child in entry.iterdir():
                if child.name in IR_FILES:
                    continue  # checked against the record when read
                if child.is_symlink() or not child.is_file():
                    logger.info("openvino: removing %s from the model cache (not a plain file)", child)
                    remove_entry(child)
        except (EngineError, OSError) as error:
            logger.warning("openvino: %s compiled without the model cache (%s)", self.spec.name, first_line(error))
            return False
        return True

    def _compile_with_cache(self):
        """The model compiled with the entry as OpenVINO's ``CACHE_DIR`` (a blob loaded, or
        compiled and written), holding the entry's lock; None when the cache cannot be used or
        fails (warned, naming the cache): the caller compiles without it."""
        with self._entry_lock() as held:
            if held is None or not self._entry_ready_for_blobs():
                return None
            try:
                return openvino_core().compile_model(self.model, DEVICE, self._config(cache=True))
            except Exception as error:  # a blob that cannot be written or read; the graph is tried without it
                logger.warning("openvino: model cache %s failed for %s (%s); compiling it without the cache",
                               self.cache_dir, self.spec.name, first_line(error))
                return None

    # -- running ----------------------------------------------------------------------------------

    @property
    def compiled_shapes(self) -> list[tuple]:
        """Shape signatures with a compiled model, least recently used first."""
        return list(self._compiled)

    def details(self) -> dict[str, Any]:
        return {"inference_precision": self.inference_precision, "int8_weights": self.weights_compressed,
                "threads": self.options.threads or None, "model_source": self.model_source,
                "compilations": self.compilations, "compile_seconds": round(self.compile_seconds, 3),
                "loaded_from_cache": self.loaded_from_cache}

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        self.check_open()
        arrays = {t.name: np.ascontiguousarray(feed[t.name], dtype=t.dtype) for t in self.spec.inputs}
        key = tuple(a.shape for a in arrays.values())
        with self._lock:
            self.check_open()
            request = self._compiled.get(key)
            compiled_now = request is None
            if compiled_now:
                request = self._compile(key, arrays)
            else:
                self._compiled.move_to_end(key)
            try:
                results = request.infer(arrays)
            except Exception as error:  # OpenVINO's messages are multi-line
                raise EngineError(f"{self.spec.name}: OpenVINO inference failed ({first_line(error)})") from None
            if compiled_now and self.model_from_ir:
                # A compiled model keeps the IR's weights mapped after it has copied (on compiling
                # and on its first call) what it runs with: every page it read would stay resident,
                # counted in the RSS and in a container's limit. A page it reads again comes back.
                release_mapped_file(self.cache_dir / IR_BIN)
            if not self.keeps_intermediate_memory():
                # the outputs are copies (below), not views of the buffers handed back
                request.get_compiled_model().release_memory()
            # ``infer`` returns copies of the output tensors (the request's own are reused next call)
            outputs = {name: results[name] for name in self.output_names}
        check_output_shapes(self.spec, arrays, outputs, self.path)
        return outputs

    def _compile(self, key: tuple, arrays: Mapping[str, np.ndarray]):
        shapes = {name: list(a.shape) for name, a in arrays.items()}
        if self.model is None:  # dropped after the previous compilation: the IR is cached
            self.model = self._load_model()
        start = time.perf_counter()
        try:
            self.model.reshape(shapes)
        except Exception as error:  # OpenVINO's messages are multi-line
            raise EngineError(f"{self.path}: OpenVINO cannot reshape it to input shapes {shapes} "
                              f"({first_line(error)})") from None
        compiled = self._compile_with_cache() if self.cache_dir is not None and self.model_from_ir else None
        cached = compiled is not None
        if compiled is None:
            try:
                compiled = openvino_core().compile_model(self.model, DEVICE, self._config(cache=False))
            except Exception as error:  # OpenVINO's messages are multi-line
                raise EngineError(f"{self.path}: OpenVINO cannot compile it for input shapes {shapes} "
                                  f"({first_line(error)})") from None
        seconds = time.perf_counter() - start
        self.compilations += 1
        self.compile_seconds += seconds
        self.inference_precision = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.loaded_from_cache = bool(compiled.get_property("LOADED_FROM_CACHE")) if cached else False
        logger.info("openvino: %s %s for %s in %.2f s (%s)", "loaded" if self.loaded_from_cache else "compiled",
                    self.spec.name, shapes, seconds, self.inference_precision)
        if self.model_from_ir:
            # A compiled model loaded from a blob holds its own weights: keeping the model too
            # would hold them twice. Another shape reads the memory-mapped IR again (cheap).
            self.model = None
        request = compiled.create_infer_request()
        self._compiled[key] = request
        while len(self._compiled) > self.options.max_shapes:
            self._compiled.popitem(last=False)
        return request

    def close(self) -> None:
        """Drop the compiled models and the graph (idempotent)."""
        with self._lock:
            self._compiled.clear()
            self.model = None
            super().close()


# ------------------------------------------------------------------------------------------------
# Factory: (package, component, precision, options) -> Engine
# ------------------------------------------------------------------------------------------------

def _io(ports) -> list[tuple[str, str, list]]:
    """An ``openvino.Model``'s inputs or outputs as :data:`~..engine.GraphTensor`."""
    tensors = []
    for port in ports:
        shape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
        tensors.append((port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, dims))
    return tensors


def make_openvino_engine(package: ModelPackage, component: str, precision: str,
                         options: OpenVINOOptions) -> OpenVINOEngine:
    """The package's fp32 graph of ``component`` on OpenVINO (checked against its sha256 when the
    package verifies); what it computes in is ``options.inference_precision``."""
    if precision != "fp32":
        raise InputError(
            "precision: the openvino backend reads the package's fp32 graphs (precision='fp32', the default); "
            f"choose how it computes with inference_precision ({', '.join(INFERENCE_PRECISIONS)}), got {precision!r}",
            field="precision",
        )
    path = package.onnx_path(component, precision)
    return OpenVINOEngine(package.specs[component], path, package.graph_content_sha256(component, precision), options)


OPENVINO = Backend("openvino", "OpenVINO, CPU: the fp32 graphs, in bf16 where the CPU has it (inference_precision)",
                   OpenVINOOptions, make_openvino_engine, Capabilities(optimized_cache=True, precisions=("fp32",)),
                   device="cpu", is_available=openvino_installed)

__all__ = ["DEVICE", "INFERENCE_PRECISIONS", "OPENVINO", "OpenVINOEngine", "OpenVINOOptions",
           "WEIGHT_COMPRESSED_COMPONENTS", "cpu_capabilities", "default_cache_dir", "make_openvino_engine",
           "resolve_inference_precision"]
