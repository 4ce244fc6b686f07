"""Exceptions with one-line, user-facing messages.

The CLI prints ``str(error)`` of these and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the offending file or field and the allowed values.
"""


class BlipDiffusionTrtError(Exception):
    """Base class: a problem the user can fix, reported in one line."""


class InputError(BlipDiffusionTrtError, ValueError):
    """A call argument, CLI option or input file is invalid."""


class CheckpointError(BlipDiffusionTrtError):
    """A diffusers checkpoint directory is missing, incomplete or not BLIP-Diffusion."""


class PackageError(BlipDiffusionTrtError):
    """A model package is missing files, altered (sha256 mismatch) or inconsistent."""


class EngineError(BlipDiffusionTrtError):
    """An engine (TensorRT plan, ONNX Runtime session) cannot be built or loaded."""


class ValidationError(BlipDiffusionTrtError):
    """An exported graph does not reproduce PyTorch within its declared tolerance."""
