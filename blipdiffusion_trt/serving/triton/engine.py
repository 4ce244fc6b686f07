"""``TritonEngine``: a runtime :class:`~blipdiffusion_trt.runtime.engine.Engine` that runs a
component model of the same Triton server through BLS (business logic scripting).

The BLS model (:mod:`.bls`) builds the runtime's own
:class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime` with one of these per
component, so the pipeline logic exists once. Outputs come back as numpy arrays in CPU memory
(``keep`` cannot keep anything on a device here). A model that takes a fixed batch (a static
TensorRT engine) gets fewer rows of a batchable component padded to it
(:func:`~blipdiffusion_trt.runtime.engine.rows_to_pad`), as the runtime's TensorRT engine does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ...components import ComponentSpec
from ...errors import EngineError, first_line
from ...runtime.engine import Engine, pad_rows, rows_to_pad


class TritonEngine(Engine):
    """Component ``spec`` served by the model ``model_name``; ``max_batch_size`` is that model's.

    ``backend_utils``: the ``triton_python_backend_utils`` module of the python stub. ``min_rows``:
    the model's fixed batch when above 1 (fewer rows are sent padded to it), else 0.
    """

    def __init__(self, spec: ComponentSpec, model_name: str, max_batch_size: int, backend_utils: Any,
                 min_rows: int = 0) -> None:
        self.spec = spec
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.min_rows = min_rows
        self._pb = backend_utils
        self._dtypes = {t.name: t.dtype for t in spec.inputs}
        # a batched model declares a tensor that is only the batch axis as dims [1] + reshape []
        self._column = {t.name for t in spec.inputs if max_batch_size > 0 and len(t.shape) == 1}
        self._request_options: dict[str, Any] = {}
        if hasattr(backend_utils, "PreferredMemory"):  # outputs in CPU memory, whatever the model's device
            self._request_options["preferred_memory"] = backend_utils.PreferredMemory(
                backend_utils.TRITONSERVER_MEMORY_CPU, 0)

    def infer(self, feed: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
        self.check_open()
        pb = self._pb
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise EngineError(f"model {self.model_name}: no value for {', '.join(missing)}")
        rows = rows_to_pad(self.spec, feed, self.min_rows)
        if rows:
            feed = {name: pad_rows(feed[name], self.min_rows) for name in self.input_names}
        inputs = []
        for name in self.input_names:
            value = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
            if name in self._column:
                value = value.reshape(-1, 1)
            inputs.append(pb.Tensor(name, value))
        request = pb.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                      requested_output_names=self.output_names, **self._request_options)
        response = request.exec()
        if response.has_error():
            raise EngineError(f"model {self.model_name}: {first_line(response.error().message())}")
        outputs = {}
        for name in self.output_names:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise EngineError(f"model {self.model_name} returned no {name!r}")
            if not tensor.is_cpu():
                raise EngineError(f"model {self.model_name}: {name!r} came back in GPU memory")
            outputs[name] = np.array(tensor.as_numpy()[:rows] if rows else tensor.as_numpy(), copy=True)
        return outputs
