"""TensorRT fp16 engines from a model package's fp16 ONNX graphs.

``build_engines`` parses each component's fp16 graph with TensorRT's ONNX parser into a strongly
typed network (the graph's own casts decide every precision: fp32 inputs/outputs, fp16 inside),
sets one optimization profile per component from :mod:`.profiles`, builds it and writes the plan
into the package's engine directory for this GPU architecture and TensorRT version, with its
record in ``engines.json`` (TensorRT version, GPU, compute capability, profile, options, seconds,
sha256; :mod:`.plans`) and the timing cache every build reuses (places:
:mod:`blipdiffusion_trt.package.layout`).

Engines are specific to a GPU architecture and a TensorRT version, so they live beside the
package's files, not in its manifest (``manifest.json`` lists what export wrote and is not
rewritten). The run-time TensorRT backend (:mod:`blipdiffusion_trt.runtime.backends.tensorrt`)
finds the directory of the running GPU and TensorRT and checks each plan against its record.

One recipe for TensorRT 10.x and 11.x: ``create_network(1 << STRONGLY_TYPED)`` (TensorRT 10 needs
the flag; TensorRT 11 is always strongly typed and ignores it) and no precision builder flags
(TensorRT 11 removed ``BuilderFlag.FP16``; strongly typed networks ignore precision flags anyway).
``EXPLICIT_BATCH`` is not passed: it is the only mode since TensorRT 10.

The TensorRT API is used directly rather than through Polygraphy. Polygraphy 0.53 could do it
(``NetworkFromOnnxPath(strongly_typed=True)`` + ``CreateConfig`` without ``fp16=True``; with
``fp16=True`` it sets ``BuilderFlag.FP16``, which TensorRT 11 no longer has), but: the build is
about ten TensorRT calls; failures here must be one-line errors naming the component (Polygraphy
reports through its own logger and ``PolygraphyException``); the progress monitor and timing
cache are wired to this tool's progress bar and files; and the runtime must not need Polygraphy
(its ``TrtRunner`` copies through its own buffers and cannot hand a device output to another
engine).

Nothing at module level imports TensorRT or CUDA: naming, records and the compatibility decision
(:mod:`.plans`), the running machine (:mod:`.environment`) and argument checks are plain
functions, testable anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import EngineError, InputError, PackageError, first_line
from ..fsutil import write_atomic
from ..package import ModelPackage, layout
from .environment import import_tensorrt, make_logger, running_environment
from .plans import (
    RECORD_NAME,
    BuildOptions,
    component_record,
    describe_build,
    engine_dir,
    merge_record,
    read_record,
    write_record,
)
from .profiles import component_profiles

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# TensorRT helpers (TensorRT imported by the caller)
# ------------------------------------------------------------------------------------------------

def network_flags(trt) -> int:
    """``1 << STRONGLY_TYPED``: required on TensorRT 10 for fp16-in-the-graph, ignored on 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise EngineError(f"TensorRT {trt.__version__} has no strongly typed networks; TensorRT >= 10 is required")
    return 1 << int(flag)


def make_progress_monitor(trt, report):
    """A ``trt.IProgressMonitor`` (TensorRT >= 10) calling ``report(text)``; None when unavailable."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, int]] = {}  # name -> (step, num_steps), insertion order = depth

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._phases[phase_name] = (0, int(num_steps))
                self._show()

        def step_complete(self, phase_name, step):
            with self._lock:
                if phase_name in self._phases:
                    self._phases[phase_name] = (int(step) + 1, self._phases[phase_name][1])
                    self._show()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                self._phases.pop(phase_name, None)
                self._show()

        def _show(self) -> None:
            try:
                report(" > ".join(f"{n} {s}/{t}" for n, (s, t) in self._phases.items()))
            except Exception:  # a progress bar must never break a build
                pass

    return _Monitor()



# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

@dataclass
class BuildReport:
    engine_dir: Path
    record_path: Path
    timing_cache: Path
    running: dict[str, str]
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def fp16_graph(package: ModelPackage, component: str) -> Path:
    """The fp16 ONNX graph of ``component``; missing -> PackageError with the re-export command."""
    path = package.layout.graph(component, "fp16")
    if "fp16" not in package.precisions or not package.has_graph(component, "fp16"):
        source = package.source
        controlnet = f" --controlnet {shlex.quote(str(source['controlnet']))}" if source.get("controlnet") else ""
        hint = f" (CHECKPOINT: the {source['checkpoint']} directory)" if source.get("checkpoint") else ""
        raise PackageError(
            f"{path} not found: TensorRT engines are built from the package's fp16 graphs; re-export with "
            f"`blipdiffusion-trt export CHECKPOINT{controlnet} --out {shlex.quote(str(package.root))} "
            f"--precision fp32,fp16 --force`{hint}"
        )
    return package.onnx_path(component, "fp16")  # confined, and checked against its sha256


def build_engines(
    package_dir: str | Path,
    components: Iterable[str] | None = None,
    shapes: str = "static",
    batch: Any = None,
    height: Any = None,
    width: Any = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    progress: bool = True,
) -> BuildReport:
    """Build ``PACKAGE/engines/<sm_XY>-trt<major.minor>/<component>.plan`` for the current GPU.

    Every argument is checked (one-line :class:`InputError`/:class:`PackageError`) before
    TensorRT is imported, so a bad call fails the same way on a machine without it.
    """
    start = time.perf_counter()
    options = BuildOptions.from_args(shapes, batch, height, width, workspace_gb)
    if isinstance(components, str):
        components = [c for c in components.split(",") if c.strip()]
    package = ModelPackage.open(package_dir)
    names = list(package.specs) if not components else list(dict.fromkeys(c.strip() for c in components))
    profiles = component_profiles(package.config, options.shapes, batch=options.batch, height=options.height,
                                  width=options.width, components=names)
    graphs = {name: fp16_graph(package, name) for name in names}
    cache_path = Path(timing_cache) if timing_cache is not None else package.layout.timing_cache
    if timing_cache is not None and not cache_path.parent.is_dir():
        raise InputError(f"--timing-cache: directory {cache_path.parent} does not exist")
    if cache_path.is_dir():
        raise InputError(f"--timing-cache: {cache_path} is a directory, give a file")

    trt = import_tensorrt()
    running = running_environment(trt)
    out_dir = engine_dir(package.root, running["compute_capability"], running["tensorrt_version"])
    _ensure_writable(out_dir)
    report = BuildReport(out_dir, out_dir / RECORD_NAME, cache_path, running)

    trt_logger = make_logger(trt)
    builder = trt.Builder(trt_logger)
    if builder is None:
        raise EngineError(f"TensorRT cannot create a builder on {describe_build(running)} ({trt_logger.last_error()})")
    cache_bytes = _read_timing_cache(cache_path)

    from tqdm.auto import tqdm

    bar = tqdm(names, desc="build", unit="engine", disable=not progress)
    monitor = make_progress_monitor(trt, _throttled(lambda text: bar.set_postfix_str(text[-80:]))) if progress else None
    cache = None
    try:
        for name in bar:
            bar.set_description(f"build {name}")
            t0 = time.perf_counter()
            serialized, cache = _build_one(trt, builder, trt_logger, graphs[name], name, profiles[name], options,
                                           cache_bytes, cache, monitor)
            seconds = time.perf_counter() - t0
            plan = out_dir / layout.plan_file(name)
            digest = hashlib.sha256(memoryview(serialized)).hexdigest()
            size = _write_plan(plan, serialized)
            del serialized
            if cache is not None:
                cache_bytes = bytes(memoryview(cache.serialize()))
                _write_timing_cache(cache_path, cache_bytes)
            entry = component_record(
                component=name, plan=plan.name, sha256=digest, size_bytes=size,
                tensorrt_version=running["tensorrt_version"], gpu_name=running["gpu_name"],
                compute_capability=running["compute_capability"], profile=profiles[name], options=options,
                build_seconds=seconds, onnx=layout.graph_file(name, "fp16"), onnx_sha256=package.graph_sha256(name, "fp16"),
            )
            write_record(out_dir, merge_record(read_record(out_dir), name, entry))
            report.components[name] = {"plan": str(plan), "seconds": round(seconds, 2), "size_bytes": size, "sha256": digest}
    finally:
        bar.close()
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def _build_one(trt, builder, trt_logger, graph: Path, name: str, profile, options: BuildOptions,
               cache_bytes: bytes, cache, monitor):
    """Parse, configure, build one component; returns (serialized plan, timing cache)."""
    trt_logger.errors.clear()
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(graph)):  # from the file, so external .data next to it is found
        first = first_line(str(parser.get_error(0))) if parser.num_errors else trt_logger.last_error()
        raise EngineError(f"{graph}: TensorRT's ONNX parser failed ({parser.num_errors} errors; first: {first})")

    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if cache is None:
        try:
            cache = config.create_timing_cache(cache_bytes)
        except Exception:  # unreadable bytes (another TensorRT version, truncated file)
            cache = None
        if cache is None:
            logger.warning("timing cache is unreadable; starting a new one")
            cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU is refused
        logger.warning("timing cache does not fit this GPU/TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if monitor is not None:
        config.progress_monitor = monitor

    opt_profile = builder.create_optimization_profile()
    network_inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = [n for n in network_inputs if n not in profile]
    if unknown:
        raise EngineError(f"{graph}: inputs {', '.join(unknown)} are not in the {name} declaration; re-export the package")
    dynamic = 0
    for input_name, (low, opt, high) in profile.items():
        if input_name not in network_inputs:
            logger.debug("%s: declared input %s is not used by the graph", name, input_name)
            continue
        dims = network_inputs[input_name]
        if len(dims) != len(low) or any(d != -1 and not lo == d == hi for d, lo, hi in zip(dims, low, high)):
            raise EngineError(f"{graph}: input {input_name} has shape {list(dims)}, the declaration {list(low)}")
        if any(d == -1 for d in dims):
            opt_profile.set_shape(input_name, low, opt, high)
            dynamic += 1
    if dynamic:
        config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{name}: TensorRT build failed ({trt_logger.last_error()})")
    del parser, network, config
    return serialized, cache


def _throttled(report, interval: float = 0.5):
    """Call ``report`` at most every ``interval`` seconds (TensorRT reports from its own threads)."""
    last = [0.0]
    lock = threading.Lock()

    def call(text: str) -> None:
        now = time.monotonic()
        with lock:
            if now - last[0] < interval:
                return
            last[0] = now
        report(text)

    return call


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        raise EngineError(f"cannot write TensorRT engines to {directory}: {error.strerror or error}") from None


def _write_plan(path: Path, serialized) -> int:
    """Temp file in the same directory, then rename: a reader never sees half a plan."""
    data = memoryview(serialized)
    write_atomic(path, data, EngineError)
    return data.nbytes


def _read_timing_cache(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as error:
        logger.warning("cannot read timing cache %s (%s); starting a new one", path, error.strerror)
        return b""


def _write_timing_cache(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EngineError(f"cannot write timing cache {path}: {error.strerror or error}") from None
    write_atomic(path, data, EngineError)

