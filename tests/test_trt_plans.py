"""TensorRT plans without TensorRT: engine directory names, ``engines.json`` records, every
compatibility decision, rebuild commands, ``nvidia-smi`` parsing."""

from __future__ import annotations

import hashlib
import json

import pytest

from blipdiffusion_trt.engines import plans as trt_plans
from blipdiffusion_trt.engines.environment import GpuInfo, parse_nvidia_smi
from blipdiffusion_trt.engines.plans import (
    RECORD_NAME,
    BuildOptions,
    check_compatibility,
    component_record,
    engine_dir_name,
    merge_record,
    read_record,
    rebuild_command,
    write_record,
)
from blipdiffusion_trt.engines.profiles import component_profiles
from blipdiffusion_trt.errors import EngineError


@pytest.mark.parametrize("cc, version, expected", [
    ("9.0", "10.8.0.43", "sm_90-trt10.8"),
    ((8, 6), "11.4.0.106", "sm_86-trt11.4"),
    ("12.0", "10.13.3.9", "sm_120-trt10.13"),
    ("sm_89", "10.0.1", "sm_89-trt10.0"),
])
def test_engine_dir_name(cc, version, expected):
    assert engine_dir_name(cc, version) == expected


@pytest.mark.parametrize("cc, version", [("nine", "10.8"), ("9.0", "ten"), ("9.0", "10")])
def test_engine_dir_name_rejects_garbage(cc, version):
    with pytest.raises(ValueError):
        engine_dir_name(cc, version)


def test_parse_nvidia_smi():
    text = "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA A100-SXM4-40GB, 8.0\n"
    assert parse_nvidia_smi(text) == GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    assert parse_nvidia_smi(text, 1) == GpuInfo("NVIDIA A100-SXM4-40GB", "8.0")
    with pytest.raises(ValueError):
        parse_nvidia_smi("", 0)


RUNNING = {"tensorrt_version": "10.8.0.43", "compute_capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3"}


def _record(full_cfg, **overrides):
    options = BuildOptions.from_args("dynamic", batch="1:1:2", height="256:512:768")
    entry = component_record(
        component="unet", plan="unet.plan", sha256="ab" * 32, size_bytes=123, tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        profile=component_profiles(full_cfg, "dynamic", batch="1:1:2", height="256:512:768")["unet"],
        options=options, build_seconds=12.345, onnx="onnx/fp16/unet.onnx", onnx_sha256="cd" * 32,
    )
    entry.update(overrides)
    return entry


def test_component_record_and_engines_json(tmp_path, full_cfg):
    entry = _record(full_cfg)
    for key in ("plan", "sha256", "size_bytes", "tensorrt_version", "gpu_name", "compute_capability", "profile",
                "options", "build_seconds", "onnx", "onnx_sha256", "built"):
        assert key in entry
    assert entry["build_seconds"] == 12.35 and entry["compute_capability"] == "9.0"
    assert entry["options"] == {"shapes": "dynamic", "batch": "1:1:2", "height": "256:512:768", "width": None,
                                "workspace_gb": None}
    sample = entry["profile"]["sample"]
    f = full_cfg.latent_scale_factor
    # width not given: the declared range
    assert sample["min"] == [1, full_cfg.latent_channels, 256 // f, full_cfg.min_image_size // f]
    assert sample["max"][0] == 4 and sample["opt"][2] == 512 // f
    record = merge_record(None, "unet", entry)
    record = merge_record(record, "vae_decoder", dict(entry, plan="vae_decoder.plan"))
    record = merge_record(record, "unet", dict(entry, sha256="ef" * 32))
    assert list(record["components"]) == ["unet", "vae_decoder"]
    assert record["components"]["unet"]["sha256"] == "ef" * 32
    write_record(tmp_path, record)
    assert read_record(tmp_path) == json.loads(json.dumps(record))
    assert read_record(tmp_path / "nowhere") is None
    (tmp_path / RECORD_NAME).write_text("{not json")
    with pytest.raises(EngineError, match="unreadable"):
        read_record(tmp_path)


def test_rebuild_command_replays_options():
    options = BuildOptions.from_args("dynamic", batch="1:2:4", height=512, workspace_gb="8")
    command = rebuild_command("/data/my pkg", options, ["unet"])
    assert command == ("blipdiffusion-trt build '/data/my pkg' --components unet --shapes dynamic "
                       "--batch 1:2:4 --height 512 --workspace 8")
    assert rebuild_command("pkg", None) == "blipdiffusion-trt build pkg --shapes static"
    assert rebuild_command("pkg", options.to_dict()) == rebuild_command("pkg", options)


def test_compatibility_decisions(tmp_path, full_cfg):
    entry = _record(full_cfg)
    assert check_compatibility(entry, RUNNING) is None

    # same architecture, another model: loads (the runtime only warns)
    other_model = dict(RUNNING, gpu_name="NVIDIA H800")
    assert check_compatibility(entry, other_model) is None
    assert not trt_plans.same_gpu_model(entry, other_model)

    other_gpu = check_compatibility(entry, dict(RUNNING, compute_capability="8.6", gpu_name="NVIDIA RTX A6000"),
                                    package="/pkg", component="unet")
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0)" in other_gpu
    assert "NVIDIA RTX A6000 (compute capability 8.6)" in other_gpu
    assert other_gpu.endswith("rebuild: blipdiffusion-trt build /pkg --shapes dynamic --batch 1:1:2 --height 256:512:768")
    assert "\n" not in other_gpu

    other_trt = check_compatibility(entry, dict(RUNNING, tensorrt_version="10.9.0.34"), package="/pkg")
    assert "TensorRT 10.8.0.43" in other_trt and "TensorRT 10.9.0.34" in other_trt
    assert "blipdiffusion-trt build /pkg" in other_trt

    plan = tmp_path / "unet.plan"
    missing = check_compatibility(entry, RUNNING, package="/pkg", component="unet", plan=plan)
    assert "missing" in missing and "--components unet" in missing

    plan.write_bytes(b"plan")
    assert check_compatibility(entry, RUNNING, plan=plan) is None
    corrupted = check_compatibility(entry, RUNNING, package="/pkg", component="unet", plan=plan,
                                    plan_sha256=hashlib.sha256(b"plan").hexdigest())
    assert "does not match its sha256" in corrupted and "--components unet" in corrupted
    assert check_compatibility(entry, RUNNING, plan=plan, plan_sha256="ab" * 32) is None

    stale = check_compatibility(entry, RUNNING, package="/pkg", component="unet", onnx_sha256="00" * 32)
    assert "another onnx/fp16/unet.onnx" in stale
    assert check_compatibility(entry, RUNNING, onnx_sha256="cd" * 32) is None

    none = check_compatibility(None, RUNNING, package="/pkg", component="unet")
    assert "no TensorRT engine for unet" in none and "blipdiffusion-trt build /pkg --components unet" in none

    garbage = check_compatibility(dict(entry, compute_capability="?"), RUNNING)
    assert garbage and "rebuild" in garbage
