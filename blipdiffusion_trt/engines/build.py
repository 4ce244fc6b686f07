"""TensorRT fp16 engines from a model package's fp16 ONNX graphs.

``build_engines`` parses ``PACKAGE/onnx/fp16/<component>.onnx`` with TensorRT's ONNX parser into a
strongly typed network (the graph's own casts decide every precision: fp32 inputs/outputs, fp16
inside), sets one optimization profile per component from :mod:`.profiles`, builds it and writes::

    PACKAGE/engines/timing.cache                  reused by every build (unless --timing-cache)
    PACKAGE/engines/<sm_XY>-trt<major.minor>/
        <component>.plan                          serialized engine
        engines.json                              per component: TensorRT version, GPU, compute
                                                  capability, profile, options, seconds, sha256

Engines are specific to a GPU architecture and a TensorRT version, so they live beside the
package's files, not in its manifest (``manifest.json`` lists what export wrote and is not
rewritten). The runtime (:mod:`blipdiffusion_trt.runtime.tensorrt_engine`) finds the directory of
the running GPU and TensorRT and checks each plan against ``engines.json``.

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

Nothing at module level imports TensorRT or CUDA: naming, records, the compatibility decision
and argument checks are plain functions, testable anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import EngineError, InputError, PackageError, first_line
from ..package import ModelPackage, PackageLayout, layout
from .profiles import check_shapes_mode, component_profiles, format_range, parse_range, profile_to_json

logger = logging.getLogger(__name__)

RECORD_NAME = layout.ENGINE_RECORD
RECORD_FORMAT_VERSION = 1
NOT_INSTALLED = "TensorRT is not installed: pip install .[trt] on a machine with an NVIDIA GPU, or use Dockerfile.trt"


# ------------------------------------------------------------------------------------------------
# Pure helpers: names, versions, records, compatibility
# ------------------------------------------------------------------------------------------------

def parse_compute_capability(value: Any) -> tuple[int, int]:
    """``"8.6"`` | ``(8, 6)`` | ``"sm_86"`` -> ``(8, 6)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)\.(\d+)", text)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = re.fullmatch(r"sm_?(\d+)(\d)", text)
    if match:
        return int(match.group(1)), int(match.group(2))
    raise ValueError(f"not a compute capability: {value!r}")


def format_compute_capability(value: Any) -> str:
    major, minor = parse_compute_capability(value)
    return f"{major}.{minor}"


def sm_name(value: Any) -> str:
    major, minor = parse_compute_capability(value)
    return f"sm_{major}{minor}"


def trt_major_minor(version: str) -> str:
    parts = str(version).split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"not a TensorRT version: {version!r}")
    return f"{parts[0]}.{parts[1]}"


def engine_dir_name(compute_capability: Any, trt_version: str) -> str:
    """``engine_dir_name("9.0", "10.8.0.43") == "sm_90-trt10.8"``."""
    return f"{sm_name(compute_capability)}-trt{trt_major_minor(trt_version)}"


_ENGINE_DIR_NAME = re.compile(r"^sm_(\d{2,3})-trt(\d[\w.\-]*)$")


def parse_engine_dir_name(name: str) -> tuple[str, str] | None:
    """The inverse of :func:`engine_dir_name`: ``"sm_89-trt10.8"`` -> ``("8.9", "10.8")``; None if not one."""
    match = _ENGINE_DIR_NAME.match(name)
    if not match:
        return None
    sm, version = match.groups()
    return f"{int(sm[:-1])}.{sm[-1]}", version


def version_key(version: str) -> tuple[int, ...]:
    """A TensorRT version as a tuple that sorts like the versions (``"10.13"`` after ``"10.8"``)."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-]", version))


def engines_root(package_dir: str | Path) -> Path:
    return PackageLayout(package_dir).engines_root


def engine_dir(package_dir: str | Path, compute_capability: Any, trt_version: str) -> Path:
    return PackageLayout(package_dir).engine_dir(engine_dir_name(compute_capability, trt_version))


def plan_name(component: str) -> str:
    return layout.plan_file(component)


@dataclass(frozen=True)
class BuildOptions:
    """What ``blipdiffusion-trt build`` was asked for: recorded, and replayed in rebuild commands."""

    shapes: str = "static"
    batch: str | None = None  # "N" or "MIN:OPT:MAX", as given
    height: str | None = None
    width: str | None = None
    workspace_gb: float | None = None

    @classmethod
    def from_args(cls, shapes: str = "static", batch: Any = None, height: Any = None, width: Any = None,
                  workspace_gb: Any = None) -> "BuildOptions":
        check_shapes_mode(shapes)
        return cls(
            shapes=shapes,
            batch=format_range(parse_range("--batch", batch)),
            height=format_range(parse_range("--height", height)),
            width=format_range(parse_range("--width", width)),
            workspace_gb=check_workspace(workspace_gb),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "batch": self.batch, "height": self.height, "width": self.width,
                "workspace_gb": self.workspace_gb}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "BuildOptions":
        data = data or {}
        return cls(**{k: data.get(k, getattr(cls, k)) for k in ("shapes", "batch", "height", "width", "workspace_gb")})


def check_workspace(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--workspace must be a size in GiB > 0, got {value!r}") from None
    if isinstance(value, bool) or not number > 0 or number != number or number == float("inf"):
        raise InputError(f"--workspace must be a size in GiB > 0, got {value!r}")
    return number


def rebuild_command(package: str | Path, options: BuildOptions | Mapping[str, Any] | None = None,
                    components: Sequence[str] | None = None) -> str:
    """The exact ``blipdiffusion-trt build`` command line that rebuilds with the same options."""
    if not isinstance(options, BuildOptions):
        options = BuildOptions.from_dict(options)
    words = ["blipdiffusion-trt", "build", str(package)]
    if components:
        words += ["--components", ",".join(components)]
    words += ["--shapes", options.shapes]
    for name in ("batch", "height", "width"):
        value = getattr(options, name)
        if value is not None:
            words += [f"--{name}", value]
    if options.workspace_gb is not None:
        words += ["--workspace", f"{options.workspace_gb:g}"]
    return " ".join(shlex.quote(w) for w in words)


def component_record(
    *,
    component: str,
    plan: str,
    sha256: str,
    size_bytes: int,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: Any,
    profile: Mapping[str, Any],
    options: BuildOptions,
    build_seconds: float,
    onnx: str,
    onnx_sha256: str | None,
    built: str | None = None,
) -> dict[str, Any]:
    """One component's entry in ``engines.json``."""
    return {
        "plan": plan,
        "sha256": sha256,
        "size_bytes": int(size_bytes),
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": gpu_name,
        "compute_capability": format_compute_capability(compute_capability),
        "profile": profile_to_json(profile) if profile and not _is_json_profile(profile) else dict(profile),
        "options": options.to_dict(),
        "build_seconds": round(float(build_seconds), 2),
        "onnx": onnx,
        "onnx_sha256": onnx_sha256,
        "built": built or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "component": component,
    }


def _is_json_profile(profile: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Mapping) for v in profile.values())


def merge_record(existing: Mapping[str, Any] | None, component: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """``engines.json`` with ``component``'s entry replaced (the others kept)."""
    record = {"format_version": RECORD_FORMAT_VERSION, "components": {}}
    if existing and existing.get("format_version") == RECORD_FORMAT_VERSION:
        record["components"] = dict(existing.get("components") or {})
    record["components"][component] = dict(entry)
    record["components"] = dict(sorted(record["components"].items()))
    return record


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """``engines.json`` of an engine directory, or None when absent; unreadable -> EngineError."""
    path = Path(directory) / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise EngineError(f"{path}: unreadable ({error}); rebuild the engines") from None
    if not isinstance(data, dict) or data.get("format_version") != RECORD_FORMAT_VERSION:
        raise EngineError(f"{path}: not an engines.json of format {RECORD_FORMAT_VERSION}; rebuild the engines")
    return data


def write_record(directory: str | Path, record: Mapping[str, Any]) -> Path:
    path = Path(directory) / RECORD_NAME
    _atomic_write(path, json.dumps(record, indent=2).encode())
    return path


def describe_build(record: Mapping[str, Any]) -> str:
    return (f"{record.get('gpu_name', '?')} (compute capability {record.get('compute_capability', '?')}) "
            f"with TensorRT {record.get('tensorrt_version', '?')}")


def check_compatibility(
    record: Mapping[str, Any] | None,
    running: Mapping[str, Any],
    *,
    package: str | Path = "PACKAGE",
    component: str | None = None,
    plan: str | Path | None = None,
    plan_sha256: str | None = None,
    onnx_sha256: str | None = None,
) -> str | None:
    """None when a plan built as ``record`` says can run here, else why not and the rebuild command.

    ``running``: ``{"tensorrt_version", "compute_capability", "gpu_name"}`` of this process.
    ``plan``: the plan's path, checked to exist; ``plan_sha256``: its digest, checked against the
    record; ``onnx_sha256``: the package's current fp16 graph digest (a re-exported graph makes
    the plan stale). The decision reads nothing else, so it is tested without TensorRT or a GPU.
    """
    name = component or (record or {}).get("component") or "component"
    here = describe_build(running)
    if record is None:
        return (f"no TensorRT engine for {name} built for {here}; build it: "
                f"{rebuild_command(package, None, [name] if component else None)}")
    options = record.get("options")
    rebuild_all = rebuild_command(package, options)
    rebuild_one = rebuild_command(package, options, [name])
    built_cc = record.get("compute_capability")
    try:
        same_cc = parse_compute_capability(built_cc) == parse_compute_capability(running.get("compute_capability"))
    except ValueError:
        same_cc = False
    if not same_cc:
        return (f"TensorRT engine {name} was built for {describe_build(record)}, this is {here}: "
                f"engines only run on the GPU architecture they were built for; rebuild: {rebuild_all}")
    if str(record.get("tensorrt_version")) != str(running.get("tensorrt_version")):
        return (f"TensorRT engine {name} was built with TensorRT {record.get('tensorrt_version')}, this is "
                f"TensorRT {running.get('tensorrt_version')}: plans only load in the TensorRT version that "
                f"built them; rebuild: {rebuild_all}")
    if plan is not None and not Path(plan).is_file():
        return f"TensorRT engine {name}: {plan} is missing; rebuild it: {rebuild_one}"
    if plan_sha256 is not None and plan_sha256 != record.get("sha256"):
        return (f"TensorRT engine {name}: {plan if plan is not None else 'the plan'} does not match its sha256 in "
                f"{RECORD_NAME} (corrupted or replaced); rebuild it: {rebuild_one}")
    if onnx_sha256 is not None and record.get("onnx_sha256") not in (None, onnx_sha256):
        return (f"TensorRT engine {name} was built from another {record.get('onnx', 'fp16 graph')} than the "
                f"package now holds; rebuild it: {rebuild_one}")
    return None


def same_gpu_model(record: Mapping[str, Any], running: Mapping[str, Any]) -> bool:
    """Same compute capability but another GPU model loads, and may run below its best tactics."""
    return str(record.get("gpu_name")) == str(running.get("gpu_name"))


# ------------------------------------------------------------------------------------------------
# The running machine
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# TensorRT helpers (TensorRT imported by the caller)
# ------------------------------------------------------------------------------------------------

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
            return _one_line(self.errors[-1]) if self.errors else default

    return _Logger()


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
    if "fp16" not in package.precisions or not package.has_graph(component, "fp16") or not path.is_file():
        source = package.source
        controlnet = f" --controlnet {shlex.quote(str(source['controlnet']))}" if source.get("controlnet") else ""
        hint = f" (CHECKPOINT: the {source['checkpoint']} directory)" if source.get("checkpoint") else ""
        raise PackageError(
            f"{path} not found: TensorRT engines are built from the package's fp16 graphs; re-export with "
            f"`blipdiffusion-trt export CHECKPOINT{controlnet} --out {shlex.quote(str(package.root))} "
            f"--precision fp32,fp16 --force`{hint}"
        )
    return path


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
            plan = out_dir / plan_name(name)
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
        first = _one_line(str(parser.get_error(0))) if parser.num_errors else trt_logger.last_error()
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
    _atomic_write(path, data)
    return data.nbytes


def _atomic_write(path: Path, data) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        raise EngineError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
    _atomic_write(path, data)


def remove_engines(package_dir: str | Path) -> None:
    """Delete every engine directory of a package (they are rebuilt per machine)."""
    shutil.rmtree(engines_root(package_dir), ignore_errors=True)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


