"""Exceptions with one-line, user-facing messages.

The CLI prints ``str(error)`` of these and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the offending file or field and the allowed values.
"""

import signal
import sys
import threading
from typing import Any, Callable


class BlipDiffusionTrtError(Exception):
    """Base class: a problem the user can fix, reported in one line."""


class InputError(BlipDiffusionTrtError, ValueError):
    """A call argument, CLI option or input file is invalid.

    ``field`` names the argument the error is about (``"height"``, ``"reference_image"``); the
    message then starts with that name, so a front end can name its own spelling of it instead
    (the CLI's ``--height``) with :meth:`renamed`.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def renamed(self, name: str) -> "InputError":
        """The same error naming its field ``name``: the leading field name replaced, else prefixed."""
        message = str(self)
        if self.field and message.startswith(self.field):
            message = name + message[len(self.field):]
        else:
            message = f"{name}: {message}"
        return InputError(message, field=self.field)


class CheckpointError(BlipDiffusionTrtError):
    """A diffusers checkpoint directory is missing, incomplete or not BLIP-Diffusion."""


class PackageError(BlipDiffusionTrtError):
    """A model package is missing files, altered (sha256 mismatch) or inconsistent."""


class EngineError(BlipDiffusionTrtError):
    """An engine (TensorRT plan, ONNX Runtime session) cannot be built or loaded."""


class ValidationError(BlipDiffusionTrtError):
    """An exported graph does not reproduce PyTorch within its declared tolerance."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an exception's message (libraries raise multi-line ones) or of a text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def describe(error: BaseException) -> str:
    """``"TypeName: first line of the message"`` (or the type name alone): a library error as a reason."""
    text = first_line(error)
    name = type(error).__name__
    return f"{name}: {text}" if text and text != name else name


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs (temporary
    directories removed, locks released) before the command exits."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def run_reporting_errors(run: Callable[[], int]) -> int:
    """Run a command: user errors print one line and exit 2, Ctrl-C exits 130 and SIGTERM 143
    (both after the command's cleanup), bugs keep their traceback."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run()
    except BlipDiffusionTrtError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
