"""The timestep embedding of every fp16 graph is computed in fp32, as diffusers computes it.

diffusers' ``Timesteps`` computes ``sin/cos(t * freq)`` in fp32 whatever the model's dtype and casts
the result to the model's dtype afterwards. A plain fp16 conversion computes the argument in fp16
(up to ~1000 rad, so in steps of 0.5): the embedding is then off by up to ~0.25 at late timesteps.
The fp16 graphs (plain: ORT-CUDA and the TensorRT engines, which are built from them; and the
CUDA-fused ones) keep these nodes in fp32 (``export.graphs.sinusoidal_embedding_nodes``, without the
fp16 round trips the converters put between kept nodes: ``drop_fp16_round_trips``).

Checked here on ONNX Runtime CPU: the embedding part of each graph (from the graph's inputs to the
value its time MLP reads, found from the graph's structure, not from node names) against PyTorch
fp32 (diffusers' ``get_timestep_embedding`` with the checkpoint's config) at t in {1, 500, 999}.
Bound: the argument ``t * freq`` (freq <= 1) is rounded once in fp32 (<= t * eps32 / 2), and two
sin/cos implementations of one fp32 argument differ by a few ulps of their result: ``2 * t * eps32
+ 8 * eps32``. The conversions this replaces (no block list; a block list with the round trips
left in) are shown to exceed it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="export tests need the export extra (pip install .[export])")
onnx = pytest.importorskip("onnx", reason="export tests need onnx (the export extra)")
ort = pytest.importorskip("onnxruntime", reason="the fp16 converter is part of onnxruntime")
torch = pytest.importorskip("torch", reason="the reference is PyTorch fp32")

from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402
from onnxruntime.transformers import float16  # noqa: E402
from onnxruntime.transformers.onnx_model import OnnxModel  # noqa: E402

from blipdiffusion_trt.components import CONTROLNET_STEP_CACHE, PLAIN_STEP_CACHE, declare_components  # noqa: E402
from blipdiffusion_trt.export.graphs import export_point, sinusoidal_embedding_nodes  # noqa: E402
from blipdiffusion_trt.package.layout import PackageLayout  # noqa: E402

from helpers import fixture_config  # noqa: E402

pytestmark = pytest.mark.slow

TIMESTEPS = (1.0, 500.0, 999.0)
EPS32 = float(np.finfo(np.float32).eps)
# the diffusers module (checkpoint folder) each denoiser graph was traced from
# every graph with a timestep embedding -> the checkpoint folder of its module: fast mode's UNet
# steps too (the shallow ControlNet is conv_in and the first residual: no time embedding)
CHECKPOINT_FOLDER = {"unet": "unet", "unet_plain": "unet", "controlnet": "controlnet",
                     **{name: "unet" for graphs in (PLAIN_STEP_CACHE, CONTROLNET_STEP_CACHE)
                        for name in (graphs.full, graphs.shallow)}}


def _bound(t: float) -> float:
    return 2 * t * EPS32 + 8 * EPS32


def _embedding_value(model) -> str:
    """The value the time MLP reads: from the first Sin node forward to the first Gemm/MatMul,
    then back over the Casts before it."""
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    sin = next(node for node in graph.node if node.op_type == "Sin")
    queue, seen = [sin], set()
    while queue:
        node = queue.pop(0)
        if node.op_type in ("Gemm", "MatMul"):
            value = node.input[0]
            while producer.get(value) is not None and producer[value].op_type == "Cast":
                value = producer[value].input[0]
            return value
        for out in node.output:
            for reader in readers.get(out, []):
                if reader.name not in seen:
                    seen.add(reader.name)
                    queue.append(reader)
    raise AssertionError("no Gemm/MatMul reads the sinusoidal embedding")


def _embedding(model, spec, t: float) -> tuple[np.ndarray, str]:
    """The embedding part of ``model`` run on ONNX Runtime CPU at timestep ``t`` (every row)."""
    sorted_model = OnnxModel(model)
    sorted_model.topological_sort()  # the converter appends its Casts last; the extractor wants order
    value = _embedding_value(sorted_model.model)
    producer = {out: node for node in sorted_model.model.graph.node for out in node.output}
    graph_inputs = {i.name for i in sorted_model.model.graph.input}
    needed, stack, seen = set(), [value], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph_inputs:
            needed.add(name)
        elif name in producer:
            stack += list(producer[name].input)
    sub = onnx.utils.Extractor(sorted_model.model).extract_model(sorted(needed), [value])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    point = export_point(spec)
    feed = {}
    for tensor in spec.inputs:
        if tensor.name in needed:
            feed[tensor.name] = np.zeros(tensor.shape_at(point), dtype=tensor.dtype)
    timestep = next(tensor.name for tensor in spec.inputs if tensor.name in needed and len(tensor.shape) == 1)
    feed[timestep] = np.full(feed[timestep].shape, t, dtype=feed[timestep].dtype)
    (out,) = session.run(None, feed)
    return out, value


def _reference(checkpoint, component: str, t: float, rows: int) -> np.ndarray:
    config = json.loads((checkpoint / CHECKPOINT_FOLDER[component] / "config.json").read_text())
    return get_timestep_embedding(torch.full((rows,), t, dtype=torch.float32), config["block_out_channels"][0],
                                  flip_sin_to_cos=config["flip_sin_to_cos"],
                                  downscale_freq_shift=config["freq_shift"]).numpy()


def _errors(model, fixture, spec) -> dict[float, float]:
    errors = {}
    for t in TIMESTEPS:
        got, _ = _embedding(model, spec, t)
        expected = _reference(fixture.checkpoint, spec.name, t, got.shape[0])
        assert got.shape == expected.shape
        errors[t] = float(np.abs(got.astype(np.float64) - expected).max())
    return errors


def _denoisers(fixture) -> list[str]:
    """Components whose fp32 graph computes a sinusoidal embedding (read from the graphs)."""
    files = PackageLayout(fixture.package)
    found = []
    for name in declare_components(fixture_config(fixture)):
        path = files.graph(name, "fp32")
        if path.is_file() and any(n.op_type == "Sin" for n in onnx.load(str(path), load_external_data=False).graph.node):
            found.append(name)
    return found


def test_every_denoiser_is_checked(tiny_cn):
    assert sorted(_denoisers(tiny_cn)) == sorted(CHECKPOINT_FOLDER)


@pytest.mark.parametrize("component", sorted(CHECKPOINT_FOLDER))
def test_plain_fp16_graph_embeds_the_timestep_in_fp32(tiny_cn, component):
    """The package's fp16 graph: what ORT-CUDA runs and what the TensorRT engines are parsed from."""
    spec = declare_components(fixture_config(tiny_cn))[component]
    model = onnx.load(str(PackageLayout(tiny_cn.package).graph(component, "fp16")))
    errors = _errors(model, tiny_cn, spec)
    assert all(errors[t] <= _bound(t) for t in TIMESTEPS), errors
    # strongly typed TensorRT takes each node's precision from the graph: Sin and Cos read fp32
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    trig = [n for n in inferred.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in trig)


@pytest.mark.parametrize("component", ["unet", "controlnet"])
def test_cuda_fused_graph_embeds_the_timestep_in_fp32(tiny_cn, component, tmp_path):
    from blipdiffusion_trt.export.gpu_fusions import fuse_for_cuda

    spec = declare_components(fixture_config(tiny_cn))[component]
    dst = tmp_path / f"{component}.onnx"
    fuse_for_cuda(PackageLayout(tiny_cn.package).graph(component, "fp32"), dst, spec.gpu_fusion)
    errors = _errors(onnx.load(str(dst)), tiny_cn, spec)
    assert all(errors[t] <= _bound(t) for t in TIMESTEPS), errors


@pytest.mark.parametrize("mistake", ["no block list", "round trips kept"])
def test_the_bound_catches_an_fp16_embedding(tiny_cn, mistake):
    """What the conversion did before (no block list), and the block list alone (the converter's
    fp16 round trips between kept nodes): both are off by more than the bound."""
    spec = declare_components(fixture_config(tiny_cn))["unet"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(PackageLayout(tiny_cn.package).graph("unet", "fp32"))))
    blocked = sinusoidal_embedding_nodes(model) if mistake == "round trips kept" else None
    model16 = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                               node_block_list=blocked)
    errors = _errors(model16, tiny_cn, spec)
    assert all(errors[t] > _bound(t) for t in TIMESTEPS), errors
    assert errors[999.0] > 1e-2, errors  # fp16 steps of 0.5 in the argument: ~0.1 off at late timesteps
