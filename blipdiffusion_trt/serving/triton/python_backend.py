"""What the model files share inside Triton's python backend: parameters, paths, error responses.

``backend_utils`` is the ``triton_python_backend_utils`` module that Triton's python stub
provides; it is passed in, so that these modules import (and are tested) without Triton.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model's config (as Triton passes it: JSON), name -> string value."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def resolve(version_dir: str | Path, path: str) -> Path:
    """A path of a model's parameters: absolute as it is, else relative to its version directory."""
    return Path(path) if os.path.isabs(path) else Path(os.path.normpath(os.path.join(version_dir, path)))


def triton_error(backend_utils: Any, message: str, *, invalid_argument: bool = False, code: str | None = None) -> Any:
    """A ``TritonError``: INVALID_ARG for a bad request, INTERNAL for the server side, or the
    code named by ``code`` ("CANCELLED", "UNAVAILABLE")."""
    errors = backend_utils.TritonError
    name = code or ("INVALID_ARG" if invalid_argument else "INTERNAL")
    try:
        return errors(message, getattr(errors, name))
    except (AttributeError, TypeError):  # python backends before the error codes
        return errors(message)


def error_response(backend_utils: Any, message: str, *, invalid_argument: bool = False, code: str | None = None) -> Any:
    return backend_utils.InferenceResponse(
        error=triton_error(backend_utils, message, invalid_argument=invalid_argument, code=code))


def log_error(backend_utils: Any, message: str) -> None:
    """Into the server's log (``pb_utils.Logger`` where the backend has it)."""
    triton_logger = getattr(backend_utils, "Logger", None)
    if triton_logger is not None:
        triton_logger.log_error(message)
    else:
        logger.error("%s", message)
