"""Resident pages of a memory-mapped file, dropped from this process once it no longer reads them.

OpenVINO reads a cached IR's weights through a read-only shared mapping of ``model.bin``, and the
compiled model keeps the mapping open after it has copied (repacked, converted) the weights it runs
with. Every page the compilation touched then stays in the process's resident set: counted in its
RSS, its peak and a container's memory limit, though nothing reads it any more.
``madvise(MADV_DONTNEED)`` on such a mapping drops those pages from the process: a read-only
shared file mapping has no private copy to lose, so a page read again later is faulted back in
from the file (the page cache), with the same bytes. It changes what is resident, never a value.

Linux only (``/proc/self/maps``); elsewhere :func:`release_mapped_file` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux's value on every architecture it runs on


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def read_only_mappings(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(start, end) of this process's read-only mappings of ``path`` (none where /proc is not there)."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n") != target:
                    continue
                perms = fields[1]
                if perms[1] != "-":  # writable: a private page may hold the only copy of its data
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return ranges


def resident_mb(path: str | os.PathLike) -> float:
    """Resident MB of this process's mappings of ``path`` (``Rss`` in /proc/self/smaps; 0 without it)."""
    target = os.path.realpath(path)
    total_kb, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=5)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) == 6 and head[5].rstrip("\n") == target
                elif inside and line.startswith("Rss:"):
                    total_kb += int(line.split()[1])
    except OSError:
        return 0.0
    return total_kb / 1024.0


def release_mapped_file(path: str | Path) -> int:
    """Drop this process's resident pages of every read-only mapping of ``path``; returns how many
    bytes of mappings it advised (0 where it cannot: not Linux, no such mapping)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, end in read_only_mappings(path):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
        else:
            logger.debug("madvise(%s) failed: %s", path, os.strerror(ctypes.get_errno()))
    return released


__all__ = ["read_only_mappings", "release_mapped_file", "resident_mb"]
