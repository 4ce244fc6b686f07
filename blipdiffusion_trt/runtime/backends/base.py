"""What a backend is: a name, an options class, an engine factory and declared capabilities.

A backend makes one :class:`~blipdiffusion_trt.runtime.engine.Engine` per component with its
factory ``make_engine(package, component, precision, options)``; ``options`` is an instance of
the backend's own frozen dataclass (ONNX Runtime's threads and graph optimisation level,
TensorRT's CUDA graphs, ...), validated when it is built, so a bad value fails before any graph
loads. What a backend can do is declared in :class:`Capabilities`, never probed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

from ...errors import InputError

if TYPE_CHECKING:
    from ...package import ModelPackage
    from ..engine import Engine


# Intra-op threads of the CPU backends when their options leave ``threads`` unset.
THREADS_ENV = "BLIPDIFFUSION_TRT_THREADS"


def default_threads() -> int | None:
    """Intra-op threads from ``BLIPDIFFUSION_TRT_THREADS`` (None: the library's default)."""
    value = os.environ.get(THREADS_ENV)
    return int(value) if value else None


@dataclass(frozen=True)
class OptionInfo:
    """What an options field declares besides its name and default: its help and, where the command
    line has it, its flag (every command that runs a package gets the flag from the registry).

    ``flag``: ``"--graph-optimization"`` (None: Python only). ``type``: what the flag's value is
    parsed with (a bool option's flag takes no value and sets the opposite of its default).
    ``choices``: the allowed values, shown and checked by the parser. ``metavar``: its placeholder.
    """

    help: str
    flag: str | None = None
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The flag's attribute on the parsed arguments: ``--ort-cache`` -> ``ort_cache``."""
        assert self.flag is not None
        return self.flag.lstrip("-").replace("-", "_")


OPTION_INFO = "blipdiffusion_trt.option"  # the key of an option's OptionInfo in its field's metadata


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,  # noqa: A002
           type: Callable[[str], Any] = str, choices: Sequence[str] | None = None,  # noqa: A002
           metavar: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """One backend option: a dataclass field carrying its :class:`OptionInfo`.

    ``threads: int | None = option(None, flag="--threads", type=int, help="intra-op threads")`` is
    all a new option needs: the command line's flag, its help, the parsing and the naming of the flag
    in errors about it follow from it.
    """
    info = OptionInfo(help=help, flag=flag, type=type, choices=tuple(choices) if choices else None, metavar=metavar)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION_INFO: info})


def option_info(f: dataclasses.Field) -> OptionInfo:
    """The :class:`OptionInfo` of an options field (every field of an options class declares one)."""
    info = f.metadata.get(OPTION_INFO)
    if info is None:
        raise TypeError(f"option {f.name} is not declared with backends.base.option(...)")
    return info


def threads_option() -> Any:
    """``threads``, which the CPU backends share: one declaration, one flag."""
    return option(None, flag="--threads", type=int,
                  help="intra-op threads (default: BLIPDIFFUSION_TRT_THREADS, else all cores)")


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options (a frozen dataclass; fields validated in ``__post_init__``,
    each declared with :func:`option`)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def flags(cls) -> dict[str, tuple[str, OptionInfo]]:
        """The fields that have a command-line flag: flag -> (field name, its :class:`OptionInfo`)."""
        out = {}
        for f in dataclasses.fields(cls):
            info = option_info(f)
            if info.flag is not None:
                out[info.flag] = (f.name, info)
        return out

    @classmethod
    def field_default(cls, name: str) -> Any:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


OptionsT = TypeVar("OptionsT", bound=BackendOptions)


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond running the package's graphs of the requested precision."""

    cpu_fused_graphs: bool = False  # loads the package's CPU-fused fp32 graphs where it has them
    cuda_fused_graphs: bool = False  # loads the package's CUDA-fused fp16 graphs where it has them
    optimized_cache: bool = False  # keeps its optimised graphs in a cache directory between runs
    device_outputs: bool = False  # outputs named in ``keep`` stay in device memory
    precisions: tuple[str, ...] = ("fp32", "fp16")  # the package graphs its engines can be made from


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Backend(Generic[OptionsT]):
    """One entry of the backend registry (:mod:`blipdiffusion_trt.runtime.backends`).

    ``device``: where its engines run, ``"cpu"`` or ``"cuda"``. ``is_available()``: whether this
    machine has what it needs (its libraries, its execution provider), without loading anything
    big; a GPU may still turn out to be missing when an engine loads. The benchmark's default
    backends are the available ones.
    """

    name: str
    description: str
    options_class: type[OptionsT]
    factory: Callable[["ModelPackage", str, str, OptionsT], "Engine"]
    capabilities: Capabilities = Capabilities()
    device: str = "cpu"
    is_available: Callable[[], bool] = _always

    def options(self, options: OptionsT | None = None, **values: Any) -> OptionsT:
        """The backend's options: ``options`` (or the defaults) with ``values`` replacing fields.

        A name the backend has no option for is an :class:`InputError` listing the ones it has.
        """
        if options is not None and not isinstance(options, self.options_class):
            raise InputError(f"options for the {self.name} backend must be {self.options_class.__name__}, "
                             f"got {type(options).__name__}", field="options")
        unknown = sorted(set(values) - set(self.options_class.field_names()))
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not an option of the {self.name} backend "
                             f"(its options: {', '.join(self.options_class.field_names()) or 'none'})",
                             field=unknown[0])
        if options is None:
            return self.options_class(**values)
        return dataclasses.replace(options, **values) if values else options

    def options_from(self, values: Mapping[str, Any]) -> OptionsT:
        """The options from a mapping that may hold other backends' options too (a command line's
        flags): the names this backend has are used, the rest ignored."""
        names = set(self.options_class.field_names())
        return self.options(**{k: v for k, v in values.items() if k in names})

    def make_engine(self, package: "ModelPackage", component: str, precision: str,
                    options: OptionsT | None = None) -> "Engine":
        """One component's engine."""
        return self.factory(package, component, precision, self.options(options))

    def load(self, package: "ModelPackage", components: Iterable[str], precision: str,
             options: OptionsT | None = None) -> dict[str, "Engine"]:
        """Engines of ``components``; if one fails, those already made are closed before the error."""
        options = self.options(options)
        engines: dict[str, "Engine"] = {}
        try:
            for name in components:
                engines[name] = self.factory(package, name, precision, options)
        except BaseException:
            for engine in engines.values():
                engine.close()
            raise
        return engines
