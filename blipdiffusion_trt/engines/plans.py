"""TensorRT plans without TensorRT: engine directory names, ``engines.json`` records, compatibility.

A plan only loads in the TensorRT version that built it, on the GPU architecture it was built
for; a package therefore keeps one engine directory per (architecture, TensorRT version), named
here (:func:`engine_dir_name`, ``sm_90-trt10.8``) and placed by the package layout
(:mod:`blipdiffusion_trt.package.layout`). Each directory's ``engines.json`` records, per
component, what its plan was built from (graph and sha256), for (GPU, compute capability) and
with (TensorRT version, build options, profile).

The builder (:mod:`.build`) writes plans and records; the run-time TensorRT backend
(:mod:`blipdiffusion_trt.runtime.backends.tensorrt`) finds the plan for the running GPU and
TensorRT (:func:`locate_plan`, :func:`read_plan`) and gets every mismatch as one line naming what
the plan was built for, what is running and the ``blipdiffusion-trt build`` command that fixes
it. Nothing here imports TensorRT or CUDA: every decision is testable on any machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import EngineError, InputError
from ..fsutil import read_json, write_atomic
from ..package import PackageLayout, layout
from ..schema import Int, List, MapOf, Nullable, Number, Object, Str, check
from .profiles import check_shapes_mode, format_range, parse_range, profile_to_json

RECORD_NAME = layout.ENGINE_RECORD
RECORD_FORMAT_VERSION = 1

_SHA256 = Str(pattern="[0-9a-f]{64}", description="a sha256 (64 lowercase hex digits)")
_DIMS = List(Int(0, 1 << 20), max_length=16)
_RANGE = Nullable(Str(pattern=r"[0-9]+(:[0-9]+:[0-9]+)?", max_length=64, description="N or MIN:OPT:MAX"))
# What one component's entry in engines.json must hold: the plan is a file name inside the engine
# directory (never a path), the rest typed as the builder writes it.
COMPONENT_RECORD_SHAPE = Object(optional={
    "plan": Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", max_length=255, description="a plan file name (no path)"),
    "sha256": _SHA256, "onnx_sha256": Nullable(_SHA256), "size_bytes": Int(0, 1 << 42),
    "tensorrt_version": Str(max_length=64), "gpu_name": Str(max_length=256), "compute_capability": Str(max_length=16),
    "profile": MapOf(Object(required={"min": _DIMS, "opt": _DIMS, "max": _DIMS}), max_length=256),
    "options": Object(optional={"shapes": Str(max_length=16), "batch": _RANGE, "height": _RANGE, "width": _RANGE,
                                "workspace_gb": Nullable(Number(above=0))}),
    "build_seconds": Number(0), "onnx": Nullable(Str(max_length=1024)), "built": Str(max_length=64),
    "component": Str(max_length=256),
})
RECORD_SHAPE = Object(required={"format_version": Int(), "components": MapOf(COMPONENT_RECORD_SHAPE, max_length=256)})


# ------------------------------------------------------------------------------------------------
# Names
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



def engine_dir(package: str | Path, compute_capability: Any, trt_version: str) -> Path:
    """The engine directory of a package for one GPU architecture and TensorRT version."""
    return PackageLayout(package).engine_dir(engine_dir_name(compute_capability, trt_version))


# ------------------------------------------------------------------------------------------------
# Build options and records
# ------------------------------------------------------------------------------------------------

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
    if not path.exists():
        return None
    data = read_json(path, EngineError, what="engines.json; rebuild the engines")
    if not isinstance(data, dict) or data.get("format_version") != RECORD_FORMAT_VERSION:
        raise EngineError(f"{path}: not an engines.json of format {RECORD_FORMAT_VERSION}; rebuild the engines")
    return check(data, RECORD_SHAPE, source=f"{path} (rebuild the engines)", error=EngineError)



def write_record(directory: str | Path, record: Mapping[str, Any]) -> Path:
    path = Path(directory) / RECORD_NAME
    write_atomic(path, json.dumps(record, indent=2).encode(), EngineError)
    return path


# ------------------------------------------------------------------------------------------------
# Compatibility
# ------------------------------------------------------------------------------------------------

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
# Finding and checking a plan (no CUDA needed until the plan is deserialized)
# ------------------------------------------------------------------------------------------------

def locate_plan(package: str | Path, component: str, running: Mapping[str, Any],
                onnx_sha256: str | None = None) -> tuple[Path, dict[str, Any], str | None]:
    """The plan for ``component`` on the running GPU/TensorRT, and its record.

    Raises :class:`EngineError` when there is none; when engines exist for another GPU or
    TensorRT version, the message says what they were built for. Returns the plan path, its
    record and a warning (another GPU model of the same architecture) or None.
    """
    root = Path(package)
    directory = engine_dir(root, running["compute_capability"], running["tensorrt_version"])
    record = (read_record(directory) or {}).get("components", {}).get(component)
    if record is None:
        # Say what exists instead: the nearest mismatch explains what to rebuild.
        for other in PackageLayout(root).engine_dirs():
            found = (read_record(other) or {}).get("components", {}).get(component)
            if found is not None:
                message = check_compatibility(found, running, package=root, component=component)
                if message:
                    raise EngineError(message)
        raise EngineError(check_compatibility(None, running, package=root, component=component))
    plan = directory / record.get("plan", layout.plan_file(component))
    message = check_compatibility(record, running, package=root, component=component, plan=plan,
                                  onnx_sha256=onnx_sha256)
    if message:
        raise EngineError(message)
    warning = None
    if not same_gpu_model(record, running):
        warning = (f"TensorRT engine {component} was built on {record.get('gpu_name')}, running on "
                   f"{running.get('gpu_name')} (same architecture): it runs, possibly below its best speed; "
                   f"rebuild for this GPU: {rebuild_command(root, record.get('options'))}")
    return plan, record, warning


def read_plan(plan: Path, record: Mapping[str, Any], running: Mapping[str, Any], package: str | Path,
              component: str) -> bytes:
    """The plan's bytes, after checking them against the sha256 in ``engines.json``."""
    try:
        data = plan.read_bytes()
    except OSError as error:
        raise EngineError(f"cannot read {plan}: {error.strerror or error}") from None
    message = check_compatibility(record, running, package=package, component=component, plan=plan,
                                  plan_sha256=hashlib.sha256(data).hexdigest())
    if message:
        raise EngineError(message)
    return data
