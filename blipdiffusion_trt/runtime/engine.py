"""The interface every inference backend implements: one :class:`Engine` per component.

An engine runs one component: ``infer(feed, keep=())`` takes named inputs and returns named
outputs. Outputs named in ``keep`` may stay in the backend's own (device) memory and be fed to
another engine of the same backend as they are: that is how ControlNet residuals reach the UNet
without a round trip through the host on a GPU. On the CPU everything is numpy.

The pipeline picks the backend once, when the package is loaded (:mod:`.backends`); the
denoising loop never asks which backend it drives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

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
