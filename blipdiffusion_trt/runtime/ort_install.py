"""Which ONNX Runtime is installed, and the one-line error that names the extra to install.

ONNX Runtime ships as two distributions that install the same ``onnxruntime`` module:
``onnxruntime`` (CPU) and ``onnxruntime-gpu`` (CUDA and TensorRT providers). The project's extras
are alternatives (``[cpu]`` or ``[gpu]``); with both installed, whichever was installed last owns
the module's files and the CUDA provider can silently be missing.

:func:`require_onnxruntime` is what the engines call instead of ``import onnxruntime``.
:func:`preload_cuda_libraries` makes the CUDA provider find the CUDA/cuDNN libraries that pip
installed (the ``nvidia-*`` wheels), which its shared library has no search path to.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata as metadata
import io
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import EngineError

logger = logging.getLogger(__name__)

CPU_DIST, GPU_DIST = "onnxruntime", "onnxruntime-gpu"
# providers that only onnxruntime-gpu has
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def _provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def extra_for(providers: Sequence = ()) -> str:
    """The extra that brings the ONNX Runtime these providers need: ``cpu`` or ``gpu``."""
    names = {_provider_name(p) for p in providers}
    return "gpu" if names & GPU_PROVIDERS else "cpu"


def installed_distributions() -> list[str]:
    """The ONNX Runtime distributions pip installed here (both is a broken install)."""
    found = []
    for dist in (CPU_DIST, GPU_DIST):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def _install_hint(extra: str) -> str:
    return f"pip install 'blipdiffusion-trt[{extra}]'"


def require_onnxruntime(providers: Sequence = ("CPUExecutionProvider",)):
    """``import onnxruntime``, or an :class:`EngineError` naming the extra to install.

    ``providers``: what the caller will ask ONNX Runtime for; the first one must be available
    here, else the error names the extra that has it (and the conflict, if both distributions
    are installed).
    """
    extra = extra_for(providers[:1])
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        raise EngineError(f"ONNX Runtime is not installed: {_install_hint(extra)}"
                          + (" (CUDA, TensorRT)" if extra == "gpu" else " (or [gpu] for CUDA)")) from None
    if not providers:
        return ort
    wanted = _provider_name(providers[0])
    available = ort.get_available_providers()
    if wanted not in available:
        dists = installed_distributions()
        if len(dists) > 1:
            raise EngineError(f"{wanted} is not available: both {' and '.join(dists)} are installed and share one "
                              f"module; pip uninstall -y {' '.join(dists)} && {_install_hint(extra)}")
        raise EngineError(f"{wanted} is not available in this ONNX Runtime ({', '.join(dists) or 'unknown build'}, "
                          f"providers: {', '.join(available)}); {_install_hint(extra)}")
    return ort


def _nvidia_library_dirs() -> list[Path]:
    """``lib`` folders of the pip-installed NVIDIA libraries (the ``nvidia`` namespace package),
    wherever they are on ``sys.path``."""
    dirs: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            dirs += sorted(p for p in root.glob("*/lib") if p.is_dir())
    return list(dict.fromkeys(dirs))


def cuda_library_names(cuda_version: str) -> list[str]:
    """The sonames the CUDA provider opens, in dependency order (cublasLt before cublas)."""
    major = cuda_version.split(".")[0]
    cufft = str(int(major) - 1) if major.isdigit() else "*"  # cuFFT's soname is one behind: CUDA 13 -> .so.12
    return [f"libcudart.so.{major}", f"libcublasLt.so.{major}", f"libcublas.so.{major}", "libcurand.so.10",
            f"libcufft.so.{cufft}", "libcudnn.so.9"]


def preload_cuda_libraries(ort=None, *, load: Callable[[str], Any] = ctypes.CDLL) -> list[str]:
    """Load the CUDA and cuDNN libraries the CUDA provider needs; call before its first session.

    The provider's shared library has no search path to the ``nvidia-*`` wheels, so unless
    something (torch) loaded them first, ONNX Runtime falls back to the CPU. ``preload_dlls()``
    (onnxruntime 1.21+) finds them next to onnxruntime; when onnxruntime lives elsewhere (a
    ``--target`` install shadowing another site directory), each library is then loaded from the
    NVIDIA ``lib`` folders on ``sys.path``. Returns the paths loaded that way. A library that is
    already loaded is found by its soname, so loading twice is harmless.
    """
    ort = ort or require_onnxruntime(("CUDAExecutionProvider",))
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # it prints, not logs, what it missed
            preload()
        if printed.getvalue().strip():
            logger.debug("onnxruntime.preload_dlls(): %s", printed.getvalue().strip())
    try:
        cuda_version = importlib.import_module("onnxruntime.capi.build_and_package_info").cuda_version
    except (ImportError, AttributeError):
        cuda_version = ""
    if not cuda_version:
        return []
    loaded = []
    folders = _nvidia_library_dirs()
    for name in cuda_library_names(cuda_version):
        for folder in folders:
            path = folder / name
            if path.is_file():
                try:
                    load(str(path))
                    loaded.append(str(path))
                except OSError as error:
                    logger.debug("cannot load %s: %s", path, error)
                break
    return loaded
