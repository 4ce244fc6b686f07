"""Which ONNX Runtime is installed, what its GPU providers need, and the one-line errors that say so.

ONNX Runtime ships as two distributions that install the same ``onnxruntime`` module:
``onnxruntime`` (CPU) and ``onnxruntime-gpu`` (CUDA and TensorRT providers). The project's extras
are alternatives (``[cpu]`` or ``[gpu]``); with both installed, whichever was installed last owns
the module's files and the CUDA provider can silently be missing.

:func:`require_onnxruntime` is what the engines call instead of ``import onnxruntime``.
:func:`ensure_cuda_libraries` (once per process, before the first CUDA session) makes the CUDA
provider find the CUDA/cuDNN libraries that pip installed (the ``nvidia-*`` wheels), which its
shared library has no search path to: without them ONNX Runtime does not fail, it silently runs
the session on the CPU. :func:`ensure_tensorrt_library` does the same for the TensorRT provider,
which links one TensorRT major (the 1.31 provider: ``libnvinfer.so.10`` and
``libnvonnxparser.so.10``, TensorRT 10; ``libnvinfer_plugin.so.10`` when present) and is dropped
just as silently when one of them is missing. :func:`cuda_device_count` asks the driver
whether there is a GPU at all (what the backends' ``is_available`` needs: the GPU wheel lists its
providers on any machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata as metadata
import io
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ...errors import EngineError

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
    """The sonames the CUDA provider opens, in dependency order (cublasLt before cublas): what its
    library links (1.31.1: libcublasLt/libcublas/libcudart.so.13, libcurand.so.10), what it opens
    at run time (libcudnn.so.9; libnvrtc.so.13 for its run-time compiled kernels: "NVRTC library
    could not be loaded" otherwise) and cuFFT."""
    major = cuda_version.split(".")[0]
    cufft = str(int(major) - 1) if major.isdigit() else "*"  # cuFFT's soname is one behind: CUDA 13 -> .so.12
    return [f"libcudart.so.{major}", f"libcublasLt.so.{major}", f"libcublas.so.{major}", "libcurand.so.10",
            f"libcufft.so.{cufft}", "libcudnn.so.9", f"libnvrtc.so.{major}"]


@dataclass
class CudaLibraries:
    """What :func:`preload_cuda_libraries` did: the libraries loaded from the NVIDIA wheels' folders,
    those found nowhere (not in those folders, not by the system loader), and where it looked."""

    cuda_version: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    preload_dlls: str = ""  # what onnxruntime.preload_dlls() printed

    def describe(self) -> str:
        """One clause for an error message: what is missing and where it was looked for."""
        if self.missing:
            where = "onnxruntime.preload_dlls()'s folders, " + ", ".join(self.folders) if self.folders else \
                "onnxruntime.preload_dlls()'s folders"
            note = "" if self.folders else "; no nvidia/*/lib folder on sys.path"
            return f"not found: {', '.join(self.missing)} (looked in {where} and the system library path{note})"
        source = ", ".join(self.folders) or "the system library path"
        return f"CUDA {self.cuda_version or '?'} and cuDNN libraries found ({len(self.loaded)} loaded from {source})"


def _load_library(path: str):
    return ctypes.CDLL(path)


def preload_cuda_libraries(ort=None, *, load: Callable[[str], Any] | None = None) -> CudaLibraries:
    """Load the CUDA and cuDNN libraries the CUDA provider needs; call before its first session.

    The provider's shared library has no search path to the ``nvidia-*`` wheels, so unless
    something (torch) loaded them first, ONNX Runtime falls back to the CPU. ``preload_dlls()``
    (onnxruntime 1.21+) finds them next to onnxruntime; when onnxruntime lives elsewhere (a
    ``--target`` install shadowing another site directory), each library is then loaded from the
    NVIDIA ``lib`` folders on ``sys.path``, else by name (the system loader: ``LD_LIBRARY_PATH``,
    a CUDA toolkit). A library that is already loaded is found by its soname, so loading twice is
    harmless. ``preload_dlls()`` prints (never raises) what it could not load; that goes to the log.
    """
    ort = ort or require_onnxruntime(("CUDAExecutionProvider",))
    load = load or _load_library
    report = CudaLibraries()
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # it prints, not logs, what it missed
            preload()
        report.preload_dlls = printed.getvalue().strip()
        if report.preload_dlls:
            logger.debug("onnxruntime.preload_dlls(): %s", report.preload_dlls)
    try:
        report.cuda_version = importlib.import_module("onnxruntime.capi.build_and_package_info").cuda_version
    except (ImportError, AttributeError):
        report.cuda_version = ""
    if not report.cuda_version:
        return report
    folders = _nvidia_library_dirs()
    report.folders = [str(f) for f in folders]
    for name in cuda_library_names(report.cuda_version):
        found = next((folder / name for folder in folders if (folder / name).is_file()), None)
        try:
            load(str(found) if found is not None else name)
        except OSError as error:
            logger.debug("cannot load %s: %s", found or name, error)
            report.missing.append(name)
            continue
        if found is not None:
            report.loaded.append(str(found))
    return report


# Once per process: the libraries stay loaded, and preload_dlls() is not cheap.
_CUDA_LIBRARIES: CudaLibraries | None = None


def ensure_cuda_libraries(ort=None) -> CudaLibraries:
    """:func:`preload_cuda_libraries` the first time it is called in a process; its report afterwards."""
    global _CUDA_LIBRARIES
    if _CUDA_LIBRARIES is None:
        _CUDA_LIBRARIES = preload_cuda_libraries(ort)
    return _CUDA_LIBRARIES


def cuda_device_count(load: Callable[[str], Any] | None = None) -> int:
    """GPUs the CUDA driver sees (0 without a driver): ``cuInit`` + ``cuDeviceGetCount`` of
    ``libcuda.so.1``, the driver library every CUDA program loads; no CUDA context is created."""
    try:
        driver = (load or _load_library)("libcuda.so.1")
        if driver.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except (OSError, AttributeError):
        return 0


# What ONNX Runtime 1.31.1's TensorRT provider (libonnxruntime_providers_tensorrt.so) needs of
# TensorRT, when its library cannot be read: it links libnvinfer.so.10 and libnvonnxparser.so.10
# (ELF NEEDED entries; besides libcudnn.so.9, libcublas.so.13 and libcudart.so.13, which
# preload_cuda_libraries loads) and has no RUNPATH, so nothing finds them unless they are loaded
# first; it dlopens libnvinfer_plugin.so.10 for TensorRT's own plugins and goes on without them
# ("Default plugin library is not on the path and is therefore ignored").
DEFAULT_TENSORRT_SONAMES = ("libnvinfer.so.10", "libnvonnxparser.so.10", "libnvinfer_plugin.so.10")
DEFAULT_TENSORRT_SONAME = DEFAULT_TENSORRT_SONAMES[0]
_TENSORRT_LIBRARY_STEMS = ("nvinfer", "nvonnxparser", "nvinfer_plugin")  # load order: libnvinfer first
OPTIONAL_TENSORRT_STEMS = frozenset({"nvinfer_plugin"})  # the provider runs without it
TENSORRT_PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"


def tensorrt_sonames(ort) -> list[str]:
    """The TensorRT libraries the installed TensorRT provider needs (``libnvinfer.so.N``,
    ``libnvonnxparser.so.N``, ``libnvinfer_plugin.so.N``), read from the provider's shared library;
    :data:`DEFAULT_TENSORRT_SONAMES` where it cannot be read."""
    provider = Path(getattr(ort, "__file__", "") or ".").parent / "capi" / TENSORRT_PROVIDER_LIBRARY
    try:
        text = provider.read_bytes()
    except OSError:
        return list(DEFAULT_TENSORRT_SONAMES)
    majors = {}
    for stem in _TENSORRT_LIBRARY_STEMS:
        match = re.search(rb"lib" + stem.encode() + rb"\.so\.(\d+)", text)
        majors[stem] = match.group(1).decode() if match else None
    default = majors["nvinfer"] or DEFAULT_TENSORRT_SONAME.rsplit(".", 1)[-1]  # one TensorRT major for all
    return [f"lib{stem}.so.{majors[stem] or default}" for stem in _TENSORRT_LIBRARY_STEMS]


def tensorrt_soname(ort) -> str:
    """The TensorRT library the installed TensorRT provider links (``libnvinfer.so.N``)."""
    return tensorrt_sonames(ort)[0]


def _is_optional(soname: str) -> bool:
    return soname.split(".so", 1)[0].removeprefix("lib") in OPTIONAL_TENSORRT_STEMS


@dataclass
class TensorRTLibrary:
    """What :func:`find_tensorrt_library` loaded: ``soname`` (libnvinfer), ``path`` (its file;
    None: by name, or not at all), ``loaded`` (every library the provider needs is loaded),
    ``libraries`` (soname -> file, None for by name), ``missing`` (needed, not found) and
    ``missing_optional`` (the plugin library: the provider runs without it)."""

    soname: str
    path: str | None = None
    loaded: bool = False
    folders: list[str] = field(default_factory=list)
    libraries: dict[str, str | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)

    def describe(self) -> str:
        major = self.soname.rsplit(".", 1)[-1]
        if self.loaded:
            where = self.path or "the system library path"
            note = f"; without {', '.join(self.missing_optional)} (TensorRT's plugins)" if self.missing_optional else ""
            return f"TensorRT {major} libraries loaded from {where}{note}"
        where = ", ".join(self.folders) + " and " if self.folders else ""
        note = "" if self.folders else "; no tensorrt_libs folder on sys.path"
        missing = self.missing or [self.soname]
        return (f"{', '.join(missing)} (TensorRT {major}, which this provider links) "
                f"{'was' if len(missing) == 1 else 'were'} not found (looked in {where}the system library path{note})")


def find_tensorrt_library(ort, *, load: Callable[[str], Any] | None = None) -> TensorRTLibrary:
    """Load the TensorRT libraries the provider needs (:func:`tensorrt_sonames`), libnvinfer first,
    all from the ``tensorrt_libs`` folder on ``sys.path`` (the pip wheels') that holds libnvinfer,
    else by name. Loaded globally, so the provider's own ``dlopen`` finds them."""
    load = load or _load_library
    sonames = tensorrt_sonames(ort)
    report = TensorRTLibrary(sonames[0])
    folders = [Path(entry or ".") / "tensorrt_libs" for entry in sys.path]
    report.folders = [str(f) for f in dict.fromkeys(folders) if f.is_dir()]
    home = next((Path(f) for f in report.folders if (Path(f) / sonames[0]).is_file()), None)
    for soname in sonames:
        candidates = ([str(home / soname)] if home is not None and (home / soname).is_file() else []) + [soname]
        for candidate in candidates:
            try:
                load(candidate)
            except OSError as error:
                logger.debug("cannot load %s: %s", candidate, error)
                continue
            report.libraries[soname] = candidate if candidate != soname else None
            break
        else:
            (report.missing_optional if _is_optional(soname) else report.missing).append(soname)
    report.loaded = not report.missing
    report.path = report.libraries.get(sonames[0])
    return report


_TENSORRT_LIBRARY: TensorRTLibrary | None = None


def ensure_tensorrt_library(ort) -> TensorRTLibrary:
    """:func:`find_tensorrt_library` once per process (before the first TensorRT-provider session)."""
    global _TENSORRT_LIBRARY
    if _TENSORRT_LIBRARY is None:
        _TENSORRT_LIBRARY = find_tensorrt_library(ort, load=lambda path: _load_global(path))
    return _TENSORRT_LIBRARY


def _load_global(path: str):
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
