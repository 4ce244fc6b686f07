"""FLOPs of ONNX graphs: Conv, ConvTranspose, MatMul, Gemm and Einsum, as 2 x multiply-accumulates.

Shapes come from ONNX Runtime's symbolic shape inference (onnx's own as a fallback) with the
graph inputs set to one generation's sizes; weights are never loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..components import generation_components
from ..package import ModelPackage
from .settings import Settings

logger = logging.getLogger(__name__)

FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")


def _shape_of(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _strip_weights(model) -> None:
    """Move large float initializers to graph inputs (shape kept, data dropped) for fast inference."""
    from onnx import TensorProto, helper

    keep, moved = [], []
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16) \
                and _prod(init.dims) > 64:
            moved.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    existing = {i.name for i in model.graph.input}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(v for v in moved if v.name not in existing)


def _infer_shapes(model):
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True), "onnxruntime symbolic_shape_infer"
    except Exception as error:  # fall back to onnx's own (data propagation resolves most Reshapes)
        logger.debug("symbolic shape inference failed (%s); using onnx.shape_inference", error)
        import onnx

        return onnx.shape_inference.infer_shapes(model, data_prop=True), "onnx.shape_inference"


def count_flops(model_or_path: Any, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """FLOPs (2 x multiply-accumulates) of Conv, ConvTranspose, MatMul, Gemm and Einsum nodes.

    ``input_shapes`` sets the graph inputs' dynamic dimensions; the rest comes from shape
    inference. Weights are never loaded (external data stays on disk). Nodes whose shapes stay
    unknown are counted in ``unresolved`` and contribute nothing.
    """
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    else:
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
    input_shapes = dict(input_shapes or {})
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            shape = list(input_shapes[value.name])
            if len(dims) != len(shape):
                raise ValueError(f"input {value.name}: rank {len(dims)}, shape given {shape}")
            for dim, size in zip(dims, shape):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    _strip_weights(model)
    inferred, method = _infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[vi.name] = _shape_of(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    def known(name: str) -> list[int] | None:
        shape = shapes.get(name)
        return shape if shape is not None and all(d is not None for d in shape) else None  # type: ignore[return-value]

    by_op: dict[str, int] = {}
    nodes: dict[str, int] = {}
    unresolved = 0
    for node in inferred.graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        flops = node_flops(node, known)
        if flops is None:
            unresolved += 1
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    return {"flops": sum(by_op.values()), "by_op": by_op, "nodes": nodes, "unresolved": unresolved,
            "shape_inference": method}


def node_flops(node, known: Callable[[str], list[int] | None]) -> int | None:
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    if op == "Conv":
        w, y = known(node.input[1]), known(node.output[0])
        if w is None or y is None:
            return None
        # every output element: (C_in / group) * prod(kernel) MACs
        return 2 * _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = known(node.input[0]), known(node.input[1])
        if x is None or w is None:
            return None
        # every input element scatters into (C_out / group) * prod(kernel) outputs
        return 2 * _prod(x) * _prod(w[1:])
    if op == "MatMul":
        a, b = known(node.input[0]), known(node.input[1])
        if a is None or b is None:
            return None
        k = a[-1]
        m = a[-2] if len(a) > 1 else 1
        n = b[-1] if len(b) > 1 else 1
        batch = _broadcast_batch(a[:-2], b[:-2])
        return 2 * _prod(batch) * m * n * k
    if op == "Gemm":
        a, b = known(node.input[0]), known(node.input[1])
        if a is None or b is None:
            return None
        trans_a = attrs["transA"].i if "transA" in attrs else 0
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        n = b[0] if trans_b else b[1]
        return 2 * m * n * k
    if op == "Einsum":
        y = known(node.output[0])
        operands = [known(name) for name in node.input]
        if y is None or any(o is None for o in operands):
            return None
        equation = attrs["equation"].s.decode().replace(" ", "")
        lhs, _, rhs = equation.partition("->")
        sizes: dict[str, int] = {}
        for term, shape in zip(lhs.split(","), operands):
            before, dots, after = term.partition("...")
            pairs = list(zip(before, shape))
            if dots and after:
                pairs += list(zip(after, shape[len(shape) - len(after):]))
            for letter, size in pairs:
                sizes[letter] = max(sizes.get(letter, 1), size)
        if not rhs:  # implicit output: letters appearing once, sorted
            all_letters = "".join(lhs.split(","))
            rhs = "".join(sorted(c for c in set(all_letters) if c.isalpha() and all_letters.count(c) == 1))
        contracted = {c for c in sizes if c not in rhs}
        return 2 * _prod(y) * _prod(sizes[c] for c in contracted)
    return None


def _broadcast_batch(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [max(x, y) for x, y in zip(a, b)]


def component_point(spec, config, *, batch: int, height: int, width: int) -> dict[str, int]:
    """Axis values of one generation: batch, CFG-doubled UNet batch, latent sizes, full text."""
    point = {name: axis.opt for name, axis in spec.axes.items()}
    point.update(batch=batch, unet_batch=2 * batch, height=height, width=width)
    for name, axis in spec.axes.items():
        if axis.derived_from is not None:  # a latent axis: its pixel axis // its divisor
            point[name] = point[axis.derived_from] // axis.divisor
    return point


def component_input_shapes(spec, config, *, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    point = component_point(spec, config, batch=batch, height=height, width=width)
    return {t.name: t.shape_at(point) for t in spec.inputs}


def count_package_flops(package: ModelPackage, config, specs, settings: Settings, implementations) -> dict[str, Any]:
    """FLOPs of every component a generation runs, at the shapes the benchmark fed it (else at
    the setting's shapes)."""
    recorded: dict[str, dict[str, list[int]]] = {}
    for impl in implementations.values():
        for name, shapes in impl.get("feed_shapes", {}).items():
            recorded.setdefault(name, shapes)
    names = [n for n in specs if n in recorded] or generation_components(config)
    out: dict[str, Any] = {}
    for name in names:
        shapes = recorded.get(name) or component_input_shapes(specs[name], config, batch=settings.batch,
                                                              height=settings.height, width=settings.width)
        try:
            counted = count_flops(package.onnx_path(name, settings.precision), shapes)
        except Exception as error:  # noqa: BLE001 -- a figure missing is better than no report
            logger.warning("FLOPs of %s: %s", name, error)
            out[name] = {"error": str(error)}
            continue
        out[name] = {**counted, "input_shapes": {k: list(v) for k, v in shapes.items()}}
    return out
