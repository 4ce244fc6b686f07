"""A ``python-cpu`` component model's logic: one package graph on ONNX Runtime's CPU provider.

The graph is the ``model.onnx`` beside the model file (the package's CPU-fused graph where it
has one, as the ``cpu`` runtime backend loads). Every request is checked against the component's
declaration (:mod:`blipdiffusion_trt.components`, read from the package copy the BLS model
holds) before any work: input names, dtypes, ranks, fixed dims, and every dynamic axis inside its
declared min/max. These models share the server's port with ``blip_diffusion``, so a client can
call them directly; without the check one oversized request (a VAE decoder's latents at
256 x 256) grows the stub until it is killed. Requests are run one at a time, never concatenated,
so results do not depend on server load; one bad request gets an error response naming the model
(INVALID_ARG) and does not stop it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...components import Axis, ComponentSpec
from ...errors import InputError, PackageError, first_line
from ...package import ModelPackage
from .python_backend import error_response, model_parameters, resolve

GRAPH_FILE = "model.onnx"


def check_inputs(spec: ComponentSpec, feed: Mapping[str, np.ndarray]) -> None:
    """InputError (one line) unless ``feed`` holds exactly the declared inputs, each of the declared
    dtype and rank, every fixed dim as declared and every axis inside its declared range (the same
    value wherever the axis appears, and a latent axis consistent with its pixel axis)."""
    extra = sorted(set(feed) - set(spec.input_names))
    if extra:
        raise InputError(f"unexpected input {extra[0]!r}; {spec.name} takes {', '.join(spec.input_names)}",
                         field=extra[0])
    values: dict[str, tuple[int, str]] = {}
    axes: dict[str, Axis] = {}
    for tensor in spec.inputs:
        value = feed.get(tensor.name)
        if value is None:
            raise InputError(f"missing input {tensor.name!r}", field=tensor.name)
        if value.dtype != np.dtype(tensor.dtype):
            raise InputError(f"input {tensor.name}: dtype {value.dtype}, expected {tensor.dtype}", field=tensor.name)
        if value.ndim != len(tensor.shape):
            raise InputError(f"input {tensor.name}: shape {list(value.shape)} has rank {value.ndim}, "
                             f"expected {len(tensor.shape)}", field=tensor.name)
        for index, (dim, size) in enumerate(zip(tensor.shape, value.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"input {tensor.name}: dim {index} is {size}, expected {dim}", field=tensor.name)
                continue
            problem = dim.check(int(size))
            if problem:
                raise InputError(f"input {tensor.name}: {problem}", field=tensor.name)
            seen = values.setdefault(dim.name, (int(size), tensor.name))
            if seen[0] != size:
                raise InputError(f"input {tensor.name}: {dim.name}={size}, but {seen[1]} has {dim.name}={seen[0]}",
                                 field=tensor.name)
            axes[dim.name] = dim
    for name, axis in axes.items():  # a latent axis and its pixel axis, where both are fed
        if axis.derived_from in values and values[name][0] != values[axis.derived_from][0] // axis.divisor:
            raise InputError(f"input {values[name][1]}: {name}={values[name][0]} does not match "
                             f"{axis.derived_from}={values[axis.derived_from][0]} (divisor {axis.divisor})",
                             field=values[name][1])


class OnnxRuntimeComponentModel:
    """``model_config``: the model's config (Triton's JSON); ``version_dir``: where ``model.onnx`` is.

    Its parameters name the component (``component``) and the package copy whose declarations
    bound the requests (``package_dir``, relative to the version directory)."""

    def __init__(self, model_config: Mapping[str, Any], version_dir: str | Path, backend_utils: Any) -> None:
        import onnxruntime as ort

        params = model_parameters(model_config)
        self._pb = backend_utils
        self.name = model_config["name"]
        self.inputs = [i["name"] for i in model_config["input"]]
        self.outputs = [o["name"] for o in model_config["output"]]
        package_dir = params.get("package_dir")
        if not package_dir:
            raise PackageError(f"model {self.name}: no package_dir parameter (rewrite the repository with "
                               f"blipdiffusion-trt triton)")
        package = ModelPackage.open(resolve(version_dir, package_dir), graphs=False)
        component = params.get("component") or self.name
        if component not in package.specs:
            raise PackageError(f"model {self.name}: the package declares no component {component!r}")
        self.spec = package.specs[component]
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
        for tensor in request.inputs():
            name = tensor.name()
            value = tensor.as_numpy()
            rank = self.ranks.get(name)
            if rank is not None and value.ndim == rank + 1 and value.shape[-1] == 1:
                value = value.reshape(value.shape[:-1])  # [B, 1] batch-only tensor (config reshape)
            feed[name] = value
        check_inputs(self.spec, feed)
        return feed

    def respond(self, request: Any) -> Any:
        pb = self._pb
        try:
            feed = self._feed(request)
        except InputError as error:
            return error_response(pb, f"{self.name}: {first_line(error)}", invalid_argument=True)
        try:
            values = self.session.run(self.outputs, feed)
        except Exception as error:  # one failed request must not stop the model
            return error_response(pb, f"{self.name}: {type(error).__name__}: {first_line(error)}", invalid_argument=False)
        tensors = [pb.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
        return pb.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.respond(request) for request in requests]

    def close(self) -> None:
        self.session = None
