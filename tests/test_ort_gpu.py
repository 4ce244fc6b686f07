"""ONNX Runtime's GPU backends (``cuda``, ``ort-tensorrt``) against the onnxruntime-gpu 1.31.1
stand-in (``fakes/onnxruntime_gpu.py``, which says what it assumes of the real package): library
loading and the silent CPU fallback, provider options, the IO binding (uploads, copies, preallocated
outputs), CUDA graphs, the TensorRT provider's options and caches. The compute is the real ONNX
Runtime CPU on the same graphs, so whole generations are compared with the ``cpu`` backend.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.errors import EngineError, InputError
from blipdiffusion_trt.package import ModelPackage
from blipdiffusion_trt.runtime.backends import ort_install
from blipdiffusion_trt.runtime.backends import get_backend
from blipdiffusion_trt.runtime.backends.onnxruntime_gpu import OnnxRuntimeGpuEngine, OnnxRuntimeGpuOptions
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

pytestmark = pytest.mark.slow
PROMPT = "a dog on a beach"


def _inputs(package: ModelPackage, seed: int = 3):
    config = package.config
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, config.latent_channels, config.default_height // config.latent_scale_factor,
                                   config.default_width // config.latent_scale_factor)).astype(np.float32)
    reference = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    condition = rng.integers(0, 256, (config.default_height, config.default_width, 3), dtype=np.uint8)
    return latents, reference, condition


def _generate(runtime, package, *, steps: int = 10, prompt: str = PROMPT, seed: int = 3):
    latents, reference, condition = _inputs(package, seed)
    return runtime(prompt, reference, "dog", "dog", latents=latents, num_inference_steps=steps, output_type="np",
                   condition_image=condition if package.config.has_controlnet else None).images


@pytest.fixture(scope="module")
def cpu_images(tiny, tiny_cn):
    """The cpu backend on the plain fp32 graphs (the ones the fake runs), per fixture and prompt."""
    cache: dict = {}

    def images(fixture, prompt: str = PROMPT):
        if (fixture.name, prompt) not in cache:
            with BlipDiffusionRuntime.from_package(fixture.package, verify=False, cpu_fused=False, threads=1) as runtime:
                cache[(fixture.name, prompt)] = _generate(runtime, runtime.package, prompt=prompt)
        return cache[(fixture.name, prompt)]

    return images


# ------------------------------------------------------------------------------------------------
# CUDA libraries before the first session; the silent CPU fallback is an error
# ------------------------------------------------------------------------------------------------

def test_cuda_libraries_are_loaded_once_before_the_first_session(fake_ort_gpu, tiny):
    package = ModelPackage.open(tiny.package, verify=False)
    cuda = get_backend("cuda")
    engines = [cuda.make_engine(package, name, "fp32") for name in ("text_encoder_plain", "unet_plain", "vae_decoder")]
    assert fake_ort_gpu.gpu.preload_calls == 1
    assert fake_ort_gpu.gpu.events[0] == ("preload_dlls",) and len(fake_ort_gpu.gpu.events) == 4
    assert all(e.session.get_providers()[0] == "CUDAExecutionProvider" for e in engines)


def test_silent_cpu_fallback_is_one_line_naming_what_is_missing_and_where(fake_ort_gpu, tiny, tmp_path, monkeypatch):
    """The CUDA provider's libraries cannot be loaded: ONNX Runtime runs the session on the CPU
    without an error (the fake's assumption); the engine refuses it, naming the missing library
    and the folders looked in."""
    site = tmp_path / "site-packages"
    lib = site / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12"):
        (lib / name).write_bytes(b"")  # cuDNN is not there
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    fake_ort_gpu.gpu.cuda_libraries = False
    monkeypatch.setattr(ort_install, "_load_library", lambda path: None if Path(path).is_file() else _missing(path))
    package = ModelPackage.open(tiny.package, verify=False)
    with pytest.raises(EngineError) as caught:
        get_backend("cuda").make_engine(package, "unet_plain", "fp32")
    message = str(caught.value)
    assert "\n" not in message
    assert "CUDAExecutionProvider did not start and ONNX Runtime fell back to CPUExecutionProvider" in message
    assert "not found: libcudnn.so.9" in message and str(lib) in message
    assert "blipdiffusion-trt[gpu]" in message


def _missing(path):
    raise OSError(f"{path}: cannot open shared object file")


def test_no_gpu_is_named(fake_ort_gpu, tiny, monkeypatch):
    from blipdiffusion_trt.runtime.backends import onnxruntime_gpu

    monkeypatch.setattr(ort_install, "cuda_device_count", lambda load=None: 0)
    report = ort_install.CudaLibraries(cuda_version="13.0", loaded=["/x/libcudart.so.13"], folders=["/x"])
    assert onnxruntime_gpu._why_cuda_did_not_start(report).startswith("no GPU visible to the CUDA driver")


def test_cuda_device_count_asks_the_driver():
    """Fake of libcuda.so.1: cuInit(0) and cuDeviceGetCount(int*) return CUresult 0 on success."""
    class Driver:
        def __init__(self, init: int, count: int):
            self.init, self.count = init, count

        def cuInit(self, flags):
            return self.init

        def cuDeviceGetCount(self, ref):
            ref._obj.value = self.count
            return 0

    assert ort_install.cuda_device_count(load=lambda name: Driver(0, 2)) == 2
    assert ort_install.cuda_device_count(load=lambda name: Driver(100, 2)) == 0  # CUDA_ERROR_NO_DEVICE
    assert ort_install.cuda_device_count(load=_missing) == 0  # no driver


# ------------------------------------------------------------------------------------------------
# CUDA provider options
# ------------------------------------------------------------------------------------------------

def test_cuda_provider_options_come_from_the_options_as_strings(fake_ort_gpu, tiny):
    package = ModelPackage.open(tiny.package, verify=False)
    options = OnnxRuntimeGpuOptions(device_id=1, cudnn_conv_algo_search="EXHAUSTIVE", provider_options={"gpu_mem_limit": 2**33})
    unet = get_backend("cuda").make_engine(package, "unet_plain", "fp32", options)
    vae = get_backend("cuda").make_engine(package, "vae_decoder", "fp32", options)
    expected = {"device_id": "1", "use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE",
                "arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": str(2**33)}
    assert unet.session.options["CUDAExecutionProvider"] == {**expected, "enable_cuda_graph": "1"}
    assert vae.session.options["CUDAExecutionProvider"] == {**expected, "enable_cuda_graph": "0"}
    nhwc = get_backend("cuda").make_engine(package, "vae_decoder", "fp32", get_backend("cuda").options(options, prefer_nhwc=True))
    assert nhwc.session.options["CUDAExecutionProvider"]["prefer_nhwc"] == "1"
    # outputs on the chosen device: preallocated (declared shapes) or bound by device type
    latents, _, _ = _inputs(package)
    vae.infer({"latents": latents})
    text = get_backend("cuda").make_engine(package, "text_encoder", "fp32", options)
    assert all(v[1]._device_id == 1 for v in vae._binding.outputs.values() if v[0] == "device")
    config = package.config
    text.infer({"input_ids": np.zeros((1, config.text_length), np.int64),
                "ctx_embeddings": np.zeros((1, config.num_query_tokens, config.text_hidden_size), np.float32)})
    assert text._binding.outputs == {"text_embeddings": ("allocate", "cuda", 1)}  # its length is not declared by its inputs


@pytest.mark.parametrize("field, value", [("device_id", -1), ("device_id", True), ("use_tf32", "yes"),
                                          ("cudnn_conv_algo_search", "FAST"), ("cuda_graph", "always"),
                                          ("prefer_nhwc", 1), ("provider_options", [("device_id", 1)])])
def test_bad_gpu_options_are_one_line_naming_the_field(field, value):
    with pytest.raises(InputError) as caught:
        get_backend("cuda").options(**{field: value})
    assert caught.value.field == field and "\n" not in str(caught.value) and field in str(caught.value)


# ------------------------------------------------------------------------------------------------
# One binding, uploads once per generation, one copy per call, CUDA graphs
# ------------------------------------------------------------------------------------------------

def _calls_per_generation(package, steps: int) -> int:
    from blipdiffusion_trt.runtime.schedulers import scheduler_from_config

    scheduler = scheduler_from_config("pndm", package.scheduler_config())
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)  # PNDM: one UNet call more than the steps


def test_a_generation_on_the_cuda_backend_copies_once_and_matches_the_cpu_backend(fake_ort_gpu, tiny, cpu_images):
    gpu = fake_ort_gpu.gpu
    with BlipDiffusionRuntime.from_package(tiny.package, "cuda", verify=False, cache_size=0,
                                           negative_cache_size=0) as runtime:
        images = _generate(runtime, runtime.package)
        calls = _calls_per_generation(runtime.package, 10)
        unet = runtime.engines["unet_plain"]
        assert isinstance(unet, OnnxRuntimeGpuEngine) and unet.cuda_graph
        assert float(np.abs(images - cpu_images(tiny)).max()) <= 1e-5
        # one IO binding per engine, not per call
        assert gpu.io_bindings == len(runtime.engines)
        # the text embeddings went to the device once; the latents (host) once per UNet call
        assert gpu.h2d_of("encoder_hidden_states") == 1
        assert gpu.h2d_of("sample") == calls and gpu.h2d_of("timestep") == calls
        # every call: one copy_outputs_to_cpu (qformer, two text encoders, the UNet calls, the VAE)
        assert gpu.copy_outputs_calls == calls + 4 and not [c for c in gpu.d2h if c[0] == "numpy"]
        # the UNet: captured in its first call (warm-up, capture, replay), then replays of one graph
        unet_runs = [(kind, gid) for stem, kind, gid in gpu.runs if stem == "unet_plain"]
        assert unet_runs == [("capture", 0)] + [("replay", 0)] * (calls - 1)
        assert unet.cuda_graphs_captured == 1 == gpu.graphs_captured

        # another prompt: uploaded into the same buffer, so the same graph replays, with the new embeddings
        before = len(gpu.runs)
        again = _generate(runtime, runtime.package, prompt="a dog in the snow")
        assert [kind for stem, kind, _ in gpu.runs[before:] if stem == "unet_plain"] == ["replay"] * calls
        assert float(np.abs(again - cpu_images(tiny, "a dog in the snow")).max()) <= 1e-5
        assert gpu.h2d_of("encoder_hidden_states") == 2 and gpu.io_bindings == len(runtime.engines)


def test_a_stale_graph_input_is_caught(fake_ort_gpu, tiny, cpu_images, monkeypatch):
    """The comparison above can fail: an engine that fed a captured graph a new buffer each step
    (an address the graph never reads: the fake replays the captured one, as CUDA does) is off."""
    original = OnnxRuntimeGpuEngine._buffer

    def fresh_buffer(self, use, name, array):
        if use == "input":
            self._buffers.pop((use, name, array.shape, array.dtype.str), None)
        return original(self, use, name, array)

    monkeypatch.setattr(OnnxRuntimeGpuEngine, "_buffer", fresh_buffer)
    with BlipDiffusionRuntime.from_package(tiny.package, "cuda", verify=False) as runtime:
        images = _generate(runtime, runtime.package)
    assert float(np.abs(images - cpu_images(tiny)).max()) > 1e-3


def test_controlnet_residuals_stay_on_the_device_and_the_control_map_is_uploaded_once(fake_ort_gpu, tiny_cn, cpu_images):
    gpu = fake_ort_gpu.gpu
    with BlipDiffusionRuntime.from_package(tiny_cn.package, "cuda", verify=False) as runtime:
        images = _generate(runtime, runtime.package)
        calls = _calls_per_generation(runtime.package, 10)
        assert float(np.abs(images - cpu_images(tiny_cn)).max()) <= 1e-5
    assert gpu.h2d_of("controlnet_cond") == 1 and gpu.h2d_of("conditioning_scale") == 1
    assert gpu.h2d_of("encoder_hidden_states") == 1  # shared by the ControlNet and the UNet
    # the residuals never left the device: no per-output numpy() copies, one copy per call otherwise
    assert not [c for c in gpu.d2h if c[0] == "numpy"]
    assert gpu.copy_outputs_calls == calls + 4  # the UNet's, and the four once-per-generation calls
    for stem in ("controlnet", "unet"):
        kinds = [kind for s, kind, _ in gpu.runs if s == stem]
        assert kinds == ["capture"] + ["replay"] * (calls - 1), stem


@pytest.mark.parametrize("why", ["cpu_nodes", "control_flow"])
def test_a_graph_onnx_runtime_will_not_capture_runs_eagerly(fake_ort_gpu, tiny, cpu_images, caplog, why):
    """In ONNX Runtime 1.31's words (the fake raises them): a node not on the CUDA provider, or control flow."""
    getattr(fake_ort_gpu.gpu, why).add("unet_plain")
    with caplog.at_level(logging.WARNING):
        with BlipDiffusionRuntime.from_package(tiny.package, "cuda", verify=False) as runtime:
            images = _generate(runtime, runtime.package)
            assert runtime.engines["unet_plain"].cuda_graph is False
            assert runtime.engines["unet_plain"].cuda_graphs_captured == 0
    assert "refuses CUDA graphs" in caplog.text and "cannot use the graph capture feature" in caplog.text
    assert {kind for stem, kind, _ in fake_ort_gpu.gpu.runs if stem == "unet_plain"} == {"regular"}
    assert float(np.abs(images - cpu_images(tiny)).max()) <= 1e-5


def test_a_failed_capture_falls_back_to_eager_runs(fake_ort_gpu, tiny, cpu_images, caplog):
    """The capture happens in the first call of a graph id (ONNX Runtime 1.31): that call failing is
    a failed capture, and the engine runs eagerly from then on."""
    fake_ort_gpu.gpu.capture_fails.add("unet_plain")
    with caplog.at_level(logging.WARNING):
        with BlipDiffusionRuntime.from_package(tiny.package, "cuda", verify=False) as runtime:
            images = _generate(runtime, runtime.package)
            assert runtime.engines["unet_plain"].cuda_graph is False
            assert runtime.engines["unet_plain"].cuda_graphs_captured == 0
    assert "CUDA graph capture failed" in caplog.text
    assert {kind for stem, kind, _ in fake_ort_gpu.gpu.runs if stem == "unet_plain"} == {"regular"}
    assert float(np.abs(images - cpu_images(tiny)).max()) <= 1e-5


def test_the_first_call_of_a_graph_id_captures_it(fake_ort_gpu, tiny):
    """ONNX Runtime 1.31 warms up, captures and replays inside the first call of a graph id, so one
    call is one captured graph (what bench/gpu reports per engine), and the second call replays.
    A new device input address is a new graph id, captured in its own first call."""
    from blipdiffusion_trt.export.graphs import example_inputs, export_point

    from helpers import vocab_bound

    package = ModelPackage.open(tiny.package, verify=False)
    engine = get_backend("cuda").make_engine(package, "unet_plain", "fp32")
    spec = package.specs["unet_plain"]
    feed = example_inputs(spec, export_point(spec), vocab_sizes={"text_encoder": vocab_bound(package.root)})
    first = engine.infer(feed)
    assert engine.cuda_graphs_captured == 1
    assert [kind for stem, kind, _ in fake_ort_gpu.gpu.runs] == ["capture"]
    second = engine.infer(feed)
    assert [kind for stem, kind, _ in fake_ort_gpu.gpu.runs] == ["capture", "replay"]
    assert all(np.array_equal(first[k], second[k]) for k in first)
    device = {**feed, "encoder_hidden_states": engine.upload("encoder_hidden_states", feed["encoder_hidden_states"])}
    engine.infer(device)
    assert engine.cuda_graphs_captured == 2 and fake_ort_gpu.gpu.runs[-1][1:] == ("capture", 1)
    engine.close()


def test_cuda_graph_none_runs_every_component_eagerly(fake_ort_gpu, tiny):
    with BlipDiffusionRuntime.from_package(tiny.package, "cuda", verify=False, cuda_graph="none") as runtime:
        _generate(runtime, runtime.package, steps=2)
        assert not any(e.cuda_graph for e in runtime.engines.values())
    assert {gid for _, _, gid in fake_ort_gpu.gpu.runs} == {-1}
    assert all(s.options["CUDAExecutionProvider"]["enable_cuda_graph"] == "0" for s in fake_ort_gpu.gpu.sessions)


@pytest.mark.parametrize("fixture_name", ["tiny_cn", "odd_cn"])
def test_preallocated_output_shapes_are_what_the_graphs_compute(fixture_name, request):
    """The declaration's output shapes (latent and residual axes derived both ways) equal the shapes
    ONNX Runtime computes, at a point other than the export one; None only where the inputs do not
    determine them (the context text encoder's output length)."""
    import onnxruntime as ort

    from blipdiffusion_trt.export.graphs import example_inputs, second_point

    from helpers import vocab_bound

    package = ModelPackage.open(request.getfixturevalue(fixture_name).package, verify=False)
    bound = vocab_bound(package.root)
    vocab = {"qformer": bound, "text_encoder": bound, "text_encoder_plain": bound}
    for name, spec in package.specs.items():
        feed = example_inputs(spec, second_point(spec), vocab_sizes=vocab, seed=5)
        declared = spec.output_shapes({k: v.shape for k, v in feed.items()})
        if name == "text_encoder":
            assert declared is None
            continue
        session = ort.InferenceSession(str(package.layout.graph(name, "fp32")), providers=["CPUExecutionProvider"])
        computed = {o.name: v.shape for o, v in zip(session.get_outputs(), session.run(None, feed))}
        assert declared == computed, name


def test_upload_is_the_identity_on_the_cpu(tiny):
    with BlipDiffusionRuntime.from_package(tiny.package, verify=False) as runtime:
        array = np.ones((2, 3), np.float32)
        assert runtime.engines["unet_plain"].upload("encoder_hidden_states", array) is array


# ------------------------------------------------------------------------------------------------
# The TensorRT execution provider
# ------------------------------------------------------------------------------------------------

def test_ort_tensorrt_options_profiles_and_caches_outside_the_package(fake_ort_gpu, tiny, tmp_path, monkeypatch):
    from blipdiffusion_trt.engines.profiles import component_profiles

    monkeypatch.setenv("BLIPDIFFUSION_TRT_CACHE", str(tmp_path / "cache"))
    package = ModelPackage.open(tiny.package, verify=False)
    backend = get_backend("ort-tensorrt")
    engines = {p: backend.make_engine(package, "unet_plain", p) for p in ("fp16", "fp32")}
    for precision, engine in engines.items():
        assert engine.session.get_providers()[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        trt = engine.session.options["TensorrtExecutionProvider"]
        assert trt["trt_fp16_enable"] == ("1" if precision == "fp16" else "0")
        assert engine.path == package.layout.graph("unet_plain", precision)
        engine_cache, timing_cache = Path(trt["trt_engine_cache_path"]), Path(trt["trt_timing_cache_path"])
        for folder in (engine_cache, timing_cache):
            assert folder.is_dir() and folder.is_relative_to(tmp_path / "cache")
            assert not folder.is_relative_to(tiny.package)
        assert engine_cache.name == package.graph_sha256("unet_plain", precision)[:24]  # not one folder per file name
        assert engine.session.options["CUDAExecutionProvider"]["enable_cuda_graph"] == "0"
    # the declared ranges: an engine for every size the package allows, never rebuilt for a new one
    profile = component_profiles(package.config, "dynamic", components=["unet_plain"])["unet_plain"]
    trt = engines["fp16"].session.options["TensorrtExecutionProvider"]
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        parsed = dict(item.split(":") for item in trt[key].split(","))
        assert parsed == {name: "x".join(map(str, shapes[i])) for name, shapes in profile.items()}
    assert profile["sample"][0] != profile["sample"][2]
    assert not (tiny.package / "engines").exists()


@pytest.mark.parametrize("absent", ["libnvinfer.so.10", "libnvonnxparser.so.10"])
def test_ort_tensorrt_without_a_tensorrt_library_is_one_line(fake_ort_gpu, tiny, tmp_path, monkeypatch, absent):
    """A library the provider links missing: ONNX Runtime drops the TensorRT provider silently (the
    fake's assumption) and runs on CUDA; the engine refuses that, naming the library."""
    monkeypatch.setenv("BLIPDIFFUSION_TRT_CACHE", str(tmp_path / "cache"))
    fake_ort_gpu.gpu.tensorrt_libraries.discard(absent)
    package = ModelPackage.open(tiny.package, verify=False)
    with pytest.raises(EngineError) as caught:
        get_backend("ort-tensorrt").make_engine(package, "unet_plain", "fp16")
    message = str(caught.value)
    assert "\n" not in message
    assert "TensorrtExecutionProvider did not start and ONNX Runtime fell back to CUDAExecutionProvider" in message
    assert f"{absent} (TensorRT 10, which this provider links) was not found" in message


def test_the_tensorrt_libraries_load_from_the_folder_of_libnvinfer(monkeypatch, tmp_path):
    """The provider has no RUNPATH: every library it needs is loaded first, libnvinfer first, from
    the tensorrt_libs folder that holds libnvinfer (not one from another TensorRT install); the
    plugin library is optional (the provider runs without TensorRT's plugins) and is named."""
    first, second = tmp_path / "a" / "tensorrt_libs", tmp_path / "b" / "tensorrt_libs"
    for folder, names in ((first, ["libnvonnxparser.so.10"]),
                          (second, ["libnvinfer.so.10", "libnvonnxparser.so.10"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(first.parent), str(second.parent)])
    loads = []

    def load(path):
        if "/" not in path:
            raise OSError(f"{path}: cannot open shared object file")
        loads.append(path)

    report = ort_install.find_tensorrt_library(type(sys)("onnxruntime"), load=load)
    assert loads == [str(second / "libnvinfer.so.10"), str(second / "libnvonnxparser.so.10")]
    assert report.loaded and report.missing == [] and report.missing_optional == ["libnvinfer_plugin.so.10"]
    assert "without libnvinfer_plugin.so.10" in report.describe()


def test_an_unwritable_cache_is_one_line(fake_ort_gpu, tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    package = ModelPackage.open(tiny.package, verify=False)
    options = OnnxRuntimeGpuOptions(cache_dir=blocker / "cache")
    with pytest.raises(EngineError, match="not writable.*BLIPDIFFUSION_TRT_CACHE") as caught:
        get_backend("ort-tensorrt").make_engine(package, "unet_plain", "fp16", options)
    assert "\n" not in str(caught.value)


def test_the_tensorrt_soname_is_read_from_the_provider(tmp_path):
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / ort_install.TENSORRT_PROVIDER_LIBRARY).write_bytes(b"\x7fELF....libnvinfer.so.11\x00libcudart.so.13\x00")
    module = type(sys)("onnxruntime")
    module.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")
    assert ort_install.tensorrt_soname(module) == "libnvinfer.so.11"
    # the libraries this file does not name: libnvinfer's major (one TensorRT)
    assert ort_install.tensorrt_sonames(module) == ["libnvinfer.so.11", "libnvonnxparser.so.11", "libnvinfer_plugin.so.11"]
    module.__file__ = str(tmp_path / "elsewhere" / "__init__.py")
    assert ort_install.tensorrt_soname(module) == ort_install.DEFAULT_TENSORRT_SONAME == "libnvinfer.so.10"


def test_user_cache_folder(monkeypatch, tmp_path):
    from blipdiffusion_trt.package import layout

    assert layout.user_cache_dir({"BLIPDIFFUSION_TRT_CACHE": str(tmp_path)}) == tmp_path
    assert layout.user_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "blipdiffusion-trt"
    assert layout.user_cache_dir({"HOME": os.environ.get("HOME", "/")}).name == "blipdiffusion-trt"
    with pytest.raises(ValueError):
        layout.ort_trt_engine_cache("../escape")


# ------------------------------------------------------------------------------------------------
# Availability: the GPU wheel lists its providers on any machine
# ------------------------------------------------------------------------------------------------

def test_gpu_backends_are_available_only_with_a_gpu_and_their_libraries(fake_ort_gpu, monkeypatch):
    cuda, trt = get_backend("cuda"), get_backend("ort-tensorrt")
    assert cuda.is_available() and trt.is_available()
    fake_ort_gpu.gpu.tensorrt_libraries.clear()
    assert cuda.is_available() and not trt.is_available()
    monkeypatch.setattr(ort_install, "cuda_device_count", lambda load=None: 0)
    assert not cuda.is_available() and not trt.is_available()
