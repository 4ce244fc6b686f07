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

from ..components import ComponentSpec
from ..errors import EngineError


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
