"""fp16 graphs with ONNX Runtime's CUDA fusions (``onnx/fp16-cuda/``), from the plain fp32 graphs.

ONNX Runtime's CUDA provider runs Stable Diffusion fast only on graphs rewritten by the
``onnxruntime.transformers`` optimizer for the GPU, as ONNX Runtime's own Stable Diffusion demo
does (``models/stable_diffusion/optimize_pipeline.py``, ``ort_optimizer.py``): fused multi-head
attention with packed QKV / KV (flash and memory-efficient attention kernels), GroupNorm and
SkipGroupNorm (channels-last), NHWC convolutions, BiasSplitGelu, BiasAdd and SkipLayerNorm. The
optimizer's defaults for the ``unet`` and ``vae`` model types are exactly that set; the fusions run on
the fp32 graph (their patterns are fp32 ones) and the result is converted to fp16 with fp32 inputs
and outputs, so the graphs keep the components' declared I/O.

These graphs hold ``com.microsoft`` ops with CUDA kernels only: ONNX Runtime CPU cannot load them,
TensorRT does not read them. Here (no GPU) they are checked for what can be checked without running
them: valid ONNX, the expected fused ops present, inputs and outputs as declared. Their numerics
are checked on a GPU by ``bench/gpu/validate.py`` (fp16 on CUDA against PyTorch fp32).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..components import ComponentSpec
from ..errors import PackageError, ValidationError
from ..package import ModelPackage, PackageLayout, layout
from ..package.manifest import replace_variant
from .cpu_fusions import patch_num_heads_detection
from .graphs import (check_finite_constants, drop_fp16_round_trips, import_contrib_opset, save_onnx,
                     sinusoidal_embedding_nodes)

logger = logging.getLogger(__name__)

# Fused ops the optimizer can emit for the unet/vae model types (its get_fused_operator_statistics).
GPU_FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu",
                 "BiasAdd", "SkipLayerNormalization", "LayerNormalization")
# What each model type must hold after fusion; a graph without these would run as slowly as the plain one.
REQUIRED_FUSED_OPS = {
    "unet": ("MultiHeadAttention", "GroupNorm", "NhwcConv"),
    "vae": ("GroupNorm", "NhwcConv"),
}
# onnx element type -> numpy dtype name of the declarations
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def gpu_fusion_options(model_type: str):
    """The optimizer's options for an fp16 CUDA target, as ONNX Runtime's Stable Diffusion demo sets them.

    ``FusionOptions("unet" | "vae")`` already enables the GPU set (NHWC conv, GroupNorm,
    SkipGroupNorm, BiasSplitGelu, packed QKV/KV, BiasAdd); the demo keeps packed QKV/KV only for
    fp16 targets (there are no fp32 kernels for the packed layouts), which this is.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        if hasattr(options, name):
            setattr(options, name, True)
    return options


def fuse_for_cuda(src: Path, dst: Path, model_type: str) -> dict[str, int]:
    """Write ``dst``: ``src`` (an fp32 graph) with the CUDA fusions for ``model_type``, in fp16.

    Inputs and outputs stay fp32 (``keep_io_types``), as in the package's plain fp16 graphs, and
    so does the timestep embedding. Returns the fused op counts.
    """
    from onnxruntime.transformers import optimizer

    patch_num_heads_detection()  # NumPy 2: the UNet attention fusion's head count (see cpu_fusions)
    previous = logging.root.manager.disable
    # the optimizer logs every pass at INFO, and a warning that the producer is not "pytorch"
    logging.disable(logging.WARNING)
    try:
        # opt_level 0: only the optimizer's Python fusions; ONNX Runtime's own graph optimisation for
        # the CUDA provider runs when the runtime loads the graph.
        model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                         optimization_options=gpu_fusion_options(model_type), use_gpu=True)
        # As the demo: fusions on the fp32 patterns first, then fp16 (symbolic shape inference knows
        # the contrib ops, which onnx's own does not); constants are clamped to +-1e4. The timestep
        # embedding stays fp32, as diffusers computes it (graphs.sinusoidal_embedding_nodes).
        model.convert_float_to_float16(keep_io_types=True, node_block_list=sinusoidal_embedding_nodes(model.model))
        drop_fp16_round_trips(model.model)
        model.topological_sort()  # the conversion appends the input Casts last; ONNX wants nodes in order
    finally:
        logging.disable(previous)
    ops = [node.op_type for node in model.model.graph.node]
    counts = {op: ops.count(op) for op in GPU_FUSED_OPS if op in ops}
    missing = [op for op in REQUIRED_FUSED_OPS.get(model_type, ()) if op not in counts]
    if missing:
        raise ValidationError(f"{src.name}: CUDA fusion ({model_type}) produced no {', '.join(missing)}; "
                              f"fused: {counts or 'nothing'}")
    model.model.producer_name = "blipdiffusion-trt"
    import_contrib_opset(model.model)
    check_finite_constants(model.model, dst.name)
    save_onnx(model.model, dst)
    return counts


def check_fused_graph(spec: ComponentSpec, path: Path) -> dict[str, Any]:
    """What can be checked without a GPU: valid ONNX, inputs and outputs as declared (names, order,
    dtypes, ranks, axis names). Raises :class:`ValidationError` on the first difference."""
    import onnx

    try:
        # full_check adds strict type and shape inference; ONNX has no schemas for com.microsoft
        # ops and checks those nodes for well-formedness only.
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ValidationError(f"{path}: not valid ONNX ({str(error).strip().splitlines()[0]})") from None
    model = onnx.load(str(path), load_external_data=False)
    for kind, values, declared in (("input", model.graph.input, spec.inputs),
                                   ("output", model.graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in declared]:
            raise ValidationError(f"{path.name}: {kind}s {names}, declared {[t.name for t in declared]}")
        for value, tensor in zip(values, declared):
            tensor_type = value.type.tensor_type
            dtype = _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))
            if dtype != tensor.dtype:
                raise ValidationError(f"{path.name}: {kind} {value.name} is {dtype}, declared {tensor.dtype}")
            dims = tensor_type.shape.dim
            if len(dims) != len(tensor.shape):
                raise ValidationError(f"{path.name}: {kind} {value.name} has rank {len(dims)}, declared {len(tensor.shape)}")
            for dim, want in zip(dims, tensor.shape):
                got = dim.dim_value if dim.HasField("dim_value") else dim.dim_param
                expected = want if isinstance(want, int) else want.name
                if got != expected:
                    raise ValidationError(f"{path.name}: {kind} {value.name} dims "
                                          f"{[d.dim_value or d.dim_param for d in dims]}, declared {tensor.to_dict()['shape']}")
    return {"onnx_checker": "full_check", "io_as_declared": True}


def fuse_component_for_cuda(root: Path, spec: ComponentSpec, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/<component>.onnx`` from the package (or export directory) at ``root``'s fp32
    graph and check it; returns its manifest entry."""
    files = PackageLayout(root)
    fused = out_dir / files.graph(spec.name, layout.CUDA_FUSED).name
    counts = fuse_for_cuda(files.graph(spec.name, "fp32"), fused, spec.gpu_fusion)
    gc.collect()  # the optimizer's model holds reference cycles: free its copy of the weights now
    return {"model_type": spec.gpu_fusion, "precision": "fp16", "fused_ops": counts,
            "checks": check_fused_graph(spec, fused),
            "numerics": "checked on a GPU only (bench/gpu/validate.py): CUDA-only contrib ops"}


def fuse_graphs_for_cuda(root: Path, specs: dict[str, ComponentSpec], *, progress: bool = True) -> dict[str, Any]:
    """Write the CUDA-fused fp16 graph of every component that declares ``gpu_fusion``; check each.

    ``root`` is a package (or the export's temporary directory) holding the fp32 graphs. The
    graphs go to a temporary sibling first and replace the CUDA-fused folder as a whole. Returns
    the manifest entry per component: model type, fused op counts and the checks that ran.
    """
    from tqdm.auto import tqdm

    from ..fsutil import replace_dir

    names = [name for name, spec in specs.items() if spec.gpu_fusion]
    files = PackageLayout(root)
    scratch = Path(tempfile.mkdtemp(prefix=f".{layout.CUDA_FUSED}.partial-", dir=files.graphs_root))
    report: dict[str, Any] = {}
    try:
        for name in tqdm(names, desc="cuda fusions", unit="component", disable=not progress):
            report[name] = fuse_component_for_cuda(root, specs[name], scratch)
        if report:
            replace_dir(scratch, files.graphs_dir(layout.CUDA_FUSED))
        else:
            shutil.rmtree(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return report


def cuda_fusion_summary(report: dict[str, Any]) -> list[str]:
    """One line per CUDA-fused component: its fused ops (numerics are checked on a GPU)."""
    lines = []
    for name, entry in report.items():
        ops = ", ".join(f"{op} {n}" for op, n in entry["fused_ops"].items())
        lines.append(f"  {name:<20} {layout.CUDA_FUSED} ({ops}); numerics: GPU only")
    return lines


def fuse_package_for_cuda(path: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Add (or redo) the CUDA-fused fp16 graphs of an existing package and record them in its manifest."""
    package = ModelPackage.open(path, verify=False)
    files = package.layout
    if not os.access(files.graphs_root, os.W_OK):
        raise PackageError(f"{package.root}: package is not writable")
    report = fuse_graphs_for_cuda(package.root, package.specs, progress=progress)
    if not report:  # nothing to fuse: no CUDA-fused folder, none listed
        shutil.rmtree(files.graphs_dir(layout.CUDA_FUSED), ignore_errors=True)
    replace_variant(package.root, package.manifest, layout.CUDA_FUSED, gpu_fused=report)
    return report
