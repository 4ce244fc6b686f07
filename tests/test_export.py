"""Export: the ONNX graphs against the ORIGINAL diffusers modules, fp16 graphs, package contents, CLI errors.

The tolerance tests call diffusers' own modules (``pipe.qformer``, ``pipe.text_encoder``, ``pipe.unet``,
``pipe.controlnet``, ``pipe.vae``) exactly as the diffusers pipelines call them, never the export
wrappers of ``blipdiffusion_trt.export.modules``: they prove that wrappers + tracing compute what
diffusers computes, at the traced shapes and at other batches, sizes and text lengths.

Every expected value is read from the checkpoint (through the diffusers pipeline loaded back with
``from_pretrained``) or from the components' declarations, never written as a literal.

What needs a GPU and is therefore not checked here: the speed of the graphs, and the accuracy of
the fp16 graphs on CUDA / TensorRT kernels. ONNX Runtime CPU runs the fp16 graphs with its own
(partly upcasting) kernels; where it has no fp16 kernel for a node the fp16 test skips with
"needs a GPU".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "diffusers", reason="export tests need diffusers (the export extra: pip install .[export])"
)
torch = pytest.importorskip("torch", reason="export tests need torch (the export extra)")
onnx = pytest.importorskip("onnx", reason="export tests need onnx (the export extra)")
ort = pytest.importorskip("onnxruntime", reason="export tests need onnxruntime")

from onnx import numpy_helper  # noqa: E402

from blipdiffusion_trt.components import Axis, ComponentSpec, PipelineConfig, declare_components  # noqa: E402
from blipdiffusion_trt.export.graphs import export_point, second_point  # noqa: E402
from blipdiffusion_trt.package import read_pipeline_config, sha256_file  # noqa: E402
from blipdiffusion_trt.package.layout import CPU_FUSED, MANIFEST  # noqa: E402

from conftest import CHECKPOINTS, Fixture, load_diffusers  # noqa: E402
from helpers import cosine, fixture_config, run_cli  # noqa: E402

pytestmark = pytest.mark.slow

FP16_FIXTURES = [name for name, (_, _, _, precisions) in CHECKPOINTS.items() if "fp16" in precisions]
CONTROLNET_FIXTURES = [name for name, (_, controlnet, _, _) in CHECKPOINTS.items() if controlnet]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_sessions: dict[str, object] = {}


def _session(path: Path):
    key = str(path)
    if key not in _sessions:
        _sessions[key] = ort.InferenceSession(key, providers=["CPUExecutionProvider"])
    return _sessions[key]


def _graph(fixture: Fixture, name: str, precision: str = "fp32") -> Path:
    return fixture.package / "onnx" / precision / f"{name}.onnx"


def _specs(fixture: Fixture) -> dict[str, ComponentSpec]:
    return declare_components(fixture_config(fixture))


# the plain fp32 graphs, and the fp32 graphs with ONNX Runtime's CPU fusions (export/cpu_fusions.py)
GRAPH_VARIANTS = ["fp32", CPU_FUSED]


def _run_graph(fixture: Fixture, spec: ComponentSpec, feed: dict[str, np.ndarray], precision: str = "fp32"):
    assert set(feed) == set(spec.input_names), (sorted(feed), spec.input_names)
    if precision == CPU_FUSED:
        # the variant must exist and hold fused attention: otherwise this test would silently
        # re-test the plain graph
        ops = {n.op_type for n in onnx.load(str(_graph(fixture, spec.name, precision)), load_external_data=False).graph.node}
        assert ops & {"Attention", "MultiHeadAttention"}, f"{spec.name}: no fused attention in the CPU-fused graph"
    return _session(_graph(fixture, spec.name, precision)).run(None, {k: np.ascontiguousarray(v) for k, v in feed.items()})


def _t(array: np.ndarray) -> "torch.Tensor":
    """A torch copy (diffusers must not be able to modify the arrays fed to ONNX Runtime)."""
    return torch.tensor(np.array(array))


def _check_axes(spec: ComponentSpec, point: dict[str, int]) -> None:
    """The point lies inside the declared ranges (so the test exercises a legal shape)."""
    for name, value in point.items():
        if name in spec.axes:
            problem = spec.axes[name].check(value)
            assert problem is None, f"{spec.name}: test point {point} is not declared legal: {problem}"


def _assert_close(spec: ComponentSpec, got, expected, where: str, point: dict[str, int] | None = None) -> None:
    assert len(got) == len(expected) == len(spec.outputs), (len(got), len(expected), spec.output_names)
    for tensor, g, e in zip(spec.outputs, got, expected):
        e = e.detach().float().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
        assert g.dtype == np.float32, f"{spec.name}.{tensor.name}: ONNX output dtype {g.dtype}"
        assert g.shape == e.shape, f"{spec.name}.{tensor.name} at {where}: ONNX shape {g.shape}, diffusers {e.shape}"
        if point is not None:
            assert g.shape == tensor.shape_at(point), (
                f"{spec.name}.{tensor.name} at {where}: shape {g.shape}, declared {tensor.shape_at(point)}"
            )
        assert np.isfinite(e).all(), f"{spec.name}.{tensor.name}: diffusers output not finite at {where}"
        diff = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) if g.size else 0.0
        assert diff <= spec.atol, (
            f"{spec.name}.{tensor.name} at {where} (shapes {g.shape}): ONNX Runtime CPU fp32 vs diffusers "
            f"max abs {diff:.3e} > atol {spec.atol:g} (output max |x| {float(np.max(np.abs(e))):.3g})"
        )


def _rng(*key) -> np.random.Generator:
    """Deterministic per test case (str hashes are salted per process, crc32 is not)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _unet_points(fixture: Fixture, specs: dict[str, ComponentSpec]) -> list[tuple[str, dict[str, int]]]:
    """Export point and a second point (other batch, other non-square size), consistent for the
    UNet and the ControlNet (whose points also carry the pixel height/width)."""
    spec = specs["controlnet"] if fixture.controlnet else specs["unet"]
    points = [("export", export_point(spec)), ("second", second_point(spec))]
    assert points[0][1] != points[1][1]
    return points


def _unet_inputs(specs, point, rng) -> dict[str, np.ndarray]:
    spec = specs["unet_plain"]
    feed = {}
    for tensor in spec.inputs:
        shape = tensor.shape_at(point)
        if tensor.name == "timestep":
            feed["timestep"] = rng.uniform(0, 999, size=shape).astype(np.float32)
        else:
            feed[tensor.name] = _normal(rng, shape)
    return feed


def _pixel_point(spec: ComponentSpec, config: PipelineConfig, batch: int, height: int, width: int) -> dict[str, int]:
    """All axes of the ControlNet declaration for a pixel size."""
    f = config.latent_scale_factor
    point = {"unet_batch": batch, "height": height, "width": width,
             "latent_height": height // f, "latent_width": width // f}
    for name in spec.axes:
        for latent in ("latent_height", "latent_width"):
            if name.startswith(latent + "_"):
                point[name] = point[latent] // int(name.rsplit("_", 1)[1])
    assert set(point) == set(spec.axes), (sorted(point), sorted(spec.axes))
    return point


# ---------------------------------------------------------------------------------------------
# 1. ONNX Runtime CPU fp32 vs the original diffusers modules
# ---------------------------------------------------------------------------------------------

# words of different token lengths: padding (attention_mask 0) inside a batch
QFORMER_WORDS = [["dog"], ["teapot", "red backpack"], ["red backpack", "dog", "a red backpack on a table"]]


def test_qformer_matches_diffusers(any_fixture):
    pipe = load_diffusers(any_fixture)
    spec = _specs(any_fixture)["qformer"]
    text_axis = spec.axes["qformer_text_length"]
    for words in QFORMER_WORDS:
        batch = len(words)
        tokens = pipe.qformer.tokenizer(words, return_tensors="pt", padding=True)
        ids = tokens.input_ids.numpy().astype(np.int64)
        mask = tokens.attention_mask.numpy().astype(np.int64)
        point = {"batch": batch, "qformer_text_length": ids.shape[1]}
        _check_axes(spec, point)
        if batch > 1:
            assert (mask == 0).any(), f"{words}: expected words of different token lengths"
        assert text_axis.check(ids.shape[1]) is None
        pixels = _normal(_rng(any_fixture.name, "qformer", batch), spec.inputs[0].shape_at(point))
        with torch.no_grad():
            expected = pipe.qformer(text_input=words, image_input=_t(pixels), return_dict=False)
        got = _run_graph(any_fixture, spec, {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask})
        _assert_close(spec, got, [expected], f"batch {batch} words {words}", point)


def test_text_encoder_matches_diffusers(any_fixture):
    pipe = load_diffusers(any_fixture)
    config = fixture_config(any_fixture)
    spec = _specs(any_fixture)["text_encoder"]
    vocab = int(pipe.text_encoder.config.vocab_size)
    full = config.text_length
    cases = [(1, full), (2, full), (3, full), (2, full - 3), (3, config.ctx_begin_pos)]
    for batch, length in cases:
        point = {"batch": batch, "text_length": length, "ctx_text_length": length + config.num_query_tokens}
        _check_axes(spec, point)
        rng = _rng(any_fixture.name, "text", batch, length)
        ids = rng.integers(0, vocab, size=spec.inputs[0].shape_at(point), dtype=np.int64)
        ctx = _normal(rng, spec.inputs[1].shape_at(point))
        with torch.no_grad():
            expected = pipe.text_encoder(
                input_ids=_t(ids), ctx_embeddings=_t(ctx), ctx_begin_pos=[pipe.config.ctx_begin_pos] * batch
            )[0]
        got = _run_graph(any_fixture, spec, {"input_ids": ids, "ctx_embeddings": ctx})
        _assert_close(spec, got, [expected], f"batch {batch} text length {length}", point)


def test_text_encoder_plain_matches_diffusers(any_fixture):
    pipe = load_diffusers(any_fixture)
    config = fixture_config(any_fixture)
    spec = _specs(any_fixture)["text_encoder_plain"]
    vocab = int(pipe.text_encoder.config.vocab_size)
    full = config.text_max_length
    for batch, length in [(1, full), (2, full), (3, full), (2, full - 3), (1, 1)]:
        point = {"batch": batch, "plain_text_length": length}
        _check_axes(spec, point)
        ids = _rng(any_fixture.name, "plain", batch, length).integers(0, vocab, size=(batch, length), dtype=np.int64)
        with torch.no_grad():
            expected = pipe.text_encoder(input_ids=_t(ids), ctx_embeddings=None)[0]
        got = _run_graph(any_fixture, spec, {"input_ids": ids})
        _assert_close(spec, got, [expected], f"batch {batch} text length {length}", point)


@pytest.mark.parametrize("graphs", GRAPH_VARIANTS)
def test_unet_with_residuals_matches_diffusers(any_fixture, graphs):
    pipe = load_diffusers(any_fixture)
    specs = _specs(any_fixture)
    spec = specs["unet"]
    residual_specs = spec.inputs[3:]
    for label, point in _unet_points(any_fixture, specs):
        _check_axes(spec, point)
        rng = _rng(any_fixture.name, "unet", label)
        feed = _unet_inputs(specs, point, rng)
        if any_fixture.controlnet:
            cond_spec = specs["controlnet"].inputs[3]
            cond = rng.uniform(0, 1, size=cond_spec.shape_at(point)).astype(np.float32)
            with torch.no_grad():
                down, mid = pipe.controlnet(
                    _t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
                    controlnet_cond=_t(cond), conditioning_scale=0.7, return_dict=False,
                )
            residuals = [r.numpy() for r in (*down, mid)]
        else:
            residuals = [_normal(rng, r.shape_at(point), 0.5) for r in residual_specs]
        assert [r.shape for r in residuals] == [r.shape_at(point) for r in residual_specs]
        feed.update({r.name: value for r, value in zip(residual_specs, residuals)})
        with torch.no_grad():
            expected = pipe.unet(
                _t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
                down_block_additional_residuals=tuple(_t(r) for r in residuals[:-1]),
                mid_block_additional_residual=_t(residuals[-1]),
            ).sample
        got = _run_graph(any_fixture, spec, feed)
        _assert_close(spec, got, [expected], f"{label} point {point}", point)


@pytest.mark.parametrize("graphs", GRAPH_VARIANTS)
def test_unet_plain_matches_diffusers(any_fixture, graphs):
    pipe = load_diffusers(any_fixture)
    specs = _specs(any_fixture)
    spec = specs["unet_plain"]
    for label, point in _unet_points(any_fixture, specs):
        _check_axes(spec, point)
        feed = _unet_inputs(specs, point, _rng(any_fixture.name, "unet_plain", label))
        with torch.no_grad():
            expected = pipe.unet(
                _t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
            ).sample
        got = _run_graph(any_fixture, spec, feed)
        _assert_close(spec, got, [expected], f"{label} point {point}", point)


@pytest.mark.parametrize("graphs", GRAPH_VARIANTS)
def test_controlnet_matches_diffusers(any_fixture, graphs):
    if not any_fixture.controlnet:
        pytest.skip(f"fixture {any_fixture.name} has no ControlNet")
    pipe = load_diffusers(any_fixture)
    specs = _specs(any_fixture)
    spec = specs["controlnet"]
    for label, point in _unet_points(any_fixture, specs):
        _check_axes(spec, point)
        rng = _rng(any_fixture.name, "controlnet", label)
        feed = _unet_inputs(specs, point, rng)
        feed["controlnet_cond"] = rng.uniform(0, 1, size=spec.inputs[3].shape_at(point)).astype(np.float32)
        feed["conditioning_scale"] = np.array([0.7], dtype=np.float32)
        with torch.no_grad():
            down, mid = pipe.controlnet(
                _t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
                controlnet_cond=_t(feed["controlnet_cond"]), conditioning_scale=0.7, return_dict=False,
            )
        got = _run_graph(any_fixture, spec, feed, graphs)
        _assert_close(spec, got, [*down, mid], f"{label} point {point}", point)


def test_vae_decoder_matches_diffusers(any_fixture):
    pipe = load_diffusers(any_fixture)
    spec = _specs(any_fixture)["vae_decoder"]
    for label, point in (("export", export_point(spec)), ("second", second_point(spec))):
        _check_axes(spec, point)
        # what the pipeline decodes: latents / scaling_factor
        latents = _normal(_rng(any_fixture.name, "vae", label), spec.inputs[0].shape_at(point),
                          1.0 / pipe.vae.config.scaling_factor)
        with torch.no_grad():
            expected = pipe.vae.decode(_t(latents)).sample
        got = _run_graph(any_fixture, spec, {"latents": latents})
        _assert_close(spec, got, [expected], f"{label} point {point}", point)


@pytest.mark.parametrize("name", CONTROLNET_FIXTURES)
def test_declared_controlnet_residual_shapes_match_real_controlnet(name, request):
    fixture = request.getfixturevalue(name)
    pipe = load_diffusers(fixture)
    config = fixture_config(fixture)
    spec = declare_components(config)["controlnet"]
    m = config.image_multiple
    sizes = [(1, config.default_height, config.default_width),  # square
             (3, config.default_height - m, config.default_width + 2 * m)]  # non-square, odd multiples
    for batch, height, width in sizes:
        point = _pixel_point(spec, config, batch, height, width)
        _check_axes(spec, point)
        rng = _rng(name, "residual shapes", batch)
        with torch.no_grad():
            down, mid = pipe.controlnet(
                _t(_normal(rng, spec.inputs[0].shape_at(point))),
                _t(rng.uniform(0, 999, size=(batch,)).astype(np.float32)),
                encoder_hidden_states=_t(_normal(rng, spec.inputs[2].shape_at(point))),
                controlnet_cond=_t(rng.uniform(0, 1, size=spec.inputs[3].shape_at(point)).astype(np.float32)),
                return_dict=False,
            )
        real = [tuple(r.shape) for r in (*down, mid)]
        declared = [t.shape_at(point) for t in spec.outputs]
        assert declared == real, f"{name} at {height}x{width} batch {batch}: declared {declared}, ControlNet gives {real}"
        # the UNet declaration takes the same residuals
        assert [t.shape_at(point) for t in declare_components(config)["unet"].inputs[3:]] == real


# ---------------------------------------------------------------------------------------------
# 2. fp16 graphs (ONNX Runtime CPU; speed and CUDA/TensorRT fp16 accuracy need a GPU)
# ---------------------------------------------------------------------------------------------

_BASE_COMPONENTS = ["qformer", "text_encoder", "text_encoder_plain", "unet", "unet_plain", "vae_decoder"]
FP16_CASES = [
    (name, component)
    for name in FP16_FIXTURES
    for component in _BASE_COMPONENTS + (["controlnet"] if CHECKPOINTS[name][1] else [])
]


def _fp16_feed(fixture: Fixture, spec: ComponentSpec, point: dict[str, int]) -> dict[str, np.ndarray]:
    pipe = load_diffusers(fixture)
    rng = _rng(fixture.name, "fp16", spec.name)
    vocab = {"qformer": len(pipe.qformer.tokenizer)}.get(spec.name, int(pipe.text_encoder.config.vocab_size))
    feed = {}
    for tensor in spec.inputs:
        shape = tensor.shape_at(point)
        if tensor.name == "input_ids":
            feed[tensor.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif tensor.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[-1, shape[1] // 2:] = 0
            feed[tensor.name] = mask
        elif tensor.name == "timestep":
            feed[tensor.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        elif tensor.name == "conditioning_scale":
            feed[tensor.name] = np.array([0.7], dtype=np.float32)
        elif tensor.name == "controlnet_cond":
            feed[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        elif tensor.name == "latents":
            feed[tensor.name] = _normal(rng, shape, 1.0 / pipe.vae.config.scaling_factor)
        else:
            feed[tensor.name] = _normal(rng, shape)
    return feed


def _tensors_in(graph) -> list:
    """Initializers and every tensor-valued node attribute (Constant, ConstantOfShape, ...), subgraphs included."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                found.extend(attr.tensors)
            elif attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_tensors_in(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    found.extend(_tensors_in(g))
    return found


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@pytest.mark.parametrize("name,component", FP16_CASES)
def test_fp16_graph(name, component, request):
    fixture = request.getfixturevalue(name)
    manifest = json.loads((fixture.package / MANIFEST).read_text())
    assert "fp16" in manifest["precisions"]
    spec = _specs(fixture)[component]
    path16 = _graph(fixture, component, "fp16")
    model = onnx.load(str(path16))

    # keep_io_types: the fp16 graph takes and returns exactly what the fp32 graph does
    for kind, values, declared in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values}
        assert dtypes == {t.name: t.dtype for t in declared}, f"{component} fp16 {kind}s: {dtypes}"

    # really converted, and no constant became -inf/NaN (finfo(float32).min masks overflow in fp16)
    tensors = [t for t in _tensors_in(model.graph) if t.data_type in _FLOAT_TYPES]
    weights = [t for t in model.graph.initializer if t.data_type in _FLOAT_TYPES and np.prod(t.dims) > 1]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), (
        f"{component}: fp32 weights left in the fp16 graph: {[t.name for t in weights if t.data_type != onnx.TensorProto.FLOAT16][:5]}"
    )
    bad = [t.name or "?" for t in tensors if not np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()]
    assert not bad, f"{component} fp16: constants holding inf/NaN: {bad[:10]}"

    try:
        session = ort.InferenceSession(str(path16), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT CPU lacks an fp16 kernel: only a GPU (ORT-CUDA / TensorRT) can run it
        pytest.skip(f"needs a GPU: ONNX Runtime CPU cannot create a session for {path16.name} ({type(error).__name__}: {str(error).splitlines()[0]})")
    point = export_point(spec)
    feed = _fp16_feed(fixture, spec, point)
    got = session.run(None, feed)
    expected = _run_graph(fixture, spec, feed)
    for tensor, g, e in zip(spec.outputs, got, expected):
        assert g.dtype == np.float32 and g.shape == e.shape == tensor.shape_at(point)
        assert np.isfinite(g).all(), f"{component}.{tensor.name}: fp16 output not finite"
        cos = cosine(g, e)
        assert cos >= spec.fp16_min_cosine, (
            f"{component}.{tensor.name}: fp16 vs fp32 cosine {cos:.6f} < {spec.fp16_min_cosine} "
            f"(max abs {float(np.max(np.abs(g - e))):.3g})"
        )


# ---------------------------------------------------------------------------------------------
# 3. Package contents
# ---------------------------------------------------------------------------------------------

def test_manifest_files_and_sha256(any_fixture):
    package = any_fixture.package
    manifest = json.loads((package / MANIFEST).read_text())
    on_disk = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert sha256_file(package / rel) == digest, f"{rel}: sha256 differs from the manifest"
    # every component has one graph per precision, the declared ones a CPU-fused graph, nothing else
    specs = _specs(any_fixture)
    graphs = {f"onnx/{p}/{n}.onnx" for p in manifest["precisions"] for n in specs}
    fused = {n for n, spec in specs.items() if spec.cpu_fusion}
    assert fused and set(manifest["cpu_fused"]) == fused
    graphs |= {f"onnx/{CPU_FUSED}/{n}.onnx" for n in fused}
    assert {f for f in on_disk if f.startswith("onnx/")} == graphs
    assert manifest["precisions"] == list(CHECKPOINTS[any_fixture.name][3])


def test_manifest_components_equal_declarations(any_fixture):
    manifest = json.loads((any_fixture.package / MANIFEST).read_text())
    specs = _specs(any_fixture)
    assert list(manifest["components"]) == list(specs)
    for name, spec in specs.items():
        entry = manifest["components"][name]
        assert [t["name"] for t in entry["inputs"]] == spec.input_names
        assert [t["name"] for t in entry["outputs"]] == spec.output_names
        declared = spec.to_dict()
        assert {k: entry[k] for k in declared} == declared, name
    assert ("controlnet" in specs) == any_fixture.controlnet


def test_pipeline_json_matches_checkpoint(any_fixture):
    pipe = load_diffusers(any_fixture)
    config = fixture_config(any_fixture)
    raw = json.loads((any_fixture.package / "pipeline.json").read_text())
    assert PipelineConfig.from_dict(raw) == config
    proc = pipe.image_processor
    index = json.loads((any_fixture.checkpoint / "model_index.json").read_text())

    assert config.ctx_begin_pos == pipe.config.ctx_begin_pos == index.get("ctx_begin_pos", 2)
    # mean/std: model_index.json when it sets them (the pipeline passes them to preprocess), else the processor's
    if index.get("mean") is not None:
        expected_mean, expected_std = index["mean"], index["std"]
        assert list(expected_mean) != list(proc.image_mean)  # proves the fixture overrides the processor
    else:
        expected_mean, expected_std = proc.image_mean, proc.image_std
    if any_fixture.name == "tiny":
        assert index.get("mean") is not None and index.get("std") is not None
    if any_fixture.name == "tiny_cn":
        assert index.get("mean") is None and index.get("std") is None
    np.testing.assert_allclose(config.image_mean, expected_mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(config.image_std, expected_std, rtol=0, atol=1e-7)

    # subject image size: what the processor actually produces
    from PIL import Image

    pixels = proc.preprocess(Image.new("RGB", (37, 23)), return_tensors="np")["pixel_values"]
    assert tuple(config.image_size) == tuple(pixels.shape[-2:]) == (proc.size["height"], proc.size["width"])
    assert config.image_resample == int(proc.resample)

    text_cfg = pipe.text_encoder.text_model.config
    assert config.text_max_length == text_cfg.max_position_embeddings == pipe.text_encoder.config.max_position_embeddings
    assert config.text_hidden_size == text_cfg.hidden_size
    assert config.num_query_tokens == pipe.qformer.config.num_query_tokens == pipe.qformer.query_tokens.shape[1]
    # encode_prompt tokenizes prompts to max_position_embeddings - num_query_tokens
    assert config.text_length == text_cfg.max_position_embeddings - pipe.qformer.config.num_query_tokens
    assert config.qformer_hidden_size == pipe.qformer.config.qformer_config.hidden_size
    assert config.qformer_max_text_length == pipe.qformer.config.qformer_config.max_position_embeddings

    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # diffusers' scale_down_factor
    assert config.latent_scale_factor == factor
    with torch.no_grad():  # and the VAE really upsamples latents by that factor
        image = pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, 2, 3)).sample
    assert tuple(image.shape[-2:]) == (2 * factor, 3 * factor)
    assert config.vae_scaling_factor == pytest.approx(pipe.vae.config.scaling_factor, abs=0)
    assert config.latent_channels == pipe.unet.config.in_channels
    assert tuple(config.unet_block_out_channels) == tuple(pipe.unet.config.block_out_channels)
    assert config.unet_layers_per_block == pipe.unet.config.layers_per_block
    assert (config.default_height, config.default_width) == (pipe.unet.config.sample_size * factor,) * 2
    assert config.has_controlnet == any_fixture.controlnet == (getattr(pipe, "controlnet", None) is not None)
    if any_fixture.controlnet:
        assert config.controlnet_conditioning_channels == pipe.controlnet.config.conditioning_channels


@pytest.mark.parametrize("name", ["odd", "odd_cn"])
def test_odd_fixture_is_unusual(name, request):
    """The odd fixtures are what catches hard-coded 77 / 16 / 224 / 8 in the code."""
    fixture = request.getfixturevalue(name)
    config = fixture_config(fixture)
    pipe = load_diffusers(fixture)
    assert pipe.text_encoder.config.max_position_embeddings == config.text_max_length != 77
    assert 2 ** (len(pipe.unet.config.block_out_channels) - 1) == config.latent_scale_factor != 8
    assert config.num_query_tokens != 16
    assert config.image_size != (224, 224)


def test_onnx_io_equals_declarations(any_fixture):
    manifest = json.loads((any_fixture.package / MANIFEST).read_text())
    specs = _specs(any_fixture)
    for precision in manifest["precisions"]:
        for name, spec in specs.items():
            model = onnx.load(str(_graph(any_fixture, name, precision)), load_external_data=False)
            for kind, values, declared in (("input", model.graph.input, spec.inputs),
                                           ("output", model.graph.output, spec.outputs)):
                where = f"{any_fixture.name} {precision}/{name} {kind}"
                assert [v.name for v in values] == [t.name for t in declared], where
                for value, tensor in zip(values, declared):
                    tt = value.type.tensor_type
                    assert onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name == tensor.dtype, (where, tensor.name)
                    dims = list(tt.shape.dim)
                    assert len(dims) == len(tensor.shape), (where, tensor.name, "rank")
                    for i, (dim, want) in enumerate(zip(dims, tensor.shape)):
                        if isinstance(want, Axis):
                            assert dim.HasField("dim_param") and dim.dim_param == want.name, (
                                f"{where} {tensor.name}[{i}]: expected symbolic {want.name!r}, got {dim}"
                            )
                        else:
                            assert dim.HasField("dim_value") and dim.dim_value == want, f"{where} {tensor.name}[{i}]: {dim} != {want}"


# ---------------------------------------------------------------------------------------------
# 4. Bad input through the CLI
# ---------------------------------------------------------------------------------------------

def _export(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("export", *args, cwd=cwd)


def _copy_checkpoint(fixture: Fixture, dst: Path) -> Path:
    shutil.copytree(fixture.checkpoint, dst)
    return dst


def _case_missing(tmp_path, tiny, tiny_cn):
    return [tmp_path / "no-such-checkpoint"], ["does not exist"]


def _case_no_model_index(tmp_path, tiny, tiny_cn):
    ckpt = tmp_path / "no-index"
    (ckpt / "unet").mkdir(parents=True)
    return [ckpt], ["model_index.json"]


def _case_not_blip(tmp_path, tiny, tiny_cn):
    ckpt = tmp_path / "sd"
    ckpt.mkdir()
    index = json.loads((tiny.checkpoint / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (ckpt / "model_index.json").write_text(json.dumps(index))
    return [ckpt], ["not BLIP-Diffusion", "StableDiffusionPipeline"]


def _case_unet_weights_missing(tmp_path, tiny, tiny_cn):
    ckpt = _copy_checkpoint(tiny, tmp_path / "no-unet-weights")
    for weights in (ckpt / "unet").glob("*.safetensors"):
        weights.unlink()
    return [ckpt], ["incomplete", "unet"]


def _case_pickle_only(tmp_path, tiny, tiny_cn):
    from diffusers import UNet2DConditionModel

    ckpt = _copy_checkpoint(tiny, tmp_path / "pickle")
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet", use_safetensors=True, local_files_only=True)
    for weights in (ckpt / "unet").glob("*.safetensors"):
        weights.unlink()
    unet.save_pretrained(ckpt / "unet", safe_serialization=False)
    assert list((ckpt / "unet").glob("*.bin"))
    return [ckpt], ["--allow-pickle", "unet"]


def _mismatched_controlnet(tiny_cn, dst: Path) -> Path:
    from diffusers import ControlNetModel

    cfg = {k: v for k, v in ControlNetModel.load_config(tiny_cn.checkpoint / "controlnet").items() if not k.startswith("_")}
    cfg["cross_attention_dim"] = 2 * cfg["cross_attention_dim"]
    ControlNetModel(**cfg).save_pretrained(dst, safe_serialization=True)
    return dst


def _case_controlnet_mismatch(tmp_path, tiny, tiny_cn):
    controlnet = _mismatched_controlnet(tiny_cn, tmp_path / "controlnet-wide")
    return [tiny.checkpoint, "--controlnet", controlnet], ["cross_attention_dim"]


def _case_fp8(tmp_path, tiny, tiny_cn):
    return [tiny.checkpoint, "--precision", "fp8"], ["fp8"]


def _case_opset5(tmp_path, tiny, tiny_cn):
    return [tiny.checkpoint, "--opset", "5"], ["opset"]


def _case_batch_too_large(tmp_path, tiny, tiny_cn):
    from blipdiffusion_trt.components import MAX_DECLARED_BATCH_SIZE

    return [tiny.checkpoint, "--max-batch-size", str(MAX_DECLARED_BATCH_SIZE + 1)], ["--max-batch-size", "[1, "]


BAD_CASES = {
    "missing-checkpoint": _case_missing,
    "no-model-index": _case_no_model_index,
    "not-blip-diffusion": _case_not_blip,
    "unet-weights-missing": _case_unet_weights_missing,
    "pickle-only": _case_pickle_only,
    "controlnet-cross-attention-dim": _case_controlnet_mismatch,
    "precision-fp8": _case_fp8,
    "opset-5": _case_opset5,
    "max-batch-size-above-the-bound": _case_batch_too_large,
}


def _assert_one_line_error(result: subprocess.CompletedProcess, keywords) -> str:
    stderr = result.stderr
    assert result.returncode != 0, f"exit 0; stdout {result.stdout!r}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {stderr!r}"
    assert lines[0].startswith("error:"), lines[0]
    for word in keywords:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, tiny, tiny_cn):
    """Every bad-input case through the CLI, run concurrently (each process imports torch + diffusers)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {}
    for case, build in BAD_CASES.items():
        root = tmp_path_factory.mktemp(case)
        args, keywords = build(root, tiny, tiny_cn)
        parent = root / "packages"
        parent.mkdir()
        jobs[case] = (root, args, keywords, parent, parent / "pkg")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            case: pool.submit(_export, *args, "--out", out, cwd=root) for case, (root, args, _, _, out) in jobs.items()
        }
        return {case: (futures[case].result(), *jobs[case][2:]) for case in jobs}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_cli_export_bad_input(case, bad_input_runs):
    result, keywords, parent, out = bad_input_runs[case]
    _assert_one_line_error(result, keywords)
    assert not out.exists(), f"{out} was created"
    assert list(parent.iterdir()) == [], f"left behind: {list(parent.iterdir())}"


def test_cli_export_out_not_empty(tmp_path, tiny):
    parent = tmp_path / "packages"
    out = parent / "pkg"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    result = _export(tiny.checkpoint, "--out", out, cwd=tmp_path)
    _assert_one_line_error(result, ["not empty", "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in parent.iterdir()] == ["pkg"]


def test_cli_export_force_replaces(tmp_path, tiny):
    parent = tmp_path / "packages"
    out = parent / "pkg"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    result = _export(tiny.checkpoint, "--out", out, "--force", "--no-validate", "--no-editing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (out / "old.txt").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
    # --no-editing: the fixture's components but the editing graphs
    assert fixture_config(tiny).has_editing and not read_pipeline_config(out).has_editing
    assert list(manifest["components"]) == [n for n in _specs(tiny) if n not in ("vae_encoder", "unet_p2p")]
    assert [p.name for p in parent.iterdir()] == ["pkg"], "temporary or old directories left behind"


def test_allow_pickle_loads_checkpoint_with_one_bin_component(tmp_path, tiny):
    from blipdiffusion_trt.export.exporter import load_pipeline

    (ckpt,), _ = _case_pickle_only(tmp_path, tiny, None)
    pipe = load_pipeline(ckpt, allow_pickle=True)  # what `export --allow-pickle` calls first
    reference = load_diffusers(tiny)
    for key, value in reference.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# 5. CPU-fused graphs added to an existing package (`blipdiffusion-trt fuse`)
# ---------------------------------------------------------------------------------------------

def _fuse(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("fuse", *args, cwd=cwd)


def test_cli_fuse_adds_cpu_fused_graphs_to_a_package(tmp_path, tiny):
    """A package exported with --no-cpu-fusions gets the fused graphs from `fuse`: listed in the
    manifest with their sha256, loaded by the cpu runtime by default, same images as the plain graphs."""
    from PIL import Image

    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    out = tmp_path / "pkg"
    result = _export(tiny.checkpoint, "--out", out, "--no-validate", "--no-cpu-fusions", "--no-editing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "onnx" / CPU_FUSED).exists()
    plain = BlipDiffusionRuntime.from_package(out)
    assert all("/fp32/" in e.path.as_posix() for e in plain.engines.values())

    result = _fuse(out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / MANIFEST).read_text())
    fused_files = sorted(f for f in manifest["files"] if f.startswith(f"onnx/{CPU_FUSED}/"))
    assert fused_files == sorted(p.relative_to(out).as_posix() for p in (out / "onnx" / CPU_FUSED).iterdir())
    assert fused_files and all(sha256_file(out / f) == manifest["files"][f] for f in fused_files)
    assert set(manifest["cpu_fused"]) == {n for n, s in declare_components(read_pipeline_config(out)).items()
                                          if s.cpu_fusion}
    assert [p.name for p in (out / "onnx").iterdir() if p.name.startswith(".")] == [], "scratch left behind"

    fused = BlipDiffusionRuntime.from_package(out)
    assert f"/{CPU_FUSED}/" in fused.engines["unet_plain"].path.as_posix()
    assert "/fp32/" in BlipDiffusionRuntime.from_package(out, cpu_fused=False).engines["unet_plain"].path.as_posix()
    config = fixture_config(tiny)
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((1, config.latent_channels, config.default_height // config.latent_scale_factor,
                                   config.default_width // config.latent_scale_factor)).astype(np.float32)
    reference = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    images = [r("on a beach", reference, "dog", "dog", latents=latents, num_inference_steps=3, output_type="np").images
              for r in (plain, fused)]
    assert float(np.abs(images[0] - images[1]).max()) <= 1e-4


def test_cli_fuse_bad_package(tmp_path):
    result = _fuse(tmp_path / "nowhere", cwd=tmp_path)
    _assert_one_line_error(result, ["nowhere", "does not exist"])


def test_cpu_fused_graphs_are_valid_onnx(any_fixture):
    """The fused graphs hold com.microsoft ops; onnx's full check refuses a graph that does not
    import that domain (the optimizer adds the import only in its own save())."""
    import onnx

    fused = sorted((any_fixture.package / "onnx" / CPU_FUSED).glob("*.onnx"))
    assert fused, "the fixtures are exported with CPU fusions"
    for path in fused:
        model = onnx.load(str(path), load_external_data=False)
        assert any(node.domain == "com.microsoft" for node in model.graph.node), path.name
        assert "com.microsoft" in {opset.domain for opset in model.opset_import}, path.name
        onnx.checker.check_model(str(path), full_check=True)
