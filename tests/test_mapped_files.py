"""Dropping the resident pages of a read-only file mapping (runtime/backends/mapped_files.py)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from blipdiffusion_trt.runtime.backends.mapped_files import read_only_mappings, release_mapped_file, resident_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux only")

SIZE = 8 << 20


def _mapped(tmp_path, access=mmap.ACCESS_READ):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=access)
    return path, data, mapping


def test_release_drops_the_resident_pages_and_keeps_the_bytes(tmp_path):
    path, data, mapping = _mapped(tmp_path)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read: resident
        assert resident_mb(path) >= 0.9 * SIZE / 2**20
        assert release_mapped_file(path) >= SIZE
        assert resident_mb(path) < 0.1 * SIZE / 2**20
        np.testing.assert_array_equal(view, data)  # read again: faulted back in from the file, same bytes
        assert resident_mb(path) >= 0.9 * SIZE / 2**20
        del view
    finally:
        mapping.close()
    assert read_only_mappings(path) == [] and release_mapped_file(path) == 0


def test_a_writable_mapping_is_left_alone(tmp_path):
    """A private writable mapping may hold the only copy of a page: it is never advised."""
    path, data, mapping = _mapped(tmp_path, access=mmap.ACCESS_COPY)
    try:
        mapping[:4] = b"\x00\x01\x02\x03"
        assert release_mapped_file(path) == 0
        assert mapping[:4] == b"\x00\x01\x02\x03"
    finally:
        mapping.close()
