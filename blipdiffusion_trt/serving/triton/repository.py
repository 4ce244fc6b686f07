"""Triton model repositories for a model package: one model per component, plus a BLS pipeline.

``write_triton_repository(package, out, flavor)`` writes::

    OUT/<component>/config.pbtxt        one model per component a generation (or an edit) runs
    OUT/<component>/1/model.plan        flavor "tensorrt"     (platform tensorrt_plan, KIND_GPU)
    OUT/<component>/1/model.onnx        flavor "onnxruntime"  (platform onnxruntime_onnx, TensorRT EP FP16)
    OUT/<component>/1/model.py+.onnx    flavor "python-cpu"   (python backend, ONNX Runtime on the CPU;
                                                               the package's CPU-fused graphs where it has them)
    OUT/blip_diffusion/config.pbtxt     whole generations: python-backend BLS model
    OUT/blip_diffusion/1/model.py
    OUT/blip_diffusion/1/package/       the package's configs and tokenizers (no graphs)
    OUT/blip_diffusion/1/blipdiffusion_trt/   the code the python models import (CODE_FILES)
    OUT/blip_diffusion/triton_probe.py  the liveness probe (``blipdiffusion-trt triton-probe``), for containers
    OUT/blip_diffusion_progress/        with --progress-model: the same model, decoupled, streaming
                                        a progress response per denoising step before the image

The components are :func:`~blipdiffusion_trt.components.generation_components` (``unet_plain``
for a plain package, ``unet`` + ``controlnet`` for a ControlNet package) and, when the package has
them, :func:`~blipdiffusion_trt.components.editing_components` (``vae_encoder``, ``unet_plain``,
``unet_p2p``): then the BLS model takes edits too (for the ``tensorrt`` flavor, when their plans
were built); their configs come from :mod:`.configs`. For the ``tensorrt`` flavor the dims are those the engines were built for: the
axis ranges are recomputed from the build options in each engine directory's ``engines.json``
(the builder's default, ``--shapes static``, fixes every axis but the Q-Former's text length, so
those models are unbatched, with fixed dims and CUDA graphs). Plans come from
``PACKAGE/engines/sm_XY-trtX.Y/`` (the newest TensorRT per architecture); several architectures
become ``cc_model_filenames``. Graphs are hard-linked where possible; an external
``<component>.onnx.data`` file keeps the name the graph refers to.

The model files (``model_files/``) are copied as ``model.py``; the code they import is copied
into the BLS model's directory, so the repository also serves in NVIDIA's Triton container, where
this project is not installed: the stub's Python needs only numpy, Pillow and tokenizers (and
onnxruntime for the python-cpu component models). Everything is written to a temporary sibling
directory and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ...components import ComponentSpec, PipelineConfig, editing_components, generation_components, step_cache_components
from ...engines.plans import BuildOptions, parse_engine_dir_name, read_record, version_key
from ...engines.profiles import axis_ranges, profile_from_json, spec_profile
from ...errors import InputError, PackageError, describe
from ...fsutil import StagingDir, check_not_an_input, replace_dir
from ...package import ModelPackage, layout, sha256_file
from .configs import (
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_QUEUE_TIMEOUT_MS,
    FLAVORS,
    Range,
    bls_config,
    component_config,
)

logger = logging.getLogger(__name__)

BLS_MODEL = "blip_diffusion"
PROGRESS_MODEL = "blip_diffusion_progress"  # the decoupled variant (--progress-model)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the blipdiffusion_trt directory
MODEL_FILES = Path(__file__).resolve().parent / "model_files"
BLS_MODEL_FILE = MODEL_FILES / "blip_diffusion.py"
COMPONENT_MODEL_FILE = MODEL_FILES / "component.py"
PROBE_FILE = Path(__file__).resolve().parent / "probe.py"
# triton-probe (standard library only), beside the BLS model's version directory (Triton loads
# numbered version directories only): a container runs it as a liveness probe from the repository
PROBE_COPY = "triton_probe.py"
CODE_DIR = "."  # the BLS model's code_dir: its version directory holds blipdiffusion_trt/ (CODE_FILES)
PACKAGE_COPY = "package"

# The code the python models import, relative to blipdiffusion_trt/: the BLS model's and the
# component models' modules and their package-internal imports, nothing else (no export code,
# no engine builder, no backend whose libraries the Triton container lacks). The tests import
# both model files from a written repository with only this copy on the path, and check that
# exactly these files are loaded.
CODE_FILES: tuple[str, ...] = (
    "__init__.py",
    "components.py",
    "errors.py",
    "fsutil.py",
    "schema.py",
    "package/__init__.py",
    "package/layout.py",
    "package/manifest.py",
    "package/model_package.py",
    "runtime/__init__.py",
    "runtime/editing.py",
    "runtime/engine.py",
    "runtime/images.py",
    "runtime/inputs.py",
    "runtime/p2p.py",
    "runtime/pipeline.py",
    "runtime/schedulers/__init__.py",
    "runtime/schedulers/base.py",
    "runtime/schedulers/ddim.py",
    "runtime/schedulers/ddim_inverse.py",
    "runtime/schedulers/dpm_solver.py",
    "runtime/schedulers/euler.py",
    "runtime/schedulers/pndm.py",
    "runtime/step_cache.py",
    "runtime/text.py",
    "runtime/timing.py",
    "runtime/backends/__init__.py",
    "runtime/backends/base.py",
    "serving/__init__.py",
    "serving/triton/__init__.py",
    "serving/triton/bls.py",
    "serving/triton/component.py",
    "serving/triton/engine.py",
    "serving/triton/metrics.py",
    "serving/triton/python_backend.py",
)


@dataclass
class ModelEntry:
    """One model of the repository, as written (kept for tests and the CLI report)."""

    name: str
    component: str | None
    max_batch_size: int
    config: str
    files: list[str] = field(default_factory=list)


@dataclass
class TritonRepository:
    path: Path
    flavor: str
    models: dict[str, ModelEntry]


# --------------------------------------------------------------------------------------------
# TensorRT plans
# --------------------------------------------------------------------------------------------


def find_plans(package: ModelPackage, components: Sequence[str]) -> dict[str, Path]:
    """compute capability ("8.9") -> engines dir holding a plan of every component (newest TensorRT)."""
    found: dict[str, tuple[tuple, Path]] = {}
    for folder in package.layout.engine_dirs():
        parsed = parse_engine_dir_name(folder.name)
        if parsed is None:
            continue
        cc, version = parsed
        missing = [c for c in components if not package.layout.plan(folder.name, c).is_file()]
        if missing:
            logger.warning("%s: no plan for %s; skipped", folder, ", ".join(missing))
            continue
        key = version_key(version)
        if cc not in found or key > found[cc][0]:
            found[cc] = (key, folder)
    if not found:
        raise PackageError(
            f"{package.layout.engines_root}: no TensorRT plans for {', '.join(components)}; run blipdiffusion-trt build first"
        )
    return {cc: folder for cc, (_, folder) in found.items()}


def engine_ranges(config: PipelineConfig, spec: ComponentSpec, folders: Iterable[Path]) -> dict[str, Range] | None:
    """Axis ranges the component's engines were built for, from each folder's ``engines.json``.

    The builder records its options (``--shapes static|dynamic``, ``--batch``, ``--height``,
    ``--width``); the ranges are recomputed from them with the builder's own profile code and
    checked against the recorded profile. None (declared ranges) when no folder records the
    component; several folders (architectures) must agree, since they share one config.pbtxt.
    """
    found: dict[Path, dict[str, Range]] = {}
    for folder in folders:
        entry = ((read_record(folder) or {}).get("components") or {}).get(spec.name)
        if not entry:
            continue
        options = BuildOptions.from_dict(entry.get("options"))
        ranges = axis_ranges(config, options.shapes, batch=options.batch, height=options.height, width=options.width)
        profile = entry.get("profile")
        if profile and profile_from_json(profile) != spec_profile(spec, ranges):
            raise PackageError(
                f"{folder}/engines.json: the recorded profile of {spec.name} does not match its build options; "
                f"rebuild with blipdiffusion-trt build"
            )
        found[folder] = {name: tuple(r) for name, r in ranges.items()}  # type: ignore[misc]
    if not found:
        logger.warning("no engines.json records %s; its config uses the declared shape ranges", spec.name)
        return None
    first_folder, first = next(iter(found.items()))
    for folder, ranges in found.items():
        if ranges != first:
            raise PackageError(
                f"{spec.name}: the engines in {first_folder.name} and {folder.name} were built for different shapes; "
                f"rebuild them with the same --shapes/--batch/--height/--width"
            )
    return first


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_graph(package: ModelPackage, precision: str, cpu_fused: bool, component: str, version_dir: Path) -> list[str]:
    """model.onnx (+ its external data file, under the name the graph refers to), checked against
    the manifest (confined, size, sha256 unless the package was opened without ``verify``) before
    it is linked or copied."""
    src = package.onnx_path(component, precision, cpu_fused=cpu_fused)
    _link_or_copy(src, version_dir / "model.onnx")
    written = ["model.onnx"]
    variant = layout.graph_variant(precision, cpu_fused=cpu_fused)
    data_name = layout.graph_data_file(component, variant)
    if package.lists(data_name):
        data = package.file(data_name)
        _link_or_copy(data, version_dir / data.name)
        written.append(data.name)
    return written


def _checked_plan(package: ModelPackage, folder: Path, component: str) -> Path:
    """A plan to copy, checked against the sha256 its ``engines.json`` records (where it records one)."""
    plan = package.layout.plan(folder.name, component)
    entry = ((read_record(folder) or {}).get("components") or {}).get(component) or {}
    expected = entry.get("sha256")
    if expected and sha256_file(plan, entry.get("size_bytes")) != expected:
        raise PackageError(f"{plan} does not match its sha256 in {folder / layout.ENGINE_RECORD}; rebuild it with "
                           f"blipdiffusion-trt build")
    return plan


def _copy_plans(package: ModelPackage, plans: dict[str, Path], component: str,
                version_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """model.plan, or one plan per architecture (and their ``cc_model_filenames``)."""
    if len(plans) == 1:
        (folder,) = plans.values()
        _link_or_copy(_checked_plan(package, folder, component), version_dir / "model.plan")
        return ["model.plan"], None
    cc_files = {}
    for cc, folder in plans.items():
        file = f"model.sm_{cc.replace('.', '')}.plan"
        _link_or_copy(_checked_plan(package, folder, component), version_dir / file)
        cc_files[cc] = file
    return sorted(cc_files.values()), cc_files


def copy_code(dst: Path) -> None:
    """:data:`CODE_FILES` into ``dst/blipdiffusion_trt``."""
    for name in CODE_FILES:
        target = dst / "blipdiffusion_trt" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / name, target)


def _copy_package_files(package: ModelPackage, dst: Path) -> None:
    """The manifest and every listed file but the graphs (configs, tokenizers), each checked as
    :meth:`ModelPackage.file` hands it out: what the BLS model opens with ``graphs=False``."""
    dst.mkdir(parents=True)
    names = [name for name in package.manifest["files"] if not layout.is_graph_file(name)]
    for name in (layout.MANIFEST, *names):
        src = package.layout.manifest if name == layout.MANIFEST else package.file(name)
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)  # not copy2: the copy gets this umask's permissions


# --------------------------------------------------------------------------------------------
# Writing the repository
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer {allowed}, got {value!r}", field=name.replace(" ", "_"))
    return value


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory", field="out")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output {out} exists and is not empty (use --force to replace it)", field="out")
    if not out.parent.is_dir():
        raise InputError(f"output directory's parent {out.parent} does not exist", field="out")


def write_triton_repository(
    package_dir: str | Path,
    out: str | Path,
    flavor: str = "python-cpu",
    max_batch_size: int | None = None,
    instances: int = 1,
    *,
    name_prefix: str = "",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cpu_threads: int = 0,
    force: bool = False,
    verify: bool = True,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS,
    progress_model: bool = False,
) -> TritonRepository:
    """Write a Triton model repository serving ``package_dir``; returns what was written.

    ``max_batch_size``: largest generation batch the component models accept (default: the
    package's declared ``max_batch_size``; 0 turns batching off). ``instances``: instance count
    of every model. ``name_prefix``: prepended to every model name, so that several packages can
    share one server. ``max_image_pixels``: the BLS model's limit on input images.
    ``cpu_threads``: ONNX Runtime intra-op threads of the python-cpu models (0: its default).
    ``max_queue_size``/``queue_timeout_ms``: the pipeline models' queue policy (a request past
    them is rejected by Triton; :func:`~.configs.queue_policy`). ``progress_model``: also write
    ``blip_diffusion_progress``, the decoupled variant that streams a progress response per step.
    """
    if flavor not in FLAVORS:
        raise InputError(f"flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}", field="flavor")
    _check_int("instances", instances, 1, 64)
    _check_int("max_image_pixels", max_image_pixels, 1)
    _check_int("cpu_threads", cpu_threads, 0, 1024)
    _check_int("max_queue_size", max_queue_size, 1, 1 << 20)
    _check_int("queue_timeout_ms", queue_timeout_ms, 0, 24 * 3600 * 1000)
    if not isinstance(name_prefix, str) or (name_prefix and not MODEL_NAME_PATTERN.match(name_prefix)):
        raise InputError(f"name prefix must be letters, digits, '_', '-' or '.', got {name_prefix!r}",
                         field="name_prefix")
    package = ModelPackage.open(package_dir, verify=verify)
    config = package.config
    if max_batch_size is None:
        max_batch_size = config.max_batch_size
    _check_int("max batch size", max_batch_size, 0, config.max_batch_size)
    out = Path(out).absolute()
    check_not_an_input(out, {"package": package_dir}, InputError)
    _check_output(out, force)

    components = generation_components(config)
    plans = find_plans(package, components) if flavor == "tensorrt" else {}
    editing = [c for c in editing_components(config) if c not in components]
    if editing and flavor == "tensorrt" and not all(
            package.layout.plan(folder.name, c).is_file() for folder in plans.values() for c in editing):
        logger.warning("no TensorRT plans of the editing graphs (%s) beside the generation's: the repository "
                       "serves generations only; build them with blipdiffusion-trt build", ", ".join(editing))
        editing = []
    serves_editing = bool(editing)
    # fast mode's graphs (cache_interval > 1): served where the package has them (and, for the
    # tensorrt flavor, their plans)
    step_cache = step_cache_components(config)
    if step_cache and flavor == "tensorrt" and not all(
            package.layout.plan(folder.name, c).is_file() for folder in plans.values() for c in step_cache):
        logger.warning("no TensorRT plans of the step-cache graphs (%s): the repository serves the exact mode only; "
                       "build them with blipdiffusion-trt build", ", ".join(step_cache))
        step_cache = []
    components = components + editing + step_cache
    names = {c: f"{name_prefix}{c}" for c in components}
    bls_name = f"{name_prefix}{BLS_MODEL}"
    precision = "fp16" if flavor == "onnxruntime" and "fp16" in package.precisions else "fp32"

    models: dict[str, ModelEntry] = {}
    staging = StagingDir(out, InputError)  # a normal directory's permissions: a non-root server reads it
    tmp = staging.path
    try:
        batch_sizes, min_rows = {}, {}
        for component in components:
            spec = package.specs[component]
            model_dir = tmp / names[component]
            version_dir = model_dir / "1"
            version_dir.mkdir(parents=True)
            cc_files, ranges = None, None
            if flavor == "tensorrt":
                ranges = engine_ranges(config, spec, plans.values())
                files, cc_files = _copy_plans(package, plans, component, version_dir)
            else:
                # the CPU flavor serves what the cpu runtime loads: the CPU-fused graph where there is one
                cpu_fused = flavor == "python-cpu" and package.has_cpu_fused(component)
                files = _copy_graph(package, precision, cpu_fused, component, version_dir)
                if flavor == "python-cpu":
                    shutil.copy2(COMPONENT_MODEL_FILE, version_dir / "model.py")
                    files.append("model.py")
            text, mbs = component_config(
                spec, config, name=names[component], flavor=flavor, max_batch_size=max_batch_size,
                instances=instances, cc_model_filenames=cc_files, cpu_threads=cpu_threads, ranges=ranges,
                code_dir=f"../../{bls_name}/1",  # the code copied into the BLS model's version directory
                package_dir=f"../../{bls_name}/1/{PACKAGE_COPY}",  # its declarations bound the requests
            )
            (model_dir / "config.pbtxt").write_text(text)
            batch_sizes[component] = mbs
            axis = spec.batch_axis
            if ranges is not None and axis is not None and mbs == 0 and ranges[axis.name][0] > 1:
                min_rows[component] = ranges[axis.name][0]  # a static engine: the BLS model pads fewer rows
            models[names[component]] = ModelEntry(names[component], component, mbs, text, files)

        version_dir = tmp / bls_name / "1"
        version_dir.mkdir(parents=True)
        shutil.copy2(BLS_MODEL_FILE, version_dir / "model.py")
        copy_code(version_dir / CODE_DIR)
        _copy_package_files(package, version_dir / PACKAGE_COPY)
        bls_options = dict(instances=instances, components=names, batch_sizes=batch_sizes,
                           max_image_pixels=max_image_pixels, editing=serves_editing, min_rows=min_rows,
                           max_queue_size=max_queue_size, queue_timeout_ms=queue_timeout_ms)
        text = bls_config(config, name=bls_name, package_dir=PACKAGE_COPY, code_dir=CODE_DIR, **bls_options)
        (tmp / bls_name / "config.pbtxt").write_text(text)
        shutil.copy2(PROBE_FILE, tmp / bls_name / PROBE_COPY)
        models[bls_name] = ModelEntry(bls_name, None, 0, text, ["model.py", "blipdiffusion_trt/", f"{PACKAGE_COPY}/"])
        if progress_model:  # the same model file, code and package copy, decoupled
            progress_name = f"{name_prefix}{PROGRESS_MODEL}"
            (tmp / progress_name / "1").mkdir(parents=True)
            shutil.copy2(BLS_MODEL_FILE, tmp / progress_name / "1" / "model.py")
            shared = f"../../{bls_name}/1"
            text = bls_config(config, name=progress_name, package_dir=f"{shared}/{PACKAGE_COPY}",
                              code_dir=shared, progress=True, **bls_options)
            (tmp / progress_name / "config.pbtxt").write_text(text)
            models[progress_name] = ModelEntry(progress_name, None, 0, text, ["model.py"])
        _check_output(out, force)  # again: nothing else may have written it meanwhile
        replace_dir(tmp, out)
    except OSError as error:  # a full disk, a read-only or vanished directory
        raise PackageError(f"writing the repository {out} failed: {describe(error)}") from None
    finally:
        staging.close()
    return TritonRepository(out, flavor, models)
