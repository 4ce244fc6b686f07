"""ONNX Runtime's optimised CPU graphs kept between runs (the ``cpu`` backend's ``optimized_cache``,
``--ort-cache``): keyed by content, verified when read.

An entry is keyed by what determines it: the source graph's content (the manifest's sha256 of the
graph and of its external data, :meth:`ModelPackage.graph_content_sha256
<blipdiffusion_trt.package.ModelPackage.graph_content_sha256>`), ONNX Runtime's version, the CPU model
("all"-level graphs hold CPU-specific layouts: NCHWc blocks sized to the SIMD width) and the
optimisation level; never by a path, a size or an mtime. An entry is ``<name>-<key>.onnx`` (its
weights in ``<name>-<key>.onnx.data``) and a record ``<name>-<key>.json`` of their sizes and
sha256, written last. An entry is served only when its files match its record: a truncated or
altered copy is rebuilt (with a warning), never loaded. Checking costs one read of the cached
files per load (a few seconds for the full-size UNet, against ~20 s of optimisation it saves).

Entries are written in a staging folder (:class:`~blipdiffusion_trt.fsutil.StagingDir`: a killed
writer's is removed by the next one; while another process writes an entry, this one loads the
package's graph) and renamed into place, record last. An entry file that leads out of the cache
folder (a symlink) is not read, and is replaced, not written through. A cache that cannot be
written (a full disk, a read-only or missing folder) costs the cache, with a warning naming it,
never the run. docs/caches.md has the summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable

from ...errors import EngineError, PackageError
from ...fsutil import OtherWriterError, StagingDir, confined_path
from ...package import sha256_file
from .cache_record import check_record, write_record

logger = logging.getLogger(__name__)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def entry_name(name: str, source_digest: str, graph_optimization: str) -> str:
    """``<name>-<key>``: the cache entry of graph ``name`` with content ``source_digest``."""
    import onnxruntime as ort

    key = "|".join([source_digest, ort.__version__, cpu_model_name(), graph_optimization])
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def file_digest(path: Path) -> str:
    """The content key of a graph not read from a package: its sha256 (and its external data's)."""
    data = path.with_name(path.name + ".data")
    digest = sha256_file(path)
    return f"{digest}+{sha256_file(data)}" if data.is_file() else digest


def _entry_files(cache_dir: Path, entry: str) -> list[Path]:
    graph = cache_dir / f"{entry}.onnx"
    return [graph, graph.with_name(graph.name + ".data")]


def _verified(cache_dir: Path, entry: str) -> Path | None:
    """The entry's graph when its files match its record; None when it is absent or altered."""
    record_path = cache_dir / f"{entry}.json"
    graph = cache_dir / f"{entry}.onnx"
    if not record_path.exists() and not record_path.is_symlink():
        return None
    try:
        for path in (record_path, *_entry_files(cache_dir, entry)):
            confined_path(cache_dir, path, EngineError, what="cache")
        check_record(record_path, allowed=[p.name for p in _entry_files(cache_dir, entry)], required=[graph.name])
    except FileNotFoundError as error:
        logger.warning("optimized_cache: %s is incomplete (%s); rebuilding it", entry, error.filename)
        return None
    except (EngineError, PackageError) as error:
        logger.warning("optimized_cache: %s; rebuilding the entry", error)
        return None
    return graph


def cached_graph(cache_dir: Path, name: str, source_digest: str, graph_optimization: str,
                 optimize: Callable[[Path, str], Any]) -> Path | None:
    """The cached optimised graph of ``name`` (content ``source_digest``), written first when it
    is missing or does not match its record. ``optimize(path, data_name)`` makes ONNX Runtime
    write the optimised graph to ``path`` with its weights in ``data_name`` beside it. None when
    the cache cannot give it, and the caller loads the package's graph: another process is writing
    the same entry right now, or the cache cannot be written (warned, naming the cache)."""
    entry = entry_name(name, source_digest, graph_optimization)
    found = _verified(cache_dir, entry)
    if found is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = StagingDir(cache_dir / entry, EngineError)
    except EngineError as error:
        if isinstance(error.__cause__, OtherWriterError):
            logger.info("optimized_cache: %s; loading the package's graph", error)
            return None
        return _not_cached(cache_dir, name, str(error))
    except OSError as error:
        return _not_cached(cache_dir, name, f"not writable: {error.strerror or error}")
    graph, data = _entry_files(cache_dir, entry)
    try:
        optimize(staging.path / graph.name, data.name)
        # data first, the record last: a visible graph has its data, and a visible record its files
        moved = []
        for path in (data, graph):
            written = staging.path / path.name
            if written.exists():
                os.replace(written, path)
                moved.append(path)
        write_record(cache_dir / f"{entry}.json", moved)
    except OSError as error:
        return _not_cached(cache_dir, name, f"cannot write: {error.strerror or error}")
    except EngineError as error:  # ONNX Runtime could not write the optimised graph (a broken graph fails again uncached)
        return _not_cached(cache_dir, name, str(error))
    finally:
        staging.close()
    return graph


def _not_cached(cache_dir: Path, name: str, reason: str) -> None:
    logger.warning("optimized_cache %s: %s not cached (%s); loading the package's graph without the cache",
                   cache_dir, name, reason)
    return None
