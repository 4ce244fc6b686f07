"""ONNX Runtime on the CPU (the ``cpu`` backend), and what the GPU backends share with it.

One options class for the family (:class:`OnnxRuntimeOptions`; the GPU providers' options add to
it, :mod:`.onnxruntime_gpu`), one engine class per provider, one factory per backend.
``onnxruntime`` is imported when an engine is made, not when this module is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ...components import CONTROLNET_STEP_CACHE, PLAIN_STEP_CACHE, ComponentSpec
from ...errors import EngineError, InputError, first_line
from ...package import ModelPackage
from ..engine import Engine, check_graph_io, check_output_shapes
from .ort_install import require_onnxruntime
from . import ort_cache
from .base import Backend, BackendOptions, Capabilities, default_threads, option, threads_option

logger = logging.getLogger(__name__)

# ONNX Runtime graph optimisation. "all" adds the CPU layout transformations (NCHWc): measured on
# the full-size UNet at 256x256 on 2 cores, session creation 18.9 s vs 2.1 s for "extended", one
# UNet call 1.45 s vs 1.63 s. "all" pays off for servers and long runs, "extended" for one-shot
# generations with few steps.
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")
_ORT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
               "disabled": "ORT_DISABLE_ALL"}

# Which sessions keep ONNX Runtime's CPU memory arena. An arena never returns memory, so each
# session holds its high-water mark for the life of the runtime. "loop" keeps it only for the
# components called every step (UNet, ControlNet: 16% slower calls without it at 512x512); the
# once-per-image ones free their activations after each call (VAE decoder at 512x512: 2.3 GB vs
# 1.3 GB peak, 0.8% slower). In a full-size 512x512 generation this took the cold-process peak
# from 12.1 to 11.8 GB: the UNet's attention buffers dominate, and the CPU-fused graphs are what
# shrink those (export/cpu_fusions.py). Measurements: bench/results/cpu-speed.
# "loop-shrink": the per-step components keep their arena within a call (the 16% above) and hand
# it back after each call (ONNX Runtime's arena shrinkage), so the UNet's activations are not held
# while the VAE decoder runs. Measurements: bench/results/cpu-memory-512.
MEMORY_ARENAS = ("loop", "all", "none", "loop-shrink")
LOOP_COMPONENTS = frozenset({"unet", "unet_plain", "unet_p2p", "controlnet",
                             *PLAIN_STEP_CACHE.names, *CONTROLNET_STEP_CACHE.names})


def memory_arena_option() -> Any:
    """``memory_arena``, which the ONNX Runtime CPU and OpenVINO backends share: one declaration, one flag."""
    return option("loop", flag="--memory-arena", choices=MEMORY_ARENAS,
                  help="which components keep their intermediate memory between calls (ONNX Runtime CPU arena, "
                       "OpenVINO buffers): loop (UNet/ControlNet), all, none, loop-shrink (as loop, handed "
                       "back after each call)")


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """Start-up options of the ONNX Runtime backends.

    ``threads``: intra-op threads (None: ``BLIPDIFFUSION_TRT_THREADS``, else ONNX Runtime's default).
    ``graph_optimization`` (:data:`GRAPH_OPTIMIZATIONS`): "all" runs fastest, "extended" loads
    several times faster. ``optimized_cache`` (a directory) keeps ONNX Runtime's optimised CPU
    graphs between runs: fast steps and a fast start after the first load (costs a copy of the
    weights). ``memory_arena`` (:data:`MEMORY_ARENAS`): which sessions keep a memory arena; "loop"
    (UNet/ControlNet only) frees the once-per-image components' activations after each call;
    "loop-shrink" also hands the UNet/ControlNet arena back after each of their calls.
    ``cpu_fused``: load the package's CPU-fused fp32 graphs where it has them (fused attention in
    the UNet and ControlNet; ``blipdiffusion-trt fuse`` adds them to a package). Backends without
    the capability (:class:`Capabilities`) ignore ``optimized_cache`` and ``cpu_fused``.
    """

    threads: int | None = threads_option()
    graph_optimization: str = option(
        "all", flag="--graph-optimization", choices=GRAPH_OPTIMIZATIONS,
        help="ONNX Runtime graph optimisation: all (fastest steps) or extended (much faster start)")
    optimized_cache: str | Path | None = option(
        None, flag="--ort-cache", metavar="DIR",
        help="directory keeping ONNX Runtime's optimised CPU graphs between runs "
             "(fast start and fast steps; costs a copy of the weights on disk; one that cannot be written is "
             "skipped with a warning)")
    memory_arena: str = memory_arena_option()
    cpu_fused: bool = option(
        True, flag="--no-cpu-fused",
        help="load the plain fp32 graphs even where the package has CPU-fused ones")

    def __post_init__(self) -> None:
        if self.threads is None:
            object.__setattr__(self, "threads", default_threads())
        elif isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise InputError(f"threads must be an integer >= 0, got {self.threads!r}", field="threads")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}, "
                             f"got {self.graph_optimization!r}", field="graph_optimization")
        if self.optimized_cache is not None and not isinstance(self.optimized_cache, (str, os.PathLike)):
            raise InputError(f"optimized_cache must be a directory path or None, got {type(self.optimized_cache).__name__}",
                             field="optimized_cache")
        if not isinstance(self.cpu_fused, bool):
            raise InputError(f"cpu_fused must be True or False, got {self.cpu_fused!r}", field="cpu_fused")
        if self.memory_arena not in MEMORY_ARENAS:
            raise InputError(f"memory_arena must be one of {', '.join(MEMORY_ARENAS)}, got {self.memory_arena!r}",
                             field="memory_arena")

    def uses_memory_arena(self, component: str) -> bool:
        return self.memory_arena == "all" or (self.memory_arena in ("loop", "loop-shrink") and component in LOOP_COMPONENTS)

    def shrinks_memory_arena(self, component: str) -> bool:
        """Whether the session's CPU arena is handed back after each call ("loop-shrink")."""
        return self.memory_arena == "loop-shrink" and component in LOOP_COMPONENTS

    def session_options(self, component: str, *, graph_optimization: str | None = None):
        """``onnxruntime.SessionOptions`` for one component's session."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        level = _ORT_LEVELS[graph_optimization or self.graph_optimization]
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = self.uses_memory_arena(component)
        if self.threads:
            options.intra_op_num_threads = self.threads
        return options




class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the CPU: plain ``session.run`` on numpy arrays.

    With ``optimized_cache``, the session's optimised graph is saved there on first load and
    loaded as it is afterwards: measured on the full-size UNet, session creation 21.6 s the first
    time, 1.7 s from the cache, identical outputs and step time.
    """

    default_providers: tuple = ("CPUExecutionProvider",)

    def __init__(self, spec: ComponentSpec, path: Path, options: OnnxRuntimeOptions, *,
                 providers: Sequence | None = None, optimized_cache: bool = True, source_digest: str | None = None):
        """``source_digest``: the graph's content as the package's manifest records it (the
        optimised-graph cache's key; None: hashed from the file)."""
        providers = list(providers or self.default_providers)
        ort = require_onnxruntime(providers)  # one line naming the extra when it (or the provider) is missing

        self._ort = ort
        self.spec = spec
        self.path = path
        source = Path(path)
        self.session = None
        if optimized_cache and options.optimized_cache is not None:
            cache_dir = Path(options.optimized_cache)
            cached = self._cached_graph(cache_dir, source, options.session_options(spec.name), providers,
                                        options.graph_optimization, source_digest)
            if cached is not None:
                try:
                    self.session = self._create_session(
                        ort, cached, options.session_options(spec.name, graph_optimization="disabled"), providers)
                    self.loaded_from = cached
                except EngineError as error:  # the cache's fault, not the package's
                    logger.warning("optimized_cache %s: %s; loading %s without the cache", cache_dir, error, source)
        if self.session is None:
            self.session = self._create_session(ort, source, options.session_options(spec.name), providers)
            self.loaded_from = source
        self._check_providers(providers)
        self._run_options = None
        if options.shrinks_memory_arena(spec.name) and provider_name(providers[0]) == "CPUExecutionProvider":
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        check_graph_io(spec, path, _io(self.session.get_inputs()), _io(self.session.get_outputs()))

    def _create_session(self, ort, source: Path, session_options, providers: list):
        try:
            return ort.InferenceSession(str(source), session_options, providers=providers)
        except Exception as error:  # ORT raises its own exception types; the user needs one line
            raise EngineError(f"{source}: ONNX Runtime cannot load it ({first_line(error)})") from None

    def _check_providers(self, providers: list) -> None:
        """The first provider asked for must be the one running the session: ONNX Runtime drops a
        provider it cannot start (missing libraries) without an error and runs on the next one."""
        wanted = provider_name(providers[0])
        active = self.session.get_providers()
        if not active or active[0] != wanted:
            raise EngineError(f"{self.path}: {wanted} is not available here (active: {', '.join(active)})")

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        self.check_open()
        outputs = self.session.run(self.output_names, {name: feed[name] for name in self.input_names}, self._run_options)
        result = dict(zip(self.output_names, outputs))
        check_output_shapes(self.spec, feed, result, self.path)
        return result

    def close(self) -> None:
        self.session = None
        super().close()

    @staticmethod
    def _cached_graph(cache_dir: Path, source: Path, options, providers, graph_optimization: str,
                      source_digest: str | None) -> Path | None:
        """The optimised graph from the cache (:mod:`.ort_cache`: keyed by content, verified),
        written first when missing; None when another process is writing it right now."""
        import onnxruntime as ort

        def optimize(target: Path, data_name: str) -> None:
            options.optimized_model_filepath = str(target)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            try:
                ort.InferenceSession(str(source), options, providers=providers)
            except Exception as error:  # ORT raises its own exception types; the user needs one line
                raise EngineError(f"{source}: ONNX Runtime cannot load it ({first_line(error)})") from None

        digest = source_digest or ort_cache.file_digest(source)
        return ort_cache.cached_graph(cache_dir, source.stem, digest, graph_optimization, optimize)


# ONNX Runtime's tensor types -> numpy dtype names (the declarations' spelling)
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(uint8)": "uint8",
              "tensor(int8)": "int8", "tensor(bfloat16)": "bfloat16"}


def _io(args) -> list[tuple[str, str, list]]:
    """A session's inputs or outputs (``NodeArg``) as :data:`~..engine.GraphTensor`."""
    return [(arg.name, _ORT_TYPES.get(arg.type, arg.type), list(arg.shape or [])) for arg in args]


# ------------------------------------------------------------------------------------------------
# Factories: (package, component, precision, options) -> Engine
# ------------------------------------------------------------------------------------------------

def make_cpu_engine(package: ModelPackage, component: str, precision: str, options: OnnxRuntimeOptions) -> Engine:
    fused = options.cpu_fused and precision == "fp32" and package.has_cpu_fused(component)
    path = package.onnx_path(component, precision, cpu_fused=fused)
    digest = package.graph_content_sha256(component, precision, cpu_fused=fused)
    return OnnxRuntimeEngine(package.specs[component], path, options, source_digest=digest)


def provider_name(provider) -> str:
    """``"CUDAExecutionProvider"`` of ``"CUDAExecutionProvider"`` or ``("CUDAExecutionProvider", {...})``."""
    return provider if isinstance(provider, str) else provider[0]


def provider_available(provider: str) -> Callable[[], bool]:
    """Whether this ONNX Runtime build has the execution provider ``provider``."""

    def available() -> bool:
        import onnxruntime as ort

        return provider in ort.get_available_providers()

    return available


CPU = Backend("cpu", "ONNX Runtime, CPU", OnnxRuntimeOptions, make_cpu_engine,
              Capabilities(cpu_fused_graphs=True, optimized_cache=True),
              device="cpu", is_available=provider_available("CPUExecutionProvider"))

__all__ = ["CPU", "GRAPH_OPTIMIZATIONS", "LOOP_COMPONENTS", "MEMORY_ARENAS", "OnnxRuntimeEngine", "OnnxRuntimeOptions",
           "default_threads", "provider_available", "provider_name"]
