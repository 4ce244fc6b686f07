"""Triton model repositories for a model package: one model per component, plus a BLS pipeline.

``write_triton_repository(package, out, flavor)`` writes::

    OUT/<component>/config.pbtxt        one model per component the pipeline runs
    OUT/<component>/1/model.plan        flavor "tensorrt"     (platform tensorrt_plan, KIND_GPU)
    OUT/<component>/1/model.onnx        flavor "onnxruntime"  (platform onnxruntime_onnx, TensorRT EP FP16)
    OUT/<component>/1/model.py+.onnx    flavor "python-cpu"   (python backend, ONNX Runtime on the CPU;
                                                               the package's CPU-fused graphs where it has them)
    OUT/blip_diffusion/config.pbtxt     whole generations: python-backend BLS model
    OUT/blip_diffusion/1/model.py
    OUT/blip_diffusion/1/package/       the package's configs and tokenizers (no graphs)
    OUT/blip_diffusion/1/blipdiffusion_trt/   the torch-free runtime code (numpy, Pillow, tokenizers)

Dims, dtypes and batching come from the component declarations (:mod:`blipdiffusion_trt.components`):
``-1`` for a dynamic axis; a component batches (``max_batch_size > 0``, ``dynamic_batching {}``)
when it is declared batchable and every one of its tensors starts with the same batch axis. The
UNet's batch axis is 2 x B (classifier-free guidance), so its ``max_batch_size`` is twice the
generation batch; the ControlNet's scalar ``conditioning_scale`` has no batch axis, so it is served
unbatched (``max_batch_size: 0``, full dims). A batched tensor with no other axis (the UNet's
``timestep``) is declared ``dims: [1]`` with ``reshape { shape: [] }``, as Triton requires.
For the ``tensorrt`` flavor the dims are those the engines were built for: the axis ranges are
recomputed from the build options in each engine directory's ``engines.json`` (the builder's
default, ``--shapes static``, fixes every axis but the Q-Former's text length, so those models
are unbatched, with fixed dims and CUDA graphs). Plans come from
``PACKAGE/engines/sm_XY-trtX.Y/`` (the newest TensorRT per architecture); several architectures
become ``cc_model_filenames``.
Only the components the pipeline runs get a model (``unet_plain`` for a plain package,
``unet`` + ``controlnet`` for a ControlNet package). Graphs are hard-linked where possible; an
external ``<component>.onnx.data`` file keeps the name the graph refers to.

The BLS model builds the runtime's own :class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime`
with engines that send BLS requests to the component models: the pipeline logic exists once. The
runtime code is copied next to its ``model.py`` (``code_dir`` parameter), so the repository also
serves in NVIDIA's Triton container, where this project is not installed; the stub's Python
needs only numpy, Pillow and tokenizers (and onnxruntime for the python-cpu component models).

Everything is written to a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..components import Axis, ComponentSpec, PipelineConfig, TensorSpec, generation_components
from ..errors import InputError, PackageError
from ..fsutil import replace_dir
from ..package import ModelPackage, layout
from .plans import BuildOptions, parse_engine_dir_name, read_record, version_key

logger = logging.getLogger(__name__)

FLAVORS = ("python-cpu", "onnxruntime", "tensorrt")
BLS_MODEL = "blip_diffusion"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}



# Components the runtime runs for a package, in pipeline order (as ``from_package`` loads them).
pipeline_components = generation_components


# --------------------------------------------------------------------------------------------
# Batching and dims from the declarations
# --------------------------------------------------------------------------------------------


def batch_axis(spec: ComponentSpec) -> Axis | None:
    """The axis Triton may batch along, or None: every tensor must start with the same axis."""
    if not spec.batchable:
        return None
    firsts = {t.shape[0] if t.shape and isinstance(t.shape[0], Axis) else None for t in (*spec.inputs, *spec.outputs)}
    if len(firsts) != 1:
        return None
    (axis,) = firsts
    return axis


Range = tuple[int, int, int]


def _range(axis: Axis, ranges: dict[str, Range] | None) -> Range:
    if ranges is not None and axis.name in ranges:
        return tuple(ranges[axis.name])  # type: ignore[return-value]
    return axis.min, axis.opt, axis.max


def triton_max_batch_size(spec: ComponentSpec, config: PipelineConfig, max_batch_size: int,
                          ranges: dict[str, Range] | None = None) -> int:
    """Triton's max_batch_size for a component, for generations of up to ``max_batch_size`` images.

    0 when the component cannot batch (or batching is off); the UNet's axis is declared as a
    multiple of the generation batch (2 x B with guidance), and so is its limit. ``ranges``
    (axis name -> (min, opt, max)) are what a TensorRT engine was built for: a fixed batch, or
    one that does not start at 1, is served unbatched.
    """
    axis = batch_axis(spec)
    if axis is None or max_batch_size == 0:
        return 0
    low, _, high = _range(axis, ranges)
    if low == high or low > 1:
        return 0
    factor = max(1, axis.max // config.max_batch_size)
    return min(high, max_batch_size * factor)


def _dim(dim: int | Axis, ranges: dict[str, Range] | None = None) -> int:
    if isinstance(dim, int):
        return dim
    low, _, high = _range(dim, ranges)
    return low if low == high else -1


def tensor_dims(tensor: TensorSpec, batching: bool, ranges: dict[str, Range] | None = None) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) for config.pbtxt; reshape is [] for a tensor that is only the batch axis."""
    dims = [_dim(d, ranges) for d in (tensor.shape[1:] if batching else tensor.shape)]
    if batching and not dims:
        return [1], []
    return dims, None


def is_static(spec: ComponentSpec, batching: bool, ranges: dict[str, Range] | None = None) -> bool:
    """Whether every non-batch dim of every tensor is fixed (CUDA graphs need static shapes)."""
    for tensor in (*spec.inputs, *spec.outputs):
        dims, _ = tensor_dims(tensor, batching, ranges)
        if any(d < 0 for d in dims):
            return False
    return True


# --------------------------------------------------------------------------------------------
# config.pbtxt text
# --------------------------------------------------------------------------------------------


def _q(text: str) -> str:
    return json.dumps(text)  # a valid protobuf text-format string literal for our inputs


def _list(values: Sequence[int]) -> str:
    return f"[ {', '.join(str(v) for v in values)} ]" if values else "[ ]"


def _tensor_block(name: str, dtype: str, dims: Sequence[int], *, reshape: Sequence[int] | None = None,
                  optional: bool = False) -> str:
    parts = [f"name: {_q(name)}", f"data_type: {dtype}", f"dims: {_list(dims)}"]
    if reshape is not None:
        parts.append(f"reshape: {{ shape: {_list(reshape)} }}")
    if optional:
        parts.append("optional: true")
    return "  {\n    " + "\n    ".join(parts) + "\n  }"


def _io_section(kind: str, blocks: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(
        f"parameters {{\n  key: {_q(k)}\n  value: {{ string_value: {_q(v)} }}\n}}\n" for k, v in params.items()
    )


@dataclass
class ModelEntry:
    """One model of the repository, as written (kept for tests and the CLI report)."""

    name: str
    component: str | None
    max_batch_size: int
    config: str
    files: list[str] = field(default_factory=list)


def component_config(
    spec: ComponentSpec, config: PipelineConfig, *, name: str, flavor: str, max_batch_size: int, instances: int,
    cc_model_filenames: dict[str, str] | None = None, cpu_threads: int = 0, ranges: dict[str, Range] | None = None,
) -> tuple[str, int]:
    """config.pbtxt text of one component model, and its max_batch_size.

    ``ranges``: the axis ranges a TensorRT engine was built for (default: the declared ones).
    """
    mbs = triton_max_batch_size(spec, config, max_batch_size, ranges)
    batching = mbs > 0
    lines = [f"name: {_q(name)}"]
    if flavor == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    elif flavor == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    else:
        lines.append('backend: "python"')
    lines.append(f"max_batch_size: {mbs}")
    text = "\n".join(lines) + "\n"

    def blocks(tensors: Iterable[TensorSpec]) -> list[str]:
        out = []
        for t in tensors:
            dims, reshape = tensor_dims(t, batching, ranges)
            out.append(_tensor_block(t.name, TRITON_DTYPES[t.dtype], dims, reshape=reshape))
        return out

    text += _io_section("input", blocks(spec.inputs))
    text += _io_section("output", blocks(spec.outputs))
    if batching:
        text += "dynamic_batching { }\n"
    kind = "KIND_CPU" if flavor == "python-cpu" else "KIND_GPU"
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    if flavor == "tensorrt":
        if cc_model_filenames:
            text += "".join(
                f"cc_model_filenames {{\n  key: {_q(cc)}\n  value: {_q(file)}\n}}\n" for cc, file in sorted(cc_model_filenames.items())
            )
        if is_static(spec, batching, ranges):
            text += "optimization {\n  cuda {\n    graphs: true\n  }\n}\n"
    elif flavor == "onnxruntime":
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            '        parameters { key: "precision_mode" value: "FP16" }\n'
            '        parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
            '        parameters { key: "trt_engine_cache_enable" value: "true" }\n'
            f'        parameters {{ key: "trt_engine_cache_path" value: {_q("/tmp/trt-engine-cache/" + name)} }}\n'
            "      }\n    ]\n  }\n}\n"
        )
    else:
        text += _parameters({"component": spec.name, "intra_op_threads": str(cpu_threads)})
    return text, mbs


def bls_inputs(config: PipelineConfig) -> list[tuple[str, str, list[int], bool]]:
    """(name, Triton dtype, dims, optional) of the BLS model's inputs."""
    return [
        ("prompt", "TYPE_STRING", [1], False),
        ("reference_image", "TYPE_UINT8", [-1, -1, 3], False),
        ("source_subject", "TYPE_STRING", [1], False),
        ("target_subject", "TYPE_STRING", [1], False),
        ("steps", "TYPE_INT32", [1], False),
        ("guidance_scale", "TYPE_FP32", [1], False),
        ("seed", "TYPE_INT64", [1], False),
        ("height", "TYPE_INT32", [1], False),
        ("width", "TYPE_INT32", [1], False),
        ("negative_prompt", "TYPE_STRING", [1], True),
        ("scheduler", "TYPE_STRING", [1], True),
        ("condition_image", "TYPE_UINT8", [-1, -1, 3], True),
        ("controlnet_conditioning_scale", "TYPE_FP32", [1], True),
    ]


def bls_config(config: PipelineConfig, *, name: str, instances: int, components: dict[str, str],
               batch_sizes: dict[str, int], max_image_pixels: int) -> str:
    text = f"name: {_q(name)}\nbackend: \"python\"\nmax_batch_size: 0\n"
    text += _io_section("input", [_tensor_block(n, d, dims, optional=opt) for n, d, dims, opt in bls_inputs(config)])
    text += _io_section("output", [_tensor_block("image", "TYPE_UINT8", [-1, -1, 3])])
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    text += _parameters({
        "package_dir": "package",
        "code_dir": ".",
        "components": json.dumps(components, sort_keys=True),
        "component_max_batch_sizes": json.dumps(batch_sizes, sort_keys=True),
        "max_image_pixels": str(max_image_pixels),
    })
    return text


# --------------------------------------------------------------------------------------------
# Generated model.py files
# --------------------------------------------------------------------------------------------

COMPONENT_MODEL_PY = '''"""Generated by blipdiffusion-trt: one package component on ONNX Runtime (CPU, fp32 graph).

Needs numpy and onnxruntime in the python backend's environment; nothing from blipdiffusion-trt.
Requests are run one at a time, never concatenated, so results do not depend on server load.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


def _one_line(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        threads = int(params.get("intra_op_threads") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        path = os.path.join(HERE, "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def _feed(self, request):
        feed = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            value = tensor.as_numpy()
            rank = self.ranks.get(name)
            if rank is not None and value.ndim == rank + 1 and value.shape[-1] == 1:
                value = value.reshape(value.shape[:-1])  # [B, 1] batch-only tensor (config reshape)
            feed[name] = value
        return feed

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                values = self.session.run(self.outputs, self._feed(request))
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # one bad request must not stop the model
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {_one_line(error)}")))
        return responses

    def finalize(self):
        self.session = None
'''


BLS_MODEL_PY = '''"""Generated by blipdiffusion-trt: whole BLIP-Diffusion generations over the component models (BLS).

The pipeline is blipdiffusion-trt's own BlipDiffusionRuntime; its engines send BLS requests to
the component models named in the "components" parameter. The runtime code is imported from
"code_dir" (default: the copy next to this file; empty: the installed blipdiffusion_trt), the
package's configs and tokenizers from "package_dir" (default: the copy next to this file).
Needs numpy, Pillow and tokenizers in the python backend's environment.
"""

import json
import os
import sys
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


def _params(config):
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _resolve(path):
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(HERE, path))


def _one_line(text):
    return " ".join(str(text).split())


def _error(message, invalid_argument=True):
    try:
        code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
        return pb_utils.TritonError(message, code)
    except (AttributeError, TypeError):  # python backends before the error codes
        return pb_utils.TritonError(message)


def _log(message):
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_error(message)
    else:
        print(message, file=sys.stderr, flush=True)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _params(config)
        code_dir = params.get("code_dir", ".")
        if code_dir:
            sys.path.insert(0, _resolve(code_dir))

        from blipdiffusion_trt.errors import BlipDiffusionTrtError, EngineError, InputError
        from blipdiffusion_trt.package import ModelPackage
        from blipdiffusion_trt.runtime import images
        from blipdiffusion_trt.runtime.engine import Engine
        from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

        self.BaseError, self.InputError, self.images = BlipDiffusionTrtError, InputError, images
        self.max_pixels = int(params.get("max_image_pixels") or images.DEFAULT_MAX_PIXELS)

        # the copied configs and tokenizers, checked against the manifest; no graphs
        package = ModelPackage.open(_resolve(params.get("package_dir", "package")), graphs=False)

        cpu_memory = {}
        if hasattr(pb_utils, "PreferredMemory"):
            cpu_memory = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}

        class TritonEngine(Engine):
            """A component model of this repository, called through BLS."""

            def __init__(self, spec, model_name, max_batch_size):
                self.spec = spec
                self.model_name = model_name
                # a batched tensor with no other axis is declared dims [1] + reshape []
                self.column = {t.name for t in spec.inputs if max_batch_size > 0 and len(t.shape) == 1}

            def infer(self, feed, keep=()):
                dtypes = {t.name: t.dtype for t in self.spec.inputs}
                inputs = []
                for name in self.input_names:
                    value = np.ascontiguousarray(feed[name], dtype=dtypes[name])
                    if name in self.column:
                        value = value.reshape(-1, 1)
                    inputs.append(pb_utils.Tensor(name, value))
                request = pb_utils.InferenceRequest(
                    model_name=self.model_name, inputs=inputs, requested_output_names=self.output_names, **cpu_memory
                )
                response = request.exec()
                if response.has_error():
                    raise EngineError(f"model {self.model_name}: {_one_line(response.error().message())}")
                outputs = {}
                for name in self.output_names:
                    tensor = pb_utils.get_output_tensor_by_name(response, name)
                    if tensor is None:
                        raise EngineError(f"model {self.model_name} returned no {name!r}")
                    if not tensor.is_cpu():
                        raise EngineError(f"model {self.model_name}: {name!r} came back in GPU memory")
                    outputs[name] = np.array(tensor.as_numpy(), copy=True)
                return outputs

        models = json.loads(params["components"])
        batch_sizes = json.loads(params.get("component_max_batch_sizes") or "{}")
        engines = {c: TritonEngine(package.specs[c], m, int(batch_sizes.get(c, 0))) for c, m in models.items()}
        self.runtime = BlipDiffusionRuntime(package, engines)
        self.has_controlnet = package.config.has_controlnet

    # -- request parsing ----------------------------------------------------------------------

    def _tensor(self, request, name, required):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if required:
                raise self.InputError(f"missing required input {name!r}")
            return None
        return tensor.as_numpy()

    def _scalar(self, request, name, required=True):
        value = self._tensor(request, name, required)
        if value is None:
            return None
        if value.size != 1:
            raise self.InputError(f"{name}: expected a single value, got shape {list(value.shape)}")
        return value.reshape(-1)[0]

    def _string(self, request, name, required=True):
        value = self._scalar(request, name, required)
        if value is None:
            return None
        if isinstance(value, (bytes, np.bytes_)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise self.InputError(f"{name}: not valid UTF-8") from None
        return str(value)

    def _image(self, request, name, required=True):
        value = self._tensor(request, name, required)
        if value is None:
            return None
        return self.images.load_image(value, field=name, max_pixels=self.max_pixels)

    def _arguments(self, request):
        seed = int(self._scalar(request, "seed"))
        if seed < 0:
            raise self.InputError(f"seed must be a non-negative integer, got {seed}")
        kwargs = dict(
            prompt=self._string(request, "prompt"),
            reference_image=self._image(request, "reference_image"),
            source_subject_category=self._string(request, "source_subject"),
            target_subject_category=self._string(request, "target_subject"),
            num_inference_steps=int(self._scalar(request, "steps")),
            guidance_scale=float(self._scalar(request, "guidance_scale")),
            seed=seed,
            height=int(self._scalar(request, "height")),
            width=int(self._scalar(request, "width")),
            output_type="np",
        )
        negative = self._string(request, "negative_prompt", required=False)
        if negative is not None:
            kwargs["neg_prompt"] = negative
        scheduler = self._string(request, "scheduler", required=False)
        if scheduler is not None:
            kwargs["scheduler"] = scheduler
        condition = self._image(request, "condition_image", required=False)
        if condition is not None:
            kwargs["condition_image"] = condition
        scale = self._scalar(request, "controlnet_conditioning_scale", required=False)
        if scale is not None:
            kwargs["controlnet_conditioning_scale"] = float(scale)
        return kwargs

    # -- serving ------------------------------------------------------------------------------

    def _generate(self, request):
        try:
            result = self.runtime(**self._arguments(request))
        except self.BaseError as error:  # InputError: the request; others (EngineError): the server side
            invalid = isinstance(error, self.InputError)
            return pb_utils.InferenceResponse(error=_error(_one_line(error), invalid_argument=invalid))
        except Exception as error:  # a bug: keep serving, log the traceback, answer one line
            _log(traceback.format_exc())
            return pb_utils.InferenceResponse(
                error=_error(f"internal error: {type(error).__name__}: {_one_line(error)}", invalid_argument=False)
            )
        image = (result.images[0] * 255).round().astype(np.uint8)  # as runtime.images.to_pil quantises
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(image))])

    def execute(self, requests):
        return [self._generate(request) for request in requests]

    def finalize(self):
        self.runtime = None
'''


# --------------------------------------------------------------------------------------------
# Writing the repository
# --------------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_graph(package: ModelPackage, variant: str, component: str, version_dir: Path) -> list[str]:
    """model.onnx (+ its external data file, under the name the graph refers to)."""
    src = package.layout.graph(component, variant)
    _link_or_copy(src, version_dir / "model.onnx")
    written = ["model.onnx"]
    data = package.layout.graph_data(component, variant)
    if data.is_file():
        _link_or_copy(data, version_dir / data.name)
        written.append(data.name)
    return written


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
    from .profiles import axis_ranges, profile_from_json, spec_profile

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


def _copy_runtime_code(dst: Path) -> None:
    """The torch-free part of blipdiffusion_trt (components, errors, package format, runtime) for the BLS model."""
    src = Path(__file__).resolve().parent.parent
    target = dst / "blipdiffusion_trt"
    target.mkdir(parents=True)
    for name in ("__init__.py", "components.py", "errors.py", "fsutil.py"):
        shutil.copy2(src / name, target / name)
    for folder in ("package", "runtime"):
        for file in sorted((src / folder).rglob("*.py")):
            (target / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target / file.relative_to(src))


def _copy_package_files(package: ModelPackage, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in layout.RUNTIME_FILES:
        src = package.layout.path(name)
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.is_file():
            shutil.copy2(src, dst / name)
        else:
            raise PackageError(f"package incomplete: {src} is missing")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


@dataclass
class TritonRepository:
    path: Path
    flavor: str
    models: dict[str, ModelEntry]


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
) -> TritonRepository:
    """Write a Triton model repository serving ``package_dir``; returns what was written.

    ``max_batch_size``: largest generation batch the component models accept (default: the
    package's declared ``max_batch_size``; 0 turns batching off). ``instances``: instance count
    of every model. ``name_prefix``: prepended to every model name, so that several packages can
    share one server. ``max_image_pixels``: the BLS model's limit on input images.
    ``cpu_threads``: ONNX Runtime intra-op threads of the python-cpu models (0: its default).
    """
    if flavor not in FLAVORS:
        raise InputError(f"flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}")
    _check_int("instances", instances, 1, 64)
    _check_int("max_image_pixels", max_image_pixels, 1)
    _check_int("cpu_threads", cpu_threads, 0, 1024)
    if not isinstance(name_prefix, str) or (name_prefix and not MODEL_NAME_PATTERN.match(name_prefix)):
        raise InputError(f"name prefix must be letters, digits, '_', '-' or '.', got {name_prefix!r}")
    package = ModelPackage.open(package_dir, verify=verify)
    config = package.config
    if max_batch_size is None:
        max_batch_size = config.max_batch_size
    _check_int("max batch size", max_batch_size, 0, config.max_batch_size)

    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output {out} exists and is not empty (use --force to replace it)")
    if not out.parent.is_dir():
        raise InputError(f"output directory's parent {out.parent} does not exist")

    components = pipeline_components(config)
    names = {c: f"{name_prefix}{c}" for c in components}
    plans = find_plans(package, components) if flavor == "tensorrt" else {}
    precision = "fp16" if flavor == "onnxruntime" and "fp16" in package.precisions else "fp32"

    models: dict[str, ModelEntry] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the repository from a non-root server
        batch_sizes = {}
        for component in components:
            spec = package.specs[component]
            model_dir = tmp / names[component]
            version_dir = model_dir / "1"
            version_dir.mkdir(parents=True)
            cc_files = None
            ranges = engine_ranges(config, spec, plans.values()) if flavor == "tensorrt" else None
            if flavor == "tensorrt":
                if len(plans) == 1:
                    (folder,) = plans.values()
                    _link_or_copy(package.layout.plan(folder.name, component), version_dir / "model.plan")
                    files = ["model.plan"]
                else:
                    cc_files = {}
                    for cc, folder in plans.items():
                        file = f"model.sm_{cc.replace('.', '')}.plan"
                        _link_or_copy(package.layout.plan(folder.name, component), version_dir / file)
                        cc_files[cc] = file
                    files = sorted(cc_files.values())
            else:
                # the CPU flavor serves what the cpu runtime loads: the CPU-fused graph where there is one
                cpu_fused = flavor == "python-cpu" and package.has_cpu_fused(component)
                files = _copy_graph(package, layout.graph_variant(precision, cpu_fused=cpu_fused), component, version_dir)
                if flavor == "python-cpu":
                    (version_dir / "model.py").write_text(COMPONENT_MODEL_PY)
                    files.append("model.py")
            text, mbs = component_config(
                spec, config, name=names[component], flavor=flavor, max_batch_size=max_batch_size,
                instances=instances, cc_model_filenames=cc_files, cpu_threads=cpu_threads, ranges=ranges,
            )
            (model_dir / "config.pbtxt").write_text(text)
            batch_sizes[component] = mbs
            models[names[component]] = ModelEntry(names[component], component, mbs, text, files)

        bls_name = f"{name_prefix}{BLS_MODEL}"
        version_dir = tmp / bls_name / "1"
        version_dir.mkdir(parents=True)
        (version_dir / "model.py").write_text(BLS_MODEL_PY)
        _copy_runtime_code(version_dir)
        _copy_package_files(package, version_dir / "package")
        text = bls_config(config, name=bls_name, instances=instances, components=names, batch_sizes=batch_sizes,
                          max_image_pixels=max_image_pixels)
        (tmp / bls_name / "config.pbtxt").write_text(text)
        models[bls_name] = ModelEntry(bls_name, None, 0, text, ["model.py", "blipdiffusion_trt/", "package/"])
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TritonRepository(out, flavor, models)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """``blipdiffusion-trt triton PACKAGE --out REPOSITORY [...]``."""
    p.add_argument("package", help="model package directory (from `blipdiffusion-trt export`)")
    p.add_argument("--out", required=True, help="model repository directory to create")
    p.add_argument("--flavor", default="python-cpu",
                   help="tensorrt (TensorRT plans from `build`), onnxruntime (ONNX + TensorRT EP fp16) or "
                        "python-cpu (python backend, ONNX Runtime on the CPU); default python-cpu")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="largest generation batch the component models accept (default: the package's; 0: no batching)")
    p.add_argument("--instances", type=int, default=1, help="instances of every model (default 1)")
    p.add_argument("--name-prefix", default="", help="prefix of every model name (several packages on one server)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest input image the BLS model accepts, in pixels (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--cpu-threads", type=int, default=0, help="ONNX Runtime threads per python-cpu model (0: default)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip checking the package files' sha256")


def run_triton(args) -> int:
    repository = write_triton_repository(
        args.package, args.out, args.flavor, args.max_batch_size, args.instances, name_prefix=args.name_prefix,
        max_image_pixels=args.max_image_pixels, cpu_threads=args.cpu_threads, force=args.force,
        verify=not args.no_verify,
    )
    print(f"wrote {repository.path} ({repository.flavor})")
    for entry in repository.models.values():
        batching = f"max_batch_size {entry.max_batch_size}" if entry.max_batch_size else "no batching"
        print(f"  {entry.name:<28} {batching}")
    return 0
