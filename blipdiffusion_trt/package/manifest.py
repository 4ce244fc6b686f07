"""``manifest.json``: the list of a package's files with their sha256, read, checked and written.

Export writes it once for the whole package (:func:`digest_tree`, :func:`write_manifest`);
``fuse`` replaces the entries of one graph variant (:func:`replace_variant`); opening a package
checks it (:func:`check_files`) and each graph is checked when it is handed out
(:func:`check_digest`). Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import PackageError
from ..fsutil import read_json, write_atomic
from . import layout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the package at ``root``; missing, unreadable or without a file list -> PackageError."""
    path = layout.PackageLayout(root).manifest
    manifest = read_json(path, PackageError, missing=f"not found; is {root} a blipdiffusion-trt package?")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise PackageError(f"{path}: no file list; re-export the package")
    return manifest


def check_digest(root: Path, manifest: Mapping[str, Any], name: str) -> None:
    """The file ``name`` must match its sha256 in the manifest (when listed)."""
    digest = manifest["files"].get(name)
    if digest is None:
        return
    file = Path(root) / name
    if sha256_file(file) != digest:
        raise PackageError(f"package altered: {file} does not match its sha256 in {layout.MANIFEST}")


def check_files(root: Path, manifest: Mapping[str, Any], *, verify: bool, graphs: bool = True) -> None:
    """Every listed file exists (graphs only with ``graphs``); with ``verify`` the non-graph files
    match their sha256 (graphs are checked when handed out: a package holds graphs a generation
    never loads)."""
    for name in manifest["files"]:
        if layout.is_graph_file(name) and not graphs:
            continue
        file = Path(root) / name
        if not file.is_file():
            raise PackageError(f"package incomplete: {file} is missing")
        if verify and not layout.is_graph_file(name):
            check_digest(root, manifest, name)


def digest_tree(root: Path) -> dict[str, str]:
    """Manifest name -> sha256 of every file under ``root`` (but the manifest itself), sorted."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != layout.MANIFEST
    }


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary file in the package, then rename)."""
    path = layout.PackageLayout(root).manifest
    write_atomic(path, json.dumps(dict(manifest), indent=2).encode(), PackageError)
    return path


def replace_variant(root: Path, manifest: Mapping[str, Any], variant: str, **entries: Any) -> dict[str, Any]:
    """The manifest with graph variant ``variant``'s files replaced by those now on disk (none when
    the folder is gone), and top-level ``entries`` set; written atomically and returned."""
    pkg = layout.PackageLayout(root)
    prefix = layout.variant_prefix(variant)
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    folder = pkg.graphs_dir(variant)
    if folder.is_dir():
        for file in sorted(folder.glob("*")):
            if file.is_file():
                files[pkg.name_of(file)] = sha256_file(file)
    updated = {**manifest, **entries, "files": dict(sorted(files.items()))}
    write_manifest(root, updated)
    return updated
