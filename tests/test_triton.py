"""Triton model repositories: the configs of every flavor, and a real Triton server.

The server is the ``tritonserver`` that nvidia-pytriton bundles (with its python backend and the
python stub built for this interpreter); it serves the ``python-cpu`` repositories of the tiny
packages on 127.0.0.1 only, and its images are compared with the Python API's.

The bundled stub is built against numpy 1.x (pytriton requires numpy<2): with numpy 2 in the
stub's Python every tensor it creates is garbage. When this interpreter has numpy>=2 the server
tests need a directory holding numpy<2 (``pip install --target DIR "numpy<2"``) in
``BLIPDIFFUSION_TRT_STUB_NUMPY``: the stub then runs in an overlay environment (this
environment's packages, that numpy first). Otherwise they are skipped with that reason.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the triton extra (pip install .[triton])")
onnx = pytest.importorskip("onnx", reason="needs the export extra")

from google.protobuf import text_format  # noqa: E402  (tritonclient[grpc] brings protobuf)
from tritonclient.grpc import model_config_pb2  # noqa: E402

from blipdiffusion_trt.components import (  # noqa: E402
    Axis,
    ComponentSpec,
    PipelineConfig,
    TensorSpec,
    editing_components,
    generation_components,
    step_cache_components,
)
from blipdiffusion_trt.package import read_pipeline_config  # noqa: E402
from blipdiffusion_trt.serving.triton import configs  # noqa: E402
from blipdiffusion_trt.serving.triton import repository as tr  # noqa: E402
from blipdiffusion_trt.errors import InputError, PackageError  # noqa: E402

from helpers import run_cli  # noqa: E402
from triton_server import infer_inputs, shm_regions, start_server, stop_server, stub_pid  # noqa: E402

FLAVORS = ("python-cpu", "onnxruntime", "tensorrt")
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}
DataType = model_config_pb2.DataType
KIND = model_config_pb2.ModelInstanceGroup.Kind


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def fake_plans(package: Path, dst: Path, archs: tuple[str, ...] = ("sm_89-trt10.8",), shapes: str | None = "static",
               **options) -> Path:
    """A copy of ``package`` with fake TensorRT plans (their content names them) in engines/<arch>/,
    and the ``engines.json`` the builder would write for ``shapes`` (none when None)."""
    from blipdiffusion_trt.engines.plans import RECORD_FORMAT_VERSION, BuildOptions
    from blipdiffusion_trt.engines.profiles import component_profiles, profile_to_json

    shutil.copytree(package, dst)
    config = read_pipeline_config(dst)
    components = json.loads((dst / "manifest.json").read_text())["components"]
    for arch in archs:
        folder = dst / "engines" / arch
        folder.mkdir(parents=True)
        for name in components:
            (folder / f"{name}.plan").write_bytes(f"plan {arch} {name}".encode())
        if shapes is not None:
            build = BuildOptions.from_args(shapes, **options)
            profiles = component_profiles(config, shapes, batch=build.batch, height=build.height, width=build.width)
            record = {"format_version": RECORD_FORMAT_VERSION, "components": {
                name: {"plan": f"{name}.plan", "options": build.to_dict(), "profile": profile_to_json(profile)}
                for name, profile in profiles.items()}}
            (folder / "engines.json").write_text(json.dumps(record, indent=2))
    return dst


@pytest.fixture(scope="module")
def trt_packages(tiny, tiny_cn, tmp_path_factory) -> dict[str, Path]:
    """Packages with (fake) engines as ``blipdiffusion-trt build`` makes them by default: static shapes."""
    root = tmp_path_factory.mktemp("trt-packages")
    return {f.name: fake_plans(f.package, root / f.name) for f in (tiny, tiny_cn)}


def onnx_io(path: Path) -> dict[str, tuple[str, list[int | None]]]:
    """name -> (Triton dtype, dims with None for a symbolic dim) of a graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    found = {}
    for value in (*model.graph.input, *model.graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        found[value.name] = (ONNX_TO_TRITON[tensor.elem_type], dims)
    return found


def model_dims(tensor, max_batch_size: int) -> list[int]:
    """The shape the model itself sees (batch as -1, reshape applied)."""
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    return ([-1] if max_batch_size > 0 else []) + dims


# --------------------------------------------------------------------------------------------
# Configs (no server)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("which", ["tiny", "tiny_cn"])
def test_repository_configs(flavor, which, request, trt_packages, tmp_path):
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.package.layout import CPU_FUSED

    fixture = request.getfixturevalue(which)
    source = trt_packages[which] if flavor == "tensorrt" else fixture.package
    repo = tr.write_triton_repository(source, tmp_path / "repo", flavor, instances=2)
    package = ModelPackage.open(fixture.package, verify=False)
    config: PipelineConfig = package.config
    generation = generation_components(config)
    expected = ["controlnet", "unet"] if fixture.controlnet else ["unet_plain"]
    assert set(expected) <= set(generation) and ("unet_plain" in generation) != fixture.controlnet
    # the editing graphs where the package has them (tiny's, not tiny_cn's)
    editing = [c for c in editing_components(config) if c not in generation]
    assert bool(editing) == (which == "tiny")
    # fast mode's step-cache graphs where the package has them (every fixture here)
    step_cache = step_cache_components(config)
    assert step_cache
    components = generation + editing + step_cache
    assert sorted(p.name for p in repo.path.iterdir()) == sorted(components + ["blip_diffusion"])
    assert not list(tmp_path.glob(".repo.partial-*")), "temporary directory left behind"

    for component in components:
        spec = package.specs[component]
        model_dir = repo.path / component
        cfg = parse_config(model_dir / "config.pbtxt")
        assert cfg.name == component
        if flavor == "tensorrt":
            assert (cfg.platform, cfg.backend) == ("tensorrt_plan", "")
            assert (model_dir / "1" / "model.plan").read_bytes() == f"plan sm_89-trt10.8 {component}".encode()
            assert not cfg.cc_model_filenames
            graph = fixture.package / "onnx" / "fp32" / f"{component}.onnx"
        elif flavor == "onnxruntime":
            assert (cfg.platform, cfg.backend) == ("onnxruntime_onnx", "")
            graph = model_dir / "1" / "model.onnx"
            assert graph.read_bytes() == (fixture.package / "onnx" / "fp16" / f"{component}.onnx").read_bytes()
            (accelerator,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
            assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        else:
            assert (cfg.platform, cfg.backend) == ("", "python")
            graph = model_dir / "1" / "model.onnx"
            # what the cpu runtime loads: the CPU-fused graph where the package has one
            folder = CPU_FUSED if package.has_cpu_fused(component) else "fp32"
            assert graph.read_bytes() == (fixture.package / "onnx" / folder / f"{component}.onnx").read_bytes()
            compile((model_dir / "1" / "model.py").read_text(), "model.py", "exec")
        (group,) = cfg.instance_group
        assert group.count == 2
        assert group.kind == (KIND.KIND_CPU if flavor == "python-cpu" else KIND.KIND_GPU)

        if flavor == "tensorrt":
            # static engines (the builder's default): the recorded profile's fixed shapes, no
            # batching (the batch is fixed), CUDA graphs wherever every dim is fixed
            record = json.loads((source / "engines" / "sm_89-trt10.8" / "engines.json").read_text())
            profile = record["components"][component]["profile"]
            assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
            for tensor in cfg.input:
                low, high = profile[tensor.name]["min"], profile[tensor.name]["max"]
                assert list(tensor.dims) == [lo if lo == hi else -1 for lo, hi in zip(low, high)], tensor.name
            static = all(d > 0 for t in (*cfg.input, *cfg.output) for d in t.dims)
            # the Q-Former's text length is padded to the longest word; an edit's UNet rows are 2 to 4
            assert static == (component not in ("qformer", "unet_p2p"))
            assert cfg.optimization.cuda.graphs == static
        else:
            # batching: from the declarations; the UNet's batch is 2 x B; ControlNet's scalar
            # conditioning_scale has no batch axis, so it cannot batch at all
            axis = configs.batch_axis(spec)
            if component == "controlnet":
                assert axis is None
            if axis is None:
                assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
            else:
                assert cfg.max_batch_size == axis.max > 0 and cfg.HasField("dynamic_batching")
                factor = 2 if axis.name == "unet_batch" else 1  # the UNets (guidance)
                assert cfg.max_batch_size == factor * config.max_batch_size
            assert not cfg.optimization.cuda.graphs

        # dims and dtypes against the ONNX graph
        graph_io = onnx_io(graph)
        assert [t.name for t in cfg.input] == spec.input_names
        assert [t.name for t in cfg.output] == spec.output_names
        for tensor in (*cfg.input, *cfg.output):
            dtype, onnx_dims = graph_io[tensor.name]
            assert DataType.Name(tensor.data_type) == dtype, tensor.name
            dims = model_dims(tensor, cfg.max_batch_size)
            assert len(dims) == len(onnx_dims), (component, tensor.name, dims, onnx_dims)
            is_input = tensor.name in spec.input_names
            for got, want in zip(dims, onnx_dims):
                # a fixed ONNX dim must be met exactly; ONNX Runtime's inputs are dynamic exactly
                # where the graph is; an output the graph leaves symbolic, or an engine built for
                # one size, may be fixed
                strict = is_input and flavor != "tensorrt"
                ok = got == want if want is not None else (got == -1 if strict else got == -1 or got > 0)
                assert ok, (component, tensor.name, dims, onnx_dims)
        graph_inputs = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
        assert sorted(graph_inputs) == sorted(spec.input_names)

    # the BLS model
    bls_dir = repo.path / "blip_diffusion"
    cfg = parse_config(bls_dir / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.platform, cfg.max_batch_size) == ("blip_diffusion", "python", "", 0)
    (group,) = cfg.instance_group
    assert group.kind == KIND.KIND_CPU and group.count == 2
    inputs = {t.name: (DataType.Name(t.data_type), list(t.dims), t.optional) for t in cfg.input}
    assert inputs == {
        "prompt": ("TYPE_STRING", [1], False),
        "reference_image": ("TYPE_UINT8", [-1, -1, 3], False),
        "source_subject": ("TYPE_STRING", [1], False),
        "target_subject": ("TYPE_STRING", [1], False),
        "steps": ("TYPE_INT32", [1], False),
        "guidance_scale": ("TYPE_FP32", [1], False),
        "seed": ("TYPE_INT64", [1], False),
        "height": ("TYPE_INT32", [1], False),
        "width": ("TYPE_INT32", [1], False),
        "negative_prompt": ("TYPE_STRING", [1], True),
        "scheduler": ("TYPE_STRING", [1], True),
        "condition_image": ("TYPE_UINT8", [-1, -1, 3], True),
        "controlnet_conditioning_scale": ("TYPE_FP32", [1], True),
        "cache_interval": ("TYPE_INT32", [1], True),
        **({"original_subject": ("TYPE_STRING", [1], True),
            "image": ("TYPE_UINT8", [-1, -1, 3], True),
            "cross_replace_steps": ("TYPE_FP32", [1], True),
            "self_replace_steps": ("TYPE_FP32", [1], True),
            "blend_threshold": ("TYPE_FP32", [1], True),
            "local_blend": ("TYPE_BOOL", [1], True)} if editing else {}),
    }
    outputs = [(t.name, DataType.Name(t.data_type), list(t.dims)) for t in cfg.output]
    assert outputs == [("image", "TYPE_UINT8", [-1, -1, 3])] + ([("source_image", "TYPE_UINT8", [-1, -1, 3])] if editing else [])
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert json.loads(params["components"]) == {c: c for c in components}
    batch_sizes = json.loads(params["component_max_batch_sizes"])
    assert batch_sizes == {c: parse_config(repo.path / c / "config.pbtxt").max_batch_size for c in components}
    # static engines built for one guided prompt take the UNet's two rows: the BLS model pads fewer
    guided_unets = [c for c in components if getattr(package.specs[c].batch_axis, "name", None) == "unet_batch"]
    assert guided_unets and json.loads(params["component_min_rows"]) == (
        {c: 2 for c in guided_unets} if flavor == "tensorrt" else {})
    version_dir = bls_dir / "1"
    package_copy = version_dir / params["package_dir"]
    assert (package_copy / "pipeline.json").read_bytes() == (fixture.package / "pipeline.json").read_bytes()
    assert (package_copy / "tokenizer" / "tokenizer.json").is_file() and not (package_copy / "onnx").exists()
    assert (version_dir / params["code_dir"] / "blipdiffusion_trt" / "runtime" / "pipeline.py").is_file()
    assert not list((version_dir / "blipdiffusion_trt").rglob("export*")), "export code (torch) must not be copied"
    compile((version_dir / "model.py").read_text(), "model.py", "exec")


def test_queue_policy_and_progress_model(tiny, tmp_path):
    """The pipeline models' queue policy (issue 23.1) and the decoupled progress variant (23.4)."""
    repo = tr.write_triton_repository(tiny.package, tmp_path / "repo", "python-cpu", max_queue_size=3,
                                      queue_timeout_ms=1500, progress_model=True, instances=2)
    for name, decoupled in (("blip_diffusion", False), ("blip_diffusion_progress", True)):
        cfg = parse_config(repo.path / name / "config.pbtxt")
        policy = cfg.dynamic_batching.default_queue_policy
        assert cfg.max_batch_size == 0 and policy.max_queue_size == 3
        assert policy.default_timeout_microseconds == 1_500_000 and policy.allow_timeout_override
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert cfg.model_transaction_policy.decoupled == decoupled and cfg.instance_group[0].count == 2
        outputs = [t.name for t in cfg.output]
        assert outputs[-2:] == (["step", "steps"] if decoupled else ["image", "source_image"])
    params = {k: v.string_value for k, v in parse_config(repo.path / "blip_diffusion_progress" / "config.pbtxt").parameters.items()}
    version_dir = repo.path / "blip_diffusion_progress" / "1"
    assert params["progress"] == "true" and (version_dir / params["package_dir"] / "pipeline.json").is_file()
    assert (version_dir / params["code_dir"] / "blipdiffusion_trt" / "serving" / "triton" / "bls.py").is_file()
    # the defaults; no progress model unless asked
    repo = tr.write_triton_repository(tiny.package, tmp_path / "default", "python-cpu")
    policy = parse_config(repo.path / "blip_diffusion" / "config.pbtxt").dynamic_batching.default_queue_policy
    assert policy.max_queue_size == configs.DEFAULT_MAX_QUEUE_SIZE
    assert policy.default_timeout_microseconds == configs.DEFAULT_QUEUE_TIMEOUT_MS * 1000
    assert not (repo.path / "blip_diffusion_progress").exists()


def test_tensorrt_several_architectures(tiny, tmp_path):
    package = fake_plans(tiny.package, tmp_path / "pkg", ("sm_89-trt10.8", "sm_90-trt10.8", "sm_90-trt10.3", "sm_86-trt10.8"))
    (package / "engines" / "sm_86-trt10.8" / "vae_decoder.plan").unlink()  # incomplete: skipped
    repo = tr.write_triton_repository(package, tmp_path / "repo", "tensorrt")
    for component in generation_components(read_pipeline_config(package)):
        cfg = parse_config(repo.path / component / "config.pbtxt")
        assert dict(cfg.cc_model_filenames) == {"8.9": "model.sm_89.plan", "9.0": "model.sm_90.plan"}
        version_dir = repo.path / component / "1"
        assert (version_dir / "model.sm_89.plan").read_bytes() == f"plan sm_89-trt10.8 {component}".encode()
        # the newest TensorRT of an architecture wins
        assert (version_dir / "model.sm_90.plan").read_bytes() == f"plan sm_90-trt10.8 {component}".encode()
        assert not (version_dir / "model.plan").exists()


def test_tensorrt_dynamic_engines(tiny, tmp_path):
    package = fake_plans(tiny.package, tmp_path / "pkg", shapes="dynamic", height="16:32:48")
    config = read_pipeline_config(package)
    repo = tr.write_triton_repository(package, tmp_path / "repo", "tensorrt")
    unet = parse_config(repo.path / "unet_plain" / "config.pbtxt")
    assert unet.max_batch_size == 2 * config.max_batch_size and unet.HasField("dynamic_batching")
    assert list(unet.input[0].dims) == [config.latent_channels, -1, -1] and not unet.optimization.cuda.graphs
    qformer = parse_config(repo.path / "qformer" / "config.pbtxt")
    assert qformer.max_batch_size == config.max_batch_size
    # one batch size only (--batch 2): unbatched, with the batch in the dims
    package = fake_plans(tiny.package, tmp_path / "pkg2", shapes="dynamic", batch="2")
    repo = tr.write_triton_repository(package, tmp_path / "repo2", "tensorrt")
    qformer = parse_config(repo.path / "qformer" / "config.pbtxt")
    assert qformer.max_batch_size == 0 and list(qformer.input[0].dims)[:2] == [2, 3]


def test_tensorrt_records(tiny, tmp_path, caplog):
    # no engines.json: the declared ranges
    package = fake_plans(tiny.package, tmp_path / "pkg", shapes=None)
    repo = tr.write_triton_repository(package, tmp_path / "repo", "tensorrt")
    assert parse_config(repo.path / "unet_plain" / "config.pbtxt").max_batch_size == 8
    assert "no engines.json records unet_plain" in caplog.text
    # two architectures built for different shapes cannot share a config
    package = fake_plans(tiny.package, tmp_path / "pkg2", ("sm_89-trt10.8",))
    other = fake_plans(tiny.package, tmp_path / "other", ("sm_90-trt10.8",), height="48")
    shutil.copytree(other / "engines" / "sm_90-trt10.8", package / "engines" / "sm_90-trt10.8")
    with pytest.raises(PackageError, match="were built for different shapes"):
        tr.write_triton_repository(package, tmp_path / "repo2", "tensorrt")
    # a record whose profile does not match its options
    record_path = package / "engines" / "sm_90-trt10.8" / "engines.json"
    shutil.rmtree(package / "engines" / "sm_89-trt10.8")
    record = json.loads(record_path.read_text())
    record["components"]["unet_plain"]["options"]["height"] = "32"
    record_path.write_text(json.dumps(record))
    with pytest.raises(PackageError, match="recorded profile of unet_plain does not match"):
        tr.write_triton_repository(package, tmp_path / "repo3", "tensorrt")
    assert not (tmp_path / "repo2").exists() and not (tmp_path / "repo3").exists()


def test_tensorrt_without_plans(tiny, tmp_path):
    with pytest.raises(PackageError, match="run blipdiffusion-trt build first") as error:
        tr.write_triton_repository(tiny.package, tmp_path / "repo", "tensorrt")
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_cuda_graphs_only_for_static_shapes():
    batch = Axis("batch", 1, 1, 4)
    static = ComponentSpec("static", inputs=(TensorSpec("x", "float32", (batch, 3, 8)),),
                           outputs=(TensorSpec("y", "float32", (batch, 3)),))
    dynamic = ComponentSpec("dynamic", inputs=(TensorSpec("x", "float32", (batch, Axis("n", 1, 2, 9))),),
                            outputs=(TensorSpec("y", "float32", (batch, 3)),))
    config = PipelineConfig.from_dict(json.loads(json.dumps({
        "ctx_begin_pos": 2, "image_size": [8, 8], "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_resample": 3,
        "num_query_tokens": 2, "qformer_hidden_size": 4, "qformer_max_text_length": 8, "text_max_length": 8,
        "text_hidden_size": 4, "latent_channels": 4, "latent_scale_factor": 2, "unet_size_multiple": 2,
        "vae_scaling_factor": 0.18, "unet_block_out_channels": [4], "unet_layers_per_block": 1,
        "default_height": 8, "default_width": 8, "has_controlnet": False,
    })))
    texts = {}
    for spec in (static, dynamic):
        text, mbs = configs.component_config(spec, config, name=spec.name, flavor="tensorrt", max_batch_size=4, instances=1)
        texts[spec.name] = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert mbs == 4
    assert texts["static"].optimization.cuda.graphs and not texts["dynamic"].optimization.cuda.graphs
    assert list(texts["static"].input[0].dims) == [3, 8] and list(texts["dynamic"].input[0].dims) == [-1]


def test_max_batch_size_option(tiny, tmp_path):
    repo = tr.write_triton_repository(tiny.package, tmp_path / "two", "onnxruntime", max_batch_size=2)
    assert parse_config(repo.path / "unet_plain" / "config.pbtxt").max_batch_size == 4
    assert parse_config(repo.path / "qformer" / "config.pbtxt").max_batch_size == 2
    repo = tr.write_triton_repository(tiny.package, tmp_path / "off", "onnxruntime", max_batch_size=0)
    for component in generation_components(read_pipeline_config(tiny.package)):
        cfg = parse_config(repo.path / component / "config.pbtxt")
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    timestep = [t for t in parse_config(repo.path / "unet_plain" / "config.pbtxt").input if t.name == "timestep"][0]
    assert list(timestep.dims) == [-1] and not timestep.HasField("reshape")
    timestep = [t for t in parse_config(tmp_path / "two" / "unet_plain" / "config.pbtxt").input if t.name == "timestep"][0]
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") and list(timestep.reshape.shape) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"flavor": "tensorrt-llm"}, "flavor must be one of python-cpu, onnxruntime, tensorrt"),
    ({"max_batch_size": 5}, "max batch size must be an integer in [0, 4], got 5"),
    ({"max_batch_size": -1}, "max batch size must be an integer in [0, 4], got -1"),
    ({"instances": 0}, "instances must be an integer in [1, 64], got 0"),
    ({"name_prefix": "a b/"}, "name prefix must be"),
    ({"max_image_pixels": 0}, "max_image_pixels must be an integer >= 1"),
    ({"max_queue_size": 0}, "max_queue_size must be an integer in [1, 1048576], got 0"),
    ({"queue_timeout_ms": -1}, "queue_timeout_ms must be an integer in [0, 86400000], got -1"),
])
def test_bad_arguments(tiny, tmp_path, kwargs, message):
    with pytest.raises(InputError) as error:
        tr.write_triton_repository(tiny.package, tmp_path / "repo", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_output_directory_handling(tiny, tmp_path):
    with pytest.raises(PackageError, match="does not exist"):
        tr.write_triton_repository(tmp_path / "nope", tmp_path / "repo")
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="exists and is not empty"):
        tr.write_triton_repository(tiny.package, out)
    assert (out / "keep.txt").exists()
    tr.write_triton_repository(tiny.package, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "blip_diffusion" / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        tr.write_triton_repository(tiny.package, tmp_path / "file", force=True)


def test_cli(tiny, tmp_path, capsys):
    from blipdiffusion_trt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["triton", str(tiny.package), "--out", str(tmp_path / "repo"), "--flavor", "onnxruntime",
                              "--max-batch-size", "1", "--instances", "3", "--no-verify"])
    assert args.run(args) == 0
    assert "unet_plain" in capsys.readouterr().out
    cfg = parse_config(tmp_path / "repo" / "unet_plain" / "config.pbtxt")
    assert cfg.max_batch_size == 2 and cfg.instance_group[0].count == 3
    args = parser.parse_args(["triton", str(tiny.package), "--out", str(tmp_path / "other"), "--flavor", "gpu"])
    with pytest.raises(InputError, match="flavor must be one of"):
        args.run(args)


# --------------------------------------------------------------------------------------------
# A real Triton server (python-cpu flavor)
# --------------------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 64 * 64
LOAD_TEST_HANG_SECONDS = 600
REFERENCE = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)
CONDITION = np.random.default_rng(8).integers(0, 256, (24, 28, 3), dtype=np.uint8)
REAL_IMAGE = np.random.default_rng(9).integers(0, 256, (30, 44, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def triton_server(tiny, tiny_cn, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    repos = [
        tr.write_triton_repository(tiny.package, tmp / "repo-tiny", "python-cpu", max_image_pixels=MAX_IMAGE_PIXELS).path,
        tr.write_triton_repository(tiny_cn.package, tmp / "repo-cn", "python-cpu", name_prefix="cn_",
                                   max_image_pixels=MAX_IMAGE_PIXELS).path,
    ]
    server = start_server(repos, tmp)
    yield server
    stopped = stop_server(server)
    # a clean shutdown: prompt, and the python backend removed every shared-memory region itself
    assert not stopped["killed"] and not stopped["regions_left"], stopped


_runtimes: dict[str, object] = {}
_references: dict[tuple, np.ndarray] = {}


def reference_image(fixture, **kwargs) -> np.ndarray:
    """The Python API's image for the same request, quantised as the BLS model does."""
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    key = (fixture.name, tuple(sorted((k, v if not isinstance(v, np.ndarray) else v.tobytes()) for k, v in kwargs.items())))
    if key not in _references:
        if fixture.name not in _runtimes:
            _runtimes[fixture.name] = BlipDiffusionRuntime.from_package(fixture.package)
        runtime = _runtimes[fixture.name]
        args = dict(kwargs)
        result = runtime(args.pop("prompt"), args.pop("reference_image"), args.pop("source_subject"),
                         args.pop("target_subject"), output_type="np", **args)
        _references[key] = (result.images[0] * 255).round().astype(np.uint8)
    return _references[key]


def generation(fixture, **overrides) -> dict:
    """Python API arguments of a small generation."""
    args = dict(prompt="a photo in the snow", reference_image=REFERENCE, source_subject="dog", target_subject="dog",
                num_inference_steps=2, guidance_scale=7.5, seed=0, height=32, width=32)
    if fixture.controlnet:
        args["condition_image"] = CONDITION
    args.update(overrides)
    return args


def triton_inputs(protocol: str, args: dict, *, drop: tuple[str, ...] = (), raw: dict | None = None) -> list:
    """Triton inputs of the BLS model for Python API arguments (``raw``: arrays sent as they are)."""
    module = __import__(f"tritonclient.{protocol}", fromlist=["InferInput"])
    names = {"num_inference_steps": "steps", "neg_prompt": "negative_prompt", "source_subject": "source_subject"}
    arrays = {}
    for key, value in args.items():
        name = names.get(key, key)
        if name in ("prompt", "source_subject", "target_subject", "negative_prompt", "scheduler", "original_subject"):
            arrays[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        elif name in ("reference_image", "condition_image", "image"):
            arrays[name] = value
        elif name == "local_blend":
            arrays[name] = np.array([value], np.bool_)
        elif name in ("steps", "height", "width"):
            arrays[name] = np.array([value], np.int32)
        elif name == "seed":
            arrays[name] = np.array([value], np.int64)
        else:
            arrays[name] = np.array([value], np.float32)
    arrays.update(raw or {})
    return infer_inputs(module, {name: array for name, array in arrays.items() if name not in drop})


def infer(client, protocol: str, model: str, inputs: list, outputs: tuple[str, ...] = ("image",)):
    """The image (or, for several ``outputs``, each of them)."""
    module = __import__(f"tritonclient.{protocol}", fromlist=["InferRequestedOutput"])
    result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(name) for name in outputs])
    arrays = [result.as_numpy(name) for name in outputs]
    return arrays[0] if len(outputs) == 1 else arrays


CASES = [
    {},
    {"seed": 5, "guidance_scale": 1.0, "height": 24, "width": 40, "scheduler": "ddim"},
    {"seed": 3, "neg_prompt": "blurry", "scheduler": "euler", "target_subject": "cat"},
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("which", ["tiny", "tiny_cn"])
def test_server_matches_python_api(triton_server, request, which, protocol):
    fixture = request.getfixturevalue(which)
    model = "cn_blip_diffusion" if fixture.controlnet else "blip_diffusion"
    client = triton_server.client(protocol)
    assert client.is_model_ready(model)
    cases = CASES + ([{"seed": 2, "controlnet_conditioning_scale": 0.5}] if fixture.controlnet else [])
    for case in cases:
        args = generation(fixture, **case)
        image = infer(client, protocol, model, triton_inputs(protocol, args))
        expected = reference_image(fixture, **args)
        assert image.dtype == np.uint8 and image.shape == (args["height"], args["width"], 3)
        np.testing.assert_array_equal(image, expected, err_msg=f"{which} {protocol} {case}")
    # different seeds really give different images
    assert not np.array_equal(reference_image(fixture, **generation(fixture)), reference_image(fixture, **generation(fixture, seed=5)))


def test_server_under_load(triton_server, tiny, tiny_cn):
    clients, requests_each, seeds = 8, 10, (0, 1, 2)
    fixtures = (tiny, tiny_cn)
    expected = {(f.name, s): reference_image(f, **generation(f, seed=s)) for f in fixtures for s in seeds}
    connections = [triton_server.client("http" if i % 2 == 0 else "grpc") for i in range(clients)]

    def worker(index: int) -> list[tuple[str, int, bool]]:
        protocol = "http" if index % 2 == 0 else "grpc"
        client = connections[index]
        results = []
        for k in range(requests_each):
            fixture = fixtures[(index + k) % 2]
            seed = seeds[(index * requests_each + k) % len(seeds)]
            model = "cn_blip_diffusion" if fixture.controlnet else "blip_diffusion"
            image = infer(client, protocol, model, triton_inputs(protocol, generation(fixture, seed=seed)))
            results.append((fixture.name, seed, np.array_equal(image, expected[(fixture.name, seed)])))
        return results

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, i) for i in range(clients)]
        # A guard against a hung server, not a speed requirement (speed is the benchmark's job):
        # generous on any CPU, so only a request that never returns trips it.
        results = [r for f in futures for r in f.result(timeout=LOAD_TEST_HANG_SECONDS)]
    assert len(results) == clients * requests_each
    wrong = [r for r in results if not r[2]]
    assert not wrong, f"{len(wrong)} of {len(results)} images differ from the Python API's: {wrong[:5]}"


BAD_REQUESTS = [
    # (name, args overrides, dropped inputs, raw arrays, expected message part)
    ("missing input", {}, ("seed",), None, "missing required input(s) ['seed']"),
    ("wrong dtype", {}, (), {"steps": np.array([2.0], np.float32)}, "data-type is 'FP32', but model 'blip_diffusion' expects 'INT32'"),
    ("oversized image", {}, (), {"reference_image": np.zeros((80, 60, 3), np.uint8)},
     f"reference_image: the image array of shape (80, 60, 3) is 60x80 = 4800 pixels, more than the limit of {MAX_IMAGE_PIXELS} pixels"),
    ("steps too small", {"num_inference_steps": 0}, (), None, "num_inference_steps must be an integer in [1, 1000], got 0"),
    ("steps too large", {"num_inference_steps": 1001}, (), None, "num_inference_steps must be an integer in [1, 1000], got 1001"),
    ("unknown scheduler", {"scheduler": "karras"}, (), None, "unknown scheduler 'karras'; allowed: pndm, ddim, euler, dpmpp-2m"),
    ("bad height", {"height": 30}, (), None, "height must be a multiple of 4"),
    ("negative seed", {"seed": -3}, (), None, "seed must be an integer in [0, 9223372036854775807], got -3"),
    ("empty prompt", {"prompt": "  "}, (), None, "prompt must be a non-empty string"),
    ("bad utf-8", {}, (), {"prompt": np.array([b"\xff\xfe"], dtype=np.object_)}, "prompt: not valid UTF-8"),
    ("two prompts", {}, (), {"prompt": np.array([b"a", b"b"], dtype=np.object_)}, "unexpected shape for input 'prompt'"),
    ("no controlnet", {"condition_image": CONDITION}, (), None, "this package has no ControlNet"),
    ("rgba image", {}, (), {"reference_image": np.zeros((8, 8, 4), np.uint8)}, "unexpected shape for input 'reference_image'"),
    # bounded work, one line, INVALID_ARGUMENT
    ("1 MB prompt", {"prompt": "x" * 1_000_000}, (), None, "prompt has 1000000 characters, more than the limit of 2000"),
    ("subject word too long", {"source_subject": "dog " * 50}, (), None, "52 Q-Former tokens, more than the 48"),
    ("guidance 1e38", {"guidance_scale": 1e38}, (), None, "guidance_scale must be a finite number in [0, 100]"),
    ("subject not utf-8", {}, (), {"source_subject": np.array([b"d\xffg"], dtype=np.object_)}, "source_subject: not valid UTF-8"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_bad_requests(triton_server, tiny, tiny_cn, protocol):
    from tritonclient.utils import InferenceServerException

    client = triton_server.client(protocol)
    for name, overrides, drop, raw, message in BAD_REQUESTS:
        inputs = triton_inputs(protocol, generation(tiny, **overrides), drop=drop, raw=raw)
        with pytest.raises(InferenceServerException) as error:
            infer(client, protocol, "blip_diffusion", inputs)
        text = error.value.message()
        assert message in text, f"{name}: {text}"
        assert "\n" not in text and "Traceback" not in text, f"{name}: {text}"
        if "Q-Former" in message or "characters" in message or "guidance" in message or "UTF-8" in message:
            status = error.value.status()
            assert status in ("400", "StatusCode.INVALID_ARGUMENT"), f"{name}: {status}"
    # the ControlNet package without its condition image
    with pytest.raises(InferenceServerException, match="pass condition_image or canny_image"):
        infer(client, protocol, "cn_blip_diffusion", triton_inputs(protocol, generation(tiny), drop=("condition_image",)))
    # still serving, and still right
    assert client.is_server_live() and client.is_model_ready("blip_diffusion")
    for fixture in (tiny, tiny_cn):
        model = "cn_blip_diffusion" if fixture.controlnet else "blip_diffusion"
        args = generation(fixture, seed=11)
        np.testing.assert_array_equal(infer(client, protocol, model, triton_inputs(protocol, args)),
                                      reference_image(fixture, **args))
    assert "not healthy" not in triton_server.log_tail(200_000)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_component_models_refuse_undeclared_inputs(triton_server, tiny, protocol):
    """Issue 20.1 on the real server: the request that once grew a vae_decoder stub to 13.7 GB
    (latents [1, 4, 256, 256]) is refused before any work, in one line, INVALID_ARG; the stub's
    memory stays within a bound far below that work (64 MB), and the pipeline still serves."""
    from tritonclient.utils import InferenceServerException

    module = __import__(f"tritonclient.{protocol}", fromlist=["InferInput"])
    client = triton_server.client(protocol)
    pid = stub_pid(triton_server, "vae_decoder")
    before = _rss(pid)
    latents = module.InferInput("latents", [1, 4, 256, 256], "FP32")
    latents.set_data_from_numpy(np.zeros((1, 4, 256, 256), np.float32))
    with pytest.raises(InferenceServerException) as error:
        client.infer("vae_decoder", [latents])
    text = error.value.message()
    assert "vae_decoder: input latents: latent_height=256 outside" in text and "\n" not in text, text
    assert str(error.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")
    assert _rss(pid) - before < 64 << 20
    args = generation(tiny, seed=12)
    np.testing.assert_array_equal(infer(client, protocol, "blip_diffusion", triton_inputs(protocol, args)),
                                  reference_image(tiny, **args))


# --------------------------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------------------------


def reference_edit(fixture, args: dict) -> tuple[np.ndarray, np.ndarray]:
    """The Python API's edit (edited, source), quantised as the BLS model does."""
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    if fixture.name not in _runtimes:
        _runtimes[fixture.name] = BlipDiffusionRuntime.from_package(fixture.package)
    args = dict(args)
    if args.pop("local_blend", True) is False:
        args["blend_threshold"] = None
    out = _runtimes[fixture.name].edit(args.pop("prompt"), args.pop("reference_image"), args.pop("source_subject"),
                                       args.pop("target_subject"), args.pop("original_subject"), output_type="np", **args)
    return tuple((image * 255).round().astype(np.uint8) for image in (out.edited, out.source))


def test_server_edits(triton_server, tiny):
    """original_subject makes a request an edit: of the generated image (http) and of a real UINT8
    image (grpc); both images equal the Python API's. Bad edits are INVALID_ARGUMENT in one line."""
    from tritonclient.utils import InferenceServerException

    cases = [("http", {"original_subject": "cat", "local_blend": False, "cross_replace_steps": 0.5}),
             ("grpc", {"original_subject": "cat", "image": REAL_IMAGE, "seed": 2, "height": 24, "width": 40})]
    for protocol, case in cases:
        client = triton_server.client(protocol)
        args = generation(tiny, **case)
        edited, source = infer(client, protocol, "blip_diffusion", triton_inputs(protocol, args), ("image", "source_image"))
        expected = reference_edit(tiny, args)
        np.testing.assert_array_equal(edited, expected[0], err_msg=f"{protocol} {case}")
        np.testing.assert_array_equal(source, expected[1], err_msg=f"{protocol} {case}")
    bad = [({"original_subject": "cat", "blend_threshold": 2.0}, "blend_threshold must be a number in [0, 1)"),
           ({"original_subject": "cat", "image": REAL_IMAGE, "scheduler": "pndm"}, "must be edited with the ddim scheduler"),
           ({"original_subject": " "}, "original_subject must be a non-empty string")]
    for protocol, status in (("http", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")):
        client = triton_server.client(protocol)
        for overrides, message in bad:
            with pytest.raises(InferenceServerException) as error:
                infer(client, protocol, "blip_diffusion", triton_inputs(protocol, generation(tiny, **overrides)))
            text = error.value.message()
            assert message in text and "\n" not in text, (overrides, text)
            assert str(error.value.status()) == status, (overrides, error.value.status())
    # a repository of a package without the editing graphs declares no edit inputs
    with pytest.raises(InferenceServerException, match="original_subject"):
        infer(triton_server.client("http"), "http", "cn_blip_diffusion",
              triton_inputs("http", generation(tiny, condition_image=CONDITION, original_subject="cat")))


# --------------------------------------------------------------------------------------------
# Liveness: a dead python-backend stub
# --------------------------------------------------------------------------------------------


def test_liveness_probe_sees_a_dead_stub(tiny, tmp_path_factory):
    """After ``kill -9`` of a stub, Triton still reports the server and every model ready (so the
    docs say to probe liveness with a real request); ``blipdiffusion-trt triton-probe``, one
    tiny generation through every component, fails in one line. The server then stops within
    :data:`STOP_SECONDS` of SIGTERM (or is killed), and none of its shared-memory regions is left."""
    tmp = tmp_path_factory.mktemp("triton-liveness")
    repo = tr.write_triton_repository(tiny.package, tmp / "repo", "python-cpu").path
    server = start_server([repo], tmp)
    try:
        probe = run_cli("triton-probe", "--url", server.http_url, "--timeout", "120", timeout=300)
        assert probe.returncode == 0 and probe.stdout.startswith("ok: blip_diffusion made an image"), probe
        assert shm_regions(server), "the python backend did not use this server's shared-memory prefix"
        # a component's stub (issue 20.1: vae_decoder, the one an oversized request once got
        # OOM-killed), then the pipeline's own; each failed probe waits for the dead stub, so two
        killed = []
        for model in ("vae_decoder", "blip_diffusion"):
            pid = stub_pid(server, model)
            killed.append(model)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as response:
                assert response.status == 200  # what Triton 2.51 reports: the reason for the probe
            failed = run_cli("triton-probe", "--url", server.http_url, "--timeout", "120", timeout=300)
            assert failed.returncode == 1, failed
            lines = failed.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("unhealthy: ") and "not healthy" in lines[0], failed.stderr
            named = [m for m in killed if m in lines[0]]
            assert named, (model, lines[0])
            if len(killed) == 1:
                assert named == [model], lines[0]
    finally:
        stopped = stop_server(server)
    assert not shm_regions(server), "shared-memory regions left behind"
    assert not stopped["killed"], stopped
