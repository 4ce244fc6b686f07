"""The builder's orchestration against the TensorRT stand-in (:mod:`fakes.tensorrt`): profiles,
strongly typed flag, timing cache, atomic plan files, records, unwritable directory, progress."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from blipdiffusion_trt.components import declare_components
from blipdiffusion_trt.engines import build as trt_build
from blipdiffusion_trt.engines.build import build_engines
from blipdiffusion_trt.engines.plans import locate_plan, read_plan, read_record
from blipdiffusion_trt.engines.profiles import component_profiles, profile_from_json
from blipdiffusion_trt.errors import EngineError
from blipdiffusion_trt.package import read_pipeline_config

from fakes.tensorrt import TENSORRT_10, TENSORRT_11
from helpers import copy_package


@pytest.mark.parametrize("fake_trt", [TENSORRT_10, TENSORRT_11], indirect=True)
def test_builder_writes_plans_record_and_timing_cache(tiny_cn, fake_trt, tmp_path):
    package = copy_package(tiny_cn, tmp_path)
    manifest_before = (package / "manifest.json").read_bytes()
    cfg = read_pipeline_config(package)
    report = build_engines(package, progress=True, workspace_gb=2)

    major, minor = fake_trt.__version__.split(".")[:2]
    out = package / "engines" / f"sm_86-trt{major}.{minor}"
    assert report.engine_dir == out
    names = list(declare_components(cfg))
    assert sorted(report.components) == sorted(names)
    record = read_record(out)
    expected_profiles = component_profiles(cfg)
    for name in names:
        plan = out / f"{name}.plan"
        entry = record["components"][name]
        assert entry["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
        assert entry["size_bytes"] == plan.stat().st_size
        assert entry["tensorrt_version"] == fake_trt.__version__ and entry["compute_capability"] == "8.6"
        assert entry["gpu_name"] == "Fake GPU 80GB"
        assert entry["onnx"] == f"onnx/fp16/{name}.onnx"
        assert entry["onnx_sha256"] == json.loads(manifest_before)["files"][entry["onnx"]]
        assert profile_from_json(entry["profile"]) == expected_profiles[name]
        assert entry["options"]["shapes"] == "static" and entry["options"]["workspace_gb"] == 2.0
        echo = json.loads(plan.read_bytes())
        assert echo["graph"] == f"{name}.onnx"
        for input_name, shapes in echo["profile"].items():  # what the builder handed to set_shape
            assert tuple(map(tuple, shapes)) == expected_profiles[name][input_name]
    assert not list(out.glob(".*tmp"))  # no temp files left
    assert (package / "manifest.json").read_bytes() == manifest_before  # engines are per machine
    # 1 << STRONGLY_TYPED, the version's own enum value: 1 << 1 on TensorRT 10, 1 << 0 on 11
    assert ("create_network", {TENSORRT_10: 1 << 1, TENSORRT_11: 1 << 0}[fake_trt.__version__]) in fake_trt.calls
    assert all(call[2] == {fake_trt.MemoryPoolType.WORKSPACE: 2 << 30} for call in fake_trt.calls if call[0] == "build")
    fp16 = [c[1] for c in fake_trt.calls if c[0] == "parse_from_file"]
    assert all(Path(p).parent == package / "onnx" / "fp16" for p in fp16)

    # the timing cache is written and fed to the next build
    cache = package / "engines" / "timing.cache"
    assert cache.read_bytes() == b"+" * len(names)
    fake_trt.calls.clear()
    build_engines(package, components=["vae_decoder"], shapes="dynamic", batch="1:1:2", progress=False)
    assert [c for c in fake_trt.calls if c[0] == "create_timing_cache"] == [("create_timing_cache", b"+" * len(names))]
    record = read_record(out)
    assert record["components"]["vae_decoder"]["options"]["shapes"] == "dynamic"
    assert record["components"]["unet"]["options"]["shapes"] == "static"  # others kept

    # the runtime side accepts these plans, then notices a corrupted one
    running = {"tensorrt_version": fake_trt.__version__, "compute_capability": "8.6", "gpu_name": "Fake GPU 80GB"}
    unet_graph = json.loads(manifest_before)["files"]["onnx/fp16/unet.onnx"]
    plan, entry, warning = locate_plan(package, "unet", running, onnx_sha256=unet_graph)
    assert plan == out / "unet.plan" and warning is None
    assert read_plan(plan, entry, running, package, "unet") == plan.read_bytes()
    _, _, warning = locate_plan(package, "unet", dict(running, gpu_name="Fake GPU 40GB"))
    assert "Fake GPU 80GB" in warning and "Fake GPU 40GB" in warning
    plan.write_bytes(plan.read_bytes() + b" ")
    with pytest.raises(EngineError, match="does not match its sha256"):
        read_plan(plan, entry, running, package, "unet")
    with pytest.raises(EngineError, match=r"built for Fake GPU 80GB \(compute capability 8.6\).*rebuild: blipdiffusion-trt build"):
        locate_plan(package, "unet", dict(running, compute_capability="9.0", gpu_name="H100"))
    other = f"{major}.{minor}.99.0"  # same major.minor (same engine folder), another build
    with pytest.raises(EngineError, match=f"TensorRT {fake_trt.__version__}.*TensorRT {other}"):
        locate_plan(package, "unet", dict(running, tensorrt_version=other))
    (out / "unet.plan").unlink()
    with pytest.raises(EngineError, match="missing; rebuild it: .* --components unet"):
        locate_plan(package, "unet", running)
    shutil.rmtree(package / "engines")
    with pytest.raises(EngineError, match="no TensorRT engine for unet"):
        locate_plan(package, "unet", running)


def test_builder_unwritable_engine_dir_is_one_line(tiny, fake_trt, tmp_path):
    package = copy_package(tiny, tmp_path)
    (package / "engines").write_text("a file where the engine directory goes")
    with pytest.raises(EngineError) as info:
        build_engines(package, components=["vae_decoder"], progress=False)
    assert str(info.value).startswith("cannot write TensorRT engines to") and "\n" not in str(info.value)


def test_builder_progress_monitor_reports(fake_trt):
    seen = []
    monitor = trt_build.make_progress_monitor(fake_trt, seen.append)
    monitor.phase_start("Build", None, 3)
    monitor.phase_start("Tactics", "Build", 10)
    assert monitor.step_complete("Tactics", 4) is True
    monitor.phase_finish("Tactics")
    assert seen == ["Build 0/3", "Build 0/3 > Tactics 0/10", "Build 0/3 > Tactics 5/10", "Build 0/3"]


@pytest.mark.parametrize("fake_trt", [TENSORRT_10, TENSORRT_11], indirect=True)
def test_the_strongly_typed_flag_is_the_versions_own_enum_value(fake_trt):
    """STRONGLY_TYPED is 1 in TensorRT 10.x (after the deprecated EXPLICIT_BATCH = 0) and 0 in 11.x
    (weak typing and EXPLICIT_BATCH removed); FP16 is a builder flag in 10.x only. A flag written as
    a literal would build a weakly typed TensorRT 10 network (fp16 inside ignored) or pass a wrong bit."""
    major = int(fake_trt.__version__.split(".")[0])
    assert trt_build.network_flags(fake_trt) == (1 << 1 if major == 10 else 1 << 0)
    assert hasattr(fake_trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") == (major == 10)
    assert hasattr(fake_trt.BuilderFlag, "FP16") == (major == 10)
