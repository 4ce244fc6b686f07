"""The ``blip_diffusion`` model's logic: whole generations over the component models.

:class:`BlipDiffusionModel` opens the repository's copy of the package (configs and tokenizers,
checked against its manifest, no graphs) with :meth:`ModelPackage.open
<blipdiffusion_trt.package.ModelPackage.open>`, and runs the runtime's own
:class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime` with a
:class:`~.engine.TritonEngine` per component of
:func:`~blipdiffusion_trt.components.generation_components`. It parses a request's tensors into
the runtime's arguments and answers every request: an image, or one line (INVALID_ARG for a bad
request, INTERNAL for the server side; a bug's traceback goes to the server's log).

The model file ``model_files/blip_diffusion.py`` creates it from the model's config
(:mod:`.configs` writes the parameters it reads).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...components import generation_components
from ...errors import BlipDiffusionTrtError, InputError, PackageError, first_line
from ...package import ModelPackage
from ...runtime import images
from ...runtime.pipeline import BlipDiffusionRuntime
from ...schema import Int, MapOf, Str, check
from .engine import TritonEngine
from .python_backend import error_response, log_error, model_parameters, resolve


class BlipDiffusionModel:
    """``runtime``: the pipeline (over :class:`TritonEngine`\\ s); ``backend_utils``: the stub's
    ``triton_python_backend_utils``; ``max_image_pixels``: the limit on input images."""

    def __init__(self, runtime: BlipDiffusionRuntime, backend_utils: Any, *,
                 max_image_pixels: int = images.DEFAULT_MAX_PIXELS) -> None:
        self.runtime = runtime
        self._pb = backend_utils
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any], version_dir: str | Path,
                          backend_utils: Any) -> "BlipDiffusionModel":
        """From the model's config (Triton's JSON) and its version directory."""
        params = model_parameters(model_config)
        name = model_config.get("name", "blip_diffusion")
        package = ModelPackage.open(resolve(version_dir, params.get("package_dir") or "package"), graphs=False)
        try:
            models = check(json.loads(params["components"]), MapOf(Str(max_length=256)),
                           source=f"model {name}: parameter components", error=PackageError)
            batch_sizes = check(json.loads(params.get("component_max_batch_sizes") or "{}"), MapOf(Int(0, 1 << 16)),
                                source=f"model {name}: parameter component_max_batch_sizes", error=PackageError)
            max_pixels = check(int(params.get("max_image_pixels") or images.DEFAULT_MAX_PIXELS), Int(1, 1 << 40),
                               source=f"model {name}: parameter max_image_pixels", error=PackageError)
        except (KeyError, ValueError) as error:
            raise PackageError(f"model {name}: parameter components / component_max_batch_sizes / max_image_pixels: "
                               f"{first_line(error)}") from None
        needed = generation_components(package.config)
        missing = [c for c in needed if c not in models]
        if missing:
            raise PackageError(f"model {name}: parameter components names no model for {', '.join(missing)}")
        engines = {c: TritonEngine(package.specs[c], models[c], int(batch_sizes.get(c, 0)), backend_utils) for c in needed}
        return cls(BlipDiffusionRuntime(package, engines), backend_utils, max_image_pixels=max_pixels)

    # -- request parsing ------------------------------------------------------------------------

    def _tensor(self, request: Any, name: str, required: bool) -> np.ndarray | None:
        tensor = self._pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            if required:
                raise InputError(f"missing required input {name!r}", field=name)
            return None
        return tensor.as_numpy()

    def _scalar(self, request: Any, name: str, required: bool = True) -> Any:
        value = self._tensor(request, name, required)
        if value is None:
            return None
        if value.size != 1:
            raise InputError(f"{name}: expected a single value, got shape {list(value.shape)}", field=name)
        return value.reshape(-1)[0]

    def _string(self, request: Any, name: str, required: bool = True) -> str | None:
        value = self._scalar(request, name, required)
        if value is None:
            return None
        if isinstance(value, (bytes, np.bytes_)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{name}: not valid UTF-8", field=name) from None
        return str(value)

    def _image(self, request: Any, name: str, required: bool = True) -> Any:
        value = self._tensor(request, name, required)
        if value is None:
            return None
        return images.load_image(value, field=name, max_pixels=self.max_image_pixels)

    def arguments(self, request: Any) -> dict[str, Any]:
        """The runtime's keyword arguments for a request's tensors."""
        seed = int(self._scalar(request, "seed"))  # checked with the rest by the runtime's check_inputs
        kwargs: dict[str, Any] = dict(
            prompt=self._string(request, "prompt"),
            reference_image=self._image(request, "reference_image"),
            source_subject_category=self._string(request, "source_subject"),
            target_subject_category=self._string(request, "target_subject"),
            num_inference_steps=int(self._scalar(request, "steps")),
            guidance_scale=float(self._scalar(request, "guidance_scale")),
            seed=seed,
            height=int(self._scalar(request, "height")),
            width=int(self._scalar(request, "width")),
            output_type="np",
        )
        negative = self._string(request, "negative_prompt", required=False)
        if negative is not None:
            kwargs["neg_prompt"] = negative
        scheduler = self._string(request, "scheduler", required=False)
        if scheduler is not None:
            kwargs["scheduler"] = scheduler
        condition = self._image(request, "condition_image", required=False)
        if condition is not None:
            kwargs["condition_image"] = condition
        scale = self._scalar(request, "controlnet_conditioning_scale", required=False)
        if scale is not None:
            kwargs["controlnet_conditioning_scale"] = float(scale)
        return kwargs

    # -- serving ----------------------------------------------------------------------------------

    def generate(self, request: Any) -> Any:
        """One request's response: the image, or an error in one line."""
        pb = self._pb
        try:
            result = self.runtime(**self.arguments(request))
        except BlipDiffusionTrtError as error:  # InputError: the request; others (EngineError): the server side
            return error_response(pb, first_line(error), invalid_argument=isinstance(error, InputError))
        except Exception as error:  # a bug: keep serving, log the traceback, answer one line
            log_error(pb, traceback.format_exc())
            return error_response(pb, f"internal error: {type(error).__name__}: {first_line(error)}",
                                  invalid_argument=False)
        image = (result.images[0] * 255).round().astype(np.uint8)  # as runtime.images.to_pil quantises
        return pb.InferenceResponse(output_tensors=[pb.Tensor("image", np.ascontiguousarray(image))])

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.generate(request) for request in requests]

    def close(self) -> None:
        self.runtime.close()
