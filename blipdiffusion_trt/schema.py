"""Declarative checks of the JSON documents the project reads, with one-line errors.

Every JSON file read from disk (``manifest.json``, ``pipeline.json``, the scheduler config, the
tokenizer settings, ``engines.json``, ...) is checked against a *shape* written next to the code
that reads it, before any of its values is used: a wrong type, a missing key or a value outside
its range becomes one line naming the file, the key path and what was expected, instead of an
``AttributeError``/``KeyError``/``ZeroDivisionError`` deep inside the reader or an allocation
sized by a hostile number::

    PIPELINE = Object({"image_size": List(Int(1, 4096), length=2), ...})
    check(data, PIPELINE, source="pipeline.json", error=PackageError)
    # PackageError: pipeline.json: image_size[0]: expected an integer in [1, 4096], got 100000

Standard library only (the runtime, the package format and Triton's python stub import it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["AnyValue", "Bool", "Int", "List", "MapOf", "Nullable", "Number", "Object", "SchemaViolation", "Shape",
           "Str", "check"]

_SHOWN = 60  # characters of an offending value quoted in a message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


class SchemaViolation(Exception):
    """Where (``path``, e.g. ``image_size[0]``) and what is wrong with a document."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _key_path(path: str, key: str) -> str:
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
    if plain:
        return f"{path}.{key}" if path else key
    return f"{path}[{_show(key)}]"


class Shape:
    """What a value must look like; :meth:`check` returns it (possibly normalised) or raises."""

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def fail(self, path: str, expected: str, value: Any) -> SchemaViolation:
        """A value of the wrong type: its type, and the value itself when it is a scalar."""
        shown = _type_name(value)
        if isinstance(value, (bool, int, float, str)):
            shown += f" {_show(value)}"
        return SchemaViolation(path, f"expected {expected}, got {shown}")


@dataclass(frozen=True)
class AnyValue(Shape):
    """Anything (a value kept as it is, e.g. free-form build notes)."""

    def check(self, value: Any, path: str) -> Any:
        return value


@dataclass(frozen=True)
class Bool(Shape):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "true or false", value)
        return value


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{_num(low)}, {_num(high)}]"
    if low is not None:
        return f" >= {_num(low)}"
    if high is not None:
        return f" <= {_num(high)}"
    return ""


@dataclass(frozen=True)
class Int(Shape):
    """An integer (not a boolean, not 2.0) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None

    def check(self, value: Any, path: str) -> int:
        expected = f"an integer{_range_text(self.low, self.high)}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, expected, value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SchemaViolation(path, f"expected {expected}, got {_show(value)}")
        return value


@dataclass(frozen=True)
class Number(Shape):
    """A finite number (integer or float, not a boolean) in ``[low, high]``; ``above``: strictly
    greater; ``finite=False`` also lets infinities through (diffusers writes ``-Infinity`` for an
    unbounded option)."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    finite: bool = True

    def check(self, value: Any, path: str) -> float:
        if self.above is not None:
            expected = f"a finite number in ({self.above:g}, {self.high:g}]" if self.high is not None else \
                f"a finite number > {self.above:g}"
        else:
            expected = "a finite number" + _range_text(self.low, self.high)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, expected, value)
        number = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
        if not self.finite and math.isinf(number) and self.low is None and self.high is None:
            return value
        if (not math.isfinite(number) or (self.above is not None and not number > self.above)
                or (self.low is not None and number < self.low) or (self.high is not None and number > self.high)):
            raise SchemaViolation(path, f"expected {expected}, got {_show(value)}")
        return value


@dataclass(frozen=True)
class Str(Shape):
    """A string: one of ``choices``, matching ``pattern`` (whole string), at most ``max_length`` characters."""

    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    max_length: int = 4096
    description: str = ""

    def check(self, value: Any, path: str) -> str:
        if self.choices is not None:
            expected = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            expected = self.description or "a string"
        if not isinstance(value, str):
            raise self.fail(path, expected, value)
        if len(value) > self.max_length:
            raise SchemaViolation(path, f"expected at most {self.max_length} characters, got {len(value)}")
        if self.choices is not None and value not in self.choices:
            raise SchemaViolation(path, f"expected {expected}, got {_show(value)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise SchemaViolation(path, f"expected {expected}, got {_show(value)}")
        return value


@dataclass(frozen=True)
class Nullable(Shape):
    """``null``, or a value of ``shape``."""

    shape: Shape

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.shape.check(value, path)


@dataclass(frozen=True)
class List(Shape):
    """A list of ``item`` values; ``length``: exactly that many, else ``[min_length, max_length]``."""

    item: Shape
    min_length: int = 0
    max_length: int = 100_000
    length: int | None = None

    def check(self, value: Any, path: str) -> list:
        if not isinstance(value, (list, tuple)):  # JSON gives lists; a Python caller may pass a tuple
            what = f"a list of {self.length} values" if self.length is not None else "a list"
            raise self.fail(path, what, value)
        low, high = (self.length, self.length) if self.length is not None else (self.min_length, self.max_length)
        if not low <= len(value) <= high:
            wanted = f"{low}" if low == high else f"{low} to {high}"
            raise SchemaViolation(path, f"expected {wanted} values, got {len(value)}")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf(Shape):
    """An object with any keys (checked by ``key``) mapping to ``value`` shapes; at most ``max_length`` keys."""

    value: Shape
    key: Shape = Str()
    min_length: int = 0
    max_length: int = 100_000

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, "an object", value)
        if not self.min_length <= len(value) <= self.max_length:
            raise SchemaViolation(path, f"expected {self.min_length} to {self.max_length} entries, got {len(value)}")
        out = {}
        for k, v in value.items():
            where = _key_path(path, str(k))
            self.key.check(k, where)
            out[k] = self.value.check(v, where)
        return out


@dataclass(frozen=True)
class Object(Shape):
    """An object with ``required`` and ``optional`` keys; other keys are kept unchecked (``extra``)
    or refused. ``rules``: checks across keys, ``(message, predicate(obj))``, applied after the
    keys (the message names the keys it is about)."""

    required: Mapping[str, Shape] = field(default_factory=dict)
    optional: Mapping[str, Shape] = field(default_factory=dict)
    extra: bool = True
    rules: tuple[tuple[str, Callable[[dict], bool]], ...] = ()

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, "an object", value)
        missing = [k for k in self.required if k not in value]
        if missing:
            raise SchemaViolation(path, f"missing {', '.join(missing)}")
        if not self.extra:
            unknown = sorted(k for k in value if k not in self.required and k not in self.optional)
            if unknown:
                raise SchemaViolation(path, f"unknown keys {', '.join(map(_show, unknown[:5]))}")
        out = dict(value)
        for name, shape in (*self.required.items(), *self.optional.items()):
            if name in value:
                out[name] = shape.check(value[name], _key_path(path, name))
        for message, rule in self.rules:
            if not rule(out):
                raise SchemaViolation(path, message)
        return out


def check(document: Any, shape: Shape, *, source: str, error: type[Exception]) -> Any:
    """``document`` checked against ``shape``; a violation raises ``error("SOURCE: PATH: what")``."""
    try:
        return shape.check(document, "")
    except SchemaViolation as violation:
        raise error(f"{source}: {violation}") from None
