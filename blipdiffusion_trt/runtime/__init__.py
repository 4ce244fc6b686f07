"""Torch-free runtime: ``from blipdiffusion_trt.runtime import BlipDiffusionRuntime``.

Imports numpy, onnxruntime, tokenizers, Pillow (and OpenCV for canny edges; OpenVINO and NNCF for
the openvino backend) only; never torch, diffusers, transformers or the export code.
"""

_PIPELINE_NAMES = {"BlipDiffusionRuntime", "PipelineOutput", "SubjectEmbedding"}


def __getattr__(name: str):
    # Lazy, so that importing e.g. runtime.schedulers does not load ONNX Runtime.
    if name in _PIPELINE_NAMES:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
