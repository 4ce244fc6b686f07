"""Reading a model package: manifest, pipeline config, graphs, tokenizers, with integrity checks.

:meth:`ModelPackage.open` is the one way every command (generate, build, triton, fuse, bench, the
Triton pipeline model) reads a package: the manifest and every file it lists are confined to the
package and checked (:mod:`.manifest`), each JSON file against its shape (:data:`SCHEDULER_CONFIG_SHAPE`,
:data:`TOKENIZER_SETTINGS_SHAPE`, :data:`~blipdiffusion_trt.components.PIPELINE_CONFIG_SHAPE`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..components import ComponentSpec, PipelineConfig, declare_components
from ..errors import PackageError
from ..fsutil import read_json
from ..schema import Bool, Int, List, Nullable, Number, Object, Str
from . import layout
from .manifest import check_files, check_listed, files_sha256, package_file, read_manifest

logger = logging.getLogger(__name__)

_TOKEN_ID = Int(0, 10_000_000)
TOKENIZER_SETTINGS_SHAPE = Object(
    required={"pad_token_id": _TOKEN_ID},
    optional={"pad_token": Nullable(Str(max_length=256)), "model_max_length": Nullable(Int(1, 1 << 30)),
              "bos_token_id": Nullable(_TOKEN_ID), "eos_token_id": Nullable(_TOKEN_ID),
              "vocab_size": Int(1, 10_000_000)},
)

# diffusers' scheduler config: the options the numpy schedulers read (each scheduler checks the
# values it supports; this checks types and sizes first).
MAX_TRAIN_TIMESTEPS = 10_000
_FLAG = Nullable(Bool())
_NAME = Nullable(Str(max_length=64))
SCHEDULER_CONFIG_SHAPE = Object(optional={
    "num_train_timesteps": Int(1, MAX_TRAIN_TIMESTEPS),
    "beta_start": Number(0, 1), "beta_end": Number(0, 1),
    "trained_betas": Nullable(List(Number(0, 1), max_length=MAX_TRAIN_TIMESTEPS)),
    "steps_offset": Int(0, MAX_TRAIN_TIMESTEPS), "solver_order": Int(1, 3),
    "clip_sample_range": Number(0), "sample_max_value": Number(0), "dynamic_thresholding_ratio": Number(0, 1),
    "lambda_min_clipped": Number(finite=False), "sigma_min": Nullable(Number(0)), "sigma_max": Nullable(Number(0)),
    "flow_shift": Nullable(Number(0)),
    **{name: _NAME for name in ("beta_schedule", "prediction_type", "timestep_spacing", "algorithm_type",
                                "solver_type", "final_sigmas_type", "interpolation_type", "timestep_type",
                                "variance_type", "_class_name", "_diffusers_version")},
    **{name: _FLAG for name in ("skip_prk_steps", "set_alpha_to_one", "clip_sample", "thresholding",
                                "rescale_betas_zero_snr", "euler_at_final", "lower_order_final",
                                "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                "use_lu_lambdas", "use_flow_sigmas")},
})


def read_pipeline_config(root: str | Path) -> PipelineConfig:
    """``pipeline.json`` of the package at ``root``, checked for this format version and shape."""
    path = package_file(Path(root), layout.PIPELINE_CONFIG)
    data = read_json(path, PackageError, missing="not found; is this a blipdiffusion-trt package?")
    version = data.get("format_version") if isinstance(data, dict) else layout.FORMAT_VERSION  # else: shape error
    if version != layout.FORMAT_VERSION:
        raise PackageError(
            f"{path}: package format_version {version!r}, this blipdiffusion-trt reads "
            f"{layout.FORMAT_VERSION}; re-export the checkpoint"
        )
    return PipelineConfig.from_dict(data, source=layout.PIPELINE_CONFIG)


def pipeline_config_json(config: PipelineConfig) -> str:
    """The text of ``pipeline.json`` for ``config`` (what export writes)."""
    return json.dumps({**config.to_dict(), "format_version": layout.FORMAT_VERSION}, indent=2)


@dataclass
class ModelPackage:
    root: Path
    manifest: dict[str, Any]
    config: PipelineConfig
    verify: bool = True
    graphs: bool = True
    _verified: set[str] = field(default_factory=set, repr=False)  # graphs already checked in this process

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, graphs: bool = True) -> "ModelPackage":
        """Open a package; every listed file must exist.

        With ``verify``, configs and tokenizers are checked against the manifest's sha256 now and
        each graph when :meth:`onnx_path` hands it out: a package holds several precisions and
        components a generation never loads (a full-size package is ~15 GB), so hashing all of
        it would dominate the start-up time. ``graphs=False`` opens a copy holding only the
        configs and tokenizers (:data:`layout.CONFIG_FILES`, e.g. a Triton pipeline model's):
        its graphs are neither required nor handed out.
        """
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"package directory {root} does not exist")
        manifest = read_manifest(root)
        missing = [name for name in layout.CONFIG_FILES if name not in manifest["files"]]
        if missing:
            raise PackageError(f"package incomplete: {', '.join(missing)} not in {layout.MANIFEST}; re-export the package")
        if "sizes" not in manifest:
            logger.warning("%s: %s records no file sizes (an older export): files are hashed without checking "
                           "their size first; re-export the package to record them", root, layout.MANIFEST)
        check_files(root, manifest, verify=verify, graphs=graphs)
        package = cls(root, manifest, read_pipeline_config(root), verify, graphs)
        if verify:  # check_files hashed every listed file but the graphs
            package._verified.update(name for name in manifest["files"] if not layout.is_graph_file(name))
        for name in package.specs:
            graph = layout.graph_file(name, "fp32")
            if graph not in manifest["files"]:
                raise PackageError(f"package incomplete: {graph} is not in {layout.MANIFEST}")
        return package

    @property
    def layout(self) -> layout.PackageLayout:
        return layout.PackageLayout(self.root)

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        return declare_components(self.config)

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest.get("precisions", ["fp32"]))

    def file(self, name: str) -> Path:
        """A listed file's path, confined to the package and of its recorded size (and sha256,
        when opened with ``verify``: configs and tokenizers are hashed once, at :meth:`open`)."""
        if name in self._verified or (not self.verify and name in self.manifest["files"]):
            return check_listed(self.root, self.manifest, name, verify=False)
        path = check_listed(self.root, self.manifest, name, verify=self.verify)
        self._verified.add(name)
        return path

    @property
    def source(self) -> dict[str, Any]:
        """What the package was exported from (``checkpoint``, ``controlnet``), as export recorded it."""
        return dict(self.manifest.get("source") or {})

    def lists(self, name: str) -> bool:
        """Whether the manifest lists the file ``name``."""
        return name in self.manifest["files"]

    def has_graph(self, component: str, precision: str, *, cpu_fused: bool = False, cuda_fused: bool = False) -> bool:
        variant = layout.graph_variant(precision, cpu_fused=cpu_fused, cuda_fused=cuda_fused)
        return self.lists(layout.graph_file(component, variant))

    def has_cpu_fused(self, component: str) -> bool:
        """Whether the package holds ``component``'s fp32 graph with ONNX Runtime's CPU fusions."""
        return self.has_graph(component, "fp32", cpu_fused=True)

    def has_cuda_fused(self, component: str) -> bool:
        """Whether the package holds ``component``'s fp16 graph with ONNX Runtime's CUDA fusions."""
        return self.has_graph(component, "fp16", cuda_fused=True)

    def graph_sha256(self, component: str, precision: str, *, cuda_fused: bool = False) -> str | None:
        """The manifest's sha256 of a graph (what a TensorRT plan records as its source)."""
        return self.manifest["files"].get(layout.graph_file(component, layout.graph_variant(precision, cuda_fused=cuda_fused)))

    def graph_content_sha256(self, component: str, precision: str, *, cpu_fused: bool = False) -> str:
        """One digest of a graph and its external-data file, from the manifest: it changes whenever
        either file does (a graph over 2 GB keeps its weights in the data file). A cache key for
        what a backend derives from the graph; PackageError when the manifest lists no such graph."""
        names = layout.graph_files(component, layout.graph_variant(precision, cpu_fused=cpu_fused))
        return files_sha256(self.manifest, names, source=self.layout.manifest)

    def require_precision(self, precision: str) -> None:
        """PackageError (naming the re-export) unless the package holds graphs of ``precision``
        (InputError when no package can: ``fp64``)."""
        layout.check_precision(precision)
        if precision not in self.precisions:
            raise PackageError(
                f"{self.root}: no {precision} graphs (package has {', '.join(self.precisions)}); "
                f"re-export with --precision fp32,{precision}"
            )

    def onnx_path(self, component: str, precision: str, *, cpu_fused: bool = False, cuda_fused: bool = False) -> Path:
        """The graph file of ``component``; ``cpu_fused``: the fp32 graph with CPU fusions (``onnx/fp32-fused``);
        ``cuda_fused``: the fp16 graph with CUDA fusions (``onnx/fp16-cuda``, CUDA provider only).

        With ``verify``, the graph (and its external data) is checked against its sha256 here.
        """
        if not cuda_fused:  # the CUDA-fused graphs are made from the fp32 ones, with or without plain fp16 graphs
            self.require_precision(precision)
        if cpu_fused and (precision != "fp32" or not self.has_cpu_fused(component)):
            raise PackageError(f"{self.root}: no CPU-fused {precision} graph of {component}; run `blipdiffusion-trt fuse`")
        if cuda_fused and (precision != "fp16" or not self.has_cuda_fused(component)):
            raise PackageError(f"{self.root}: no CUDA-fused {precision} graph of {component}; "
                               "run `blipdiffusion-trt fuse --target cuda`")
        if not self.graphs:
            raise PackageError(f"{self.root}: opened without its graphs (a copy of the configs and tokenizers only)")
        variant = layout.graph_variant(precision, cpu_fused=cpu_fused, cuda_fused=cuda_fused)
        for name in layout.graph_files(component, variant):
            if self.lists(name):
                self.file(name)
        return self.file(layout.graph_file(component, variant))

    def tokenizer_json(self, tokenizer: str) -> Path:
        """``tokenizer``: :data:`layout.CLIP_TOKENIZER` or :data:`layout.QFORMER_TOKENIZER`."""
        return self.file(layout.tokenizer_file(tokenizer))

    def tokenizer_settings(self, tokenizer: str) -> dict[str, Any]:
        name = layout.tokenizer_settings_file(tokenizer)
        return read_json(self.file(name), PackageError, shape=TOKENIZER_SETTINGS_SHAPE, source=str(self.root / name))

    def scheduler_config(self) -> dict[str, Any]:
        return read_json(self.file(layout.SCHEDULER_CONFIG), PackageError, shape=SCHEDULER_CONFIG_SHAPE,
                         source=str(self.root / layout.SCHEDULER_CONFIG))
