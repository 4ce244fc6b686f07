"""Shared fixtures: real diffusers BLIP-Diffusion checkpoints with random weights, and their packages.

Checkpoints are built with the real diffusers classes, saved with ``save_pretrained`` and loaded
back with ``from_pretrained`` (offline), once per test session.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (architecture, ControlNet, model_index mean/std, precisions)
CHECKPOINTS = {
    # model_index.json sets mean/std (as the real Salesforce/blipdiffusion does), not the defaults
    "tiny": ("tiny", False, ([0.5, 0.45, 0.4], [0.27, 0.26, 0.28]), ("fp32", "fp16")),
    "tiny_cn": ("tiny", True, (None, None), ("fp32", "fp16")),
    # unlike diffusers' test configs: 40 text positions, 6 queries, 42 px subject, latent factor 4
    "odd": ("tiny-odd", False, (None, None), ("fp32",)),
    "odd_cn": ("tiny-odd", True, (None, None), ("fp32",)),
}
# Packages with the editing graphs (vae_encoder, unet_p2p): a plain and a ControlNet one (whose
# generations load no unet_plain, which its inversion needs); tiny_cn is exported without them,
# which gives the tests a package as exported before editing existed.
EDITING_FIXTURES = ("tiny", "odd", "odd_cn")
# Packages with fast mode's step-cache graphs (exported by default; left out of "odd" to keep the
# fixtures' export shorter and to give the tests a package exported without them).
STEP_CACHE_FIXTURES = ("tiny", "tiny_cn", "odd_cn")


@dataclass(frozen=True)
class Fixture:
    name: str
    checkpoint: Path
    package: Path
    controlnet: bool


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("blipdiffusion")


_built: dict[str, Fixture] = {}


def build_fixture(name: str, root: Path) -> Fixture:
    if name in _built:
        return _built[name]
    pytest.importorskip("diffusers", reason="export tests need the export extra (pip install .[export])")
    from blipdiffusion_trt.export.exporter import export_package
    from blipdiffusion_trt.export.random_checkpoint import build_random_checkpoint

    arch, controlnet, (mean, std), precisions = CHECKPOINTS[name]
    checkpoint = build_random_checkpoint(root / f"{name}-checkpoint", arch, controlnet=controlnet, mean=mean, std=std, seed=len(name))
    package = root / f"{name}-package"
    export_package(checkpoint, package, precisions=precisions, editing=name in EDITING_FIXTURES,
                   step_cache=name in STEP_CACHE_FIXTURES, progress=False)
    _built[name] = Fixture(name, checkpoint, package, controlnet)
    return _built[name]


@pytest.fixture(scope="session")
def tiny(fixture_root) -> Fixture:
    return build_fixture("tiny", fixture_root)


@pytest.fixture(scope="session")
def tiny_cn(fixture_root) -> Fixture:
    return build_fixture("tiny_cn", fixture_root)


@pytest.fixture(scope="session")
def odd(fixture_root) -> Fixture:
    return build_fixture("odd", fixture_root)


@pytest.fixture(scope="session")
def odd_cn(fixture_root) -> Fixture:
    return build_fixture("odd_cn", fixture_root)


@pytest.fixture(scope="session", params=list(CHECKPOINTS))
def any_fixture(request, fixture_root) -> Fixture:
    return build_fixture(request.param, fixture_root)


_pipes: dict[str, object] = {}


def load_diffusers(fixture: Fixture):
    """The diffusers pipeline of a fixture, loaded back through from_pretrained (cached)."""
    if fixture.name not in _pipes:
        from blipdiffusion_trt.export.exporter import load_pipeline

        _pipes[fixture.name] = load_pipeline(fixture.checkpoint)
    return _pipes[fixture.name]


_runtimes: dict[str, object] = {}


def shared_runtime(fixture: Fixture):
    """A BlipDiffusionRuntime per fixture, shared by tests (tests that count engine calls load their own)."""
    if fixture.name not in _runtimes:
        from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

        _runtimes[fixture.name] = BlipDiffusionRuntime.from_package(fixture.package)
    return _runtimes[fixture.name]


@pytest.fixture(scope="session")
def full_cfg():
    """The full-size architecture's PipelineConfig, as export writes it into a package (read by
    export's own code from ``configs/blipdiffusion-full.json``, modules built without weights)."""
    pytest.importorskip("diffusers", reason="the full-size config is read by the export code (pip install .[export])")
    from blipdiffusion_trt.export.random_checkpoint import architecture_pipeline_config

    return architecture_pipeline_config("full", controlnet=True)


@pytest.fixture()
def fake_trt(monkeypatch, request):
    """The ``tensorrt`` stand-in (fakes/tensorrt.py) imported as ``tensorrt``, on a fake GPU: the
    TensorRT 10 one, or the version a test asks for (``indirect`` parametrisation)."""
    from blipdiffusion_trt.engines import environment
    from blipdiffusion_trt.engines.environment import GpuInfo

    from fakes.tensorrt import FAKE_GPU, FAKE_VERSION, make_fake_tensorrt

    trt = make_fake_tensorrt(getattr(request, "param", FAKE_VERSION))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(environment, "gpu_info", lambda: GpuInfo(*FAKE_GPU))
    return trt


@pytest.fixture()
def fake_ort_gpu(monkeypatch):
    """The onnxruntime-gpu 1.31.1 stand-in (fakes/onnxruntime_gpu.py) imported as ``onnxruntime``,
    over the real CPU build; the once-per-process library loading starts afresh, and the libraries
    the fake device has (``fake.gpu.cuda_libraries``, ``.tensorrt_libraries``) are what ctypes loads."""
    real = pytest.importorskip("onnxruntime")
    from blipdiffusion_trt.runtime.backends import ort_install

    from fakes.onnxruntime_gpu import make_fake_onnxruntime_gpu

    fake = make_fake_onnxruntime_gpu(real)

    def load(path: str):
        name = path.rsplit("/", 1)[-1]
        tensorrt = name.startswith(("libnvinfer", "libnvonnxparser"))
        have = name in fake.gpu.tensorrt_libraries if tensorrt else fake.gpu.cuda_libraries
        if not have:
            raise OSError(f"{path}: cannot open shared object file: No such file or directory")
        fake.gpu.loaded_libraries.add(name)
        return object()

    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info", fake.build_and_package_info)
    monkeypatch.setattr(ort_install, "_CUDA_LIBRARIES", None)
    monkeypatch.setattr(ort_install, "_TENSORRT_LIBRARY", None)
    monkeypatch.setattr(ort_install, "_load_library", load)
    monkeypatch.setattr(ort_install, "_load_global", load)
    monkeypatch.setattr(ort_install, "cuda_device_count", lambda load=None: 1)
    return fake
