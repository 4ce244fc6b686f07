"""The ``blip_diffusion`` model's custom metrics, on Triton's metrics port beside Triton's own.

Made with the python backend's ``MetricFamily`` (Triton 2.51: counters, gauges, histograms); a
backend without it (or the tests' stand-in without metrics) gets :class:`ModelMetrics` that
records nothing. Every metric has a ``model`` label (several packages on one server); the same
family in several instances of a model is one series, so the counters add up over instances.

=======================================  ======================================================
metric                                   the question it answers
=======================================  ======================================================
``blip_diffusion_requests_total``        how did requests end? (``outcome``: ok, invalid,
                                         cancelled, timed_out, failed); requests Triton itself
                                         rejected (a full queue, a queue timeout) never reach
                                         the model: they are in ``nv_inference_request_failure``
``blip_diffusion_requests_in_progress``  how many generations run right now (at most the
                                         instance count); with Triton's
                                         ``nv_inference_pending_request_count`` (the queue) the
                                         signal to scale on
``blip_diffusion_denoising_steps_total`` how much denoising was done (its rate: steps/s, the
                                         throughput in the unit that costs; stopped requests'
                                         steps included)
``blip_diffusion_step_seconds``          how long one denoising step takes under the present
                                         load (histogram: p50/p99 with ``histogram_quantile``;
                                         a loop's first step is counted, not timed)
``blip_diffusion_stage_seconds_total``   where the time goes (``stage``: qformer,
                                         text_encoder, unet, scheduler, vae_decoder, ...): the
                                         runtime's own stage timer, summed
=======================================  ======================================================
"""

from __future__ import annotations

from typing import Any, Mapping

OUTCOMES = ("ok", "invalid", "cancelled", "timed_out", "failed")
# a tiny package's step takes milliseconds on a GPU, a full-size one seconds on a CPU
STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
NOT_STAGES = ("total", "steps")  # the runtime's timings that are not stages


class ModelMetrics:
    """The metrics of one model (``model`` label); a no-op where ``backend_utils`` has no MetricFamily."""

    def __init__(self, backend_utils: Any, model: str) -> None:
        family = getattr(backend_utils, "MetricFamily", None)
        self.enabled = family is not None
        if not self.enabled:
            return
        labels = {"model": model}
        self._families = [
            family(name="blip_diffusion_requests_total", description="requests by outcome",
                   kind=family.COUNTER),
            family(name="blip_diffusion_requests_in_progress", description="generations running now",
                   kind=family.GAUGE),
            family(name="blip_diffusion_denoising_steps_total", description="denoising steps run",
                   kind=family.COUNTER),
            family(name="blip_diffusion_step_seconds", description="seconds per denoising step",
                   kind=family.HISTOGRAM),
            family(name="blip_diffusion_stage_seconds_total", description="seconds spent per pipeline stage",
                   kind=family.COUNTER),
        ]
        requests, in_progress, steps, step_seconds, stages = self._families
        self._requests = {outcome: requests.Metric(labels={**labels, "outcome": outcome}) for outcome in OUTCOMES}
        self._in_progress = in_progress.Metric(labels=labels)
        self._steps = steps.Metric(labels=labels)
        self._step_seconds = step_seconds.Metric(labels=labels, buckets=STEP_BUCKETS)
        self._stage_family = stages
        self._stages: dict[str, Any] = {}
        self._labels = labels

    def started(self) -> None:
        if self.enabled:
            self._in_progress.increment(1)

    def finished(self, outcome: str) -> None:
        if self.enabled:
            self._in_progress.increment(-1)
            self._requests[outcome].increment(1)

    def step(self, seconds: float | None) -> None:
        """One denoising step done; ``seconds``: since the previous one (None for a loop's first)."""
        if self.enabled:
            self._steps.increment(1)
            if seconds is not None:
                self._step_seconds.observe(seconds)

    def stages(self, timings: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for stage, seconds in timings.items():
            if stage in NOT_STAGES:
                continue
            metric = self._stages.get(stage)
            if metric is None:
                metric = self._stages[stage] = self._stage_family.Metric(labels={**self._labels, "stage": stage})
            metric.increment(float(seconds))

    def close(self) -> None:
        # Metric objects before their families (the python backend requires that order)
        self._requests = self._in_progress = self._steps = self._step_seconds = None  # type: ignore[assignment]
        self._stages = {}
        self._families = []
