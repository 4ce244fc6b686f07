"""Reading a model package: manifest, pipeline config, graphs, tokenizers, with integrity checks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..components import ComponentSpec, PipelineConfig, declare_components
from ..errors import PackageError
from ..fsutil import read_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# fp32 graphs with ONNX Runtime CPU fusions (written by export/cpu_fusions.py)
CPU_FUSED_DIR = "fp32-fused"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(file: Path, digest: str) -> None:
    if sha256_file(file) != digest:
        raise PackageError(f"package altered: {file} does not match its sha256 in {MANIFEST_NAME}")


@dataclass
class ModelPackage:
    root: Path
    manifest: dict[str, Any]
    config: PipelineConfig
    verify: bool = True

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> "ModelPackage":
        """Open a package; every listed file must exist.

        With ``verify``, configs and tokenizers are checked against the manifest's sha256 now and
        each graph when :meth:`onnx_path` hands it out: a package holds several precisions and
        components a generation never loads (a full-size package is ~15 GB), so hashing all of
        it would dominate the start-up time.
        """
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"package directory {root} does not exist")
        manifest_path = root / MANIFEST_NAME
        manifest = read_json(manifest_path, PackageError, missing=f"not found; is {root} a blipdiffusion-trt package?")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise PackageError(f"{manifest_path}: no file list; re-export the package")
        for name, digest in files.items():
            file = root / name
            if not file.is_file():
                raise PackageError(f"package incomplete: {file} is missing")
            if verify and not name.startswith("onnx/"):
                _check_digest(file, digest)
        package = cls(root, manifest, PipelineConfig.load(root), verify)
        for name in package.specs:
            if f"onnx/fp32/{name}.onnx" not in files:
                raise PackageError(f"package incomplete: onnx/fp32/{name}.onnx is not in {MANIFEST_NAME}")
        return package

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        return declare_components(self.config)

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest.get("precisions", ["fp32"]))

    def has_cpu_fused(self, component: str) -> bool:
        """Whether the package holds ``component``'s fp32 graph with ONNX Runtime's CPU fusions."""
        return f"onnx/{CPU_FUSED_DIR}/{component}.onnx" in self.manifest["files"]

    def onnx_path(self, component: str, precision: str, *, cpu_fused: bool = False) -> Path:
        """The graph file of ``component``; ``cpu_fused``: the fp32 graph with CPU fusions (``onnx/fp32-fused``)."""
        if precision not in self.precisions:
            raise PackageError(
                f"{self.root}: no {precision} graphs (package has {', '.join(self.precisions)}); "
                f"re-export with --precision fp32,{precision}"
            )
        folder = precision
        if cpu_fused:
            if precision != "fp32" or not self.has_cpu_fused(component):
                raise PackageError(f"{self.root}: no CPU-fused {precision} graph of {component}; run `blipdiffusion-trt fuse`")
            folder = CPU_FUSED_DIR
        path = self.root / "onnx" / folder / f"{component}.onnx"
        if self.verify:
            files = self.manifest["files"]
            for rel in (f"onnx/{folder}/{component}.onnx", f"onnx/{folder}/{component}.onnx.data"):
                if rel in files:
                    _check_digest(self.root / rel, files[rel])
        return path

    def graph_sha256(self, component: str, precision: str, *, cpu_fused: bool = False) -> str:
        """The manifest's sha256 of a graph and of its external data file: changes whenever the graph does."""
        return _graph_sha256(self.manifest["files"], f"onnx/{CPU_FUSED_DIR if cpu_fused else precision}/{component}.onnx")

    def tokenizer_settings(self, folder: str) -> dict[str, Any]:
        return read_json(self.root / folder / "tokenizer_settings.json", PackageError)

    def scheduler_config(self) -> dict[str, Any]:
        return read_json(self.root / "scheduler" / "scheduler_config.json", PackageError)


def _graph_sha256(files: dict[str, str], rel: str) -> str:
    parts = [files[rel]] + ([files[rel + ".data"]] if rel + ".data" in files else [])
    return hashlib.sha256("|".join(parts).encode()).hexdigest() if len(parts) > 1 else parts[0]


def graph_of(path: str | Path) -> tuple[str, str, str]:
    """``(folder, component, sha256)`` of a graph path :meth:`ModelPackage.onnx_path` handed out.

    ``folder`` is the precision ("fp32", "fp16") or :data:`CPU_FUSED_DIR`; ``sha256`` is
    :meth:`ModelPackage.graph_sha256`'s, read from the package's manifest.
    """
    path = Path(path)
    root, folder, component = path.parent.parent.parent, path.parent.name, path.stem
    manifest_path = root / MANIFEST_NAME
    files = read_json(manifest_path, PackageError).get("files") or {}
    rel = f"onnx/{folder}/{component}.onnx"
    if path.suffix != ".onnx" or path.parent.parent.name != "onnx" or rel not in files:
        raise PackageError(f"{path}: not a graph listed in {manifest_path}")
    return folder, component, _graph_sha256(files, rel)
