"""Stand-in for ``triton_python_backend_utils``, imitating Triton's python backend r24.10
(Triton 2.51, the server nvidia-pytriton 0.7.0 bundles).

Only what this project's model files and ``blipdiffusion_trt.serving.triton`` use: ``Tensor``
(``name``, ``as_numpy``, ``is_cpu``), ``InferenceRequest`` (``inputs``,
``requested_output_names``, ``exec``), ``InferenceResponse`` (``output_tensors``, ``has_error``,
``error``), ``TritonError`` with its codes, ``PreferredMemory``, the ``TRITONSERVER_MEMORY_*``
constants, ``Logger`` and the two ``get_*_tensor_by_name`` helpers, which are copies of the real
module's pure-Python ones.

Where the real stub sends a BLS request to the server, :meth:`InferenceRequest.exec` here calls
the model registered under that name with :func:`serve` (an in-process server), one request per
``execute`` call; an unknown model gets the error response Triton gives, and only the requested
outputs come back, as Triton returns them. Requests and logged lines are recorded for tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

# model name -> an object with ``execute(requests) -> responses`` (a TritonPythonModel)
MODELS: dict[str, Any] = {}
# every request exec() sent: (model name, request)
SENT: list[tuple[str, "InferenceRequest"]] = []
# metric family name -> MetricFamily
METRICS: dict[str, "MetricFamily"] = {}


class TritonError(Exception):
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class PreferredMemory:
    def __init__(self, preferred_memory_type: int, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class Tensor:
    def __init__(self, name: str, array: np.ndarray, *, on_gpu: bool = False) -> None:
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        self._name = name
        self._array = array
        self._on_gpu = on_gpu  # the fake's way to make a tensor a GPU model would return

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if self._on_gpu:
            raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._array

    def is_cpu(self) -> bool:
        return not self._on_gpu

    def shape(self) -> list[int]:
        return list(self._array.shape)


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    def __init__(self, model_name: str = "", inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, preferred_memory: PreferredMemory | None = None,
                 **options: Any) -> None:
        self._model_name = model_name
        self._inputs = list(inputs or [])
        self._requested = list(requested_output_names or [])
        self.preferred_memory = preferred_memory
        self.options = options
        # the fake's: how a test cancels a request (after that many is_cancelled() calls), its
        # timeout (microseconds, 0: none), and what a decoupled model sent
        self.cancel_after: int | None = None
        self.cancel_checks = 0
        self.timeout_us = 0
        self.sent: list[tuple["InferenceResponse", int]] = []

    def is_cancelled(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after is not None and self.cancel_checks > self.cancel_after

    def timeout(self) -> int:
        return self.timeout_us

    def get_response_sender(self) -> "ResponseSender":
        return ResponseSender(self)

    def model_name(self) -> str:
        return self._model_name

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        SENT.append((self._model_name, self))
        model = MODELS.get(self._model_name)
        if model is None:
            return InferenceResponse(error=TritonError(
                f"Failed for execute the inference request. Model '{self._model_name}' is not ready.",
                TritonError.NOT_FOUND))
        (response,) = model.execute([self])
        if response.has_error() or not self._requested:
            return response
        return InferenceResponse([t for t in response.output_tensors() if t.name() in self._requested])


class ResponseSender:
    """A decoupled model's sender: records ``(response, flags)`` on its request; nothing after the final flag."""

    def __init__(self, request: InferenceRequest) -> None:
        self._request = request

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._request.sent and self._request.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise TritonModelException("Unable to send response. Response sender has been closed.")
        self._request.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()


class Metric:
    def __init__(self, family: "MetricFamily", labels: dict[str, str], buckets: list[float] | None) -> None:
        self.family = family
        self.labels = dict(labels)
        self.buckets = buckets
        self.values: list[float] = []  # every increment / observation

    def increment(self, value: float) -> None:
        self.values.append(value)

    def observe(self, value: float) -> None:
        self.values.append(value)

    def value(self) -> float:
        return float(sum(self.values))


class MetricFamily:
    """Records its metrics in :data:`METRICS` (name -> family); a family of a name made twice is one."""

    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __new__(cls, name: str, description: str, kind: int) -> "MetricFamily":
        if name in METRICS:
            return METRICS[name]
        family = super().__new__(cls)
        family.name, family.kind, family.metrics = name, kind, []
        METRICS[name] = family
        return family

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.description = description

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802
        if (self.kind == self.HISTOGRAM) != (buckets is not None):
            raise TritonModelException("buckets are for histograms, and histograms need them")
        for metric in self.metrics:
            if metric.labels == (labels or {}):
                return metric
        metric = Metric(self, labels or {}, buckets)
        self.metrics.append(metric)
        return metric


def metric_value(name: str, **labels: str) -> float:
    """The fake's: a metric's sum of increments (a histogram's: of observations), 0 if never made."""
    family = METRICS.get(name)
    for metric in family.metrics if family else []:
        if metric.labels == labels:
            return metric.value()
    return 0.0


class Logger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls.lines.append(("verbose", message))


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


# ------------------------------------------------------------------------------------------------
# The fake's own: the in-process server
# ------------------------------------------------------------------------------------------------

def serve(name: str, model: Any) -> None:
    """Answer BLS requests to ``name`` with ``model.execute``."""
    MODELS[name] = model


def reset() -> None:
    MODELS.clear()
    SENT.clear()
    METRICS.clear()
    Logger.lines.clear()
