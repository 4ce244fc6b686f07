"""Helpers shared by the test modules (fixtures are in conftest.py, stand-ins in fakes/)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from blipdiffusion_trt.components import PipelineConfig
from blipdiffusion_trt.package import read_pipeline_config

REPO = Path(__file__).resolve().parents[1]
TRT_SKIP_REASON = ("TensorRT is not installed (its PyPI wheels download from NVIDIA at install time); "
                   "needs a GPU host or Dockerfile.trt")


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


HAVE_TRT = _trt_importable()


def fixture_config(fixture) -> PipelineConfig:
    """The pipeline config of a fixture's package, as the package states it."""
    return read_pipeline_config(fixture.package)


def copy_package(fixture, tmp_path: Path) -> Path:
    """A copy of a fixture's package the test may alter (the session fixtures stay clean)."""
    target = tmp_path / f"{fixture.name}-copy"
    shutil.copytree(fixture.package, target)
    return target


def png_bytes(width: int, height: int, *, color_type: int = 2, bit_depth: int = 8, idat: bytes = b"") -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (decoding is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat or zlib.compress(b"\0")) + chunk(b"IEND", b"")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``blipdiffusion-trt ARGS`` in a subprocess (offline)."""
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "blipdiffusion_trt.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout)


def onnx_inputs(path: Path) -> dict[str, list[int | str]]:
    """A graph's input names and dims (a number, or the symbolic dim's name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def vocab_bound(package: Path) -> int:
    """Token ids valid for both tokenizers (and the models' embeddings)."""
    import tokenizers

    sizes = [tokenizers.Tokenizer.from_file(str(package / d / "tokenizer.json")).get_vocab_size()
             for d in ("tokenizer", "qformer_tokenizer")]
    return min(sizes + [1000])
