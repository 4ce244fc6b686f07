"""Graph helpers shared by export and the CPU fusions: example inputs at declared points, saving
graphs (with external data past protobuf's limit), running them on ONNX Runtime and comparing outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ..components import ComponentSpec
from ..errors import ValidationError

# Protobuf cannot serialise a ModelProto over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def export_point(spec: ComponentSpec) -> dict[str, int]:
    """Axis values for tracing: the optimum, but batch 2 (batch-1 traces bake batch 1 in)."""
    point = {name: axis.opt for name, axis in spec.axes.items()}
    for name in ("batch", "unet_batch"):
        if name in point:
            point[name] = 2
    return point


def second_point(spec: ComponentSpec) -> dict[str, int]:
    """Another point in the declared ranges: other batch, other size, shorter text."""
    point = export_point(spec)
    axes = spec.axes
    for name in ("batch", "unet_batch"):
        if name in point:
            point[name] = min(3, axes[name].max) if name == "unet_batch" else 1
    for name in ("height", "width"):
        if name in axes:
            axis = axes[name]
            other = axis.opt - axis.multiple_of if name == "height" else axis.opt + axis.multiple_of
            point[name] = other if axis.min <= other <= axis.max else axis.min
    _derive_latent_axes(spec, point)
    for name in ("qformer_text_length", "text_length", "plain_text_length"):
        if name in axes:
            point[name] = max(axes[name].min, axes[name].opt - 3)
    if "p2p_batch" in axes:  # a real image's edit: no unconditional source row
        point["p2p_batch"] = max(axes["p2p_batch"].min, axes["p2p_batch"].opt - 1)
    if "ctx_text_length" in axes and "text_length" in point:
        point["ctx_text_length"] = point["text_length"] + (axes["ctx_text_length"].opt - axes["text_length"].opt)
    return point


def _derive_latent_axes(spec: ComponentSpec, point: dict[str, int]) -> None:
    """Keep latent and residual axes consistent with the pixel height/width in ``point``."""
    derived = [axis for axis in spec.axes.values() if axis.derived_from is not None]
    for source in dict.fromkeys(axis.derived_from for axis in derived):
        # the latent axis itself first; the ControlNet residual axes divide it further
        group = sorted((axis for axis in derived if axis.derived_from == source), key=lambda axis: axis.divisor)
        latent = group[0]
        if source in point:
            value = point[source] // latent.divisor
        else:
            step = latent.multiple_of
            other = latent.opt - step if source == "height" else latent.opt + step
            value = other if latent.min <= other <= latent.max else latent.opt
        point[latent.name] = value
        for axis in group[1:]:
            point[axis.name] = value // (axis.divisor // latent.divisor)


def example_inputs(spec: ComponentSpec, point: dict[str, int], *, vocab_sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at ``point`` with realistic value ranges (token ids, masks, timesteps)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.shape_at(point)
        if tensor.name == "input_ids":
            feed[tensor.name] = rng.integers(0, vocab_sizes[spec.name], size=shape, dtype=np.int64)
        elif tensor.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[0, max(1, shape[1] - 2):] = 0  # padding in the first row exercises the mask
            feed[tensor.name] = mask
        elif tensor.name == "timestep":
            feed[tensor.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        elif tensor.name == "conditioning_scale":
            feed[tensor.name] = np.array([0.8], dtype=np.float32)
        elif tensor.name == "controlnet_cond":
            feed[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        elif tensor.name == "image":
            feed[tensor.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif tensor.name in P2P_CONTROL_EXAMPLES:
            feed[tensor.name] = P2P_CONTROL_EXAMPLES[tensor.name](rng, shape)
        else:
            feed[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


# unet_p2p's control inputs with control on: 0/1 token weights, one aligned source token per target
# token, the self-attention gate on
P2P_CONTROL_EXAMPLES = {
    "cross_weights": lambda rng, shape: rng.integers(0, 2, size=shape).astype(np.float32),
    "token_map": lambda rng, shape: np.eye(shape[1], dtype=np.float32)[rng.integers(0, shape[1], size=shape[0])],
    "self_gate": lambda rng, shape: np.ones(shape, dtype=np.float32),
}


def save_onnx(model, path: Path) -> None:
    """Save as one file, or one file plus one ``.data`` file when the graph exceeds protobuf's limit."""
    import onnx

    from onnx.external_data_helper import convert_model_to_external_data

    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_path.name, size_threshold=1024)
    onnx.save_model(model, str(path))


def import_contrib_opset(model) -> None:
    """Declare the ``com.microsoft`` opset the fused ops belong to. The onnxruntime.transformers
    optimizer adds this import only in its own ``save()``; a graph without it is not valid ONNX
    (``onnx.checker``: no opset import for domain 'com.microsoft')."""
    if any(node.domain == "com.microsoft" for node in model.graph.node) and \
            not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)


def check_finite_constants(model, where: str) -> None:
    """ValidationError when a float constant of ``model`` holds inf/NaN (after an fp16 conversion)."""
    from onnx import numpy_helper

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type in (1, 10) and tensor.raw_data:
            values = numpy_helper.to_array(tensor)
            if not np.isfinite(values).all():
                raise ValidationError(f"{where}: constant {tensor.name or '?'} holds inf/NaN after fp16 conversion")


def sinusoidal_embedding_nodes(model) -> list[str]:
    """Names of the nodes that compute a sinusoidal embedding (the UNet's and ControlNet's timestep
    projection): every node in the module scope of a Sin or Cos node, and the nodes between the
    graph's inputs and that scope (the timestep's broadcast to the batch; not a Shape, which reads
    no values).

    diffusers computes this embedding in fp32 whatever the model's dtype (``Timesteps`` casts to
    float, the cast to the model's dtype comes after it); in fp16 the argument ``t * freq`` (up to
    ~1000 rad) is rounded to steps of 0.5 and the sines are off by up to ~0.25. The fp16
    conversions keep these nodes in fp32 (the converters' ``node_block_list``).
    """
    scopes = {node.name.rsplit("/", 1)[0] + "/" for node in model.graph.node
              if node.op_type in ("Sin", "Cos") and "/" in node.name}
    if not scopes:
        return []
    in_scope = [node for node in model.graph.node if any(node.name.startswith(scope) for scope in scopes)]
    producer = {output: node for node in model.graph.node for output in node.output}
    downstream = {i.name for i in model.graph.input}  # values computed from a graph input
    from_inputs = set()
    for node in model.graph.node:  # the exporter writes nodes in topological order
        if any(name in downstream for name in node.input):
            downstream.update(node.output)
            from_inputs.add(node.name)
    ancestors, stack = set(), [name for node in in_scope for name in node.input]
    while stack:
        node = producer.get(stack.pop())
        # a Shape reads no values: kept fp16, it spares a Cast of the whole latent to fp32
        if node is None or node.name in ancestors or node.op_type in ("Shape", "Size"):
            continue
        ancestors.add(node.name)
        stack += list(node.input)
    chosen = {node.name for node in in_scope} | (ancestors & from_inputs)
    return [node.name for node in model.graph.node if node.name in chosen]


def drop_fp16_round_trips(model) -> int:
    """Remove every Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pair: the fp16 converters put one on
    every edge between two nodes kept in fp32 (each kept node gets a Cast to fp32 before its inputs
    and a Cast to fp16 after its outputs), which rounds the value to fp16 all the same.
    (onnxconverter-common's ``remove_unnecessary_cast_node`` misses a pair after a Constant and a
    value read by several nodes.) The second Cast's readers read the fp32 value instead; a first
    Cast that nobody reads any more goes too. Returns how many pairs were removed."""
    float32, float16 = 1, 10
    graph = model.graph
    elem_types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    elem_types.update({t.name: t.data_type for t in graph.initializer})
    producer = {output: node for node in graph.node for output in node.output}
    graph_outputs = {v.name for v in graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None)

    rename: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        if node.op_type != "Cast" or cast_to(node) != float32 or node.output[0] in graph_outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or cast_to(first) != float16:
            continue
        source = first.input[0]
        if elem_types.get(source) != float32 and not (producer.get(source) is not None
                                                      and producer[source].op_type == "Constant"
                                                      and _constant_elem_type(producer[source]) == float32):
            continue
        rename[node.output[0]] = source
        dropped.append(node)
    if not dropped:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in dropped:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | graph_outputs
    for node in [n for n in graph.node if n.op_type == "Cast" and cast_to(n) == float16 and n.output[0] not in read]:
        graph.node.remove(node)
    live = {output for node in graph.node for output in node.output}
    for value in [v for v in graph.value_info if v.name not in live]:
        graph.value_info.remove(value)
    return len(dropped)


def _constant_elem_type(node) -> int | None:
    value = next((a for a in node.attribute if a.name == "value"), None)
    return value.t.data_type if value is not None else None


def ort_session(path: Path, providers: Iterable[str] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def run_onnx(path_or_session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = path_or_session if not isinstance(path_or_session, (str, Path)) else ort_session(Path(path_or_session))
    return session.run(None, feed)


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0 for x, y in zip(a, b))


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x = np.concatenate([v.ravel() for v in a]).astype(np.float64)
    y = np.concatenate([v.ravel() for v in b]).astype(np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:  # e.g. an untrained ControlNet: zero convolutions give zero residuals
        return 1.0 if nx == ny else 0.0
    return float(x @ y / (nx * ny))

