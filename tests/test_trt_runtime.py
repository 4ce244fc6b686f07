"""The run-time TensorRT backend: against the stand-ins (TensorRT and CUDA calls on the host, the
plans' graphs on ONNX Runtime) everywhere; on a GPU with TensorRT, tiny engines built (static and
dynamic) and compared with ONNX Runtime fp32 component by component, ControlNet residuals handed
to the UNet as device tensors, and a whole generation run on TensorRT."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from blipdiffusion_trt.components import generation_components
from blipdiffusion_trt.engines import environment as trt_environment
from blipdiffusion_trt.engines.build import build_engines
from blipdiffusion_trt.engines.profiles import axis_ranges
from blipdiffusion_trt.errors import EngineError, InputError
from blipdiffusion_trt.runtime.backends.tensorrt import TENSORRT

from fakes.cuda import FAKE_CUDA
from fakes.tensorrt import FAKE_RUNNING
from helpers import TRT_SKIP_REASON, copy_package, cosine, vocab_bound


# ------------------------------------------------------------------------------------------------
# Against the stand-ins (ONNX Runtime behind fake TensorRT/CUDA)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_runtime(fake_trt, monkeypatch):
    from blipdiffusion_trt.runtime.backends import tensorrt

    monkeypatch.setattr(tensorrt, "import_cudart", lambda: FAKE_CUDA)
    monkeypatch.setattr(tensorrt, "_running_here", lambda: dict(FAKE_RUNNING))  # what fake_trt's build recorded
    monkeypatch.delenv(tensorrt.CUDA_GRAPH_ENV, raising=False)
    return tensorrt


def _fake_engines(tensorrt, package):
    return {n: tensorrt.TENSORRT.make_engine(package, n, "fp16") for n in generation_components(package.config)}


def _generate_kwargs(package, **overrides):
    from PIL import Image

    rng = np.random.default_rng(0)
    kwargs = dict(prompt="swimming underwater", reference_image=Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
                  source_subject_category="dog", target_subject_category="dog", num_inference_steps=3, seed=0,
                  output_type="np")
    if package.config.has_controlnet:
        kwargs["condition_image"] = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("name, shapes", [("tiny_cn", "static"), ("tiny", "dynamic")])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_runtime_engine_generation_with_stand_ins(tiny, tiny_cn, fake_runtime, request, tmp_path, monkeypatch, name,
                                                  shapes, cuda_graph):
    """The whole TensorRTEngine path (plan lookup and checks, buffers, pinned copies, device
    hand-off of the ControlNet residuals, CUDA graph replay) computes what the CPU runtime does."""
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime
    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor

    if cuda_graph:
        monkeypatch.setenv(fake_runtime.CUDA_GRAPH_ENV, "1")
    package_dir = copy_package(request.getfixturevalue(name), tmp_path)
    build_engines(package_dir, shapes=shapes, progress=False)
    package = ModelPackage.open(package_dir)
    engines = _fake_engines(fake_runtime, package)
    assert all(e.use_cuda_graph == cuda_graph for e in engines.values())
    seen = []
    if package.config.has_controlnet:
        unet_infer = engines["unet"].infer

        def spy(feed, keep=()):
            seen.append({k: type(v) for k, v in feed.items()
                         if k.endswith("_res") or "_res_" in k or k == "encoder_hidden_states"})
            return unet_infer(feed, keep)

        engines["unet"].infer = spy
    runtime = BlipDiffusionRuntime(package, engines)
    cpu = BlipDiffusionRuntime.from_package(package_dir, cpu_fused=False)  # the stand-ins run the plain graphs
    launches = FAKE_CUDA.launches
    got = runtime(**_generate_kwargs(package)).images
    expected = cpu(**_generate_kwargs(package)).images
    np.testing.assert_allclose(got, expected, atol=1e-6)
    if package.config.has_controlnet:
        # residuals stayed "on the GPU"; the text embeddings were uploaded once, before the loop
        assert seen and all(set(types_.values()) == {DeviceTensor} for types_ in seen)
    if cuda_graph:
        assert FAKE_CUDA.launches > launches  # later denoising steps replayed the captured graph
    if shapes == "dynamic":
        cfg = package.config
        other = runtime(**_generate_kwargs(package, height=cfg.default_height + cfg.image_multiple, guidance_scale=1.0)).images
        np.testing.assert_allclose(other, cpu(**_generate_kwargs(package, height=cfg.default_height + cfg.image_multiple,
                                                                 guidance_scale=1.0)).images, atol=1e-6)
    else:
        # static engines take guidance (UNet batch 2) at the built size only; anything else says how to rebuild
        with pytest.raises(EngineError, match=r"built for exactly .*rebuild for these shapes: blipdiffusion-trt build"):
            runtime(**_generate_kwargs(package, guidance_scale=1.0))
    for engine in engines.values():
        engine.close()


def test_edits_on_static_engines_with_stand_ins(tiny, fake_runtime, tmp_path):
    """The builder's default (static) engines run every edit: unet_p2p's rows (4: a generated image
    with guidance, 3: a real image, 2: no guidance) keep their range in its profile, and the DDIM
    inversion's single unet_plain row runs padded to the engine's two; the editing engines load on
    first use with the runtime's backend, and the images equal the CPU runtime's."""
    from PIL import Image

    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor, TensorRTEngine
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    package_dir = copy_package(tiny, tmp_path)
    build_engines(package_dir, progress=False)
    runtime = BlipDiffusionRuntime.from_package(package_dir, "tensorrt", precision="fp16")
    cpu = BlipDiffusionRuntime.from_package(package_dir, cpu_fused=False)  # the stand-ins run the plain graphs
    assert "unet_p2p" not in runtime.engines
    runtime._editor.load_engines()
    p2p, plain = runtime.engines["unet_p2p"], runtime.engines["unet_plain"]
    assert all(isinstance(runtime.engines[c], TensorRTEngine) for c in ("unet_p2p", "vae_encoder", "unet_plain"))
    assert [shape[0] for shape in p2p.profiles["sample"]] == [2, 4, 4]
    assert [shape[0] for shape in plain.profiles["sample"]] == [2, 2, 2]
    fed, ran = [], []
    p2p_infer, plain_run = p2p.infer, plain._infer

    def spy_p2p(feed, keep=()):
        fed.append(("unet_p2p", feed["sample"].shape[0]))
        return p2p_infer(feed, keep)

    def spy_plain(feed, keep=()):
        ran.append(("unet_plain", feed["sample"].shape[0]))
        return plain_run(feed, keep)

    p2p.infer, plain._infer = spy_p2p, spy_plain
    rng = np.random.default_rng(0)
    common = dict(prompt="sitting on a sofa", reference_image=Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)),
                  source_subject_category="dog", target_subject_category="dog", original_subject="cat",
                  num_inference_steps=2, output_type="np")
    real = Image.fromarray(rng.integers(0, 256, (30, 44, 3), np.uint8))
    cases = [(dict(seed=1), 4), (dict(image=real), 3), (dict(seed=2, guidance_scale=1.0, blend_threshold=None), 2)]
    for case, rows in cases:
        fed.clear()
        ran.clear()
        got = runtime.edit(**common, **case)
        expected = cpu.edit(**common, **case)
        np.testing.assert_allclose(got.images, expected.images, atol=1e-5, err_msg=str(case))
        assert fed and set(fed) == {("unet_p2p", rows)}, (case, fed)
        assert ran == ([("unet_plain", 2)] * 2 if "image" in case else []), (case, ran)  # the inversion, padded
    # a kept output of a padded call is the device tensor of the rows asked for
    feed = {"sample": rng.standard_normal((1, *plain.profiles["sample"][0][1:])).astype(np.float32),
            "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, *plain.profiles["encoder_hidden_states"][0][1:])).astype(np.float32)}
    kept = plain.infer(feed, keep=["noise_pred"])["noise_pred"]
    assert isinstance(kept, DeviceTensor) and kept.shape[0] == 1
    np.testing.assert_array_equal(kept.numpy(), plain.infer(feed)["noise_pred"])
    runtime.close()


def test_runtime_engine_device_tensors_and_errors(tiny_cn, fake_runtime, tmp_path):
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor

    package_dir = copy_package(tiny_cn, tmp_path)
    build_engines(package_dir, components=["controlnet", "unet"], progress=False)
    package = ModelPackage.open(package_dir)
    controlnet = TENSORRT.make_engine(package, "controlnet", "fp16")
    unet = TENSORRT.make_engine(package, "unet", "fp16")
    point = {axis: r[1] for axis, r in axis_ranges(package.config).items()}
    feed = example_inputs(package.specs["controlnet"], point, vocab_sizes={}, seed=1)
    kept = controlnet.infer(feed, keep=["mid_block_res"])
    assert isinstance(kept["mid_block_res"], DeviceTensor) and isinstance(kept["down_block_res_0"], np.ndarray)
    host = controlnet.infer(feed)
    with pytest.raises(EngineError, match="overwritten"):
        kept["mid_block_res"].numpy()
    kept = controlnet.infer(feed, keep=controlnet.output_names)
    for key, value in kept.items():
        np.testing.assert_array_equal(value.numpy(), host[key])
        np.testing.assert_array_equal(np.asarray(value), host[key])
    unet_feed = {k: feed[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    np.testing.assert_array_equal(unet.infer({**unet_feed, **kept})["noise_pred"], unet.infer({**unet_feed, **host})["noise_pred"])
    with pytest.raises(EngineError, match="own kept output"):
        controlnet.infer({**feed, "sample": controlnet.infer(feed, keep=["down_block_res_0"])["down_block_res_0"]})
    with pytest.raises(InputError, match="input timestep is missing"):
        unet.infer({k: v for k, v in {**unet_feed, **host}.items() if k != "timestep"})
    with pytest.raises(EngineError, match="outside the engine's profile|built for exactly"):
        unet.infer({**unet_feed, **host, "sample": unet_feed["sample"][:, :, :-1]})
    controlnet.close()
    with pytest.raises(EngineError, match="closed"):
        controlnet.infer(feed)
    # the factory refuses fp32 and checks the plan against its record
    with pytest.raises(EngineError, match="--precision fp16"):
        TENSORRT.make_engine(package, "unet", "fp32")
    plan = next((package_dir / "engines").glob("*/unet.plan"))
    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(EngineError, match="does not match its sha256"):
        TENSORRT.make_engine(package, "unet", "fp16")
    with pytest.raises(EngineError, match="no TensorRT engine for vae_decoder .* --components vae_decoder"):
        TENSORRT.make_engine(package, "vae_decoder", "fp16")


def _unet_engine(tiny, tmp_path, use_cuda_graph: bool):
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage

    package_dir = copy_package(tiny, tmp_path)
    build_engines(package_dir, components=["unet_plain"], progress=False)
    package = ModelPackage.open(package_dir)
    engine = TENSORRT.make_engine(package, "unet_plain", "fp16", TENSORRT.options(use_cuda_graph=use_cuda_graph))
    point = {axis: r[1] for axis, r in axis_ranges(package.config).items()}
    return engine, example_inputs(package.specs["unet_plain"], point, vocab_sizes={}, seed=2), package_dir


def test_a_capture_that_raises_is_still_ended(tiny, fake_runtime, tmp_path, monkeypatch, caplog):
    """TensorRT raising inside the capture (not just returning False): the capture is ended, the
    engine falls back to eager runs, and the stream works on (a stream left capturing would refuse
    every later copy: the CUDA stand-in asserts that)."""
    import onnxruntime as ort

    engine, feed, package_dir = _unet_engine(tiny, tmp_path, use_cuda_graph=True)
    context_type = type(engine._context)
    original = context_type.execute_async_v3

    def execute(self, stream_handle):
        if FAKE_CUDA.capturing:
            raise RuntimeError("an operation TensorRT cannot capture")
        return original(self, stream_handle)

    monkeypatch.setattr(context_type, "execute_async_v3", execute)
    expected = ort.InferenceSession(str(package_dir / "onnx" / "fp32" / "unet_plain.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with caplog.at_level("WARNING"):
        first = engine.infer(feed)["noise_pred"]  # the eager run's result; the capture after it fails
    assert "CUDA graph capture failed (an operation TensorRT cannot capture)" in caplog.text
    assert FAKE_CUDA.capturing == {} and engine.use_cuda_graph is False
    second = engine.infer(feed)["noise_pred"]
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_array_equal(first, second)
    engine.close()


def test_device_tensors_are_copied_on_their_owner_stream(tiny_cn, fake_runtime, tmp_path):
    """Not on the legacy default stream, which CUDA refuses while any stream captures a graph."""
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage

    package_dir = copy_package(tiny_cn, tmp_path)
    build_engines(package_dir, components=["controlnet"], progress=False)
    package = ModelPackage.open(package_dir)
    controlnet = TENSORRT.make_engine(package, "controlnet", "fp16")
    point = {axis: r[1] for axis, r in axis_ranges(package.config).items()}
    feed = example_inputs(package.specs["controlnet"], point, vocab_sizes={}, seed=1)
    kept = controlnet.infer(feed, keep=["mid_block_res"])
    FAKE_CUDA.capturing[12345] = []  # another engine's stream, capturing
    try:
        before = len(FAKE_CUDA.copy_streams)
        kept["mid_block_res"].numpy()
        assert FAKE_CUDA.copy_streams[before:] == [controlnet._stream_handle]
    finally:
        FAKE_CUDA.capturing.pop(12345)
    controlnet.close()


def test_uploads_are_device_tensors_valid_until_the_next_upload(tiny, fake_runtime, tmp_path):
    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor

    engine, feed, _ = _unet_engine(tiny, tmp_path, use_cuda_graph=False)
    embeddings = feed["encoder_hidden_states"]
    uploaded = engine.upload("encoder_hidden_states", embeddings)
    assert isinstance(uploaded, DeviceTensor)
    np.testing.assert_array_equal(uploaded.numpy(), embeddings)
    np.testing.assert_array_equal(engine.infer({**feed, "encoder_hidden_states": uploaded})["noise_pred"],
                                  engine.infer(feed)["noise_pred"])
    assert uploaded.valid  # running the engine does not touch its uploads
    again = engine.upload("encoder_hidden_states", embeddings * 2)
    assert again.ptr == uploaded.ptr and not uploaded.valid
    with pytest.raises(EngineError, match="overwritten"):
        engine.infer({**feed, "encoder_hidden_states": uploaded})
    with pytest.raises(InputError, match="no input named noise_pred"):
        engine.upload("noise_pred", embeddings)
    engine.close()
    assert not again.valid


# ------------------------------------------------------------------------------------------------
# On a GPU with TensorRT
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_trt():
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP_REASON)
    try:
        trt_environment.gpu_info()
        trt_environment.import_cudart()
    except EngineError as error:
        pytest.skip(f"TensorRT is installed but there is no usable GPU ({error})")
    return trt


@pytest.fixture(scope="module")
def built_packages(gpu_trt, tmp_path_factory, tiny_cn, tiny):
    """tiny_cn built static and dynamic, tiny built static (copies: the fixtures stay clean)."""
    out = {}
    for fixture, shapes in ((tiny_cn, "static"), (tiny_cn, "dynamic"), (tiny, "static")):
        root = tmp_path_factory.mktemp(f"trt-{fixture.name}-{shapes}")
        package = root / fixture.package.name
        shutil.copytree(fixture.package, package)
        report = build_engines(package, shapes=shapes, progress=False)
        print(f"\n{fixture.name} {shapes}: " + ", ".join(f"{n} {e['seconds']:.1f}s" for n, e in report.components.items()))
        out[(fixture.name, shapes)] = package
    return out


@pytest.mark.parametrize("key", [("tiny_cn", "static"), ("tiny_cn", "dynamic"), ("tiny", "static")])
def test_gpu_engines_match_onnxruntime_fp32(built_packages, key):
    import onnxruntime as ort

    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage

    package = ModelPackage.open(built_packages[key])
    shapes = key[1]
    ranges = axis_ranges(package.config, shapes)
    vocab = vocab_bound(package.root)
    points = [1] if shapes == "static" else [0, 1, 2]
    for name, spec in package.specs.items():
        engine = TENSORRT.make_engine(package, name, "fp16")
        session = ort.InferenceSession(str(package.onnx_path(name, "fp32")), providers=["CPUExecutionProvider"])
        for index in points:
            point = {axis: r[index] for axis, r in ranges.items()}
            point["qformer_text_length"] = min(point["qformer_text_length"], 16)
            feed = example_inputs(spec, point, vocab_sizes={k: vocab for k in ("qformer", "text_encoder", "text_encoder_plain")}, seed=index)
            got = engine.infer(feed)
            expected = dict(zip(spec.output_names, session.run(None, feed)))
            for output in spec.output_names:
                cos = cosine(got[output], expected[output])
                diff = float(np.max(np.abs(got[output].astype(np.float64) - expected[output])))
                print(f"{key} {name}.{output} @ {['min', 'opt', 'max'][index]}: cosine {cos:.6f}, max|diff| {diff:.3e}")
                assert got[output].shape == expected[output].shape
                assert np.isfinite(got[output]).all()
                assert cos >= spec.fp16_min_cosine, (name, output, cos)
        engine.close()


def test_gpu_controlnet_residuals_stay_on_the_device(built_packages):
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor, TensorRTEngine

    package = ModelPackage.open(built_packages[("tiny_cn", "static")])
    specs = package.specs
    controlnet = TENSORRT.make_engine(package, "controlnet", "fp16")
    unet = TENSORRT.make_engine(package, "unet", "fp16")
    point = {axis: r[1] for axis, r in axis_ranges(package.config).items()}
    feed = example_inputs(specs["controlnet"], point, vocab_sizes={}, seed=3)
    kept = controlnet.infer(feed, keep=controlnet.output_names)
    assert all(isinstance(v, DeviceTensor) for v in kept.values())
    host = {k: v.numpy() for k, v in kept.items()}
    unet_feed = {k: feed[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    on_device = unet.infer({**unet_feed, **kept})["noise_pred"]
    via_host = unet.infer({**unet_feed, **host})["noise_pred"]
    np.testing.assert_array_equal(on_device, via_host)
    controlnet.infer(feed)  # overwrites the kept residuals
    with pytest.raises(EngineError, match="overwritten"):
        unet.infer({**unet_feed, **kept})
    # CUDA graphs replay the same computation
    graph_unet = TensorRTEngine(specs["unet"], unet.plan, use_cuda_graph=True)
    for _ in range(3):
        np.testing.assert_array_equal(graph_unet.infer({**unet_feed, **host})["noise_pred"], via_host)
    # a shape outside a static profile is a one-line error naming the rebuild
    with pytest.raises(EngineError, match="built for exactly.*blipdiffusion-trt build"):
        unet.infer({**{k: v[:1] for k, v in unet_feed.items()}, **{k: v[:1] for k, v in host.items()}})


def test_gpu_whole_generation(built_packages):
    from PIL import Image

    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    for key in (("tiny", "static"), ("tiny_cn", "dynamic")):
        package = ModelPackage.open(built_packages[key])
        engines = TENSORRT.load(package, generation_components(package.config), "fp16")
        trt_runtime = BlipDiffusionRuntime(package, engines)
        cpu_runtime = BlipDiffusionRuntime.from_package(package.root)
        rng = np.random.default_rng(0)
        reference = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        kwargs = dict(prompt="swimming underwater", reference_image=reference, source_subject_category="dog",
                      target_subject_category="dog", num_inference_steps=5, seed=0, output_type="np")
        if package.config.has_controlnet:
            kwargs["condition_image"] = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        got = trt_runtime(**kwargs).images
        expected = cpu_runtime(**kwargs).images
        diff = np.abs(got.astype(np.float64) - expected)
        print(f"generation {key}: max|diff| {diff.max():.3e}, mean {diff.mean():.3e}")
        assert got.shape == expected.shape and np.isfinite(got).all()
        assert diff.mean() < 0.02 and diff.max() < 0.25


def test_bench_replays_each_stage_with_fresh_device_inputs(tiny_cn, fake_runtime, tmp_path, monkeypatch):
    """On tensorrt with a ControlNet, the UNet feed recorded in a generation holds the ControlNet's
    residuals and the uploaded text embeddings as DeviceTensors, overwritten long before the UNet
    is replayed: the benchmark re-runs the ControlNet and uploads again right before timing it."""

    from blipdiffusion_trt.bench import ours
    from blipdiffusion_trt.bench.settings import Settings
    from blipdiffusion_trt.package import read_pipeline_config

    package_dir = copy_package(tiny_cn, tmp_path)
    build_engines(package_dir, progress=False)
    config = read_pipeline_config(package_dir)
    f = config.latent_scale_factor
    settings = Settings(height=config.default_height, width=config.default_width, steps=2, batch=1, scheduler="pndm",
                        guidance=7.5, precision="fp16", seed=0, controlnet=True,
                        latent_shape=(1, config.latent_channels, config.default_height // f, config.default_width // f))
    from blipdiffusion_trt.bench.cli import build_parser

    args = build_parser().parse_args(["--warmup", "1", "--runs", "1", "--stage-runs", "2", "--no-verify"])
    bar = type("Bar", (), {"set_postfix_str": lambda self, text: None, "update": lambda self, n=1: None})()
    result = ours.bench_ours("tensorrt", package_dir, settings, args, bar)
    assert {"controlnet", "unet", "vae_decoder"} <= set(result["stages"])
    assert all(result["stages"][name]["p50"] > 0 for name in ("controlnet", "unet"))
    # the stale feed, replayed as recorded, is refused: this is what the fresh inputs avoid
    monkeypatch.setattr(ours, "replay_feed", lambda name, recorders, engines: recorders[name].first)
    with pytest.raises(EngineError, match="overwritten"):
        ours.bench_ours("tensorrt", package_dir, settings, args, bar)
