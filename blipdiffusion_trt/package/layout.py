"""The on-disk format of a model package: every file and folder name, in one place.

A package is a directory that needs neither torch nor diffusers::

    manifest.json                     format version, components and their I/O, tools, sha256 of files
    pipeline.json                     PipelineConfig (ctx_begin_pos, image mean/std, latent factor, ...)
    scheduler/scheduler_config.json
    tokenizer/tokenizer.json          CLIP BPE (+ tokenizer_settings.json: pad id, max length)
    qformer_tokenizer/tokenizer.json  (+ tokenizer_settings.json)
    onnx/fp32/<component>.onnx        (+ <component>.onnx.data where a graph exceeds 2 GB)
    onnx/fp16/<component>.onnx        on request: strongly typed fp16 graphs, fp32 inputs/outputs
    onnx/fp32-fused/<component>.onnx  fp32 graphs with ONNX Runtime's CPU fusions (UNet, ControlNet
                                      attention), loaded by the CPU runtime
    onnx/fp16-cuda/<component>.onnx   on request: fp16 graphs with ONNX Runtime's CUDA fusions (UNet,
                                      ControlNet, VAE decoder), loaded by the CUDA provider only
    engines/timing.cache              TensorRT timing cache, reused by every build
    engines/<engine dir>/<component>.plan   TensorRT plans for one GPU architecture and TensorRT version
    engines/<engine dir>/engines.json       what each plan was built from, for and with

Export writes everything but ``engines/``; ``manifest.json`` lists (with sha256) what export and
``fuse`` wrote. Engines are per machine and live beside the listed files, never in the manifest.
The engine directory's name (GPU architecture and TensorRT version) is the engines layer's
(:mod:`blipdiffusion_trt.engines.plans`); where it goes is this module's.

What a backend builds by itself while it runs (ONNX Runtime's TensorRT execution provider: its
engines and timing cache) goes to a per-user cache folder (:func:`user_cache_dir`), never into the
package: a package may be read-only (an image, a shared volume), and the provider writes lazily,
during a generation. Its engine folder is named by the graph's sha256 because the provider's own
cache key hashes the graph's structure and file name, not its weights.

Names here are relative POSIX paths (the manifest's keys); :class:`PackageLayout` turns them into
paths under one package root. Nothing here reads a file except :meth:`PackageLayout.engine_dirs`
(and the environment, for :func:`user_cache_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError

# Version of the format below, written into pipeline.json and manifest.json.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
PIPELINE_CONFIG = "pipeline.json"
SCHEDULER_DIR = "scheduler"
SCHEDULER_CONFIG = f"{SCHEDULER_DIR}/scheduler_config.json"
CLIP_TOKENIZER = "tokenizer"
QFORMER_TOKENIZER = "qformer_tokenizer"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_SETTINGS = "tokenizer_settings.json"

GRAPHS_DIR = "onnx"
PRECISIONS = ("fp32", "fp16")
# fp32 graphs with ONNX Runtime's CPU fusions (written by export/cpu_fusions.py)
CPU_FUSED = "fp32-fused"
# fp16 graphs with ONNX Runtime's CUDA fusions, fp32 inputs/outputs (written by export/gpu_fusions.py)
CUDA_FUSED = "fp16-cuda"
EXTERNAL_DATA_SUFFIX = ".data"

ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
ENGINE_RECORD = "engines.json"
PLAN_SUFFIX = ".plan"

# The per-user cache (see the module docstring): $BLIPDIFFUSION_TRT_CACHE, else
# $XDG_CACHE_HOME/blipdiffusion-trt, else ~/.cache/blipdiffusion-trt.
CACHE_ENV = "BLIPDIFFUSION_TRT_CACHE"
CACHE_APP_DIR = "blipdiffusion-trt"
ORT_TRT_CACHE = "ort-trt"
# The openvino backend's model cache (converted IR and compiled blobs), one folder per graph.
OPENVINO_CACHE = "openvino"
ORT_TRT_TIMING_CACHE = "timing"


def tokenizer_file(tokenizer: str) -> str:
    """``<tokenizer>/tokenizer.json``: a tokenizer's name in the manifest."""
    return f"{tokenizer}/{TOKENIZER_JSON}"


def tokenizer_settings_file(tokenizer: str) -> str:
    """``<tokenizer>/tokenizer_settings.json``: its settings' name in the manifest."""
    return f"{tokenizer}/{TOKENIZER_SETTINGS}"


# The files besides the graphs that a generation reads (each must be listed in the manifest):
# with the manifest, what a server running whole generations needs of a package.
CONFIG_FILES = (
    PIPELINE_CONFIG,
    SCHEDULER_CONFIG,
    *(name for folder in (CLIP_TOKENIZER, QFORMER_TOKENIZER)
      for name in (tokenizer_file(folder), tokenizer_settings_file(folder))),
)


def check_precision(precision: Any) -> str:
    """``precision`` when it is one export can write (:data:`PRECISIONS`), else a one-line
    InputError: a precision no package holds is a wrong argument, not a package to re-export."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        shown = repr(precision) if len(repr(precision)) <= 60 else repr(precision)[:57] + "..."
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)} (the graphs a package can hold), "
                         f"got {shown}", field="precision")
    return precision


def graph_variant(precision: str, *, cpu_fused: bool = False, cuda_fused: bool = False) -> str:
    """The graph folder of a precision: ``fp32``, ``fp16``, ``fp32-fused`` (CPU-fused fp32) or
    ``fp16-cuda`` (CUDA-fused fp16)."""
    if cpu_fused and cuda_fused:
        raise ValueError("a graph is CPU-fused or CUDA-fused, not both")
    if cpu_fused:
        if precision != "fp32":
            raise ValueError(f"CPU-fused graphs are fp32, not {precision}")
        return CPU_FUSED
    if cuda_fused:
        if precision != "fp16":
            raise ValueError(f"CUDA-fused graphs are fp16, not {precision}")
        return CUDA_FUSED
    return precision


def graph_file(component: str, variant: str) -> str:
    """``onnx/<variant>/<component>.onnx``: a graph's name in the manifest."""
    return f"{GRAPHS_DIR}/{variant}/{component}.onnx"


def graph_data_file(component: str, variant: str) -> str:
    """The external-data file next to a graph over 2 GB (its name is written inside the graph)."""
    return graph_file(component, variant) + EXTERNAL_DATA_SUFFIX


def graph_files(component: str, variant: str) -> tuple[str, str]:
    """A graph and its (possible) external-data file."""
    return graph_file(component, variant), graph_data_file(component, variant)


def variant_prefix(variant: str) -> str:
    """The manifest-name prefix of every file of one graph variant."""
    return f"{GRAPHS_DIR}/{variant}/"


def is_graph_file(name: str) -> bool:
    """Whether a manifest name is a graph (or its data): hashed when loaded, not when opened."""
    return name.startswith(f"{GRAPHS_DIR}/")


def user_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user cache folder (:data:`CACHE_ENV`, else ``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    base = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / CACHE_APP_DIR


def ort_trt_engine_cache(graph_sha256: str, cache_root: Path | None = None) -> Path:
    """ONNX Runtime's TensorRT engine cache for one graph (named by the graph's sha256)."""
    if not graph_sha256 or any(c not in "0123456789abcdef" for c in graph_sha256):
        raise ValueError(f"a graph's sha256 names its cache folder, got {graph_sha256!r}")
    return (cache_root or user_cache_dir()) / ORT_TRT_CACHE / graph_sha256[:24]


def ort_trt_timing_cache(cache_root: Path | None = None) -> Path:
    """ONNX Runtime's TensorRT timing cache folder, shared by every graph (timings are per layer and GPU)."""
    return (cache_root or user_cache_dir()) / ORT_TRT_CACHE / ORT_TRT_TIMING_CACHE


def plan_file(component: str) -> str:
    """A TensorRT plan's file name inside its engine directory."""
    return f"{component}{PLAN_SUFFIX}"


@dataclass(frozen=True)
class PackageLayout:
    """The paths of one package (existing or being written, e.g. an export's temporary directory)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def path(self, name: str) -> Path:
        """A manifest name (relative POSIX path) as a path under the root."""
        return self.root / name

    def name_of(self, path: Path) -> str:
        """The manifest name of a path under the root."""
        return Path(path).relative_to(self.root).as_posix()

    # -- configs and tokenizers ------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def pipeline_config(self) -> Path:
        return self.root / PIPELINE_CONFIG

    @property
    def scheduler_config(self) -> Path:
        return self.root / SCHEDULER_CONFIG

    def tokenizer_dir(self, tokenizer: str) -> Path:
        """``tokenizer`` is :data:`CLIP_TOKENIZER` or :data:`QFORMER_TOKENIZER`."""
        if tokenizer not in (CLIP_TOKENIZER, QFORMER_TOKENIZER):
            raise ValueError(f"unknown tokenizer folder {tokenizer!r}")
        return self.root / tokenizer

    def tokenizer_json(self, tokenizer: str) -> Path:
        return self.tokenizer_dir(tokenizer) / TOKENIZER_JSON

    def tokenizer_settings(self, tokenizer: str) -> Path:
        return self.tokenizer_dir(tokenizer) / TOKENIZER_SETTINGS

    # -- graphs ----------------------------------------------------------------------------------

    @property
    def graphs_root(self) -> Path:
        return self.root / GRAPHS_DIR

    def graphs_dir(self, variant: str) -> Path:
        return self.root / GRAPHS_DIR / variant

    def graph(self, component: str, variant: str) -> Path:
        return self.root / graph_file(component, variant)

    # -- engines (per machine, not in the manifest) ----------------------------------------------

    @property
    def engines_root(self) -> Path:
        return self.root / ENGINES_DIR

    @property
    def timing_cache(self) -> Path:
        """The TensorRT builder's default timing cache."""
        return self.root / ENGINES_DIR / TIMING_CACHE

    def engine_dir(self, name: str) -> Path:
        """An engine directory by name (``engines.plans.engine_dir_name`` gives the name)."""
        return self.root / ENGINES_DIR / name

    def plan(self, engine_dir: str, component: str) -> Path:
        return self.engine_dir(engine_dir) / plan_file(component)

    def engine_dirs(self) -> list[Path]:
        """The engine directories present (sorted by name)."""
        if not self.engines_root.is_dir():
            return []
        return sorted(p for p in self.engines_root.iterdir() if p.is_dir())
