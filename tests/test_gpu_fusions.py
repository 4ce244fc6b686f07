"""fp16 graphs with ONNX Runtime's CUDA fusions (``onnx/fp16-cuda``): what can be checked without a GPU.

These graphs hold com.microsoft ops with CUDA kernels only (NhwcConv, GroupNorm, SkipGroupNorm,
BiasSplitGelu, BiasAdd, packed-QKV MultiHeadAttention), so ONNX Runtime CPU cannot run them and
their numerics are checked on a GPU (``bench/gpu/validate.py``). Here: they are valid ONNX (onnx's
full check), every attention / GroupNorm / convolution / GEGLU of the fp32 graph was fused (counted
against the fp32 graph, not against literals), the weights are fp16, the inputs and outputs are
the declared ones, the package records them with their sha256, and ONNX Runtime CPU refuses them.

The optimizer is run with NumPy's "array to scalar" deprecation turned into an error, which is what
NumPy 2 (the GPU machine's) makes of it: the tests' NumPy is 1.x.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="export tests need the export extra (pip install .[export])")
onnx = pytest.importorskip("onnx", reason="export tests need onnx (the export extra)")
ort = pytest.importorskip("onnxruntime", reason="the optimizer is part of onnxruntime")

from onnx import numpy_helper  # noqa: E402

from blipdiffusion_trt.components import CONTROLNET_STEP_CACHE, PLAIN_STEP_CACHE, declare_components  # noqa: E402
from blipdiffusion_trt.errors import PackageError, ValidationError  # noqa: E402
from blipdiffusion_trt.package import ModelPackage, sha256_file  # noqa: E402
from blipdiffusion_trt.package.layout import CUDA_FUSED as GPU_FUSED_DIR, MANIFEST as MANIFEST_NAME  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # NumPy 2 raises where NumPy 1.25+ warns: the optimizer must not rely on it
    pytest.mark.filterwarnings("error:Conversion of an array with ndim > 0:DeprecationWarning"),  # NUMPY2_WARNING
]

ONNX_DTYPES = {1: "float32", 7: "int64"}


NUMPY2_WARNING = "Conversion of an array with ndim > 0"


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": f"error:{NUMPY2_WARNING}:DeprecationWarning"}
    return subprocess.run([sys.executable, "-m", "blipdiffusion_trt.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900, env=env)


@pytest.fixture(scope="module")
def cuda_package(tiny_cn, tmp_path_factory) -> Path:
    """The ControlNet fixture exported again with ``--gpu-fusions`` (fp32 only, no CPU fusions: faster;
    no editing graphs, as the fixture), by two worker processes (``--jobs 2``: the fusions then run
    in the workers)."""
    out = tmp_path_factory.mktemp("gpu-fusions") / "pkg"
    result = _cli("export", tiny_cn.checkpoint, "--out", out, "--no-validate", "--no-cpu-fusions", "--no-editing",
                  "--gpu-fusions", "--jobs", "2", cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fp16-cuda" in result.stdout
    return out


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _fused_components(package: Path) -> list[str]:
    return [name for name, spec in ModelPackage.open(package, verify=False).specs.items() if spec.gpu_fusion]


def test_export_writes_the_declared_fused_graphs_with_their_digests(cuda_package):
    manifest = json.loads((cuda_package / MANIFEST_NAME).read_text())
    declared = _fused_components(cuda_package)
    # the denoisers and the VAE decoder, and fast mode's UNet steps (the shallow ControlNet is a few convolutions)
    step_unets = {g for graphs in (PLAIN_STEP_CACHE, CONTROLNET_STEP_CACHE) for g in (graphs.full, graphs.shallow)}
    assert set(declared) == {"unet", "unet_plain", "controlnet", "vae_decoder"} | step_unets
    assert set(manifest["gpu_fused"]) == set(declared)
    listed = sorted(f for f in manifest["files"] if f.startswith(f"onnx/{GPU_FUSED_DIR}/"))
    assert listed == sorted(p.relative_to(cuda_package).as_posix() for p in (cuda_package / "onnx" / GPU_FUSED_DIR).iterdir())
    assert listed == sorted(f"onnx/{GPU_FUSED_DIR}/{n}.onnx" for n in declared)
    assert all(sha256_file(cuda_package / f) == manifest["files"][f] for f in listed)
    package = ModelPackage.open(cuda_package)
    for name in package.specs:
        assert package.has_cuda_fused(name) == (name in declared), name
        if name in declared:  # checked against its sha256 when handed out
            assert package.onnx_path(name, "fp16", cuda_fused=True) == cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx"
        else:
            with pytest.raises(PackageError, match="no CUDA-fused fp16 graph"):
                package.onnx_path(name, "fp16", cuda_fused=True)
    # recorded fused-op counts are those of the files
    for name, entry in manifest["gpu_fused"].items():
        ops = _ops(cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx")
        assert entry["fused_ops"] == {op: ops[op] for op in entry["fused_ops"]}, name
        assert entry["precision"] == "fp16"


def test_every_attention_groupnorm_conv_and_geglu_is_fused(cuda_package):
    """Counted against the fp32 graph the fused one was made from."""
    for name in _fused_components(cuda_package):
        plain = _ops(cuda_package / "onnx" / "fp32" / f"{name}.onnx")
        fused = _ops(cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx")
        # torch exports GroupNorm as InstanceNormalization between reshapes
        assert plain["InstanceNormalization"] > 0 and plain["Conv"] > 0, name
        assert fused["NhwcConv"] == plain["Conv"] and fused["Conv"] == 0, (name, fused)
        if name == "vae_decoder":
            # its one attention block (diffusers' SDPA pattern) is not matched by the optimizer's VAE
            # attention fusion; the GroupNorm feeding that attention stays an InstanceNormalization
            assert fused["GroupNorm"] + fused["SkipGroupNorm"] == plain["InstanceNormalization"] - plain["Softmax"]
            continue
        assert plain["Softmax"] > 0 and plain["Erf"] > 0, name
        assert fused["MultiHeadAttention"] == plain["Softmax"] and fused["Softmax"] == 0, (name, fused)
        assert fused["GroupNorm"] + fused["SkipGroupNorm"] == plain["InstanceNormalization"], (name, fused)
        assert fused["InstanceNormalization"] == 0
        # GEGLU: one Erf (exact gelu) per transformer block, one BiasSplitGelu each
        assert fused["BiasSplitGelu"] == plain["Erf"] and fused["Erf"] == 0, (name, fused)
        # one self- and one cross-attention per transformer block; BiasAdd: each block's residual
        assert fused["MultiHeadAttention"] == 2 * fused["BiasSplitGelu"]
        assert fused["BiasAdd"] == fused["BiasSplitGelu"]


def test_packed_qkv_for_self_attention_and_packed_kv_for_cross_attention(cuda_package):
    model = onnx.load(str(cuda_package / "onnx" / GPU_FUSED_DIR / "unet_plain.onnx"), load_external_data=False)
    inputs = [len([i for i in node.input if i]) for node in model.graph.node if node.op_type == "MultiHeadAttention"]
    # self-attention: one packed QKV input; cross-attention: query + packed KV
    assert sorted(collections.Counter(inputs).items()) == [(1, len(inputs) // 2), (2, len(inputs) // 2)]


def test_fused_graphs_are_valid_fp16_with_the_declared_io(cuda_package):
    specs = ModelPackage.open(cuda_package, verify=False).specs
    for name in _fused_components(cuda_package):
        path = cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {o.domain for o in model.opset_import} >= {"", "com.microsoft"}
        spec = specs[name]
        for values, declared in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            assert [v.name for v in values] == [t.name for t in declared], name
            for value, tensor in zip(values, declared):
                tensor_type = value.type.tensor_type
                assert ONNX_DTYPES.get(tensor_type.elem_type) == tensor.dtype, (name, value.name)
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
                assert dims == [d if isinstance(d, int) else d.name for d in tensor.shape], (name, value.name, dims)
        # fp16 weights; what stays fp32 is what the fp16 kernels take in fp32 (GroupNorm gamma/beta)
        sizes = collections.Counter()
        for init in model.graph.initializer:
            sizes[init.data_type] += numpy_helper.to_array(init).size
        assert sizes[10] > 0 and sizes[1] < 0.01 * (sizes[1] + sizes[10]), (name, dict(sizes))
        assert all(np.isfinite(numpy_helper.to_array(i)).all() for i in model.graph.initializer if i.data_type in (1, 10))


def test_onnx_runtime_cpu_refuses_the_cuda_fused_graphs(cuda_package):
    """What is true on the CPU: no kernels for the CUDA contrib ops. The cpu backend never loads them."""
    for name in _fused_components(cuda_package):
        path = cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx"
        with pytest.raises(Exception, match="NhwcConv|GroupNorm|BiasSplitGelu|MultiHeadAttention"):
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fuse_target_cuda_adds_them_to_an_existing_package(odd, tmp_path):
    """The other architecture (latent factor 4, three levels), through `fuse --target cuda`."""
    package = tmp_path / "pkg"
    shutil.copytree(odd.package, package)
    before = json.loads((package / MANIFEST_NAME).read_text())
    result = _cli("fuse", package, "--target", "cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((package / MANIFEST_NAME).read_text())
    added = {f for f in manifest["files"] if f not in before["files"]}
    assert added == {f"onnx/{GPU_FUSED_DIR}/{n}.onnx" for n in _fused_components(package)}
    assert {k: v for k, v in manifest["files"].items() if k in before["files"]} == before["files"]
    assert manifest["cpu_fused"] == before["cpu_fused"]
    ModelPackage.open(package)  # every digest still holds
    assert not list((package / "onnx").glob(".*partial*")), "scratch directory left behind"
    # done again: replaced, not duplicated
    assert _cli("fuse", package, "--target", "cuda", cwd=tmp_path).returncode == 0
    assert json.loads((package / MANIFEST_NAME).read_text())["files"].keys() == manifest["files"].keys()


def test_an_altered_fused_graph_is_refused(cuda_package, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(cuda_package, package)
    path = package / "onnx" / GPU_FUSED_DIR / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its sha256"):
        ModelPackage.open(package).onnx_path("unet", "fp16", cuda_fused=True)


def test_the_checks_catch_a_graph_that_differs_from_the_declaration(cuda_package, tmp_path):
    from blipdiffusion_trt.export.gpu_fusions import check_fused_graph

    specs = declare_components(ModelPackage.open(cuda_package, verify=False).config)
    source = cuda_package / "onnx" / GPU_FUSED_DIR / "controlnet.onnx"
    assert check_fused_graph(specs["controlnet"], source)["io_as_declared"]
    renamed, retyped = onnx.load(str(source)), onnx.load(str(source))
    old = renamed.graph.output[0].name
    renamed.graph.output[0].name = "residual_0"
    for node in renamed.graph.node:  # a valid graph, just not the declared one
        node.output[:] = ["residual_0" if o == old else o for o in node.output]
    retyped.graph.input[0].type.tensor_type.elem_type = 10
    for model, match in ((renamed, "outputs"), (retyped, "sample is float16, declared float32")):
        path = tmp_path / "bad.onnx"
        onnx.save(model, str(path))
        with pytest.raises(ValidationError, match=match):
            check_fused_graph(specs["controlnet"], path)


def test_a_graph_without_the_unet_patterns_is_refused(cuda_package, tmp_path):
    """The required-fusion check can fail: the Q-Former has no GroupNorm or convolution to fuse."""
    from blipdiffusion_trt.export.gpu_fusions import fuse_for_cuda

    with pytest.raises(ValidationError, match="produced no"):
        fuse_for_cuda(cuda_package / "onnx" / "fp32" / "qformer.onnx", tmp_path / "qformer.onnx", "unet")
    assert not (tmp_path / "qformer.onnx").exists()


def test_parallel_export_writes_the_same_graphs_as_the_sequential_one(cuda_package, tiny_cn):
    """``--jobs 2`` (worker processes) against the fixture's one-process export of the same checkpoint."""
    parallel = json.loads((cuda_package / MANIFEST_NAME).read_text())["files"]
    sequential = json.loads((tiny_cn.package / MANIFEST_NAME).read_text())["files"]
    graphs = [f for f in sequential if f.startswith("onnx/fp32/")]
    assert graphs and {f: parallel[f] for f in graphs} == {f: sequential[f] for f in graphs}
    assert parallel["pipeline.json"] == sequential["pipeline.json"]


def test_cli_errors_are_one_line(tiny_cn, tmp_path):
    result = _cli("export", tiny_cn.checkpoint, "--out", tmp_path / "pkg", "--jobs", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --jobs must be an integer >= 1, got 0"]
    assert not (tmp_path / "pkg").exists()
    result = _cli("fuse", tmp_path / "missing", "--target", "cuda", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr


def test_the_cuda_backend_loads_the_cuda_fused_graphs_where_the_package_has_them(cuda_package, fake_ort_gpu):
    """On the onnxruntime-gpu stand-in (the sessions are created, not run: their contrib ops have CUDA
    kernels only). The fused graphs are fp16: asked for fp32, the plain graphs load."""
    from blipdiffusion_trt.runtime.backends import get_backend

    package = ModelPackage.open(cuda_package)
    cuda, cpu = get_backend("cuda"), get_backend("cpu")
    assert cuda.capabilities.cuda_fused_graphs and not cpu.capabilities.cuda_fused_graphs
    for name in _fused_components(cuda_package):
        engine = cuda.make_engine(package, name, "fp16")
        assert engine.path == cuda_package / "onnx" / GPU_FUSED_DIR / f"{name}.onnx"
        assert cuda.make_engine(package, name, "fp32").path == cuda_package / "onnx" / "fp32" / f"{name}.onnx"
    # without the fused graphs (or with cuda_fused=False) fp16 needs the package's plain fp16 graphs
    with pytest.raises(PackageError, match="no fp16 graphs"):
        cuda.make_engine(package, "unet_plain", "fp16", cuda.options(cuda_fused=False))
