"""The interface every inference backend implements: one :class:`Engine` per component.

An engine runs one component: ``infer(feed, keep=())`` takes named inputs and returns named
outputs. Outputs named in ``keep`` may stay in the backend's own (device) memory and be fed to
another engine of the same backend as they are: that is how ControlNet residuals reach the UNet
without a round trip through the host on a GPU. On the CPU everything is numpy.

The pipeline picks the backend once, when the package is loaded (:mod:`.backends`); the
denoising loop never asks which backend it drives.

An engine built for a fixed batch (a static TensorRT plan, and the Triton model serving one) runs
fewer rows of a batchable component padded (:func:`rows_to_pad`, :func:`pad_rows`): its rows are
independent (``ComponentSpec.batch_axis``), so the last row repeated and the outputs cut back
give what a smaller batch would. The DDIM inversion feeds the UNet one row, where a guided
generation's static engine takes two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np

from ..components import Axis, ComponentSpec
from ..errors import EngineError, PackageError


class Engine(ABC):
    """One component's compiled graph: name-based inputs and outputs, ``infer`` and ``close``."""

    spec: ComponentSpec
    closed: bool = False

    @property
    def input_names(self) -> list[str]:
        return self.spec.input_names

    @property
    def output_names(self) -> list[str]:
        return self.spec.output_names

    @abstractmethod
    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        """Run once. Outputs in ``keep`` may be backend-native (device) values, the rest numpy."""

    def details(self) -> dict[str, Any]:
        """What the backend chose for this engine beyond the graph itself (e.g. the precision it
        computes in), for reports (``--timings``, ``bench.json``); empty where it chose nothing."""
        return {}

    def upload(self, name: str, value: Any) -> Any:
        """``value`` for input ``name``, placed where this engine's calls read it: in device memory
        on a GPU backend (so a value fed every call, e.g. the text embeddings of a generation, is
        copied once, not every call), unchanged on the CPU.

        The uploaded value may be fed to any engine of the same backend. A GPU backend keeps one
        buffer per input name and shape, so it stays valid until the next ``upload`` of the same
        name and shape to this engine.
        """
        return value

    @staticmethod
    def to_host(value: Any) -> np.ndarray:
        """A numpy copy of a value this backend returned or uploaded (a device value is copied back)."""
        if isinstance(value, np.ndarray):
            return value
        numpy = getattr(value, "numpy", None)
        return numpy() if callable(numpy) else np.asarray(value)

    def close(self) -> None:
        """Release what the engine holds (sessions, device memory); ``infer`` fails afterwards.

        Idempotent. Subclasses free their resources, then call this.
        """
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise EngineError(f"{self.spec.name}: the engine was closed")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def rows_to_pad(spec: ComponentSpec, feed: Mapping[str, Any], min_rows: int | None) -> int:
    """The rows ``feed`` holds when they are fewer than ``min_rows`` (an engine's smallest batch)
    and can be padded: ``spec`` is batchable and every input (a host array, or an uploaded device
    value with a ``shape``; the caller pads its host copy) has that many rows. Else 0 (the
    engine's own shape check reports a feed it cannot take)."""
    if not min_rows or min_rows <= 1 or spec.batch_axis is None:
        return 0
    values = [feed.get(name) for name in spec.input_names]
    if not all(len(getattr(v, "shape", ())) > 0 for v in values):
        return 0
    counts = {v.shape[0] for v in values}
    if len(counts) != 1:
        return 0
    (rows,) = counts
    return rows if 0 < rows < min_rows else 0


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``rows`` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


# One input or output of an opened graph, as its backend reports it: name, numpy dtype name, dims
# (an int: static; anything else, e.g. ONNX Runtime's symbolic name or None: dynamic).
GraphTensor = tuple[str, str, Sequence[Any]]


def check_graph_io(spec: ComponentSpec, graph: Any, inputs: Sequence[GraphTensor],
                   outputs: Sequence[GraphTensor], *, built: bool = False, advice: str = "re-export the package") -> None:
    """The opened graph ``graph`` (its path, named in the error) against ``spec``, the
    declaration of its component from the package's config: the same input and output names,
    dtypes and ranks, and every dimension the graph fixes equal to the declared one (a static
    dimension where an axis is declared only when the axis has that one value). A graph swapped in
    from another checkpoint or another component is one :class:`PackageError` line, not a
    backend's traceback at the first call or a wrong-sized output.

    ``built``: an engine built from the graph (a TensorRT plan): an input the graph does not use
    may be gone, and an axis may be fixed to any value of its range (a static-shape plan).
    ``advice``: what the error tells the user to do."""
    for kind, declared, found in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        names = [tensor[0] for tensor in found]
        wanted = [t.name for t in declared]
        subset = built and kind == "inputs"
        if (not set(names) <= set(wanted) or len(set(names)) != len(names)) if subset else sorted(names) != sorted(wanted):
            raise PackageError(f"{graph}: {kind} {names} are not the {spec.name} graph's {wanted} "
                               f"(another graph in its place?); {advice}")
        by_name = {tensor[0]: tensor for tensor in found}
        for tensor in declared:
            if tensor.name not in by_name:
                continue  # an input a built engine dropped
            _, dtype, dims = by_name[tensor.name]
            dims = list(dims)
            where = f"{graph}: {kind[:-1]} {tensor.name}"
            if dtype != tensor.dtype:
                raise PackageError(f"{where} is {dtype}, the {spec.name} declaration says {tensor.dtype}; {advice}")
            if len(dims) != len(tensor.shape):
                raise PackageError(f"{where} has {len(dims)} dimensions, the {spec.name} declaration "
                                   f"{len(tensor.shape)} ({_declared(tensor.shape)}); {advice}")
            for i, (dim, want) in enumerate(zip(dims, tensor.shape)):
                if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 0:
                    continue  # dynamic in the graph: the declaration bounds it
                if isinstance(want, int):
                    allowed = want == dim
                else:
                    allowed = want.min <= dim <= want.max if built else want.min == want.max == dim
                if not allowed:
                    raise PackageError(f"{where}: dimension {i} is {int(dim)} in the graph, the package's config "
                                       f"declares {_declared([want])[1:-1]} (shape {_declared(tensor.shape)}); "
                                       f"the graph does not match this package: {advice}")


def _declared(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else f"{d.name} {d.min}..{d.max}" if isinstance(d, Axis)
                           else str(d) for d in shape) + "]"


def check_output_shapes(spec: ComponentSpec, feed: Mapping[str, Any], outputs: Mapping[str, Any],
                        graph: Any) -> None:
    """Outputs of one call against the declaration at the fed shapes (``spec.output_shapes``):
    a graph whose dynamic dimensions scale otherwise than declared (another checkpoint's VAE
    decoder: another upsampling) is caught at its first call, before a wrong-sized image is written."""
    expected = spec.output_shapes({name: getattr(feed.get(name), "shape", ()) for name in spec.input_names})
    if expected is None:
        return
    for name, shape in expected.items():
        value = outputs.get(name)
        got = value.shape if isinstance(value, np.ndarray) else None  # a device value: its own engine checks it
        if got is not None and tuple(got) != tuple(shape):
            raise PackageError(f"{graph}: output {name} has shape {list(got)} for these inputs, the {spec.name} "
                               f"declaration {list(shape)}; the graph does not match this package: re-export it")
