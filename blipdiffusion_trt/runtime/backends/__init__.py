"""The backend registry: name -> :class:`~.base.Backend`, one module per backend family.

================  =========================  ================================================
name              module                     engines
================  =========================  ================================================
``cpu``           :mod:`.onnxruntime`        ONNX Runtime, CPU (CPU-fused graphs, optimised-graph cache)
``cuda``          :mod:`.onnxruntime_gpu`    ONNX Runtime, CUDA provider with IO binding (CUDA-fused graphs, CUDA graphs)
``ort-tensorrt``  :mod:`.onnxruntime_gpu`    ONNX Runtime, TensorRT execution provider
``tensorrt``      :mod:`.tensorrt`           TensorRT plans from ``blipdiffusion-trt build``
``openvino``      :mod:`.openvino`           OpenVINO, CPU (the fp32 graphs in bf16 where the CPU has it)
================  =========================  ================================================

A new backend is one module defining its options dataclass, its :class:`~..engine.Engine` and a
:class:`~.base.Backend` object, plus one line in :data:`REGISTRY`. Modules are imported when
their backend is first asked for, so naming the backends (the CLI's help) imports none of them,
and a backend's libraries (onnxruntime, TensorRT, CUDA, OpenVINO) are imported only when it makes an engine.
"""

from __future__ import annotations

import importlib

from ...errors import InputError
from .base import Backend, BackendOptions, Capabilities

# name -> (module in this package, the Backend object's name in it)
REGISTRY: dict[str, tuple[str, str]] = {
    "cpu": ("onnxruntime", "CPU"),
    "cuda": ("onnxruntime_gpu", "CUDA"),
    "ort-tensorrt": ("onnxruntime_gpu", "ORT_TENSORRT"),
    "tensorrt": ("tensorrt", "TENSORRT"),
    "openvino": ("openvino", "OPENVINO"),
}
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is an :class:`InputError` listing the known ones."""
    entry = REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}", field="backend")
    module, attribute = entry
    backend = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    assert backend.name == name, (backend.name, name)
    return backend


__all__ = ["BACKENDS", "REGISTRY", "Backend", "BackendOptions", "Capabilities", "get_backend"]
