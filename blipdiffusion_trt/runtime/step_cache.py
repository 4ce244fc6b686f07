"""Fast mode: DeepCache's step caching (Ma et al., arXiv 2312.00858), branch 0, on exported graphs.

With ``cache_interval`` N > 1, UNet call 0 and every N-th call after it run the full-step graph,
which also returns the deep feature (the hidden state entering the last layer of the last up
block); the calls between run the shallow-step graph on that feature: time embedding, conv_in,
the last up layer, norm and conv_out. The schedule counts UNet calls, not timestep values (PNDM
runs one timestep twice). With a ControlNet, a full step runs the whole ControlNet and a shallow
step only its first residual: the shallow step reads no other.

The deep feature stays where the backend computed it: a kept output (:meth:`Engine.infer`'s
``keep``) is a device buffer on a GPU backend, handed to the shallow engine without a copy to the
host; on the CPU it is the numpy array itself.

The mode is approximate (a shallow step's deep feature is the one of the last full step), opt-in,
and N = 1 runs the exact mode's graphs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..components import DEEP_FEATURE, StepCacheGraphs, step_cache_graphs
from ..errors import InputError
from .inputs import LIMITS, check_int
from .timing import StageTimer

if TYPE_CHECKING:
    from ..package import ModelPackage
    from .engine import Engine

__all__ = ["StepCache", "check_cache_interval", "refuse_cache_interval"]


def check_cache_interval(value: Any) -> int:
    """``cache_interval``: an integer in [1, max steps] (1: the exact mode)."""
    return check_int("cache_interval", value, 1, LIMITS.max_steps)


def refuse_cache_interval(value: Any, flow: str) -> None:
    """One-line refusal of fast mode for a flow that does not implement it (``edit``, ``invert``)."""
    if check_cache_interval(value) > 1:
        raise InputError(f"cache_interval {value} is for generation only: {flow} runs every UNet call in full "
                         f"(pass cache_interval=1)", field="cache_interval")


def require_step_cache(package: "ModelPackage", control: bool, interval: int) -> StepCacheGraphs:
    """The package's step-cache graphs for this generation, or one line saying how to get them."""
    graphs = step_cache_graphs(package.config, control=control)
    if graphs is None:
        raise InputError(f"cache_interval {interval} needs the step-cache graphs, which the package {package.root} "
                         f"lacks (exported with --no-step-cache or before fast mode): re-export it with "
                         f"`blipdiffusion-trt export CHECKPOINT --out DIR` (step-cache graphs are exported by default)",
                         field="cache_interval")
    return graphs


@dataclass
class StepCache:
    """One generation's step cache: the schedule (by UNet call index) and the deep feature of the
    last full step (backend-native: a device value on a GPU backend)."""

    interval: int
    graphs: StepCacheGraphs
    calls: int = 0
    deep_feature: Any = None

    def next_is_full(self) -> bool:
        """Whether the next UNet call is a full step: call 0, then every ``interval`` calls."""
        return self.calls % self.interval == 0

    def predict(self, engine: Callable[[str], "Engine"], feed: Mapping[str, Any],
                control: Mapping[str, Any] | None, timer: StageTimer) -> np.ndarray:
        """One UNet call of the mode: ``feed`` holds sample, timestep and encoder_hidden_states;
        ``control`` the ControlNet's control map and scale (None: no ControlNet)."""
        full = self.next_is_full()
        self.calls += 1
        feed = dict(feed)
        graphs = self.graphs
        if full:
            if control:
                controlnet = engine("controlnet")
                with timer("controlnet"):
                    feed.update(controlnet.infer({**feed, **control}, keep=controlnet.output_names))
            with timer(graphs.full):
                out = engine(graphs.full).infer(feed, keep=[DEEP_FEATURE])
            self.deep_feature = out[DEEP_FEATURE]
            return out["noise_pred"]
        if control:
            shallow_controlnet = engine(graphs.controlnet)
            with timer(graphs.controlnet):
                feed.update(shallow_controlnet.infer({"sample": feed["sample"], **control},
                                                     keep=shallow_controlnet.output_names))
        feed[DEEP_FEATURE] = self.deep_feature
        with timer(graphs.shallow):
            return engine(graphs.shallow).infer(feed)["noise_pred"]
