"""``manifest.json``: the list of a package's files with their sha256 and size, read, checked and written.

Export writes it once for the whole package (:func:`digest_tree`, :func:`write_manifest`);
``fuse`` replaces the entries of one graph variant (:func:`replace_variant`). Every reader of a
package file goes through :func:`package_file` and :func:`check_listed` (via
:class:`~.model_package.ModelPackage`), which is where a package is confined and verified:

- a manifest name is a relative POSIX path inside the package (no ``..``, no absolute path, no
  backslash), refused when the manifest is read (:data:`MANIFEST_SHAPE`);
- the file it names must stay inside the package once symlinks are resolved, and be a regular
  file (not a FIFO, a device, a directory);
- its size must be the one the manifest records (``sizes``, which export and ``fuse`` write; a
  manifest from before sizes were recorded is hashed without this check, and opening it warns)
  before any byte is hashed, and hashing reads no more than that;
- with ``verify``, its sha256 must match.

Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Mapping

from ..errors import PackageError
from ..fsutil import confined_path, open_regular, read_json, write_atomic
from ..schema import AnyValue, Int, List, MapOf, Nullable, Object, SchemaViolation, Shape, Str
from . import layout

logger = logging.getLogger(__name__)

MAX_FILE_NAME = 1024
MAX_FILES = 10_000
MAX_FILE_SIZE = 1 << 42  # 4 TiB: any size a manifest records is below this


def file_name_problem(name: str) -> str | None:
    """None when ``name`` is a manifest name that stays inside the package, else why not."""
    if not name or len(name) > MAX_FILE_NAME:
        return f"a file name must have 1 to {MAX_FILE_NAME} characters"
    if "\\" in name or "\0" in name:
        return "a file name must not hold a backslash or a NUL character"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path: files must be inside the package"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "leaves the package or is not a plain relative path ('..', '.', '//')"
    if name == layout.MANIFEST:
        return "the manifest cannot list itself"
    return None


class PackageFileName(Shape):
    """A manifest key: a relative POSIX path inside the package (:func:`file_name_problem`)."""

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, "a file name", value)
        problem = file_name_problem(value)
        if problem:
            raise SchemaViolation(path, problem)
        return value


SHA256 = Str(pattern="[0-9a-f]{64}", description="a sha256 (64 lowercase hex digits)")

# What manifest.json must hold. ``files`` and ``sizes`` are what readers rely on; the rest is
# export's record (components, validation figures, tool versions), shaped loosely.
MANIFEST_SHAPE = Object(
    required={"files": MapOf(SHA256, key=PackageFileName(), min_length=1, max_length=MAX_FILES)},
    optional={
        "format_version": Int(1, layout.FORMAT_VERSION),
        "sizes": MapOf(Int(0, MAX_FILE_SIZE), key=PackageFileName(), max_length=MAX_FILES),
        "precisions": List(Str(choices=layout.PRECISIONS), min_length=1, max_length=len(layout.PRECISIONS)),
        "source": Object(optional={"checkpoint": Nullable(Str()), "controlnet": Nullable(Str())}),
        "created": Str(max_length=64),
        "opset": Int(1, 1000),
        "tools": MapOf(Str(max_length=256)),
        "components": MapOf(Object()),
        "cpu_fused": MapOf(AnyValue()),
    },
    rules=(
        ("sizes: lists files that files does not", lambda m: set(m.get("sizes", {})) <= set(m["files"])),
        ("precisions must include fp32", lambda m: "fp32" in m.get("precisions", ["fp32"])),
    ),
)


def sha256_file(path: Path, size: int | None = None) -> str:
    """sha256 of a regular file; with ``size`` its size must be that (checked before reading,
    and no more than that is read)."""
    with open_regular(path, PackageError, what="package file") as f:
        actual = os.fstat(f.fileno()).st_size
        if size is not None and actual != size:
            raise PackageError(f"package altered: {path} has {actual} bytes, {layout.MANIFEST} records {size}")
        digest = hashlib.sha256()
        remaining = actual
        while remaining > 0:
            block = f.read(min(1 << 20, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the package at ``root``, checked against :data:`MANIFEST_SHAPE`; missing,
    unreadable, outside the package or wrongly shaped -> PackageError."""
    path = package_file(root, layout.MANIFEST, missing=f"not found; is {root} a blipdiffusion-trt package?")
    return read_json(path, PackageError, missing=f"not found; is {root} a blipdiffusion-trt package?",
                     shape=MANIFEST_SHAPE, source=str(path))


def package_file(root: Path, name: str, *, missing: str | None = None) -> Path:
    """The path of ``name`` in the package at ``root`` (``PackageLayout(root).path(name)``),
    refused unless it stays inside the package once symlinks are resolved and, where it exists,
    is a regular file. ``missing``: the message when it does not exist (None: no check)."""
    problem = file_name_problem(name) if name != layout.MANIFEST else None
    if problem:
        raise PackageError(f"{root}: {name!r}: {problem}")
    root = Path(root)
    path = root / name
    if not root.is_dir():
        raise PackageError(f"package directory {root} does not exist")
    confined_path(root, path, PackageError, what="package")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if missing is not None:
            raise PackageError(f"{path}: {missing}") from None
        return path
    except OSError as error:
        raise PackageError(f"{path}: cannot read ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise PackageError(f"{path}: not a regular file; package files must be plain files")
    return path


def listed_size(manifest: Mapping[str, Any], name: str) -> int | None:
    """The size the manifest records for ``name`` (None: an older manifest without sizes)."""
    return (manifest.get("sizes") or {}).get(name)


def check_listed(root: Path, manifest: Mapping[str, Any], name: str, *, verify: bool) -> Path:
    """The listed file ``name``, checked as every reader gets it: inside the package, a regular
    file, of the recorded size, and with ``verify`` of the recorded sha256. PackageError otherwise."""
    if name not in manifest["files"]:
        raise PackageError(f"package incomplete: {name} is not in {layout.MANIFEST}")
    path = package_file(root, name, missing="missing (package incomplete)")
    size = listed_size(manifest, name)
    if size is not None and path.stat().st_size != size:
        raise PackageError(f"package altered: {path} has {path.stat().st_size} bytes, {layout.MANIFEST} records {size}")
    if verify and sha256_file(path, size) != manifest["files"][name]:
        raise PackageError(f"package altered: {path} does not match its sha256 in {layout.MANIFEST}")
    return path


def files_sha256(manifest: Mapping[str, Any], names: tuple[str, ...] | list[str], *, source: Path) -> str:
    """One sha256 over the listed digests of ``names`` (the first must be listed; the others are
    included where listed): the digest of the first alone when it is the only one listed."""
    files = manifest["files"]
    if names[0] not in files:
        raise PackageError(f"{source}: {names[0]} is not listed")
    digests = [files[name] for name in names if name in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest()


def check_files(root: Path, manifest: Mapping[str, Any], *, verify: bool, graphs: bool = True) -> None:
    """Every listed file is inside the package, a regular file of its recorded size (graphs only
    with ``graphs``); with ``verify`` the non-graph files match their sha256 (graphs are checked
    when handed out: a package holds graphs a generation never loads)."""
    for name in manifest["files"]:
        if layout.is_graph_file(name) and not graphs:
            continue
        check_listed(root, manifest, name, verify=verify and not layout.is_graph_file(name))


def digest_tree(root: Path) -> dict[str, str]:
    """Manifest name -> sha256 of every file under ``root`` (but the manifest itself), sorted."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != layout.MANIFEST
    }


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary file in the package, then rename), recording
    the size of every listed file: those the manifest records are kept, the others read from disk
    (the files just hashed)."""
    recorded = dict(manifest.get("sizes") or {})
    files = manifest["files"]
    sizes = {name: recorded[name] if name in recorded else (Path(root) / name).stat().st_size for name in files}
    path = layout.PackageLayout(root).manifest
    write_atomic(path, json.dumps({**manifest, "sizes": sizes}, indent=2).encode(), PackageError)
    return path


def replace_variant(root: Path, manifest: Mapping[str, Any], variant: str, **entries: Any) -> dict[str, Any]:
    """The manifest with graph variant ``variant``'s files replaced by those now on disk (none when
    the folder is gone), and top-level ``entries`` set; written atomically and returned."""
    pkg = layout.PackageLayout(root)
    prefix = layout.variant_prefix(variant)
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    sizes = {k: v for k, v in (manifest.get("sizes") or {}).items() if k in files}
    folder = pkg.graphs_dir(variant)
    if folder.is_dir():
        for file in sorted(folder.glob("*")):
            if file.is_file():
                files[pkg.name_of(file)] = sha256_file(file)
    updated = {**manifest, **entries, "files": dict(sorted(files.items())), "sizes": sizes}
    write_manifest(root, updated)
    return read_manifest(root)
