"""Records of derived files a backend caches between runs (ONNX Runtime's optimised graphs,
OpenVINO's IR): each entry's files with their sizes and sha256, written after the files. An
entry is served only when its files match its record, so a truncated or altered copy is made
again, never loaded. Checking costs one read of the cached files per load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ...errors import EngineError, PackageError
from ...fsutil import read_json, write_atomic
from ...package import sha256_file
from ...schema import Int, MapOf, Object, Str

RECORD_VERSION = 1
_SHA256 = Str(pattern="[0-9a-f]{64}", description="a sha256")
RECORD_SHAPE = Object(required={
    "format_version": Int(RECORD_VERSION, RECORD_VERSION),
    "files": MapOf(Object(required={"sha256": _SHA256, "size": Int(0, 1 << 42)}), min_length=1, max_length=8),
})


def write_record(record_path: Path, files: Iterable[Path]) -> None:
    """The record of ``files`` (in ``record_path``'s folder), written atomically: call it after
    the files are in place, so a visible record always has its files."""
    record = {"format_version": RECORD_VERSION,
              "files": {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}}
    write_atomic(record_path, json.dumps(record, indent=2).encode(), EngineError)


def check_record(record_path: Path, allowed: Iterable[str], required: Iterable[str]) -> None:
    """``record_path`` lists every name in ``required`` and no name outside ``allowed`` (files
    beside the record), and each listed file has its recorded size and sha256.
    :class:`EngineError` (or FileNotFoundError) otherwise."""
    record = read_json(record_path, EngineError, shape=RECORD_SHAPE)
    files = record["files"]
    if set(files) - set(allowed) or set(required) - set(files):
        raise EngineError(f"{record_path}: lists other files than its entry's")
    for name, expected in files.items():
        path = record_path.parent / name
        if path.stat().st_size != expected["size"]:
            raise EngineError(f"{path} has {path.stat().st_size} bytes, {record_path.name} records {expected['size']}")
        try:
            digest = sha256_file(path, expected["size"])
        except PackageError as error:  # not a regular file, or changed while read
            raise EngineError(str(error)) from None
        if digest != expected["sha256"]:
            raise EngineError(f"{record_path.parent / name} does not match its sha256 in {record_path.name}")
