"""Checkpoint -> model package: load with diffusers, trace each component to ONNX, validate.

The package's files and where they go are :mod:`blipdiffusion_trt.package.layout`'s: configs,
tokenizers, one graph per component and precision (fp32, optionally fp16), the CPU-fused fp32
graphs (:mod:`.cpu_fusions`), on request the CUDA-fused fp16 graphs (:mod:`.gpu_fusions`) and the
manifest listing them with their sha256.

The package is written to a temporary sibling directory and renamed into place at the end, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..components import CONTROLNET_STEP_CACHE, PLAIN_STEP_CACHE, ComponentSpec, PipelineConfig, declare_components
from ..errors import CheckpointError, InputError, PackageError, ValidationError, describe
from ..fsutil import StagingDir, check_not_an_input, read_json, replace_dir
from ..package import PackageLayout, layout, pipeline_config_json
from ..package.manifest import digest_tree, write_manifest
from ..schema import Object
from .cpu_fusions import fuse_graphs, fusion_summary
from .gpu_fusions import cuda_fusion_summary, fuse_graphs_for_cuda
from .graphs import (check_finite_constants, cosine, drop_fp16_round_trips, example_inputs, export_point, max_abs_diff,
                     ort_session, run_onnx, save_onnx, second_point, sinusoidal_embedding_nodes)
from .hub import fetch_qformer_tokenizer, resolve_checkpoint

logger = logging.getLogger(__name__)

PRECISIONS = layout.PRECISIONS
BLIP_CLASSES = ("BlipDiffusionPipeline", "BlipDiffusionControlNetPipeline")
WEIGHT_MODULES = ("text_encoder", "vae", "unet", "qformer", "controlnet")


# --------------------------------------------------------------------------------------------
# 1. Loading and checking the checkpoint
# --------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    """A checkpoint's JSON config: an object (its keys are read with ``.get``)."""
    return read_json(path, CheckpointError, missing=f"not found ({what})", what=what, shape=Object())


def check_checkpoint_dir(checkpoint: Path, allow_pickle: bool) -> dict:
    """Validate a diffusers BLIP-Diffusion directory before loading it; returns model_index.json."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    index = _read_json(checkpoint / "model_index.json", "diffusers model_index.json: is this a diffusers checkpoint?")
    class_name = index.get("_class_name")
    if class_name not in BLIP_CLASSES:
        raise CheckpointError(
            f"{checkpoint}/model_index.json: model class {class_name!r} is not BLIP-Diffusion "
            f"(expected one of {', '.join(BLIP_CLASSES)})"
        )
    for name in WEIGHT_MODULES:
        if name not in index:
            continue
        _check_weights(checkpoint / name, allow_pickle)
    for name in ("tokenizer", "scheduler", "image_processor"):
        if not (checkpoint / name).is_dir():
            raise CheckpointError(f"checkpoint incomplete: {checkpoint / name} is missing")
    return index


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint incomplete: {folder / 'config.json'} is missing")
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    if any(n.endswith(".bin") or n.endswith(".bin.index.json") for n in names):
        if allow_pickle:
            return
        raise CheckpointError(
            f"{folder}: weights only in pickle form (.bin); convert them to safetensors or pass "
            "--allow-pickle if you trust the file"
        )
    raise CheckpointError(f"checkpoint incomplete: no weights (.safetensors) in {folder}")


def load_pipeline(checkpoint: str | Path, controlnet: str | Path | None = None, *, allow_pickle: bool = False):
    """Load a diffusers BLIP-Diffusion (ControlNet) pipeline in fp32 on the CPU, offline."""
    checkpoint = Path(checkpoint)
    index = check_checkpoint_dir(checkpoint, allow_pickle)  # before the slow imports: instant errors
    fetch_qformer_tokenizer(checkpoint)  # a Hub id in qformer/config.json: into the cache the load reads

    import diffusers
    import torch
    import transformers
    from diffusers import ControlNetModel
    from diffusers.pipelines import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline

    # Loading notes (no accelerate, untyped mean/std) are noise to a user of this tool.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # None lets each component load whichever format it has; True refuses pickle everywhere.
    safetensors_only = None if allow_pickle else True
    pipeline_cls = {c.__name__: c for c in (BlipDiffusionPipeline, BlipDiffusionControlNetPipeline)}[index["_class_name"]]
    kwargs: dict[str, Any] = dict(torch_dtype=torch.float32, use_safetensors=safetensors_only, local_files_only=True)
    if controlnet is not None:
        controlnet = Path(controlnet)
        if not controlnet.is_dir():
            raise CheckpointError(f"ControlNet directory {controlnet} does not exist")
        config = _read_json(controlnet / "config.json", "ControlNet config")
        if config.get("_class_name") != "ControlNetModel":
            raise CheckpointError(f"{controlnet}/config.json: class {config.get('_class_name')!r} is not ControlNetModel")
        _check_weights(controlnet, allow_pickle)
        unet_config = _read_json(checkpoint / "unet" / "config.json", "UNet config")
        _check_controlnet_matches(config, unet_config, controlnet)
        try:
            kwargs["controlnet"] = ControlNetModel.from_pretrained(
                controlnet, torch_dtype=torch.float32, use_safetensors=safetensors_only, local_files_only=True
            )
        except Exception as error:  # diffusers raises many types; the user needs one line
            raise CheckpointError(f"{controlnet}: cannot load ControlNet ({describe(error)})") from None
        pipeline_cls = BlipDiffusionControlNetPipeline
    elif "controlnet" in index:
        _check_controlnet_matches(
            _read_json(checkpoint / "controlnet" / "config.json", "ControlNet config"),
            _read_json(checkpoint / "unet" / "config.json", "UNet config"),
            checkpoint / "controlnet",
        )
    try:
        pipe = pipeline_cls.from_pretrained(checkpoint, **kwargs)
    except Exception as error:  # diffusers raises many types; the user needs one line
        raise CheckpointError(f"{checkpoint}: cannot load {pipeline_cls.__name__} ({describe(error)})") from None
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def _check_controlnet_matches(controlnet: dict, unet: dict, where: Path) -> None:
    for key in ("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels"):
        if controlnet.get(key) != unet.get(key):
            raise CheckpointError(
                f"{where}: ControlNet {key}={controlnet.get(key)} does not match the UNet's {unet.get(key)}"
            )


def pipeline_config_from(pipe, max_batch_size: int = 4, editing: bool = True, step_cache: bool = True) -> PipelineConfig:
    """Everything the runtime needs, read from the loaded checkpoint's own configs.

    ``editing``: declare the editing graphs (``vae_encoder``, ``unet_p2p``; export/p2p.py).
    ``step_cache``: declare fast mode's graphs (DeepCache branch 0; export/modules.py), unless the
    UNet has parts the shallow step does not reproduce (then a warning says which).
    """
    from .modules import step_cache_channels
    from .p2p import edit_attention_downsample

    proc = pipe.image_processor
    unet, vae, text, qformer = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, pipe.qformer.config
    # diffusers' BLIP pipelines derive the latent size from the UNet; the VAE must agree.
    factor = 2 ** (len(unet.block_out_channels) - 1)
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    if factor != vae_factor:
        raise CheckpointError(f"UNet latent factor {factor} does not match the VAE's {vae_factor}")
    if qformer.qformer_config.hidden_size != text.hidden_size:
        raise CheckpointError(
            f"Q-Former hidden size {qformer.qformer_config.hidden_size} != text encoder hidden size {text.hidden_size}"
        )
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        cond_factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        if cond_factor != factor:
            raise CheckpointError(f"ControlNet conditioning downsamples by {cond_factor}, latents by {factor}")
    return PipelineConfig(
        ctx_begin_pos=int(pipe.config.ctx_begin_pos),
        image_size=(int(proc.size["height"]), int(proc.size["width"])),
        image_mean=tuple(float(v) for v in (pipe.config.mean or proc.image_mean)),
        image_std=tuple(float(v) for v in (pipe.config.std or proc.image_std)),
        image_resample=int(proc.resample),
        num_query_tokens=int(qformer.num_query_tokens),
        qformer_hidden_size=int(qformer.qformer_config.hidden_size),
        qformer_max_text_length=int(qformer.qformer_config.max_position_embeddings),
        text_max_length=int(text.max_position_embeddings),
        text_hidden_size=int(text.hidden_size),
        latent_channels=int(unet.in_channels),
        latent_scale_factor=factor,
        unet_size_multiple=2 ** (len(unet.block_out_channels) - 1),
        vae_scaling_factor=float(vae.scaling_factor),
        unet_block_out_channels=tuple(int(c) for c in unet.block_out_channels),
        unet_layers_per_block=int(unet.layers_per_block),
        default_height=int(unet.sample_size) * factor,
        default_width=int(unet.sample_size) * factor,
        has_controlnet=controlnet is not None,
        controlnet_conditioning_channels=int(controlnet.config.conditioning_channels) if controlnet is not None else 3,
        max_batch_size=max_batch_size,
        edit_attention_downsample=edit_attention_downsample(pipe.unet) if editing else 0,
        step_cache_channels=step_cache_channels(pipe.unet) if step_cache and _step_cache_supported(pipe.unet) else 0,
        text_vocab_size=int(text.vocab_size),
        qformer_vocab_size=int(qformer.qformer_config.vocab_size),
    )


def _step_cache_supported(unet) -> bool:
    from .modules import step_cache_unsupported

    problem = step_cache_unsupported(unet)
    if problem:
        logger.warning("no step-cache graphs (fast mode): %s, which the shallow step does not reproduce", problem)
    return problem is None


# --------------------------------------------------------------------------------------------
# 2. The torch module of each component (example inputs: .graphs)
# --------------------------------------------------------------------------------------------


def component_modules(pipe, config: PipelineConfig) -> dict[str, Any]:
    """Factories of the torch module for each component (built lazily to keep memory low)."""
    from . import modules

    factories = {
        "qformer": lambda: modules.QFormerGraph(pipe.qformer),
        "text_encoder": lambda: modules.ContextTextEncoderGraph(pipe.text_encoder, config.ctx_begin_pos),
        "text_encoder_plain": lambda: modules.PlainTextEncoderGraph(pipe.text_encoder),
        "unet": lambda: modules.UNetGraph(pipe.unet, with_residuals=True),
        "unet_plain": lambda: modules.UNetGraph(pipe.unet, with_residuals=False),
        "vae_decoder": lambda: modules.VaeDecoderGraph(pipe.vae),
    }
    if config.has_controlnet:
        factories["controlnet"] = lambda: modules.ControlNetGraph(pipe.controlnet)
    if config.has_editing:
        from .p2p import UNetP2PGraph

        factories["vae_encoder"] = lambda: modules.VaeEncoderGraph(pipe.vae)
        factories["unet_p2p"] = lambda: UNetP2PGraph(pipe.unet)
    if config.has_step_cache:
        factories[PLAIN_STEP_CACHE.full] = lambda: modules.UNetFullStepGraph(pipe.unet, with_residuals=False)
        factories[PLAIN_STEP_CACHE.shallow] = lambda: modules.UNetShallowStepGraph(pipe.unet, with_residual=False)
        if config.has_controlnet:
            factories[CONTROLNET_STEP_CACHE.full] = lambda: modules.UNetFullStepGraph(pipe.unet, with_residuals=True)
            factories[CONTROLNET_STEP_CACHE.shallow] = lambda: modules.UNetShallowStepGraph(pipe.unet, with_residual=True)
            factories[CONTROLNET_STEP_CACHE.controlnet] = lambda: modules.ControlNetShallowStepGraph(pipe.controlnet)
    # A new wrapper is in training mode, and the exporter restores that mode on every child after
    # tracing: without eval() dropout would be live in the PyTorch reference afterwards.
    return {name: (lambda make=make: make().eval()) for name, make in factories.items()}


def vocab_sizes(pipe) -> dict[str, int]:
    text_vocab = int(pipe.text_encoder.config.vocab_size)
    return {"qformer": len(pipe.qformer.tokenizer), "text_encoder": text_vocab, "text_encoder_plain": text_vocab}


def run_torch(module, spec: ComponentSpec, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*[torch.from_numpy(feed[name]) for name in spec.input_names])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in outs]


# --------------------------------------------------------------------------------------------
# 3. Tracing, fp16 conversion, validation
# --------------------------------------------------------------------------------------------

def trace_to_onnx(module, spec: ComponentSpec, feed: dict[str, np.ndarray], path: Path, opset: int) -> None:
    """Trace with the TorchScript exporter; writes ``path`` (+ external data for > 2 GB)."""
    import warnings

    import onnx
    import torch

    scratch = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=path.parent))
    try:
        raw = scratch / f"{spec.name}.onnx"
        args = tuple(torch.from_numpy(feed[name]) for name in spec.input_names)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(raw))  # gathers the legacy exporter's per-tensor external files
        model.producer_name = "blipdiffusion-trt"
        apply_declared_shapes(model, spec)
        save_onnx(model, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def apply_declared_shapes(model, spec: ComponentSpec) -> None:
    """Write the declaration's dims onto the graph's inputs and outputs.

    The tracer names output dims after the ops that produce them ("Addquery_embeds_dim_1") even
    where the declaration knows a fixed size or a shared axis name; TensorRT and Triton read these.
    """
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = declared.get(value.name)
        if tensor is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            raise ValidationError(f"{spec.name}: {value.name} has rank {len(dims)}, declared {len(tensor.shape)}")
        for dim, declared_dim in zip(dims, tensor.shape):
            if isinstance(declared_dim, int):
                dim.ClearField("dim_param")
                dim.dim_value = declared_dim
            else:
                dim.ClearField("dim_value")
                dim.dim_param = declared_dim.name


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 graph with fp32 inputs/outputs, for strongly typed TensorRT and ORT-CUDA.

    onnxruntime.transformers.float16 (the maintained copy of onnxconverter-common's
    converter) clamps constants to +-1e4 (``max_finite_val``), so any
    ``finfo(float32).min`` mask constant left in a graph does not become -inf. The timestep
    embedding's nodes stay fp32 (:func:`.graphs.sinusoidal_embedding_nodes`); the TensorRT
    engines are built from these graphs, so theirs does too.
    """
    import onnx
    from onnxruntime.transformers import float16

    # The converter needs every value's type to keep ops that must stay fp32 (Resize scales,
    # shape arithmetic) fp32; its own shape inference cannot serialise graphs over 2 GB, so infer
    # through a file (external data stays where it is: same directory, same location field).
    inferred = src.with_name(f".{src.stem}.inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    # the timestep embedding stays fp32, as diffusers computes it (graphs.sinusoidal_embedding_nodes)
    model16 = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                               node_block_list=sinusoidal_embedding_nodes(model))
    drop_fp16_round_trips(model16)
    check_finite_constants(model16, dst.name)
    save_onnx(model16, dst)


# --------------------------------------------------------------------------------------------
# 4. The package
# --------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    package: Path
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_fused: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpu_fused: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """What was written and how closely each graph matches PyTorch, one line per component."""
        lines = [f"wrote {self.package} in {self.seconds:.1f} s"]
        for name, entry in self.components.items():
            checks = ", ".join(f"{v['point']} max|diff| {v['max_abs']:.2e}" for v in entry.get("validation", []))
            fp16 = entry.get("fp16_validation")
            if fp16:
                checks += f"; fp16 cosine {fp16['cosine']:.6f}" if fp16.get("checked") else f"; fp16 {fp16['reason']}"
            lines.append(f"  {name:<20} {checks}")
        return "\n".join(lines + fusion_summary(self.cpu_fused) + cuda_fusion_summary(self.gpu_fused))


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"blipdiffusion-trt": __version__, "python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxconverter-common", "tokenizers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"output directory {out} exists and is not empty (pass --force to replace it)")
    if not out.parent.exists():
        raise InputError(f"parent directory of {out} does not exist")


def export_package(
    checkpoint: str | Path,
    out: str | Path,
    *,
    controlnet: str | Path | None = None,
    precisions: Iterable[str] = ("fp32",),
    opset: int = 17,
    force: bool = False,
    allow_pickle: bool = False,
    validate: bool = True,
    max_batch_size: int = 4,
    cpu_fusions: bool = True,
    editing: bool = True,
    step_cache: bool = True,
    gpu_fusions: bool = False,
    jobs: int = 1,
    progress: bool = True,
    revision: str | None = None,
) -> ExportReport:
    """Export every component of a BLIP-Diffusion checkpoint into a self-contained package.

    ``checkpoint`` (and ``controlnet``): a folder, or a Hugging Face Hub repository id whose files
    export reads are downloaded into the Hugging Face cache first (at ``revision``; :mod:`.hub`).

    ``editing``: include the editing graphs (``vae_encoder``, ``unet_p2p``) that
    ``BlipDiffusionRuntime.edit``/``invert`` run; without them the package only generates.
    ``step_cache``: include fast mode's graphs (``cache_interval`` > 1; components.step_cache_components).
    ``jobs`` > 1 exports that many components at once, each in a worker process that loads the
    checkpoint itself (memory: up to ``jobs`` full-size UNet exports, ~17 GB each); CUDA fusions
    then run in the worker right after their component's graph.
    """
    from tqdm.auto import tqdm

    from .tokenizer_files import export_tokenizer_json, tokenizer_settings

    precisions = tuple(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or "fp32" not in precisions:
        raise InputError(f"--precision must list fp32 and optionally fp16, got {','.join(precisions)}")
    if not 14 <= opset <= 21:
        raise InputError(f"--opset must be in [14, 21], got {opset}")
    if not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"--jobs must be an integer >= 1, got {jobs!r}")
    out = Path(out).resolve()
    check_not_an_input(out, {"checkpoint": checkpoint, "ControlNet": controlnet}, InputError)
    _prepare_output(out, force)
    start = time.perf_counter()
    # a Hub repository id: its snapshot in the Hugging Face cache, then exported as any folder
    source = {"checkpoint": str(Path(checkpoint).resolve().name), "controlnet": str(controlnet) if controlnet else None}
    local = resolve_checkpoint(checkpoint, revision=revision, allow_pickle=allow_pickle)
    if local != Path(checkpoint).expanduser():
        source["checkpoint"] = f"{checkpoint}@{local.name}"  # the repository and the commit exported
    checkpoint = local
    if controlnet is not None:
        local = resolve_checkpoint(controlnet, allow_pickle=allow_pickle, what="ControlNet")
        if local != Path(controlnet).expanduser():
            source["controlnet"] = f"{controlnet}@{local.name}"
        controlnet = local
    pipe = load_pipeline(checkpoint, controlnet, allow_pickle=allow_pickle)
    config = pipeline_config_from(pipe, max_batch_size=max_batch_size, editing=editing, step_cache=step_cache)
    # what the runtime will accept when it reads pipeline.json back: refused now, not after the export
    PipelineConfig.from_dict(config.to_dict(), source=f"{checkpoint}: the pipeline config its configs give")
    specs = declare_components(config)
    report = ExportReport(out)

    # A locked temporary sibling: an export killed earlier left its own, removed now; a live one
    # into the same place makes this one fail (two exports cannot both win).
    staging = StagingDir(out, InputError)
    tmp = staging.path
    files = PackageLayout(tmp)
    try:
        # Configs and tokenizers.
        files.pipeline_config.write_text(pipeline_config_json(config))
        files.scheduler_config.parent.mkdir(parents=True)
        files.scheduler_config.write_text(json.dumps(dict(pipe.scheduler.config), indent=2, default=_json_default))
        for folder, tokenizer in ((layout.CLIP_TOKENIZER, pipe.tokenizer), (layout.QFORMER_TOKENIZER, pipe.qformer.tokenizer)):
            files.tokenizer_dir(folder).mkdir()
            export_tokenizer_json(tokenizer, files.tokenizer_json(folder))
            files.tokenizer_settings(folder).write_text(json.dumps(tokenizer_settings(tokenizer), indent=2))

        # Graphs, one component at a time (the full UNet alone peaks near 14 GB while tracing).
        factories = component_modules(pipe, config)
        vocab = vocab_sizes(pipe)
        for precision in precisions:
            files.graphs_dir(precision).mkdir(parents=True)
        if jobs > 1:
            # --- parallel export (jobs > 1): one worker process per component at a time ---
            order = sorted(specs, key=lambda n: -sum(p.numel() for p in factories[n]().parameters()))
            del pipe, factories
            gc.collect()
            report.components, report.gpu_fused = _export_in_parallel(
                order, jobs, tmp, dict(checkpoint=checkpoint, controlnet=controlnet, allow_pickle=allow_pickle,
                                       max_batch_size=max_batch_size, editing=editing,
                                       step_cache=step_cache),
                dict(precisions=precisions, opset=opset, validate=validate), gpu_fusions, progress)
            report.components = {name: report.components[name] for name in specs}
            report.gpu_fused = {name: report.gpu_fused[name] for name in specs if name in report.gpu_fused}
        else:
            bar = tqdm(list(specs.values()), desc="export", unit="component", disable=not progress)
            for spec in bar:
                bar.set_postfix_str(spec.name)
                module = factories[spec.name]()
                report.components[spec.name] = export_component(module, spec, tmp, vocab, precisions=precisions,
                                                                opset=opset, validate=validate)
                del module
                gc.collect()
            del pipe, factories
            gc.collect()
        # After the PyTorch models are gone: fusing the full UNet alone peaks near 14 GB. Each
        # fused graph is checked against its fp32 graph, itself validated against PyTorch above.
        cpu_fused = report.cpu_fused = fuse_graphs(tmp, specs, vocab, progress=progress) if cpu_fusions else {}
        if gpu_fusions and jobs <= 1:  # fp16 graphs for the CUDA provider; numerics are checked on a GPU (bench/gpu)
            report.gpu_fused = fuse_graphs_for_cuda(tmp, specs, progress=progress)

        manifest = {
            "format_version": layout.FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "precisions": list(precisions),
            "opset": opset,
            "tools": tool_versions(),
            "components": {name: {**specs[name].to_dict(), **report.components[name]} for name in specs},
            "cpu_fused": cpu_fused,
            "gpu_fused": report.gpu_fused,
        }
        manifest["files"] = digest_tree(tmp)
        write_manifest(tmp, manifest)
        _prepare_output(out, force)  # again: nothing else may have written it meanwhile
        replace_dir(tmp, out)
    except OSError as error:  # a full disk, a read-only or vanished directory
        raise PackageError(f"export to {out} failed: {describe(error)}") from None
    finally:
        staging.close()  # whatever was not moved into place, and the lock
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def export_component(module, spec: ComponentSpec, root: Path, vocab: dict[str, int], *,
                     precisions: Iterable[str], opset: int, validate: bool) -> dict[str, Any]:
    """Trace one component into the package (or export directory) at ``root``: its fp32 graph (and
    fp16), each validated; returns its manifest entry."""
    files = PackageLayout(root)
    entry: dict[str, Any] = {}
    path32 = files.graph(spec.name, "fp32")
    t0 = time.perf_counter()
    feed = example_inputs(spec, export_point(spec), vocab_sizes=vocab)
    trace_to_onnx(module, spec, feed, path32, opset)
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    if validate:
        entry["validation"] = validate_component(module, spec, path32, vocab)
    if "fp16" in precisions:
        path16 = files.graph(spec.name, "fp16")
        convert_fp16(path32, path16)
        if validate:
            entry["fp16_validation"] = validate_fp16(spec, path32, path16, vocab)
    return entry


# Worker processes of a parallel export: each loads the checkpoint once (initializer), then exports
# the components it is handed.
_WORKER: dict[str, Any] = {}


def _init_export_worker(load_args: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    pipe = load_pipeline(load_args["checkpoint"], load_args["controlnet"], allow_pickle=load_args["allow_pickle"])
    config = pipeline_config_from(pipe, max_batch_size=load_args["max_batch_size"], editing=load_args["editing"],
                                  step_cache=load_args["step_cache"])
    _WORKER.update(factories=component_modules(pipe, config), specs=declare_components(config), vocab=vocab_sizes(pipe))


def _export_in_worker(name: str, root: Path, options: dict[str, Any], gpu_fusions: bool):
    spec = _WORKER["specs"][name]
    module = _WORKER["factories"][name]()
    entry = export_component(module, spec, root, _WORKER["vocab"], **options)
    del module
    gc.collect()
    fused = None
    if gpu_fusions and spec.gpu_fusion:
        from .gpu_fusions import fuse_component_for_cuda

        out_dir = PackageLayout(root).graphs_dir(layout.CUDA_FUSED)
        out_dir.mkdir(exist_ok=True)
        fused = fuse_component_for_cuda(root, spec, out_dir)
    return name, entry, fused


def _export_in_parallel(order: list[str], jobs: int, root: Path, load_args: dict[str, Any],
                        options: dict[str, Any], gpu_fusions: bool, progress: bool):
    """Export the components in ``order`` (largest first) on ``jobs`` worker processes."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // jobs)
    components: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    # spawn: torch's thread pools do not survive fork
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(order)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_export_worker, initargs=(load_args, threads))
    try:
        futures = [pool.submit(_export_in_worker, name, root, options, gpu_fusions) for name in order]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"export ({jobs} jobs)", unit="component",
                           disable=not progress):
            name, entry, fused_entry = future.result()
            components[name] = entry
            if fused_entry is not None:
                fused[name] = fused_entry
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return components, {name: fused[name] for name in order if name in fused}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def validate_component(module, spec: ComponentSpec, path: Path, vocab: dict[str, int]) -> list[dict[str, Any]]:
    """ONNX Runtime CPU vs PyTorch fp32 at the export point and a second point.

    The tolerance is ``spec.atol`` scaled by the output magnitude when that exceeds 1 (the
    full-size random-weight models produce large activations).
    """
    session = ort_session(path)
    results = []
    for label, point in (("export", export_point(spec)), ("second", second_point(spec))):
        feed = example_inputs(spec, point, vocab_sizes=vocab, seed=1)
        expected = run_torch(module, spec, feed)
        got = run_onnx(session, feed)
        diff = max_abs_diff(got, expected)
        scale = max(1.0, max(float(np.max(np.abs(e))) for e in expected))
        results.append({"point": label, "shapes": {k: list(v.shape) for k, v in feed.items()}, "max_abs": diff, "scale": scale})
        if not diff <= spec.atol * scale:
            raise ValidationError(f"{spec.name}: ONNX differs from PyTorch by {diff:.3g} at {label} shapes (tolerance {spec.atol * scale:.3g})")
    return results


def validate_fp16(spec: ComponentSpec, path32: Path, path16: Path, vocab: dict[str, int]) -> dict[str, Any]:
    """fp16 vs fp32 graph on ONNX Runtime CPU, where ORT CPU has fp16 kernels for every node."""
    feed = example_inputs(spec, export_point(spec), vocab_sizes=vocab, seed=2)
    try:
        session = ort_session(path16)
    except Exception as error:  # ORT CPU lacks some fp16 kernels: that check needs a GPU
        return {"checked": False, "reason": f"ONNX Runtime CPU cannot run it ({describe(error)}); needs a GPU"}
    got = run_onnx(session, feed)
    expected = run_onnx(path32, feed)
    finite = all(np.isfinite(g).all() for g in got)
    cos = cosine(got, expected)
    result = {"checked": True, "finite": bool(finite), "cosine": cos, "max_abs": max_abs_diff(got, expected)}
    if not finite or not cos >= spec.fp16_min_cosine:
        raise ValidationError(f"{spec.name}: fp16 graph off (finite={finite}, cosine={cos:.5f} < {spec.fp16_min_cosine})")
    return result
