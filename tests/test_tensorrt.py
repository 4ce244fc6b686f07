"""TensorRT engines: profiles, naming, records, compatibility, CLI; builds and runs where possible.

Everywhere: optimization profiles derived from the declarations of real test packages (and of a
full-size config read from ``configs/blipdiffusion-full.json``), checked against the exported ONNX
graphs and run through ONNX Runtime at their min/opt/max points; engine directory names;
``engines.json`` records; every compatibility decision; the ``build`` command's argument checks
(in a subprocess); a missing fp16 graph; no TensorRT. The builder's orchestration (profiles,
strongly typed flag, timing cache, atomic plan files, record, unwritable directory) runs against a
small stand-in of the ``tensorrt`` module that implements the calls the builder makes.

Where ``tensorrt`` imports and a GPU is present: tiny engines are built (static and dynamic) and
compared with ONNX Runtime fp32 component by component, ControlNet residuals go to the UNet as
device tensors, and a whole generation runs on TensorRT.
"""

from __future__ import annotations

import enum
import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.components import PipelineConfig, controlnet_residual_shapes, declare_components
from blipdiffusion_trt.package import read_pipeline_config
from blipdiffusion_trt.engines import build as trt_build
from blipdiffusion_trt.engines import environment as trt_environment
from blipdiffusion_trt.engines import plans as trt_plans
from blipdiffusion_trt.engines.build import build_engines
from blipdiffusion_trt.engines.environment import NOT_INSTALLED, GpuInfo, parse_nvidia_smi
from blipdiffusion_trt.engines.plans import (
    RECORD_NAME,
    BuildOptions,
    check_compatibility,
    component_record,
    engine_dir_name,
    locate_plan,
    merge_record,
    read_plan,
    read_record,
    rebuild_command,
    write_record,
)
from blipdiffusion_trt.engines.profiles import (
    axis_ranges,
    check_shape,
    component_profiles,
    parse_range,
    profile_from_json,
    profile_to_json,
)
from blipdiffusion_trt.errors import EngineError, InputError, PackageError
from blipdiffusion_trt.runtime.backends.tensorrt import TENSORRT

REPO = Path(__file__).resolve().parent.parent
TRT_SKIP_REASON = ("TensorRT is not installed (its PyPI wheels download from NVIDIA at install time); "
                   "needs a GPU host or Dockerfile.trt")


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


HAVE_TRT = _trt_importable()


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def full_size_config(controlnet: bool = True) -> PipelineConfig:
    """The full-size architecture's PipelineConfig, every number read from the shipped config."""
    data = json.loads((REPO / "blipdiffusion_trt" / "configs" / "blipdiffusion-full.json").read_text())
    text, qformer, unet, vae = (data[k]["kwargs"] for k in ("text_encoder", "qformer", "unet", "vae"))
    factor = 2 ** (len(unet["block_out_channels"]) - 1)
    assert factor == 2 ** (len(vae["block_out_channels"]) - 1) == data["pipeline"]["latent_scale_factor"]
    vision = qformer["vision_config"]
    return PipelineConfig(
        ctx_begin_pos=data["pipeline"]["ctx_begin_pos"],
        image_size=(vision["image_size"], vision["image_size"]),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), image_resample=3,
        num_query_tokens=qformer["num_query_tokens"],
        qformer_hidden_size=text["hidden_size"],
        qformer_max_text_length=512,  # BERT default max_position_embeddings (not listed in the file)
        text_max_length=text["max_position_embeddings"],
        text_hidden_size=text["hidden_size"],
        latent_channels=unet["in_channels"],
        latent_scale_factor=factor,
        unet_size_multiple=factor,
        vae_scaling_factor=vae["scaling_factor"],
        unet_block_out_channels=tuple(unet["block_out_channels"]),
        unet_layers_per_block=unet["layers_per_block"],
        default_height=unet["sample_size"] * factor,
        default_width=unet["sample_size"] * factor,
        has_controlnet=controlnet,
    )


def _cfg(fixture) -> PipelineConfig:
    return read_pipeline_config(fixture.package)


@pytest.fixture(scope="module")
def full_cfg() -> PipelineConfig:
    return full_size_config()


# ------------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------------

def _expected_static(cfg: PipelineConfig, batch: int, height: int, width: int) -> dict[str, dict[str, tuple]]:
    """The static shapes written out from the config, independently of profiles.py."""
    f = cfg.latent_scale_factor
    lh, lw = height // f, width // f
    ub = 2 * batch
    unet = {
        "sample": (ub, cfg.latent_channels, lh, lw),
        "timestep": (ub,),
        "encoder_hidden_states": (ub, cfg.text_max_length, cfg.text_hidden_size),
    }
    down, (mid_ch, mid_scale) = controlnet_residual_shapes(cfg, ub, lh, lw)
    residuals = {f"down_block_res_{i}": (ub, ch, lh // s, lw // s) for i, (ch, s) in enumerate(down)}
    residuals["mid_block_res"] = (ub, mid_ch, lh // mid_scale, lw // mid_scale)
    expected = {
        "text_encoder": {"input_ids": (batch, cfg.text_length),
                         "ctx_embeddings": (batch, cfg.num_query_tokens, cfg.text_hidden_size)},
        "text_encoder_plain": {"input_ids": (batch, cfg.text_max_length)},
        "unet": {**unet, **residuals},
        "unet_plain": unet,
        "vae_decoder": {"latents": (batch, cfg.latent_channels, lh, lw)},
    }
    if cfg.has_controlnet:
        expected["controlnet"] = {**unet, "controlnet_cond": (ub, cfg.controlnet_conditioning_channels, height, width),
                                  "conditioning_scale": (1,)}
    return expected


def _check_static(cfg: PipelineConfig, profiles, batch: int, height: int, width: int) -> None:
    expected = _expected_static(cfg, batch, height, width)
    assert set(profiles) == set(declare_components(cfg))
    for component, inputs in expected.items():
        for name, shape in inputs.items():
            assert profiles[component][name] == (shape, shape, shape), (component, name)
    # The Q-Former's text is padded to the longest word: its length keeps the declared range.
    qformer = profiles["qformer"]
    text_axis = declare_components(cfg)["qformer"].axes["qformer_text_length"]
    low, opt, high = qformer["input_ids"]
    assert (low[1], opt[1], high[1]) == (text_axis.min, text_axis.opt, text_axis.max)
    assert low[0] == opt[0] == high[0] == batch
    assert qformer["pixel_values"][0] == (batch, 3, *cfg.image_size)


@pytest.mark.parametrize("name", ["tiny", "tiny_cn", "odd"])
def test_static_profiles_from_package_declarations(request, name):
    fixture = request.getfixturevalue(name)
    cfg = _cfg(fixture)
    _check_static(cfg, component_profiles(cfg), 1, cfg.default_height, cfg.default_width)
    # another size and batch: latent and residual sizes follow the pixel size
    height, width = cfg.default_height + cfg.image_multiple, cfg.default_width - cfg.image_multiple
    batch = min(2, cfg.max_batch_size)
    _check_static(cfg, component_profiles(cfg, batch=batch, height=height, width=str(width)), batch, height, width)


def test_static_profiles_full_size(full_cfg):
    cfg = full_cfg
    profiles = component_profiles(cfg)
    _check_static(cfg, profiles, 1, cfg.default_height, cfg.default_width)
    f = cfg.latent_scale_factor
    assert profiles["unet"]["sample"][0] == (2, cfg.latent_channels, cfg.default_height // f, cfg.default_width // f)
    assert profiles["controlnet"]["controlnet_cond"][1] == (2, 3, cfg.default_height, cfg.default_width)


def test_static_default_size_is_read_from_the_package(tiny, odd):
    """No 512 anywhere: the static size is each package's default_height/default_width."""
    for fixture in (tiny, odd):
        cfg = _cfg(fixture)
        ranges = axis_ranges(cfg)
        assert ranges["height"] == (cfg.default_height,) * 3 and ranges["width"] == (cfg.default_width,) * 3
        assert ranges["latent_height"] == (cfg.default_height // cfg.latent_scale_factor,) * 3
    assert _cfg(tiny).default_height != _cfg(odd).default_height or _cfg(tiny).latent_scale_factor != _cfg(odd).latent_scale_factor


@pytest.mark.parametrize("name", ["tiny_cn", "odd"])
def test_dynamic_profiles_are_the_declared_ranges(request, name):
    fixture = request.getfixturevalue(name)
    cfg = _cfg(fixture)
    specs = declare_components(cfg)
    profiles = component_profiles(cfg, "dynamic")
    for component, spec in specs.items():
        for tensor in spec.inputs:
            low, opt, high = profiles[component][tensor.name]
            declared = tuple(tensor.shape_at(p) for p in ("min", "opt", "max"))
            assert (low, opt, high) == declared, (component, tensor.name)
    ranges = axis_ranges(cfg, "dynamic")
    assert ranges["unet_batch"] == (1, 2, 2 * cfg.max_batch_size)


def test_dynamic_profiles_narrowed_by_options(tiny_cn, full_cfg):
    for cfg in (_cfg(tiny_cn), full_cfg):
        m, f = cfg.image_multiple, cfg.latent_scale_factor
        h = (cfg.min_image_size, cfg.default_height, cfg.default_height + 2 * m)
        ranges = axis_ranges(cfg, "dynamic", batch="1:2:3", height=f"{h[0]}:{h[1]}:{h[2]}", width=cfg.default_width)
        assert ranges["batch"] == (1, 2, 3)
        assert ranges["unet_batch"] == (1, 4, 6)
        assert ranges["height"] == h and ranges["width"] == (cfg.default_width,) * 3
        assert ranges["latent_height"] == tuple(v // f for v in h)
        for scale in (2, 4):
            if f"latent_height_{scale}" in ranges:
                assert ranges[f"latent_height_{scale}"] == tuple(v // f // scale for v in h)
        profiles = component_profiles(cfg, "dynamic", batch="1:2:3", height=f"{h[0]}:{h[1]}:{h[2]}",
                                      width=cfg.default_width)
        channels = cfg.controlnet_conditioning_channels
        assert profiles["controlnet"]["controlnet_cond"] == tuple(
            (b, channels, v, cfg.default_width) for b, v in zip((1, 4, 6), h))
        assert profiles["vae_decoder"]["latents"] == tuple(
            (b, cfg.latent_channels, v // f, cfg.default_width // f) for b, v in zip((1, 2, 3), h))


def _bad_options(cfg: PipelineConfig):
    m, lo, hi, mb = cfg.image_multiple, cfg.min_image_size, cfg.max_image_size, cfg.max_batch_size
    d = cfg.default_height
    return [
        ({"shapes": "fast"}, "--shapes", "static, dynamic"),
        ({"batch": 0}, "--batch", f"[1, {mb}]"),
        ({"batch": mb + 1}, "--batch", f"[1, {mb}]"),
        ({"batch": "two"}, "--batch", "MIN:OPT:MAX"),
        ({"batch": "1:2"}, "--batch", "MIN:OPT:MAX"),
        ({"height": d + 1}, "--height", f"multiple of {m} in [{lo}, {hi}]"),
        ({"width": hi + m}, "--width", f"multiple of {m} in [{lo}, {hi}]"),
        ({"height": 0}, "--height", f"multiple of {m} in [{lo}, {hi}]"),
        ({"shapes": "dynamic", "height": f"{d}:{lo}:{hi}"}, "--height", "MIN <= OPT <= MAX"),
        ({"shapes": "dynamic", "width": f"{lo}:{d}:{hi + m}"}, "--width", f"[{lo}, {hi}]"),
        ({"shapes": "dynamic", "batch": f"2:1:{mb}"}, "--batch", "MIN <= OPT <= MAX"),
        ({"shapes": "static", "batch": f"1:1:{mb}"}, "--batch", "--shapes dynamic"),
    ]


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_bad_profile_options_are_one_line_errors(request, name, full_cfg):
    for cfg in (_cfg(request.getfixturevalue(name)), full_cfg):
        for kwargs, option, allowed in _bad_options(cfg):
            kwargs = dict(kwargs)
            shapes = kwargs.pop("shapes", "static")
            with pytest.raises(InputError) as info:
                axis_ranges(cfg, shapes, **kwargs)
            message = str(info.value)
            assert option in message and allowed in message and "\n" not in message, (kwargs, message)
    with pytest.raises(InputError, match="--components: unknown nope"):
        component_profiles(full_cfg, components=["unet", "nope"])


def test_parse_range_and_check_shape():
    assert parse_range("--batch", None) is None
    assert parse_range("--batch", 2) == (2, 2, 2)
    assert parse_range("--batch", " 1 : 2 : 4 ") == (1, 2, 4)
    assert parse_range("--batch", (1, 1, 3)) == (1, 1, 3)
    for bad in ("", "1:2:3:4", "a", True, 1.5j):
        with pytest.raises(InputError):
            parse_range("--batch", bad)
    profile = ((1, 4, 8), (2, 4, 8), (4, 4, 16))
    assert check_shape("x", (3, 4, 10), profile) is None
    assert "outside the engine's profile" in check_shape("x", (5, 4, 8), profile)
    assert "dimensions" in check_shape("x", (5, 4), profile)
    assert "built for exactly" in check_shape("x", (1, 4, 8), ((2, 4, 8),) * 3)
    assert profile_from_json(profile_to_json({"x": profile})) == {"x": profile}


def _onnx_inputs(path: Path) -> dict[str, list[int | str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


@pytest.mark.parametrize("name", ["tiny_cn", "odd"])
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_profiles_fit_the_exported_graphs(request, name, shapes):
    """What TensorRT would check: ranks, fixed dims equal, dynamic dims where the graph has them;
    and the min/opt/max points are joint shapes the graph runs at (ONNX Runtime fp32)."""
    import onnxruntime as ort

    from blipdiffusion_trt.export.graphs import example_inputs

    fixture = request.getfixturevalue(name)
    cfg = _cfg(fixture)
    ranges = axis_ranges(cfg, shapes)
    profiles = component_profiles(cfg, shapes)
    vocab = _vocab_bound(fixture.package)
    for component, spec in declare_components(cfg).items():
        graph = fixture.package / "onnx" / "fp32" / f"{component}.onnx"
        inputs = _onnx_inputs(graph)
        assert set(inputs) <= set(profiles[component]), component
        for input_name, dims in inputs.items():
            low, opt, high = profiles[component][input_name]
            assert len(dims) == len(low), (component, input_name)
            for d, a, b, c in zip(dims, low, opt, high):
                if isinstance(d, int) and d > 0:
                    assert a == b == c == d, (component, input_name, dims, low)
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        points = [0, 2] if shapes == "dynamic" else [1]
        for index in points:
            point = {axis: r[index] for axis, r in ranges.items()}
            if component == "qformer" and index == 2:
                point["qformer_text_length"] = min(point["qformer_text_length"], 16)  # keep the CPU run short
            feed = example_inputs(spec, point, vocab_sizes={k: vocab for k in ("qformer", "text_encoder", "text_encoder_plain")})
            for input_name, array in feed.items():
                assert check_shape(input_name, array.shape, profiles[component][input_name]) is None
            outputs = session.run(None, feed)
            for tensor, out in zip(spec.outputs, outputs):
                assert out.shape == tensor.shape_at(point), (component, tensor.name)


def _vocab_bound(package: Path) -> int:
    """Token ids valid for both tokenizers (and the models' embeddings)."""
    import tokenizers

    sizes = [tokenizers.Tokenizer.from_file(str(package / d / "tokenizer.json")).get_vocab_size()
             for d in ("tokenizer", "qformer_tokenizer")]
    return min(sizes + [1000])


# ------------------------------------------------------------------------------------------------
# Names, records, compatibility
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# CLI (subprocess), missing fp16 graphs, no TensorRT
# ------------------------------------------------------------------------------------------------

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
    cfg = _cfg(tiny)
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


# ------------------------------------------------------------------------------------------------
# The builder against a stand-in `tensorrt` module
# ------------------------------------------------------------------------------------------------

def make_fake_tensorrt(version: str = "10.99.0.1") -> types.ModuleType:
    """The calls build.py makes, with TensorRT's names and signatures (10.x/11.x Python API).

    ``build_serialized_network`` checks what TensorRT would: every dynamic input has a profile
    shape of the right rank, fixed dims agree, min <= opt <= max. The plan is a JSON echo.
    """
    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec callers (torch, diffusers)
    trt.__version__ = version
    trt.calls = []

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        pass

    ILogger.Severity = Severity
    ILogger.__init__ = lambda self: None

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1  # the enum value in TensorRT 10/11 (EXPLICIT_BATCH=0 is gone)

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class IProgressMonitor:
        def __init__(self):
            pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.path = flags, [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            trt.calls.append(("parse_from_file", path))
            self.network.path = path
            for name, dims in _onnx_inputs(Path(path)).items():
                self.network.inputs.append(Tensor(name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)))
            return True

        def get_error(self, i):
            return "no error"

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.profiles, self.pool, self.cache, self.progress_monitor = [], {}, None, None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def create_timing_cache(self, data):
            trt.calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch=False):
            self.cache = cache
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert network.flags == 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            shapes = config.profiles[0].shapes if config.profiles else {}
            for tensor in network.inputs:
                if -1 not in tensor.shape:
                    continue
                low, opt, high = shapes[tensor.name]
                assert len(low) == len(tensor.shape)
                for d, a, b, c in zip(tensor.shape, low, opt, high):
                    assert d == -1 or a == b == c == d
                    assert 1 <= a <= b <= c
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building", None, 2)
                config.progress_monitor.step_complete("Building", 0)
                config.progress_monitor.step_complete("Building", 1)
                config.progress_monitor.phase_finish("Building")
            trt.calls.append(("build", Path(network.path).name, dict(config.pool)))
            config.cache.data += b"+"  # builds add their timings to the attached cache
            echo = {"graph": Path(network.path).name, "path": str(network.path),
                    "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
            return json.dumps(echo).encode()

    for obj in (ILogger, NetworkDefinitionCreationFlag, MemoryPoolType, IProgressMonitor, OnnxParser, Builder):
        setattr(trt, obj.__name__, obj)
    _add_fake_runtime(trt)
    return trt


def _add_fake_runtime(trt: types.ModuleType) -> None:
    """``trt.Runtime`` for the stand-in plans: the execution context runs the component's fp32 graph
    on ONNX Runtime, reading inputs from and writing outputs to the (fake) device addresses."""
    import ctypes

    import onnxruntime as ort

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    np_types = {1: np.float32, 7: np.int64, 10: np.float16, 6: np.int32}

    class Engine:
        def __init__(self, echo):
            import onnx

            path = Path(echo["path"])
            self.graph32 = path.parent.parent / "fp32" / path.name
            model = onnx.load(str(path), load_external_data=False)
            self.io = []  # (name, mode, dtype, dims)
            for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
                for v in values:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                    self.io.append((v.name, mode, np.dtype(np_types[v.type.tensor_type.elem_type]), dims))
            self.profile = {k: tuple(tuple(x) for x in v) for k, v in echo["profile"].items()}
            self.session = ort.InferenceSession(str(self.graph32), providers=["CPUExecutionProvider"])
            self.shape_cache = {}
            self.runs = 0

        @property
        def num_io_tensors(self):
            return len(self.io)

        def _find(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return self._find(name)[1]

        def get_tensor_dtype(self, name):
            return self._find(name)[2]

        def get_tensor_shape(self, name):
            return self._find(name)[3]

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return list(self.profile[name])

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile[name]
            if not all(a <= d <= b for d, a, b in zip(shape, low, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def _input_shape(self, name):
            dims = self.engine.get_tensor_shape(name)
            return self.shapes[name] if -1 in dims else dims

        def get_tensor_shape(self, name):
            inputs = [t for t in self.engine.io if t[1] == TensorIOMode.INPUT]
            key = tuple(self._input_shape(t[0]) for t in inputs)
            if key not in self.engine.shape_cache:
                zeros = {t[0]: np.zeros(self._input_shape(t[0]), t[2]) for t in inputs}
                outs = self.engine.session.run(None, zeros)
                self.engine.shape_cache[key] = {o.name: r.shape for o, r in zip(self.engine.session.get_outputs(), outs)}
            return self.engine.shape_cache[key][name]

        def execute_async_v3(self, stream_handle):
            def run():
                feed = {}
                for name, mode, dtype, _ in self.engine.io:
                    if mode == TensorIOMode.INPUT:
                        shape = self._input_shape(name)
                        count = int(np.prod(shape))
                        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
                        feed[name] = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
                outs = self.engine.session.run(None, feed)
                for out, value in zip(self.engine.session.get_outputs(), outs):
                    value = np.ascontiguousarray(value, dtype=self.engine.get_tensor_dtype(out.name))
                    ctypes.memmove(self.addresses[out.name], value.ctypes.data, value.nbytes)
                self.engine.runs += 1

            return FAKE_CUDA.enqueue(stream_handle, run)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    trt.TensorIOMode = TensorIOMode
    trt.Runtime = Runtime
    trt.nptype = lambda dtype: dtype


class FakeCuda(types.SimpleNamespace):
    """The cuda-python runtime calls the TensorRT backend (runtime/backends/tensorrt.py) makes, on host memory.

    Streams run work at once; a stream being captured records it into a graph instead, and
    ``cudaGraphLaunch`` replays it, as CUDA graphs do.
    """

    def __init__(self):
        import ctypes

        class Err(enum.Enum):
            cudaSuccess = 0
            cudaErrorInvalidValue = 1

        class Kind(enum.Enum):
            cudaMemcpyHostToDevice = 1
            cudaMemcpyDeviceToHost = 2

        class Mode(enum.Enum):
            cudaStreamCaptureModeGlobal = 0
            cudaStreamCaptureModeThreadLocal = 1

        super().__init__(cudaError_t=Err, cudaMemcpyKind=Kind, cudaStreamCaptureMode=Mode, cudaStreamNonBlocking=1)
        self._ctypes = ctypes
        self.memory, self.capturing, self.graphs, self.next_stream = {}, {}, {}, 100
        self.launches = self.copies = 0

    def _alloc(self, size):
        buffer = (self._ctypes.c_byte * size)()
        address = self._ctypes.addressof(buffer)
        self.memory[address] = buffer
        return (self.cudaError_t.cudaSuccess, address)

    def cudaMalloc(self, size):
        return self._alloc(size)

    def cudaMallocHost(self, size):
        return self._alloc(size)

    def cudaFree(self, ptr):
        self.memory.pop(int(ptr), None)
        return (self.cudaError_t.cudaSuccess,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        self.next_stream += 1
        return (self.cudaError_t.cudaSuccess, self.next_stream)

    def cudaStreamDestroy(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert int(stream) not in self.capturing  # copies stay outside the graph
        self._ctypes.memmove(int(dst), int(src), int(count))
        self.copies += 1
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpy(self, dst, src, count, kind):
        self._ctypes.memmove(int(dst), int(src), int(count))
        return (self.cudaError_t.cudaSuccess,)

    def enqueue(self, stream, work):
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()
        return True

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        self.next_graph = getattr(self, "next_graph", 0) + 1
        self.graphs[self.next_graph] = self.capturing.pop(int(stream))
        return (self.cudaError_t.cudaSuccess, self.next_graph)

    def cudaGraphInstantiate(self, graph, flags):
        return (self.cudaError_t.cudaSuccess, graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for work in self.graphs[graph_exec]:
            work()
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph, None)
        return (self.cudaError_t.cudaSuccess,)


FAKE_CUDA = FakeCuda()


@pytest.fixture()
def fake_trt(monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_environment, "gpu_info", lambda: GpuInfo("Fake GPU 80GB", "8.6"))
    return trt


def _copy_package(fixture, tmp_path) -> Path:
    target = tmp_path / fixture.package.name
    shutil.copytree(fixture.package, target)
    return target


def test_builder_writes_plans_record_and_timing_cache(tiny_cn, fake_trt, tmp_path):
    package = _copy_package(tiny_cn, tmp_path)
    manifest_before = (package / "manifest.json").read_bytes()
    cfg = read_pipeline_config(package)
    report = build_engines(package, progress=True, workspace_gb=2)

    out = package / "engines" / "sm_86-trt10.99"
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
        assert entry["tensorrt_version"] == "10.99.0.1" and entry["compute_capability"] == "8.6"
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
    assert ("create_network", 1 << 1) in fake_trt.calls
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
    running = {"tensorrt_version": "10.99.0.1", "compute_capability": "8.6", "gpu_name": "Fake GPU 80GB"}
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
    with pytest.raises(EngineError, match="TensorRT 10.99.0.1.*TensorRT 10.99.1.0"):
        locate_plan(package, "unet", dict(running, tensorrt_version="10.99.1.0"))
    (out / "unet.plan").unlink()
    with pytest.raises(EngineError, match="missing; rebuild it: .* --components unet"):
        locate_plan(package, "unet", running)
    shutil.rmtree(package / "engines")
    with pytest.raises(EngineError, match="no TensorRT engine for unet"):
        locate_plan(package, "unet", running)


def test_builder_unwritable_engine_dir_is_one_line(tiny, fake_trt, tmp_path):
    package = _copy_package(tiny, tmp_path)
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


# ------------------------------------------------------------------------------------------------
# The runtime engine against the stand-ins (ONNX Runtime behind fake TensorRT/CUDA)
# ------------------------------------------------------------------------------------------------

FAKE_RUNNING = {"tensorrt_version": "10.99.0.1", "compute_capability": "8.6", "gpu_name": "Fake GPU 80GB"}


@pytest.fixture()
def fake_runtime(fake_trt, monkeypatch):
    from blipdiffusion_trt.runtime.backends import tensorrt

    monkeypatch.setattr(tensorrt, "import_cudart", lambda: FAKE_CUDA)
    monkeypatch.setattr(tensorrt, "_running_here", lambda: dict(FAKE_RUNNING))
    monkeypatch.delenv(tensorrt.CUDA_GRAPH_ENV, raising=False)
    return tensorrt


def _fake_engines(tensorrt, package):
    needed = ["qformer", "text_encoder", "text_encoder_plain", "vae_decoder"]
    needed += ["unet", "controlnet"] if package.config.has_controlnet else ["unet_plain"]
    return {n: tensorrt.TENSORRT.make_engine(package, n, "fp16") for n in needed}


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
    package_dir = _copy_package(request.getfixturevalue(name), tmp_path)
    build_engines(package_dir, shapes=shapes, progress=False)
    package = ModelPackage.open(package_dir)
    engines = _fake_engines(fake_runtime, package)
    assert all(e.use_cuda_graph == cuda_graph for e in engines.values())
    seen = []
    if package.config.has_controlnet:
        unet_infer = engines["unet"].infer

        def spy(feed, keep=()):
            seen.append({k: type(v) for k, v in feed.items() if k.endswith("_res") or "_res_" in k})
            return unet_infer(feed, keep)

        engines["unet"].infer = spy
    runtime = BlipDiffusionRuntime(package, engines)
    cpu = BlipDiffusionRuntime.from_package(package_dir, cpu_fused=False)  # the stand-ins run the plain graphs
    launches = FAKE_CUDA.launches
    got = runtime(**_generate_kwargs(package)).images
    expected = cpu(**_generate_kwargs(package)).images
    np.testing.assert_allclose(got, expected, atol=1e-6)
    if package.config.has_controlnet:
        assert seen and all(set(types_.values()) == {DeviceTensor} for types_ in seen)  # residuals stayed "on the GPU"
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


def test_runtime_engine_device_tensors_and_errors(tiny_cn, fake_runtime, tmp_path):
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends.tensorrt import DeviceTensor

    package_dir = _copy_package(tiny_cn, tmp_path)
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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))


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
    vocab = _vocab_bound(package.root)
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
                cos = _cosine(got[output], expected[output])
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
        needed = ["qformer", "text_encoder", "text_encoder_plain", "vae_decoder"]
        needed += ["unet", "controlnet"] if package.config.has_controlnet else ["unet_plain"]
        engines = {n: TENSORRT.make_engine(package, n, "fp16") for n in needed}
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
