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
:class:`~.base.Backend` object, plus one line in :data:`REGISTRY`. A new option is one field of the
options dataclass, declared with :func:`~.base.option` (its help, and its flag if the command line
has it): every command that runs a package (generate, edit, invert, bench) builds its backend flags
from the registry (:func:`add_option_arguments`), and the chosen backend's options from the flags
given (:func:`options_from_flags`). Modules are imported when their backend or the flags are first
asked for; a backend's libraries (onnxruntime, TensorRT, CUDA, OpenVINO) only when it makes an engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import InputError
from .base import Backend, BackendOptions, Capabilities, OptionInfo, option

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



# ------------------------------------------------------------------------------------------------
# The backends' command-line flags, from their options classes
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flag:
    """One backend flag of the command line: the option it sets, and which backends have it."""

    flag: str
    field: str
    info: OptionInfo
    default: Any
    backends: tuple[str, ...]

    @property
    def dest(self) -> str:
        return self.info.dest

    @property
    def help(self) -> str:
        where = " / ".join(self.backends)
        plural = "backends" if len(self.backends) > 1 else "backend"
        text = f"{where} {plural}: {self.info.help}"
        if isinstance(self.default, bool):
            return text
        if self.default is not None and "default" not in self.info.help:
            text += f" (default {self.default})"
        return text


def option_flags() -> dict[str, Flag]:
    """Every backend flag, in the order of the registry and of the options' fields. A flag several
    backends have (``--threads``) must be the same option in each (field, declaration, default)."""
    flags: dict[str, Flag] = {}
    for name in REGISTRY:
        options_class = get_backend(name).options_class
        for flag, (field, info) in options_class.flags().items():
            default = options_class.field_default(field)
            known = flags.get(flag)
            if known is None:
                flags[flag] = Flag(flag, field, info, default, (name,))
                continue
            if (known.field, known.info, known.default) != (field, info, default):
                raise TypeError(f"{flag} is declared differently by the {', '.join(known.backends)} and {name} "
                                "backends' options")
            flags[flag] = dataclasses.replace(known, backends=(*known.backends, name))
    return flags


def add_option_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add every backend flag to ``parser``. Each is None unless given; the option's default is the
    options class's (:func:`options_from_flags` passes only the flags given)."""
    for flag in option_flags().values():
        info = flag.info
        if isinstance(flag.default, bool):  # a switch: sets the opposite of the default
            parser.add_argument(flag.flag, dest=flag.dest, action="store_const", const=not flag.default,
                                default=None, help=flag.help)
        else:
            parser.add_argument(flag.flag, dest=flag.dest, type=info.type, choices=info.choices,
                                metavar=info.metavar, default=None, help=flag.help)


def given_flags(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The backend flags given on a command line (parsed by a parser with :func:`add_option_arguments`):
    flag -> value."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return {flag.flag: values[flag.dest] for flag in option_flags().values() if values.get(flag.dest) is not None}


def options_from_flags(backend: str, flags: Mapping[str, Any], *, strict: bool = True) -> BackendOptions:
    """``backend``'s options from flags (:func:`given_flags`); the others keep their defaults.

    ``strict``: a flag the backend has no option for is an :class:`InputError` naming the flag (a
    command that runs one backend); else it is left to the backends that have it (the benchmark).
    An option's own error (a bad value) names its field; :func:`flag_names` turns it into the flag.
    """
    chosen = get_backend(backend)
    own = chosen.options_class.flags()
    unknown = [flag for flag in flags if flag not in own]
    if strict and unknown:
        raise InputError(f"{unknown[0]}: not an option of the {backend} backend "
                         f"(its flags: {', '.join(own) or 'none'})")
    return chosen.options(**{own[flag][0]: value for flag, value in flags.items() if flag in own})


def flag_names(backend: str) -> dict[str, str]:
    """Field -> flag of ``backend``'s options that have one (to name the flag in an option's error)."""
    return {field: flag for flag, (field, _) in get_backend(backend).options_class.flags().items()}


__all__ = ["BACKENDS", "REGISTRY", "Backend", "BackendOptions", "Capabilities", "Flag", "OptionInfo",
           "add_option_arguments", "flag_names", "get_backend", "given_flags", "option", "option_flags",
           "options_from_flags"]
