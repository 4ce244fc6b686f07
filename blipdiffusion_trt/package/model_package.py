"""Reading a model package: manifest, pipeline config, graphs, tokenizers, with integrity checks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..components import ComponentSpec, PipelineConfig, declare_components
from ..errors import PackageError
from ..fsutil import read_json
from . import layout
from .manifest import check_digest, check_files, read_manifest

logger = logging.getLogger(__name__)


def read_pipeline_config(root: str | Path) -> PipelineConfig:
    """``pipeline.json`` of the package at ``root``, checked for this format version."""
    path = layout.PackageLayout(root).pipeline_config
    data = read_json(path, PackageError, missing="not found; is this a blipdiffusion-trt package?")
    version = data.get("format_version") if isinstance(data, dict) else None
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

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, graphs: bool = True) -> "ModelPackage":
        """Open a package; every listed file must exist.

        With ``verify``, configs and tokenizers are checked against the manifest's sha256 now and
        each graph when :meth:`onnx_path` hands it out: a package holds several precisions and
        components a generation never loads (a full-size package is ~15 GB), so hashing all of
        it would dominate the start-up time. ``graphs=False`` opens a copy holding only the
        configs and tokenizers (:data:`layout.RUNTIME_FILES`, e.g. a Triton pipeline model's):
        its graphs are neither required nor handed out.
        """
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"package directory {root} does not exist")
        manifest = read_manifest(root)
        check_files(root, manifest, verify=verify, graphs=graphs)
        package = cls(root, manifest, read_pipeline_config(root), verify, graphs)
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

    @property
    def source(self) -> dict[str, Any]:
        """What the package was exported from (``checkpoint``, ``controlnet``), as export recorded it."""
        return dict(self.manifest.get("source") or {})

    def lists(self, name: str) -> bool:
        """Whether the manifest lists the file ``name``."""
        return name in self.manifest["files"]

    def has_graph(self, component: str, precision: str, *, cpu_fused: bool = False) -> bool:
        return self.lists(layout.graph_file(component, layout.graph_variant(precision, cpu_fused=cpu_fused)))

    def has_cpu_fused(self, component: str) -> bool:
        """Whether the package holds ``component``'s fp32 graph with ONNX Runtime's CPU fusions."""
        return self.has_graph(component, "fp32", cpu_fused=True)

    def graph_sha256(self, component: str, precision: str) -> str | None:
        """The manifest's sha256 of a graph (what a TensorRT plan records as its source)."""
        return self.manifest["files"].get(layout.graph_file(component, precision))

    def require_precision(self, precision: str) -> None:
        """PackageError (naming the re-export) unless the package holds graphs of ``precision``."""
        if precision not in self.precisions:
            raise PackageError(
                f"{self.root}: no {precision} graphs (package has {', '.join(self.precisions)}); "
                f"re-export with --precision fp32,{precision}"
            )

    def onnx_path(self, component: str, precision: str, *, cpu_fused: bool = False) -> Path:
        """The graph file of ``component``; ``cpu_fused``: the fp32 graph with CPU fusions (``onnx/fp32-fused``).

        With ``verify``, the graph (and its external data) is checked against its sha256 here.
        """
        self.require_precision(precision)
        if cpu_fused and (precision != "fp32" or not self.has_cpu_fused(component)):
            raise PackageError(f"{self.root}: no CPU-fused {precision} graph of {component}; run `blipdiffusion-trt fuse`")
        if not self.graphs:
            raise PackageError(f"{self.root}: opened without its graphs (a copy of the configs and tokenizers only)")
        variant = layout.graph_variant(precision, cpu_fused=cpu_fused)
        if self.verify:
            for name in layout.graph_files(component, variant):
                check_digest(self.root, self.manifest, name)
        return self.layout.graph(component, variant)

    def tokenizer_json(self, tokenizer: str) -> Path:
        """``tokenizer``: :data:`layout.CLIP_TOKENIZER` or :data:`layout.QFORMER_TOKENIZER`."""
        return self.layout.tokenizer_json(tokenizer)

    def tokenizer_settings(self, tokenizer: str) -> dict[str, Any]:
        return read_json(self.layout.tokenizer_settings(tokenizer), PackageError)

    def scheduler_config(self) -> dict[str, Any]:
        return read_json(self.layout.scheduler_config, PackageError)
