"""fp32 graphs with ONNX Runtime's CPU fusions (``onnx/fp32-fused/``), from the plain fp32 graphs.

ONNX Runtime's own graph optimiser does not fuse the UNet's attention: it leaves each head's
``MatMul -> Softmax -> MatMul`` chain in place, and at 512x512 (4,096 latent positions) the
attention probabilities it materialises hold GBs in the memory arena. The
``onnxruntime.transformers`` optimizer rewrites those chains into its ``Attention`` /
``MultiHeadAttention`` contrib ops, which have CPU kernels. Measured on the full-size UNet at
512x512 on 2 cores: one call 6.81 s -> 6.54 s, session peak RSS 7.9 GB -> 5.6 GB.

Only fusions with CPU kernels are enabled; the optimizer's defaults for ``unet`` add NHWC
convolutions, GroupNorm and BiasSplitGelu, which are CUDA-only (ORT CPU refuses such a graph).
The fused graphs hold ``com.microsoft`` ops, so TensorRT and the fp16 conversion keep reading the
plain graphs; the fused ones are an extra, CPU-side variant.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..components import ComponentSpec
from ..errors import PackageError, ValidationError, describe
from ..package import ModelPackage, PackageLayout, layout
from ..package.manifest import replace_variant
from .graphs import (example_inputs, export_point, import_contrib_opset, max_abs_diff, ort_session, run_onnx, save_onnx,
                     second_point)

logger = logging.getLogger(__name__)

# Optimizer passes that emit ops without CPU kernels (NhwcConv, GroupNorm, SkipGroupNorm,
# BiasSplitGelu, BiasAdd) or packed QKV/KV layouts the CPU attention kernels do not take.
_CUDA_ONLY_OPTIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                      "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
_CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
_FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
              "FastGelu", "Gelu", "QuickGelu")


def patch_num_heads_detection() -> None:
    """Make the UNet attention fusion work with NumPy 2.

    ``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a shape-[1] array, which NumPy 2
    rejects ("only 0-dimensional arrays can be converted"), so the whole optimizer crashed on our
    graphs. The fix reads the single element; everything else is the library's own code.
    """
    import fusion_attention_unet  # the optimizer imports its modules under their top-level names

    cls = fusion_attention_unet.FusionAttentionUnet
    if getattr(cls, "_blipdiffusion_trt_patched", False):
        return
    original = cls.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if not is_torch2:
            return original(self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                heads = int(value.reshape(-1)[0])
                return heads if heads > 0 else 0
        return 0

    cls.get_num_heads = get_num_heads
    cls._blipdiffusion_trt_patched = True


def fuse_for_cpu(src: Path, dst: Path, model_type: str) -> dict[str, int]:
    """Write ``dst``: ``src`` with the CPU-capable fusions for ``model_type``; returns fused op counts.

    Returns an empty dict (and writes nothing) when the optimizer found nothing to fuse.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    patch_num_heads_detection()
    options = FusionOptions(model_type)
    for name in _CUDA_ONLY_OPTIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    # opt_level 0: only the optimizer's Python fusions; ORT's own graph optimisation runs when the
    # runtime loads the graph (its "all" level output is CPU-model specific, not for a package).
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the optimizer logs every pass at INFO under its own module names
    try:
        model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                         optimization_options=options, use_gpu=False)
    finally:
        logging.disable(previous)
    ops = [node.op_type for node in model.model.graph.node]
    counts = {op: ops.count(op) for op in _FUSED_OPS if op in ops}
    if not counts:
        return {}
    unsupported = sorted(set(ops) & set(_CUDA_ONLY_OPS))
    if unsupported:
        raise ValidationError(f"{src.name}: CPU fusion produced ops without CPU kernels: {', '.join(unsupported)}")
    model.model.producer_name = "blipdiffusion-trt"
    import_contrib_opset(model.model)
    save_onnx(model.model, dst)
    return counts


def compare_graphs(spec: ComponentSpec, reference: Path, fused: Path, feeds: list[tuple[str, dict[str, np.ndarray]]]) -> list[dict[str, Any]]:
    """The fused graph against the plain graph on ONNX Runtime CPU, within the component's tolerance.

    One session at a time: two full-size UNet sessions side by side would hold ~14 GB.
    """
    def outputs(path: Path) -> list[list[np.ndarray]]:
        session = ort_session(path)
        try:
            return [run_onnx(session, feed) for _, feed in feeds]
        finally:
            del session
            gc.collect()

    expected_all = outputs(reference)
    got_all = outputs(fused)
    results = []
    for (label, _), expected, got in zip(feeds, expected_all, got_all):
        diff = max_abs_diff(got, expected)
        scale = max(1.0, max(float(np.max(np.abs(e))) for e in expected))
        results.append({"point": label, "max_abs_vs_fp32": diff, "scale": scale})
        if not diff <= spec.atol * scale:
            raise ValidationError(f"{spec.name}: CPU-fused graph differs from the fp32 graph by {diff:.3g} at {label} "
                                  f"shapes (tolerance {spec.atol * scale:.3g})")
    return results


def package_vocab_sizes(root: Path) -> dict[str, int]:
    """Token-id ranges for example inputs, from the package's own tokenizers."""
    from tokenizers import Tokenizer

    files = PackageLayout(root)
    text = Tokenizer.from_file(str(files.tokenizer_json(layout.CLIP_TOKENIZER))).get_vocab_size(with_added_tokens=True)
    qformer = Tokenizer.from_file(str(files.tokenizer_json(layout.QFORMER_TOKENIZER))).get_vocab_size(with_added_tokens=True)
    return {"qformer": qformer, "text_encoder": text, "text_encoder_plain": text}


def fuse_graphs(root: Path, specs: dict[str, ComponentSpec], vocab: dict[str, int], *, progress: bool = True) -> dict[str, Any]:
    """Write the CPU-fused graph of every component that declares ``cpu_fusion``; validate each.

    ``root`` is a package (or the export's temporary directory) holding the fp32 graphs. The
    graphs go to a temporary sibling first and replace the CPU-fused folder as a whole. Returns the manifest
    entry per fused component: fused op counts and the comparison with the fp32 graph.
    """
    from tqdm.auto import tqdm

    from ..fsutil import StagingDir, replace_dir

    names = [name for name, spec in specs.items() if spec.cpu_fusion]
    files = PackageLayout(root)
    staging = StagingDir(files.graphs_dir(layout.CPU_FUSED), PackageError)  # a killed run's leftovers are removed
    scratch = staging.path
    report: dict[str, Any] = {}
    try:
        for name in tqdm(names, desc="cpu fusions", unit="component", disable=not progress):
            spec = specs[name]
            plain = files.graph(name, "fp32")
            fused = scratch / files.graph(name, layout.CPU_FUSED).name
            counts = fuse_for_cpu(plain, fused, spec.cpu_fusion)
            gc.collect()  # the optimizer's model holds reference cycles: free its copy of the weights now
            if not counts:
                logger.info("%s: nothing to fuse for the CPU; the runtime uses the fp32 graph", name)
                continue
            feeds = [(label, example_inputs(spec, point, vocab_sizes=vocab, seed=3))
                     for label, point in (("export", export_point(spec)), ("second", second_point(spec)))]
            report[name] = {"model_type": spec.cpu_fusion, "fused_ops": counts,
                            "validation": compare_graphs(spec, plain, fused, feeds)}
        if report:
            replace_dir(scratch, files.graphs_dir(layout.CPU_FUSED))
    finally:
        staging.close()
    return report


def fusion_summary(report: dict[str, Any]) -> list[str]:
    """One line per fused component: its fused ops and how far it is from the fp32 graph."""
    lines = []
    for name, entry in report.items():
        ops = ", ".join(f"{op} {n}" for op, n in entry["fused_ops"].items())
        diffs = ", ".join(f"{v['point']} max|diff| {v['max_abs_vs_fp32']:.2e}" for v in entry["validation"])
        lines.append(f"  {name:<20} cpu-fused ({ops}); vs fp32 graph: {diffs}")
    return lines


def fuse_package(path: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Add (or redo) the CPU-fused graphs of an existing package and record them in its manifest."""
    import os
    import shutil

    package = ModelPackage.open(path)
    files = package.layout
    if not os.access(files.graphs_root, os.W_OK):
        raise PackageError(f"{package.root}: package is not writable")
    for name, spec in package.specs.items():  # the graphs fused from: confined, checked against their sha256
        if spec.cpu_fusion:
            package.onnx_path(name, "fp32")
    vocab = package_vocab_sizes(package.root)  # tokenizers: checked when the package was opened
    try:
        report = fuse_graphs(package.root, package.specs, vocab, progress=progress)
        if not report:  # nothing fused: no CPU-fused folder, none listed
            shutil.rmtree(files.graphs_dir(layout.CPU_FUSED), ignore_errors=True)
        replace_variant(package.root, package.manifest, layout.CPU_FUSED, cpu_fused=report)
    except OSError as error:  # a full disk
        raise PackageError(f"fuse {package.root} failed: {describe(error)}") from None
    return report
