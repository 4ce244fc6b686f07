"""Small file helpers: JSON reading with one-line errors, atomic file writes and directory replacement."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], *, missing: str = "not found", what: str = "") -> Any:
    """``json.loads`` of a file; a missing or broken file raises ``error`` with a one-line message."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable {what + ' ' if what else ''}({exc})") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing what was there."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_atomic(path: Path, data: bytes | memoryview, error: type[Exception]) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: a reader never sees half a file.

    An ``OSError`` becomes ``error`` with a one-line message; the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
