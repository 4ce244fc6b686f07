"""The backend interface: registry, options (validation, unknown names), capabilities, close()."""

from __future__ import annotations

import numpy as np
import pytest

from blipdiffusion_trt.errors import EngineError, InputError
from blipdiffusion_trt.package import ModelPackage
from blipdiffusion_trt.runtime.backends import BACKENDS, REGISTRY, Backend, BackendOptions, get_backend
from blipdiffusion_trt.runtime.backends.onnxruntime import (
    OnnxRuntimeGpuOptions,
    OnnxRuntimeOptions,
    cuda_providers,
    ort_tensorrt_providers,
)
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime


def test_registry_names_resolve_to_their_backends():
    assert BACKENDS == tuple(REGISTRY)
    for name in BACKENDS:
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert issubclass(backend.options_class, BackendOptions)
        backend.options()  # the defaults are valid
    with pytest.raises(InputError) as e:
        get_backend("tpu")
    assert e.value.field == "backend" and all(name in str(e.value) for name in BACKENDS)


def test_capabilities_are_declared():
    assert get_backend("cpu").capabilities.cpu_fused_graphs and get_backend("cpu").capabilities.optimized_cache
    for name in ("cuda", "ort-tensorrt", "tensorrt"):
        capabilities = get_backend(name).capabilities
        assert not capabilities.cpu_fused_graphs and not capabilities.optimized_cache
        assert capabilities.device_outputs


def test_options_validation_and_unknown_names():
    cpu = get_backend("cpu")
    with pytest.raises(InputError) as e:
        cpu.options(use_cuda_graph=True)
    assert e.value.field == "use_cuda_graph" and "cpu backend" in str(e.value) and "graph_optimization" in str(e.value)
    with pytest.raises(InputError) as e:
        cpu.options(memory_arena="some")
    assert e.value.field == "memory_arena" and "loop, all, none" in str(e.value)
    with pytest.raises(InputError) as e:
        cpu.options(get_backend("tensorrt").options())
    assert "OnnxRuntimeOptions" in str(e.value)
    # a command line's flags: each backend takes the options it has
    flags = {"graph_optimization": "extended", "memory_arena": "none", "use_cuda_graph": False}
    assert cpu.options_from(flags) == OnnxRuntimeOptions(graph_optimization="extended", memory_arena="none")
    assert get_backend("tensorrt").options_from(flags).use_cuda_graph is False
    base = OnnxRuntimeOptions(threads=1)
    assert cpu.options(base, cpu_fused=False) == OnnxRuntimeOptions(threads=1, cpu_fused=False)


def test_threads_default_from_the_environment(monkeypatch):
    monkeypatch.setenv("BLIPDIFFUSION_TRT_THREADS", "3")
    assert OnnxRuntimeOptions().threads == 3
    assert OnnxRuntimeOptions(threads=1).threads == 1
    with pytest.raises(InputError):
        OnnxRuntimeOptions(threads=-1)


def test_gpu_provider_options(tiny):
    options = OnnxRuntimeGpuOptions(provider_options={"device_id": 1})
    assert cuda_providers(options) == [("CUDAExecutionProvider", {"device_id": 1})]
    package = ModelPackage.open(tiny.package, verify=False)
    (trt, trt_options), cuda = ort_tensorrt_providers(package, options)
    assert trt == "TensorrtExecutionProvider" and cuda == "CUDAExecutionProvider"
    assert trt_options["device_id"] == 1 and trt_options["trt_engine_cache_path"] == str(package.layout.ort_trt_cache)
    with pytest.raises(InputError):
        OnnxRuntimeGpuOptions(provider_options=[("device_id", 1)])


def test_from_package_rejects_another_backends_option(tiny):
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, use_cuda_graph=True)
    assert "use_cuda_graph" in str(e.value) and "\n" not in str(e.value)


def test_close_releases_the_engines(tiny):
    config = ModelPackage.open(tiny.package, verify=False).config
    latents = np.zeros((1, config.latent_channels, config.default_height // config.latent_scale_factor,
                        config.default_width // config.latent_scale_factor), np.float32)
    reference = np.full((20, 20, 3), 128, np.uint8)
    with BlipDiffusionRuntime.from_package(tiny.package, verify=False) as runtime:
        runtime("a photo", reference, "dog", "dog", num_inference_steps=1, latents=latents, output_type="np")
        engines = list(runtime.engines.values())
    assert all(engine.closed for engine in engines)
    with pytest.raises(EngineError, match="closed"):
        runtime("a photo", reference, "dog", "dog", num_inference_steps=1, latents=latents, output_type="np")
    runtime.close()  # idempotent
