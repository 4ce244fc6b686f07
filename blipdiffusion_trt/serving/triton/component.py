"""A ``python-cpu`` component model's logic: one package graph on ONNX Runtime's CPU provider.

The graph is the ``model.onnx`` beside the model file (the package's CPU-fused graph where it
has one, as the ``cpu`` runtime backend loads). Requests are run one at a time, never
concatenated, so results do not depend on server load; one bad request gets an error response
naming the model and does not stop it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...errors import first_line
from .python_backend import error_response, model_parameters

GRAPH_FILE = "model.onnx"


class OnnxRuntimeComponentModel:
    """``model_config``: the model's config (Triton's JSON); ``version_dir``: where ``model.onnx`` is."""

    def __init__(self, model_config: Mapping[str, Any], version_dir: str | Path, backend_utils: Any) -> None:
        import onnxruntime as ort

        params = model_parameters(model_config)
        self._pb = backend_utils
        self.name = model_config["name"]
        self.inputs = [i["name"] for i in model_config["input"]]
        self.outputs = [o["name"] for o in model_config["output"]]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        threads = int(params.get("intra_op_threads") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        path = Path(version_dir) / GRAPH_FILE
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def _feed(self, request: Any) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.inputs:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            value = tensor.as_numpy()
            rank = self.ranks.get(name)
            if rank is not None and value.ndim == rank + 1 and value.shape[-1] == 1:
                value = value.reshape(value.shape[:-1])  # [B, 1] batch-only tensor (config reshape)
            feed[name] = value
        return feed

    def respond(self, request: Any) -> Any:
        pb = self._pb
        try:
            values = self.session.run(self.outputs, self._feed(request))
        except Exception as error:  # one bad request must not stop the model
            return error_response(pb, f"{self.name}: {type(error).__name__}: {first_line(error)}", invalid_argument=False)
        tensors = [pb.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
        return pb.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.respond(request) for request in requests]

    def close(self) -> None:
        self.session = None
