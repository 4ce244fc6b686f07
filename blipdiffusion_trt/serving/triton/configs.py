"""``config.pbtxt`` of every model of a repository, from the component declarations.

Dims, dtypes and batching come from :mod:`blipdiffusion_trt.components`: ``-1`` for a dynamic
axis; a component batches (``max_batch_size > 0``, ``dynamic_batching {}``) when it is declared
batchable and every one of its tensors starts with the same batch axis. The UNet's batch axis is
2 x B (classifier-free guidance), so its ``max_batch_size`` is twice the generation batch; the
ControlNet's scalar ``conditioning_scale`` has no batch axis, so it is served unbatched
(``max_batch_size: 0``, full dims). A batched tensor with no other axis (the UNet's ``timestep``)
is declared ``dims: [1]`` with ``reshape { shape: [] }``, as Triton requires. For TensorRT plans
the axis ranges are those the engines were built for (``ranges``), not the declared ones.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from ...components import Axis, ComponentSpec, PipelineConfig, TensorSpec

FLAVORS = ("python-cpu", "onnxruntime", "tensorrt")

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

Range = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Batching and dims
# --------------------------------------------------------------------------------------------


def batch_axis(spec: ComponentSpec) -> Axis | None:
    """The axis Triton may batch along, or None: every tensor must start with the same axis."""
    return spec.batch_axis


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
# Protobuf text format
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


def _instance_group(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


# --------------------------------------------------------------------------------------------
# Component models
# --------------------------------------------------------------------------------------------


def component_config(
    spec: ComponentSpec, config: PipelineConfig, *, name: str, flavor: str, max_batch_size: int, instances: int,
    cc_model_filenames: dict[str, str] | None = None, cpu_threads: int = 0, ranges: dict[str, Range] | None = None,
    code_dir: str = "", package_dir: str = "",
) -> tuple[str, int]:
    """config.pbtxt text of one component model, and its max_batch_size.

    ``ranges``: the axis ranges a TensorRT engine was built for (default: the declared ones).
    ``code_dir``: python-cpu only, the model's path to the repository's copy of this package's
    code (:data:`~.repository.CODE_FILES`), relative to its version directory; ``package_dir``:
    python-cpu only, its path to the package copy whose declarations bound its requests.
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
    text += _instance_group(instances, "KIND_CPU" if flavor == "python-cpu" else "KIND_GPU")
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
        text += _parameters({"component": spec.name, "intra_op_threads": str(cpu_threads), "code_dir": code_dir,
                             "package_dir": package_dir})
    return text, mbs


# --------------------------------------------------------------------------------------------
# The BLS model
# --------------------------------------------------------------------------------------------


# The BLS model's inputs that make a request an edit (:mod:`.bls`): ``original_subject`` selects
# editing; ``image`` is a real image to edit (else the generated one is).
EDIT_INPUTS: tuple[tuple[str, str, list[int], bool], ...] = (
    ("original_subject", "TYPE_STRING", [1], True),
    ("image", "TYPE_UINT8", [-1, -1, 3], True),
    ("cross_replace_steps", "TYPE_FP32", [1], True),
    ("self_replace_steps", "TYPE_FP32", [1], True),
    ("blend_threshold", "TYPE_FP32", [1], True),
    ("local_blend", "TYPE_BOOL", [1], True),
)


def bls_inputs(config: PipelineConfig, editing: bool = False) -> list[tuple[str, str, list[int], bool]]:
    """(name, Triton dtype, dims, optional) of the BLS model's inputs (``editing``: with the edit's)."""
    inputs = [
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
        ("cache_interval", "TYPE_INT32", [1], True),  # fast mode (step caching); 1, the default: exact
    ]
    return inputs + list(EDIT_INPUTS) if editing else inputs


def bls_outputs(editing: bool = False, progress: bool = False) -> list[tuple[str, str, list[int]]]:
    """(name, Triton dtype, dims) of the BLS model's outputs: the image (an edit's edited image) and,
    for an edit, its source image (a real image's reconstruction); ``progress`` (the streaming
    variant): also ``step`` and ``steps``, the only outputs of its progress responses."""
    outputs = [("image", "TYPE_UINT8", [-1, -1, 3])]
    if editing:
        outputs.append(("source_image", "TYPE_UINT8", [-1, -1, 3]))
    if progress:
        outputs += [("step", "TYPE_INT32", [1]), ("steps", "TYPE_INT32", [1])]
    return outputs


# A generation takes seconds (GPU) to minutes (CPU, full size): a handful of waiting requests is
# already a long wait, and each one holds its input images in memory.
DEFAULT_MAX_QUEUE_SIZE = 8
# A request that waited this long in the queue is rejected rather than run for a client that has
# likely given up; a client may ask for less with its own request timeout.
DEFAULT_QUEUE_TIMEOUT_MS = 120_000


def queue_policy(max_queue_size: int, queue_timeout_ms: int) -> str:
    """The BLS model's ``dynamic_batching`` block: no batching (its max_batch_size is 0), only the
    queue policy. Past ``max_queue_size`` waiting requests, or after ``queue_timeout_ms`` in the
    queue (0: no limit; a request's own shorter ``timeout`` overrides it), Triton rejects a request
    itself, before it reaches the model."""
    return (
        "dynamic_batching {\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {queue_timeout_ms * 1000}\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {max_queue_size}\n"
        "  }\n"
        "}\n"
    )


def bls_config(config: PipelineConfig, *, name: str, instances: int, components: dict[str, str],
               batch_sizes: dict[str, int], max_image_pixels: int, package_dir: str, code_dir: str,
               editing: bool = False, min_rows: dict[str, int] | None = None,
               max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS,
               progress: bool = False) -> str:
    """config.pbtxt text of the BLS model; its parameters are what :mod:`.bls` reads. ``editing``:
    the repository serves the editing graphs, so the model takes edits too. ``min_rows``: the
    fixed batch of the component models that take one (static TensorRT engines).
    ``max_queue_size``/``queue_timeout_ms``: its queue policy (:func:`queue_policy`).
    ``progress``: the decoupled variant that streams a response per denoising step."""
    text = f"name: {_q(name)}\nbackend: \"python\"\nmax_batch_size: 0\n"
    text += _io_section("input", [_tensor_block(n, d, dims, optional=opt)
                                  for n, d, dims, opt in bls_inputs(config, editing)])
    text += _io_section("output", [_tensor_block(n, d, dims) for n, d, dims in bls_outputs(editing, progress)])
    text += queue_policy(max_queue_size, queue_timeout_ms)
    if progress:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    text += _instance_group(instances, "KIND_CPU")
    text += _parameters({
        "package_dir": package_dir,
        "code_dir": code_dir,
        "components": json.dumps(components, sort_keys=True),
        "component_max_batch_sizes": json.dumps(batch_sizes, sort_keys=True),
        "component_min_rows": json.dumps(min_rows or {}, sort_keys=True),
        "max_image_pixels": str(max_image_pixels),
        # what a liveness probe needs to send a valid tiny request (serving/triton/probe.py)
        "min_image_size": str(config.min_image_size),
        "has_controlnet": "true" if config.has_controlnet else "false",
        "progress": "true" if progress else "false",
    })
    return text
