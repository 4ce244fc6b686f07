"""The one-shot GPU validation script (``bench/gpu/validate.py``), in its CPU dry run.

The dry run is the GPU run's code with a tiny checkpoint, our cpu backend on fp32 graphs and
diffusers fp32 on the CPU. It runs here with the network and TensorRT made unavailable to every
process it starts (a ``sitecustomize`` on PYTHONPATH), since the GPU machine has neither, and with
NumPy's "array to scalar" deprecation as an error (NumPy 2 on the GPU machine raises it).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the validation builds and exports a checkpoint (export extra)")
pytest.importorskip("onnx", reason="the validation exports graphs (export extra)")

ROOT = Path(__file__).resolve().parent.parent
GPU_BENCH = ROOT / "bench" / "gpu"

pytestmark = pytest.mark.slow

SITECUSTOMIZE = '''
import socket, sys

def _no_network(*args, **kwargs):
    raise OSError("network access attempted: the GPU machine has none")

socket.socket.connect = _no_network
socket.create_connection = _no_network
sys.modules["tensorrt"] = None  # the GPU machine has no TensorRT: any import fails
'''


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(GPU_BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("common", "report", "validate")}
    finally:
        sys.path.remove(str(GPU_BENCH))


@pytest.fixture(scope="module")
def dry_run(tiny_cn, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-dry-run")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "site"), str(ROOT)]),
           "PYTHONWARNINGS": "error:Conversion of an array with ndim > 0:DeprecationWarning"}
    out = root / "out"
    proc = subprocess.run([sys.executable, str(GPU_BENCH / "validate.py"), "--out", str(out), "--dry-run",
                           "--checkpoint", str(tiny_cn.checkpoint), "--jobs", "1"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
    return proc, out, tiny_cn


def test_dry_run_completes_and_passes(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    data = json.loads((out / "validation.json").read_text())
    assert data["mode"]["name"] == "dry-run" and data["environment_problems"] == []
    statuses = {name: phase["status"] for name, phase in data["phases"].items()}
    assert statuses.pop("checkpoint").startswith("given: ")
    assert statuses == {"export": "done", "ours": "done", "diffusers": "done", "accuracy": "done",
                        "diffusers-compile": "skipped: GPU only", "fast_mode": "done", "flops": "done"}
    # fast mode ran beside the exact mode on both packages
    for key in ("plain", "controlnet"):
        modes = data["fast_mode"][key]
        assert set(modes) == {"1", "3", "5"} and modes["3"]["image_vs_exact"]["max_abs"] > 0
    assert data["tensorrt_imported"] is False
    assert not (out / "work").exists(), "the work folder (checkpoint, package) must be removed"
    assert (out / "validation.md").read_text().startswith("### GPU validation (dry-run)")


def test_dry_run_checks_every_component_against_pytorch(dry_run):
    from blipdiffusion_trt.package import ModelPackage

    _, out, fixture = dry_run
    data = json.loads((out / "validation.json").read_text())
    components = data["accuracy"]["components"]
    assert set(components) == set(ModelPackage.open(fixture.package, verify=False).specs)
    for name, metrics in components.items():
        assert metrics["passed"] and metrics["finite"], name
        assert metrics["graph"] == f"onnx/fp32/{name}.onnx"  # the dry run's graphs
        assert metrics["max_abs_reference"] > 0, f"{name}: an all-zero reference would prove nothing"
    for key in ("plain", "controlnet"):
        parity = data["image_parity"][key]
        assert parity["passed"] and parity["ours_vs_diffusers_fp32"] > 60, (key, parity)


def test_dry_run_measures_both_sides_the_same_way(dry_run):
    _, out, _ = dry_run
    data = json.loads((out / "validation.json").read_text())
    sides = data["sides"]
    assert set(sides) == {"ours", "diffusers"}
    expected_stages = {"plain": {"qformer", "text_encoder", "text_encoder_plain", "unet_plain", "vae_decoder"},
                       "controlnet": {"qformer", "text_encoder", "text_encoder_plain", "unet", "controlnet", "vae_decoder"}}
    for side in sides.values():
        assert side["memory"]["mb"] is not None and side["memory"]["method"] == sides["ours"]["memory"]["method"]
        for key, stages in expected_stages.items():
            pipeline = side["pipelines"][key]
            assert set(pipeline["stages"]) == stages, (side["side"], key, set(pipeline["stages"]))
            assert pipeline["generation"]["p50"] > 0 and pipeline["host_overhead_per_step"]["p50"] >= 0
            # PNDM runs one UNet call more than the steps requested; both sides count the same calls
            assert pipeline["unet_calls"] == sides["ours"]["pipelines"][key]["unet_calls"] > data["generations"][key]["steps"]
    assert sides["ours"]["torch_imported"] is False, "our runtime's side must not import torch"
    # which engines ran CUDA graphs (none on the cpu backend: the figure is None, not 0)
    assert set(sides["ours"]["engine_cuda_graphs"]) == {"qformer", "text_encoder", "text_encoder_plain", "unet",
                                                         "controlnet", "unet_plain", "vae_decoder"}
    assert set(sides["ours"]["engine_cuda_graphs"].values()) == {None}
    # FLOPs from the fp32 graphs, as the benchmark counts them
    from blipdiffusion_trt.bench.flops import component_input_shapes, count_flops
    from blipdiffusion_trt.package import ModelPackage

    flops = data["flops"]["unet_plain"]["flops"]
    assert flops > 0 and data["flops"]["unet_plain"]["unresolved"] == 0
    # the work folder is gone; the fixture's package holds the same architecture's graphs
    _, _, fixture = dry_run
    package = ModelPackage.open(fixture.package, verify=False)
    gen = data["generations"]["plain"]
    shapes = component_input_shapes(package.specs["unet_plain"], package.config, batch=1,
                                     height=gen["height"], width=gen["width"])
    assert count_flops(package.layout.graph("unet_plain", "fp32"), shapes)["flops"] == flops


def test_plain_view_is_the_package_without_its_controlnet(tiny_cn, tmp_path, bench_modules):
    from blipdiffusion_trt.package import ModelPackage

    view = bench_modules["validate"].plain_view(tiny_cn.package, tmp_path / "plain")
    package = ModelPackage.open(view)  # every digest verified
    assert not package.config.has_controlnet and "controlnet" not in package.specs
    assert not any("controlnet" in f for f in package.manifest["files"])
    unet = Path("onnx/fp32/unet_plain.onnx")
    assert (view / unet).stat().st_ino == (tiny_cn.package / unet).stat().st_ino  # hard links, no copies


def test_environment_check_names_wrong_pins_and_a_missing_cuda_provider(bench_modules):
    validate = bench_modules["validate"]
    env = {"versions": {"diffusers": "0.35.1", "transformers": "5.17.0", "huggingface_hub": "1.33.0"},
           "onnxruntime_providers": ["CPUExecutionProvider"], "onnxruntime_module_version": "1.30.0",
           "onnxruntime_module": "/site-packages/onnxruntime/__init__.py"}
    problems = validate.check_environment(env, bench_modules["common"].GPU)
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    assert any(p.startswith("transformers 5.17.0 is not the pinned 4.48.") for p in problems)
    assert any("has no CUDA provider" in p for p in problems)
    good = {**env, "versions": {"diffusers": "0.32.2", "transformers": "4.48.3", "huggingface_hub": "0.36.2"}}
    assert validate.check_environment(good, bench_modules["common"].DRY_RUN) == []


def test_accuracy_measures_catch_a_wrong_output(bench_modules):
    common = bench_modules["common"]
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    fp16_like = reference + rng.standard_normal(reference.shape).astype(np.float32) * 1e-3
    assert common.compare([fp16_like], [reference])["cosine"] > 0.999
    # a swapped guidance half (a classic batching mistake) or a NaN fails the fp16 criterion
    swapped = reference[::-1].copy()
    assert common.compare([swapped], [reference])["cosine"] < 0.999
    broken = reference.copy()
    broken[0, 0, 0, 0] = np.nan
    assert not common.compare([broken], [reference])["finite"]
    assert common.psnr(reference.clip(0, 1), reference.clip(0, 1)) == float("inf")
    assert 39 < common.psnr(np.zeros((8, 8)), np.full((8, 8), 0.01)) < 41  # MSE 1e-4: 40 dB


def test_the_work_folder_keeps_a_prepared_checkpoint_and_package(bench_modules, tmp_path):
    """After a measure call (--checkpoint/--package inside --work, as run.sh passes them), the
    scratch goes but what prepare left stays, for a rerun of the measure phase on the same machine."""
    work = tmp_path / "work"
    for name in ("full-controlnet-checkpoint/unet", "full-controlnet-package/onnx", "plain-package-view/onnx"):
        (work / name).mkdir(parents=True)
    (work / "ours.result.json").write_text("{}")
    bench_modules["validate"].clean_work(work, keep=[work / "full-controlnet-checkpoint", work / "full-controlnet-package"])
    assert sorted(p.name for p in work.iterdir()) == ["full-controlnet-checkpoint", "full-controlnet-package"]
    bench_modules["validate"].clean_work(work, keep=[])
    assert not work.exists()
