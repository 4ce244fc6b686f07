"""``blipdiffusion-trt build`` in a subprocess (every argument error is one line), a package without
fp16 graphs, and a machine without TensorRT (build and runtime fail in one line)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blipdiffusion_trt.engines.build import build_engines
from blipdiffusion_trt.engines.environment import NOT_INSTALLED
from blipdiffusion_trt.errors import EngineError, PackageError
from blipdiffusion_trt.runtime.backends.tensorrt import TENSORRT

from helpers import HAVE_TRT, fixture_config


def run_build_cli(*args: str) -> subprocess.CompletedProcess:
    """``blipdiffusion-trt build ...`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "blipdiffusion_trt.cli", "build", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_argument_errors(tiny):
    cfg = fixture_config(tiny)
    m, lo, hi = cfg.image_multiple, cfg.min_image_size, cfg.max_image_size
    cases = [
        (["--shapes", "fast"], "--shapes must be one of static, dynamic"),
        (["--batch", "x"], "--batch must be an integer N or MIN:OPT:MAX"),
        (["--batch", str(cfg.max_batch_size + 1)], f"--batch must be in [1, {cfg.max_batch_size}]"),
        (["--height", str(cfg.default_height + 1)], f"--height must be a multiple of {m} in [{lo}, {hi}]"),
        (["--shapes", "dynamic", "--width", f"{hi}:{lo}:{hi}"], "--width MIN:OPT:MAX must satisfy"),
        (["--batch", "1:1:2"], "--shapes static takes one value"),
        (["--workspace", "0"], "--workspace must be a size in GiB > 0"),
        (["--components", "unet,nope"], "--components: unknown nope"),
        (["--timing-cache", tiny.package / "no" / "dir" / "t.cache"], "--timing-cache: directory"),
        (["--timing-cache", tiny.package / "onnx"], "is a directory, give a file"),
    ]
    for extra, expected in cases:
        line = _one_line_error(run_build_cli(tiny.package, *extra))
        assert expected in line, (extra, line)
    line = _one_line_error(run_build_cli(tiny.package.parent / "no-such-package"))
    assert "does not exist" in line


def test_missing_fp16_graphs_name_the_file_and_the_export_command(odd):
    with pytest.raises(PackageError) as info:
        build_engines(odd.package, progress=False)
    message = str(info.value)
    assert "onnx/fp16/qformer.onnx" in message and "--precision fp32,fp16" in message and "\n" not in message
    assert "blipdiffusion-trt export" in message
    line = _one_line_error(run_build_cli(odd.package, "--components", "vae_decoder"))
    assert "onnx/fp16/vae_decoder.onnx" in line and "--precision fp32,fp16" in line


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_build_fails_in_one_line(tiny):
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_engines(tiny.package, progress=False)
    line = _one_line_error(run_build_cli(tiny.package))
    assert line == f"error: {NOT_INSTALLED}"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_runtime_fails_in_one_line(tiny):
    from blipdiffusion_trt.package import ModelPackage

    package = ModelPackage.open(tiny.package)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        TENSORRT.make_engine(package, "unet_plain", "fp16")
    with pytest.raises(EngineError, match="--precision fp16"):
        TENSORRT.make_engine(package, "unet_plain", "fp32")
    from blipdiffusion_trt.runtime.backends import BACKENDS

    if "tensorrt" in BACKENDS:  # once the backend is registered, generate reports it in one line
        from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

        with pytest.raises(EngineError, match="TensorRT is not installed"):
            BlipDiffusionRuntime.from_package(tiny.package, "tensorrt", precision="fp16")
