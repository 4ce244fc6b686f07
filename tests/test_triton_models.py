"""The Triton model files and the code they run, on a fake ``triton_python_backend_utils``
(``tests/fakes``): ``TritonEngine``, the BLS model over the python-cpu component models, error
responses, and a written repository's code copy imported on its own.

The real server (``test_triton.py``) runs the same files; these tests need no server, so they
can look inside: which requests the BLS model sends, what each answer is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the triton extra (pip install .[triton])")

from conftest import shared_runtime  # noqa: E402
from fakes import triton_python_backend_utils as pb  # noqa: E402
from fakes.triton_repository import load_python_models, request  # noqa: E402

from blipdiffusion_trt.components import (  # noqa: E402
    Axis,
    ComponentSpec,
    TensorSpec,
    editing_components,
    generation_components,
    step_cache_components,
    step_cache_graphs,
)
from blipdiffusion_trt.errors import EngineError, PackageError  # noqa: E402
from blipdiffusion_trt.package import read_pipeline_config  # noqa: E402
from blipdiffusion_trt.serving.triton.bls import BlipDiffusionModel  # noqa: E402
from blipdiffusion_trt.serving.triton.engine import TritonEngine  # noqa: E402
from blipdiffusion_trt.serving.triton.repository import CODE_FILES, write_triton_repository  # noqa: E402

FAKES = Path(__file__).parent / "fakes"
REFERENCE = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)
CONDITION = np.random.default_rng(8).integers(0, 256, (24, 28, 3), dtype=np.uint8)


@pytest.fixture()
def fake_server(monkeypatch):
    """The fake module as ``triton_python_backend_utils`` (what the model files import), emptied."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    pb.reset()
    yield pb
    for model in list(pb.MODELS.values()):
        model.finalize()
    pb.reset()


# --------------------------------------------------------------------------------------------
# TritonEngine
# --------------------------------------------------------------------------------------------

SPEC = ComponentSpec(
    "toy",
    inputs=(TensorSpec("sample", "float32", (2, 3)), TensorSpec("timestep", "int64", (2,))),
    outputs=(TensorSpec("out", "float32", (2, 3)), TensorSpec("extra", "float32", (2,))),
)


class ScriptedModel:
    """Answers every request with ``answer(request)``; keeps the requests."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def execute(self, requests):
        self.requests += requests
        return [self.answer(r) for r in requests]

    def finalize(self):
        pass


def _echo(request):
    sample = pb.get_input_tensor_by_name(request, "sample").as_numpy()
    timestep = pb.get_input_tensor_by_name(request, "timestep").as_numpy()
    return pb.InferenceResponse([pb.Tensor("out", sample * 2), pb.Tensor("extra", timestep.reshape(-1) + 0.5),
                                 pb.Tensor("unrequested", np.zeros(1, np.float32))])


@pytest.mark.parametrize("max_batch_size", [0, 4])
def test_engine_sends_the_declared_inputs_and_returns_host_copies(fake_server, max_batch_size):
    model = ScriptedModel(_echo)
    fake_server.serve("toy_model", model)
    engine = TritonEngine(SPEC, "toy_model", max_batch_size, fake_server)
    sample = np.arange(6, dtype=np.float64).reshape(2, 3)  # cast to the declared float32
    out = engine.infer({"sample": sample, "timestep": [7, 9]})

    (sent,) = model.requests
    assert sent.model_name() == "toy_model" and sent.requested_output_names() == ["out", "extra"]
    assert sent.preferred_memory.preferred_memory_type == fake_server.TRITONSERVER_MEMORY_CPU
    values = {t.name(): t.as_numpy() for t in sent.inputs()}
    assert values["sample"].dtype == np.float32 and values["timestep"].dtype == np.int64
    # a batched model declares a batch-only tensor as dims [1] + reshape []: it is sent as [B, 1]
    assert values["timestep"].shape == ((2, 1) if max_batch_size else (2,))
    assert set(out) == {"out", "extra"}
    np.testing.assert_array_equal(out["out"], sample.astype(np.float32) * 2)
    np.testing.assert_array_equal(out["extra"], [7.5, 9.5])


def test_engine_pads_rows_to_a_fixed_batch(fake_server):
    """A model with a fixed batch (a static TensorRT engine) gets fewer rows of a batchable
    component padded with the last row, and the answer is cut back to the rows asked for."""
    rows = Axis("rows", 1, 2, 4)
    spec = ComponentSpec("toy", inputs=(TensorSpec("sample", "float32", (rows, 3)), TensorSpec("timestep", "int64", (rows,))),
                         outputs=(TensorSpec("out", "float32", (rows, 3)), TensorSpec("extra", "float32", (rows,))))
    model = ScriptedModel(_echo)
    fake_server.serve("toy_model", model)
    engine = TritonEngine(spec, "toy_model", 0, fake_server, min_rows=3)
    sample = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = engine.infer({"sample": sample, "timestep": np.array([7, 9])})
    sent = {t.name(): t.as_numpy() for t in model.requests[-1].inputs()}
    np.testing.assert_array_equal(sent["sample"], sample[[0, 1, 1]])
    np.testing.assert_array_equal(sent["timestep"], [7, 9, 9])
    np.testing.assert_array_equal(out["out"], sample * 2)
    np.testing.assert_array_equal(out["extra"], [7.5, 9.5])
    engine.infer({"sample": np.zeros((3, 3), np.float32), "timestep": np.zeros(3, np.int64)})  # enough rows: as they are
    assert len(model.requests[-1].inputs()[0].as_numpy()) == 3


def test_engine_errors_are_one_line_engine_errors(fake_server):
    engine = TritonEngine(SPEC, "toy_model", 0, fake_server)
    feed = {"sample": np.zeros((2, 3), np.float32), "timestep": np.zeros(2, np.int64)}
    with pytest.raises(EngineError, match="model toy_model: Failed for execute the inference request"):
        engine.infer(feed)  # not served
    fake_server.serve("toy_model", ScriptedModel(lambda r: pb.InferenceResponse(
        error=pb.TritonError("toy_model: bad shape\n  at line 3\n  at line 4"))))
    with pytest.raises(EngineError) as error:
        engine.infer(feed)
    assert str(error.value) == "model toy_model: toy_model: bad shape"
    fake_server.serve("toy_model", ScriptedModel(lambda r: pb.InferenceResponse([pb.Tensor("out", np.zeros((2, 3)))])))
    with pytest.raises(EngineError, match="model toy_model returned no 'extra'"):
        engine.infer(feed)
    fake_server.serve("toy_model", ScriptedModel(lambda r: pb.InferenceResponse(
        [pb.Tensor("out", np.zeros((2, 3)), on_gpu=True), pb.Tensor("extra", np.zeros(2))])))
    with pytest.raises(EngineError, match="'out' came back in GPU memory"):
        engine.infer(feed)
    with pytest.raises(EngineError, match="no value for timestep"):
        engine.infer({"sample": feed["sample"]})
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(feed)


# --------------------------------------------------------------------------------------------
# The BLS model over the python-cpu component models
# --------------------------------------------------------------------------------------------


def generation(fixture, **overrides) -> dict:
    args = dict(prompt="a photo in the snow", reference_image=REFERENCE, source_subject="dog", target_subject="dog",
                num_inference_steps=2, guidance_scale=7.5, seed=0, height=32, width=32)
    if fixture.controlnet:
        args["condition_image"] = CONDITION
    args.update(overrides)
    return args


def python_api(fixture, args: dict):
    args = dict(args)
    return shared_runtime(fixture)(args.pop("prompt"), args.pop("reference_image"), args.pop("source_subject"),
                                   args.pop("target_subject"), output_type="np", **args)


def python_api_image(fixture, args: dict) -> np.ndarray:
    """The Python API's image, quantised as the BLS model does."""
    return (python_api(fixture, args).images[0] * 255).round().astype(np.uint8)


def bls_arrays(args: dict) -> dict[str, np.ndarray]:
    """The BLS model's input tensors for Python API arguments (as a client sends them)."""
    names = {"num_inference_steps": "steps", "neg_prompt": "negative_prompt"}
    dtypes = {"steps": np.int32, "height": np.int32, "width": np.int32, "seed": np.int64,
              "guidance_scale": np.float32, "controlnet_conditioning_scale": np.float32,
              "cross_replace_steps": np.float32, "self_replace_steps": np.float32, "blend_threshold": np.float32,
              "local_blend": np.bool_, "cache_interval": np.int32}
    arrays = {}
    for key, value in args.items():
        name = names.get(key, key)
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, str):
            arrays[name] = np.array([value])
        else:
            arrays[name] = np.array([value], dtypes[name])
    return arrays


@pytest.fixture(scope="module")
def repositories(tiny, tiny_cn, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-models")
    return {f.name: write_triton_repository(f.package, root / f.name, "python-cpu", max_image_pixels=64 * 64).path
            for f in (tiny, tiny_cn)}


@pytest.mark.parametrize("which", ["tiny", "tiny_cn"])
def test_bls_model_matches_the_python_api(fake_server, repositories, request, which):
    fixture = request.getfixturevalue(which)
    models = load_python_models(repositories[which], fake_server)
    config = read_pipeline_config(fixture.package)
    components = generation_components(config)
    # a package with the editing graphs: their models too (loaded by the BLS model on the first edit)
    editing = [c for c in editing_components(config) if c not in components]
    # and fast mode's step-cache graphs (loaded on the first request with cache_interval > 1)
    step_cache = step_cache_components(config)
    assert sorted(models) == sorted(components + editing + step_cache + ["blip_diffusion"])
    bls = models["blip_diffusion"].model
    assert isinstance(bls, BlipDiffusionModel) and bls.editing == bool(editing)
    assert {c: (type(e), e.model_name) for c, e in bls.runtime.engines.items()} == {c: (TritonEngine, c) for c in components}

    cases = [{}, {"seed": 5, "guidance_scale": 1.0, "height": 24, "width": 40, "scheduler": "ddim"},
             {"seed": 3, "neg_prompt": "blurry", "scheduler": "euler", "target_subject": "cat"}]
    if fixture.controlnet:
        cases.append({"seed": 2, "controlnet_conditioning_scale": 0.5})
    cases.append({"seed": 4, "cache_interval": 3})  # fast mode: an optional input
    asked = set()
    for case in cases:
        args = generation(fixture, **case)
        fake_server.SENT.clear()
        (response,) = models["blip_diffusion"].execute([request_of(fake_server, args)])
        assert not response.has_error(), response.error().message()
        image = fake_server.get_output_tensor_by_name(response, "image").as_numpy()
        np.testing.assert_array_equal(image, python_api_image(fixture, args), err_msg=f"{which} {case}")
        # the UNet once per step (guidance: one batch of 2); the subject and negative prompt are cached
        sent = [name for name, _ in fake_server.SENT]
        unet = "unet" if fixture.controlnet else "unet_plain"
        if case.get("cache_interval", 1) == 1:
            assert sent.count(unet) == python_api(fixture, args).timings["steps"]
        else:
            graphs = step_cache_graphs(config, control=fixture.controlnet)
            assert sent.count(graphs.full) + sent.count(graphs.shallow) == python_api(fixture, args).timings["steps"]
            assert unet not in sent and sent.count(graphs.full) < sent.count(graphs.shallow)
        asked |= set(sent)
    assert asked == set(components + step_cache_graphs(config, control=fixture.controlnet).names)
    # different seeds give different images
    first = python_api_image(fixture, generation(fixture))
    assert not np.array_equal(first, python_api_image(fixture, generation(fixture, seed=5)))


def request_of(backend_utils, args: dict):
    return request(backend_utils, bls_arrays(args))


def test_bls_model_answers_every_bad_request_in_one_line(fake_server, repositories, tiny, tiny_cn, monkeypatch):
    models = load_python_models(repositories["tiny"], fake_server)
    bls = models["blip_diffusion"]
    invalid = fake_server.TritonError.INVALID_ARG
    cases = [
        ({"num_inference_steps": 0}, {}, "num_inference_steps must be an integer in [1, 1000], got 0"),
        ({"seed": -3}, {}, "seed must be an integer in [0, 9223372036854775807], got -3"),
        ({"scheduler": "karras"}, {}, "karras"),
        ({"prompt": "  "}, {}, "prompt must be a non-empty string"),
        ({}, {"prompt": np.array([b"\xff\xfe"], dtype=np.object_)}, "prompt: not valid UTF-8"),
        ({}, {"seed": np.array([1, 2], np.int64)}, "seed: expected a single value, got shape [2]"),
        ({}, {"reference_image": np.zeros((80, 60, 3), np.uint8)}, "more than the limit of 4096 pixels"),
        ({"condition_image": CONDITION}, {}, "this package has no ControlNet"),
    ]
    for overrides, raw, message in cases:
        arrays = {**bls_arrays(generation(tiny, **overrides)), **raw}
        (response,) = bls.execute([request(fake_server, arrays)])
        assert response.has_error(), overrides
        text = response.error().message()
        assert message in text and "\n" not in text, (overrides, text)
        assert response.error().code() == invalid, (overrides, text)
    arrays = bls_arrays(generation(tiny))
    del arrays["seed"]
    (response,) = bls.execute([request(fake_server, arrays)])
    assert response.error().message() == "missing required input 'seed'"

    # a component model failing is the server's side: INTERNAL, naming the model
    fake_server.serve("unet_plain", ScriptedModel(lambda r: pb.InferenceResponse(
        error=pb.TritonError("unet_plain: RuntimeException: out of memory\nstack"))))
    (response,) = bls.execute([request_of(fake_server, generation(tiny))])
    assert response.error().code() == fake_server.TritonError.INTERNAL
    assert response.error().message() == "model unet_plain: unet_plain: RuntimeException: out of memory"

    # a bug: one line to the client, the traceback to the server's log, and the model keeps serving
    fake_server.serve("unet_plain", models["unet_plain"])
    with monkeypatch.context() as patch:
        patch.setattr(bls.model.runtime, "encode_subject", lambda *a, **k: 1 / 0)
        (response,) = bls.execute([request_of(fake_server, generation(tiny))])
    assert response.error().message() == "internal error: ZeroDivisionError: division by zero"
    assert response.error().code() == fake_server.TritonError.INTERNAL
    assert any(level == "error" and "Traceback" in line and "ZeroDivisionError" in line
               for level, line in fake_server.Logger.lines)
    (response,) = bls.execute([request_of(fake_server, generation(tiny, seed=11))])
    np.testing.assert_array_equal(fake_server.get_output_tensor_by_name(response, "image").as_numpy(),
                                  python_api_image(tiny, generation(tiny, seed=11)))


# --------------------------------------------------------------------------------------------
# Edits through the BLS model
# --------------------------------------------------------------------------------------------

REAL_IMAGE = np.random.default_rng(9).integers(0, 256, (30, 44, 3), dtype=np.uint8)
EDIT_CASES = [
    {"original_subject": "cat"},  # the generated image, guidance, local blend: 4 UNet rows
    {"original_subject": "cat", "image": REAL_IMAGE, "seed": 2, "height": 24, "width": 40},  # a real image: 3 rows
    {"original_subject": "cat", "guidance_scale": 1.0, "local_blend": False, "cross_replace_steps": 0.5,
     "self_replace_steps": 0.0, "scheduler": "euler"},  # no guidance: 2 rows, no local blend
]


def python_api_edit(fixture, args: dict) -> tuple[np.ndarray, np.ndarray]:
    """The Python API's edit (edited, source), quantised as the BLS model does."""
    args = dict(args)
    if args.pop("local_blend", True) is False:
        args["blend_threshold"] = None
    out = shared_runtime(fixture).edit(args.pop("prompt"), args.pop("reference_image"), args.pop("source_subject"),
                                       args.pop("target_subject"), args.pop("original_subject"), output_type="np", **args)
    return tuple((image * 255).round().astype(np.uint8) for image in (out.edited, out.source))


def test_bls_model_edits_match_the_python_api(fake_server, repositories, tiny):
    """A request with original_subject is an edit: the edited image and the source image equal the
    Python API's; the editing graphs' models are asked only then, unet_p2p once per step."""
    models = load_python_models(repositories["tiny"], fake_server)
    bls = models["blip_diffusion"]
    for case in EDIT_CASES:
        args = generation(tiny, **case)
        fake_server.SENT.clear()
        (response,) = bls.execute([request_of(fake_server, args)])
        assert not response.has_error(), response.error().message()
        edited, source = python_api_edit(tiny, args)
        for name, expected in (("image", edited), ("source_image", source)):
            got = fake_server.get_output_tensor_by_name(response, name).as_numpy()
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {case}")
        sent = [name for name, _ in fake_server.SENT]
        assert "unet_p2p" in sent and sent.count("vae_encoder") == ("image" in case)
        assert not np.array_equal(edited, source)
    # generations still answer one image
    (response,) = bls.execute([request_of(fake_server, generation(tiny))])
    assert fake_server.get_output_tensor_by_name(response, "source_image") is None


def test_bls_model_answers_bad_edits_in_one_line(fake_server, repositories, tiny, tiny_cn):
    invalid = fake_server.TritonError.INVALID_ARG
    models = load_python_models(repositories["tiny"], fake_server)
    cases = [
        ({"original_subject": "cat", "blend_threshold": 2.0}, "blend_threshold must be a number in [0, 1)"),
        ({"original_subject": "cat", "cross_replace_steps": 1.5}, "cross_replace_steps must be a number in [0, 1]"),
        ({"original_subject": " "}, "original_subject must be a non-empty string"),
        ({"original_subject": "cat", "image": REAL_IMAGE, "scheduler": "pndm"}, "must be edited with the ddim scheduler"),
        ({"original_subject": "cat", "image": np.zeros((80, 60, 3), np.uint8)}, "image: the image array"),
        ({"original_subject": "cat", "local_blend": False, "blend_threshold": 0.5}, "pass one of them"),
        ({"original_subject": "cat", "condition_image": CONDITION}, "condition_image: not an input of edits"),
        ({"image": REAL_IMAGE}, "image: an input of edits; pass original_subject to edit"),
    ]
    for overrides, message in cases:
        args = generation(tiny, **overrides)
        (response,) = models["blip_diffusion"].execute([request_of(fake_server, args)])
        assert response.has_error(), overrides
        text = response.error().message()
        assert message in text and "\n" not in text, (overrides, text)
        assert response.error().code() == invalid, (overrides, text)
    # a repository of a package without the editing graphs
    fake_server.reset()
    models = load_python_models(repositories["tiny_cn"], fake_server)
    (response,) = models["blip_diffusion"].execute([request_of(fake_server, generation(tiny_cn, original_subject="cat"))])
    assert response.error().code() == invalid
    assert "serves no editing graphs" in response.error().message()


def test_component_model_bad_request_is_one_line(fake_server, repositories):
    models = load_python_models(repositories["tiny"], fake_server)
    (response,) = models["vae_decoder"].execute([fake_server.InferenceRequest(inputs=[])])
    assert response.error().message() == "vae_decoder: missing input 'latents'"
    assert response.error().code() == pb.TritonError.INVALID_ARG
    latents = np.zeros((1, 1, 2, 2), np.float32)  # wrong channel count
    (response,) = models["vae_decoder"].execute([fake_server.InferenceRequest(inputs=[pb.Tensor("latents", latents)])])
    text = response.error().message()
    assert text.startswith("vae_decoder: ") and "\n" not in text


def _declared_inputs(spec, point: str = "min") -> dict[str, np.ndarray]:
    return {t.name: np.zeros(t.shape_at(point), t.dtype) for t in spec.inputs}


@pytest.mark.parametrize("which", ["tiny", "tiny_cn"])
def test_every_component_model_refuses_undeclared_inputs_before_any_work(fake_server, repositories, request, which):
    """Issue 20.1: a request straight to a component model outside the package's declarations
    (components.py) is refused in one line (INVALID_ARG) before its graph runs; inside them it runs."""
    from blipdiffusion_trt.package import ModelPackage

    fixture = request.getfixturevalue(which)
    specs = ModelPackage.open(fixture.package, verify=False).specs
    models = load_python_models(repositories[which], fake_server)
    components = [name for name in models if name in specs]
    assert set(generation_components(read_pipeline_config(fixture.package))) <= set(components)
    for name in components:
        model = models[name].model
        spec = specs[name]
        runs = []
        real_run = model.session.run
        model.session.run = lambda *a, **k: runs.append(a) or real_run(*a, **k)

        def send(arrays):
            tensors = [pb.Tensor(n, a) for n, a in arrays.items()]
            (response,) = models[name].execute([fake_server.InferenceRequest(inputs=tensors)])
            return response

        # the declared minimum runs
        response = send(_declared_inputs(spec, "min"))
        assert not response.has_error(), (name, response.error() and response.error().message())
        assert len(runs) == 1
        bad_cases = []
        for tensor in spec.inputs:
            for index, dim in enumerate(tensor.shape):
                if isinstance(dim, Axis):
                    shape = list(tensor.shape_at("min"))
                    shape[index] = dim.max + max(1, dim.multiple_of)  # past the declared range
                    bad_cases.append((tensor.name, shape, tensor.dtype, f"outside [{dim.min}, {dim.max}]"))
                else:
                    shape = list(tensor.shape_at("min"))
                    shape[index] = dim + 1
                    bad_cases.append((tensor.name, shape, tensor.dtype, f"dim {index} is {dim + 1}, expected {dim}"))
            other = "float64" if tensor.dtype != "float64" else "float32"
            bad_cases.append((tensor.name, list(tensor.shape_at("min")), other, f"dtype {other}, expected {tensor.dtype}"))
            bad_cases.append((tensor.name, list(tensor.shape_at("min")) + [2], tensor.dtype, "has rank"))
        for tensor_name, shape, dtype, message in bad_cases:
            arrays = _declared_inputs(spec, "min")
            arrays[tensor_name] = np.zeros(shape, dtype)
            response = send(arrays)
            assert response.has_error(), (name, tensor_name, shape, dtype)
            text = response.error().message()
            assert text.startswith(f"{name}: input {tensor_name}: ") and message in text and "\n" not in text, text
            assert response.error().code() == pb.TritonError.INVALID_ARG, text
        extra = {**_declared_inputs(spec, "min"), "surprise": np.zeros(1, np.float32)}
        assert "unexpected input 'surprise'" in send(extra).error().message()
        assert len(runs) == 1, f"{name}: a refused request ran the graph"


def test_vae_decoder_refuses_the_issue_20_request(fake_server, repositories):
    """The request that grew the stub to 13.7 GB: latents [1, 4, 256, 256]."""
    models = load_python_models(repositories["tiny"], fake_server)
    (response,) = models["vae_decoder"].execute([fake_server.InferenceRequest(
        inputs=[pb.Tensor("latents", np.zeros((1, 4, 256, 256), np.float32))])])
    text = response.error().message()
    assert response.error().code() == pb.TritonError.INVALID_ARG
    assert text.startswith("vae_decoder: input latents: ") and "outside" in text, text


def test_bls_model_needs_a_model_for_every_generation_component(fake_server, repositories, tiny):
    from fakes.triton_repository import model_config_json

    bls_dir = repositories["tiny"] / "blip_diffusion"
    config = json.loads(model_config_json(bls_dir / "config.pbtxt"))
    components = json.loads(config["parameters"]["components"]["string_value"])
    del components["unet_plain"]
    config["parameters"]["components"]["string_value"] = json.dumps(components)
    with pytest.raises(PackageError, match="names no model for unet_plain"):
        BlipDiffusionModel.from_model_config(config, bls_dir / "1", fake_server)


# --------------------------------------------------------------------------------------------
# The repository's code copy, on its own
# --------------------------------------------------------------------------------------------


def test_repository_code_runs_on_its_own(repositories, tiny, tmp_path):
    """The model files imported from a written repository, in a process where nothing but the
    repository's copy of blipdiffusion_trt is importable: a generation works, and the modules
    loaded are exactly the copied files (CODE_FILES: nothing missing, nothing extra)."""
    repository = repositories["tiny"]
    code = repository / "blip_diffusion" / "1" / "blipdiffusion_trt"
    copied = sorted(str(p.relative_to(code)) for p in code.rglob("*.py"))
    assert copied == sorted(CODE_FILES)
    assert not [f for f in copied if f.startswith(("export", "engines", "bench")) or "tensorrt" in f]

    args = generation(tiny, seed=4)
    np.savez(tmp_path / "request.npz", **bls_arrays(args))
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(site), "HOME": str(tmp_path),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-S", str(FAKES / "triton_repository.py"), str(repository),
                           str(tmp_path / "request.npz"), str(tmp_path / "result.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["importable_before"] is False, "the subprocess could import blipdiffusion_trt before loading"
    loaded = sorted(str(Path(m).relative_to(code.resolve())) if Path(m).is_relative_to(code.resolve()) else m
                    for m in result["modules"])
    assert loaded == sorted(CODE_FILES), f"loaded but not copied: {sorted(set(loaded) - set(CODE_FILES))}; " \
                                         f"copied but not loaded: {sorted(set(CODE_FILES) - set(loaded))}"
    image = np.array(result["image"], dtype=np.uint8)
    np.testing.assert_array_equal(image, python_api_image(tiny, args))


# --------------------------------------------------------------------------------------------
# Under load (issue 23): cancellation, timeouts, progress, metrics
# --------------------------------------------------------------------------------------------


def _unet_calls(backend_utils) -> int:
    return sum(1 for name, _ in backend_utils.SENT if name == "unet_plain")


def test_bls_model_stops_a_cancelled_request_at_the_next_step(fake_server, repositories, tiny):
    """A request cancelled during step k runs no UNet call after step k; its answer is CANCELLED in one
    line; the model counts it and serves the next request normally."""
    models = load_python_models(repositories["tiny"], fake_server)
    bls = models["blip_diffusion"]
    req = request_of(fake_server, generation(tiny, num_inference_steps=10, scheduler="ddim"))
    req.cancel_after = 4  # the check before the loop, then steps 1-3 pass; cancelled during step 4
    (response,) = bls.execute([req])
    assert response.error().code() == pb.TritonError.CANCELLED
    assert response.error().message() == "cancelled after 4 of 10 denoising steps"
    assert _unet_calls(fake_server) == 4
    assert pb.metric_value("blip_diffusion_requests_total", model="blip_diffusion", outcome="cancelled") == 1
    assert pb.metric_value("blip_diffusion_denoising_steps_total", model="blip_diffusion") == 4
    # cancelled while it waited: no work at all
    req = request_of(fake_server, generation(tiny))
    req.cancel_after = 0
    (response,) = bls.execute([req])
    assert response.error().message() == "cancelled after 0 of 2 denoising steps" and _unet_calls(fake_server) == 4
    args = generation(tiny, seed=3)
    (response,) = bls.execute([request_of(fake_server, args)])
    np.testing.assert_array_equal(pb.get_output_tensor_by_name(response, "image").as_numpy(),
                                  python_api_image(tiny, args))
    assert pb.metric_value("blip_diffusion_requests_total", model="blip_diffusion", outcome="ok") == 1
    assert pb.metric_value("blip_diffusion_requests_in_progress", model="blip_diffusion") == 0


def test_bls_model_honours_a_requests_own_timeout(fake_server, repositories, tiny, monkeypatch):
    import blipdiffusion_trt.serving.triton.bls as bls_module

    models = load_python_models(repositories["tiny"], fake_server)
    clock = [1000.0]
    monkeypatch.setattr(bls_module, "monotonic", lambda: clock[0])
    req = request_of(fake_server, generation(tiny, num_inference_steps=6, scheduler="euler"))
    req.timeout_us = 2_500_000
    real_infer = TritonEngine.infer

    def slow_infer(self, feed, keep=()):  # every UNet call takes a second of the fake clock
        if self.model_name == "unet_plain":
            clock[0] += 1.0
        return real_infer(self, feed, keep)

    monkeypatch.setattr(TritonEngine, "infer", slow_infer)
    (response,) = models["blip_diffusion"].execute([req])
    assert response.error().code() == pb.TritonError.UNAVAILABLE
    assert response.error().message() == "timed out: its timeout of 2500 ms passed after 3 of 6 denoising steps"
    assert _unet_calls(fake_server) == 3
    assert pb.metric_value("blip_diffusion_requests_total", model="blip_diffusion", outcome="timed_out") == 1


def test_progress_model_streams_every_step_then_the_image(fake_server, tiny, tmp_path):
    """The decoupled variant: one response per denoising step (step, steps; PNDM runs one more
    step than asked), then the image, flagged final, equal to the Python API's."""
    repo = write_triton_repository(tiny.package, tmp_path / "repo", "python-cpu", progress_model=True).path
    models = load_python_models(repo, fake_server)
    args = generation(tiny, num_inference_steps=3)
    req = request_of(fake_server, args)
    assert models["blip_diffusion_progress"].execute([req]) is None
    *progress, (final, flags) = req.sent
    assert [pb.get_output_tensor_by_name(r, "step").as_numpy().tolist() for r, _ in progress] == [[1], [2], [3], [4]]
    assert {pb.get_output_tensor_by_name(r, "steps").as_numpy().tolist()[0] for r, _ in progress} == {4}
    assert all(f == 0 for _, f in progress) and flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    np.testing.assert_array_equal(pb.get_output_tensor_by_name(final, "image").as_numpy(), python_api_image(tiny, args))
    # a bad request: its error, final, and nothing else
    req = request_of(fake_server, generation(tiny, num_inference_steps=0))
    models["blip_diffusion_progress"].execute([req])
    ((response, flags),) = req.sent
    assert response.error().code() == pb.TritonError.INVALID_ARG and flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert pb.metric_value("blip_diffusion_requests_total", model="blip_diffusion_progress", outcome="invalid") == 1
    assert pb.metric_value("blip_diffusion_requests_total", model="blip_diffusion_progress", outcome="ok") == 1
