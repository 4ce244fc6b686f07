"""Installation: ONNX Runtime from the [cpu] or [gpu] extra, and the CUDA libraries for the CUDA provider.

A missing ONNX Runtime is simulated by ``sys.modules["onnxruntime"] = None`` in a fresh process
(any ``import onnxruntime`` then raises ImportError, as on a bare install). The CUDA library
loading is tested with fakes of what onnxruntime-gpu 1.31 provides; each fake says which
behaviour of the real package it stands for.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt.errors import EngineError
from blipdiffusion_trt.runtime.backends import ort_install

BLOCK_ORT = "import sys; sys.modules['onnxruntime'] = None\n"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_ORT + code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_bare_install_names_the_extra_in_one_line(tiny, tmp_path):
    """The Python API raises EngineError naming [cpu] (cpu backend) or [gpu] (cuda backend)."""
    code = (
        "from blipdiffusion_trt.errors import EngineError\n"
        "from blipdiffusion_trt.runtime import BlipDiffusionRuntime\n"
        "for backend in ('cpu', 'cuda', 'ort-tensorrt'):\n"
        "    try:\n"
        f"        BlipDiffusionRuntime.from_package({str(tiny.package)!r}, backend)\n"
        "    except EngineError as error:\n"
        "        print(backend, '|', error)\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" | ") for line in result.stdout.strip().splitlines())
    assert lines["cpu"] == "ONNX Runtime is not installed: pip install 'blipdiffusion-trt[cpu]' (or [gpu] for CUDA)"
    for backend in ("cuda", "ort-tensorrt"):
        assert lines[backend] == "ONNX Runtime is not installed: pip install 'blipdiffusion-trt[gpu]' (CUDA, TensorRT)"


def test_bare_install_cli_prints_one_line_and_exits_2(tiny, tmp_path):
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    args = ["generate", str(tiny.package), "--prompt", "a photo", "--reference-image", str(image),
            "--source-subject", "dog", "--target-subject", "dog", "--out", str(tmp_path / "out.png"), "--steps", "2"]
    result = _python(f"from blipdiffusion_trt.cli import main\nsys.exit(main({args!r}))", tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: ONNX Runtime is not installed: pip install 'blipdiffusion-trt[cpu]' (or [gpu] for CUDA)"]
    assert not (tmp_path / "out.png").exists()


def test_cuda_provider_missing_names_the_gpu_extra_before_loading_anything(tiny):
    """With the CPU build (as here), asking for CUDA fails at once, not after loading the graph on the CPU."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends import get_backend

    package = ModelPackage.open(tiny.package, verify=False)
    with pytest.raises(EngineError, match=r"^CUDAExecutionProvider is not available .*blipdiffusion-trt\[gpu\]") as caught:
        get_backend("cuda").make_engine(package, "unet_plain", "fp32")
    assert "\n" not in str(caught.value)


def test_both_distributions_installed_is_named_with_the_fix(monkeypatch):
    """Fake: importlib.metadata reports both onnxruntime and onnxruntime-gpu (pip allows that; they
    share one module). The real module here is the CPU build, so CUDA is missing, as it would be."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    monkeypatch.setattr(ort_install.metadata, "version", lambda dist: "1.31.1")
    with pytest.raises(EngineError) as caught:
        ort_install.require_onnxruntime([("CUDAExecutionProvider", {"device_id": 0})])
    assert str(caught.value) == (
        "CUDAExecutionProvider is not available: both onnxruntime and onnxruntime-gpu are installed and share one "
        "module; pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'blipdiffusion-trt[gpu]'")


def test_extra_for_providers():
    assert ort_install.extra_for(["CPUExecutionProvider"]) == "cpu"
    assert ort_install.extra_for([("CUDAExecutionProvider", {}), "CPUExecutionProvider"]) == "gpu"
    assert ort_install.extra_for([("TensorrtExecutionProvider", {}), "CUDAExecutionProvider"]) == "gpu"


def _fake_onnxruntime(monkeypatch, cuda_version: str, calls: list):
    """Fake of onnxruntime-gpu 1.31.1's module: ``preload_dlls()`` prints (never raises) what it could
    not load, and ``onnxruntime.capi.build_and_package_info.cuda_version`` holds the CUDA version
    the wheel was built with ("13.0" in the 1.31.1 wheel)."""

    def preload_dlls(cuda=True, cudnn=True, msvc=True, directory=None):
        calls.append(("preload_dlls", directory))
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info",
                        types.SimpleNamespace(cuda_version=cuda_version))
    return types.SimpleNamespace(preload_dlls=preload_dlls, __version__="1.31.1")


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_preload_loads_cuda13_libraries_from_another_site_directory(monkeypatch, tmp_path, capsys):
    """onnxruntime-gpu installed with --target (as on the GPU validation machine), the NVIDIA wheels in
    another site directory, CUDA 13's consolidated layout (nvidia/cu13/lib) plus nvidia/cudnn/lib."""
    site = tmp_path / "site-packages"
    _touch(site, *(f"nvidia/cu13/lib/{n}" for n in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13",
                                                     "libcurand.so.10", "libcufft.so.12", "libnvrtc.so.13")),
           "nvidia/cudnn/lib/libcudnn.so.9", "nvidia/cudnn/lib/libcudnn_ops.so.9")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "empty"), str(site)])
    calls: list = []
    ort = _fake_onnxruntime(monkeypatch, "13.0", calls)
    loaded = ort_install.preload_cuda_libraries(ort, load=lambda path: calls.append(("load", Path(path).name)))
    assert calls[0] == ("preload_dlls", None)
    # dependency order: the runtime first, cublasLt before cublas; cuDNN's sub-libraries load on demand
    # (libnvrtc: the provider dlopens it for its run-time compiled kernels, as preload_dlls() lists it)
    assert [c[1] for c in calls[1:]] == ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13",
                                          "libcurand.so.10", "libcufft.so.12", "libcudnn.so.9", "libnvrtc.so.13"]
    assert [Path(p).parent.parent.name for p in loaded.loaded] == ["cu13"] * 5 + ["cudnn", "cu13"]
    assert loaded.missing == [] and loaded.cuda_version == "13.0"
    assert capsys.readouterr().out == ""  # preload_dlls' prints are logged, not printed
    assert loaded.preload_dlls.startswith("Failed to load libcublasLt.so.13")


def test_preload_finds_cuda12_per_library_folders(monkeypatch, tmp_path):
    site = tmp_path / "site-packages"
    _touch(site, "nvidia/cuda_runtime/lib/libcudart.so.12", "nvidia/cublas/lib/libcublasLt.so.12",
           "nvidia/cublas/lib/libcublas.so.12", "nvidia/curand/lib/libcurand.so.10",
           "nvidia/cufft/lib/libcufft.so.11", "nvidia/cudnn/lib/libcudnn.so.9",
           "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
           "nvidia/cublas/lib/libcublas.so.13")  # another major: never loaded
    monkeypatch.setattr(sys, "path", [str(site)])
    calls: list = []
    ort = _fake_onnxruntime(monkeypatch, "12.8", calls)
    loaded = ort_install.preload_cuda_libraries(ort, load=lambda path: None)
    assert [Path(p).name for p in loaded.loaded] == ["libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12",
                                              "libcurand.so.10", "libcufft.so.11", "libcudnn.so.9", "libnvrtc.so.12"]


def test_preload_with_a_cpu_build_loads_nothing(monkeypatch, tmp_path):
    """The CPU build has no preload_dlls and an empty cuda_version: nothing to do, no error."""
    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info", types.SimpleNamespace(cuda_version=""))
    loads: list = []
    report = ort_install.preload_cuda_libraries(types.SimpleNamespace(__version__="1.31.1"), load=loads.append)
    assert report.loaded == report.missing == [] and loads == []


def test_a_library_found_nowhere_is_reported_missing(monkeypatch, tmp_path):
    """Not in an NVIDIA folder, and the system loader cannot open it by name either."""
    site = tmp_path / "site-packages"
    _touch(site, "nvidia/cu13/lib/libcudart.so.13")
    monkeypatch.setattr(sys, "path", [str(site)])
    ort = _fake_onnxruntime(monkeypatch, "13.0", [])

    def load(path):
        if not Path(path).is_file():
            raise OSError(f"{path}: cannot open shared object file")

    report = ort_install.preload_cuda_libraries(ort, load=load)
    assert [Path(p).name for p in report.loaded] == ["libcudart.so.13"]
    assert report.missing == ["libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12", "libcudnn.so.9",
                              "libnvrtc.so.13"]
    assert report.folders == [str(site / "nvidia" / "cu13" / "lib")]
    assert report.describe().startswith("not found: libcublasLt.so.13") and str(site) in report.describe()
