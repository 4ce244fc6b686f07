"""The ``blip_diffusion`` model's logic: whole generations (and edits) over the component models.

:class:`BlipDiffusionModel` opens the repository's copy of the package (configs and tokenizers,
checked against its manifest, no graphs) with :meth:`ModelPackage.open
<blipdiffusion_trt.package.ModelPackage.open>`, and runs the runtime's own
:class:`~blipdiffusion_trt.runtime.pipeline.BlipDiffusionRuntime` with a
:class:`~.engine.TritonEngine` per component of
:func:`~blipdiffusion_trt.components.generation_components` (and, made on the first edit, of
:func:`~blipdiffusion_trt.components.editing_components` where the repository serves them). It
parses a request's tensors into the runtime's arguments and answers every request: an image, or
one line (INVALID_ARG for a bad request, INTERNAL for the server side; a bug's traceback goes to
the server's log).

A request with ``original_subject`` is an edit (``BlipDiffusionRuntime.edit``): of the image
generated from ``seed``, or of the real image ``image`` (UINT8 HxWx3); ``cross_replace_steps``,
``self_replace_steps``, ``blend_threshold`` and ``local_blend`` (false: none) are optional. Its
response holds ``image`` (the edited image) and ``source_image`` (the source, or the real image's
reconstruction).

The model file ``model_files/blip_diffusion.py`` creates it from the model's config
(:mod:`.configs` writes the parameters it reads).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from time import monotonic, perf_counter
from typing import Any, Callable, Mapping

import numpy as np

from ...components import editing_components, generation_components
from ...errors import BlipDiffusionTrtError, InputError, PackageError, first_line
from ...package import ModelPackage
from ...runtime import images
from ...runtime.pipeline import BlipDiffusionRuntime
from ...runtime.step_cache import refuse_cache_interval
from ...schema import Int, MapOf, Str, check
from .engine import TritonEngine
from .metrics import ModelMetrics
from .python_backend import error_response, log_error, model_parameters, resolve

# inputs only an edit takes (``original_subject`` makes a request an edit)
EDIT_ONLY_INPUTS = ("image", "cross_replace_steps", "self_replace_steps", "blend_threshold", "local_blend")


class RequestStopped(Exception):
    """A request stopped between denoising steps; ``code``: the TritonError code of its response."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ServedRuntime(BlipDiffusionRuntime):
    """The runtime, noting the step count of the denoising loop it is about to run (its
    scheduler's timesteps: PNDM runs one more than asked), for progress and stop messages."""

    loop_steps = 0

    def _prepare_scheduler(self, name: str, num_inference_steps: int):
        scheduler = super()._prepare_scheduler(name, num_inference_steps)
        self.loop_steps = len(scheduler.timesteps)
        return scheduler


class BlipDiffusionModel:
    """``runtime``: the pipeline (over :class:`TritonEngine`\\ s); ``backend_utils``: the stub's
    ``triton_python_backend_utils``; ``max_image_pixels``: the limit on input images."""

    def __init__(self, runtime: BlipDiffusionRuntime, backend_utils: Any, *,
                 max_image_pixels: int = images.DEFAULT_MAX_PIXELS, editing: bool = False,
                 name: str = "blip_diffusion", progress: bool = False) -> None:
        """``editing``: the repository serves the editing graphs (the runtime loads them on first use);
        ``name``: the model's (its metrics' label); ``progress``: the decoupled variant, which
        streams a progress response per step before the image."""
        self.runtime = runtime
        self._pb = backend_utils
        self.max_image_pixels = max_image_pixels
        self.editing = editing
        self.progress = progress
        self.metrics = ModelMetrics(backend_utils, name)

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
            min_rows = check(json.loads(params.get("component_min_rows") or "{}"), MapOf(Int(0, 1 << 16)),
                             source=f"model {name}: parameter component_min_rows", error=PackageError)
            max_pixels = check(int(params.get("max_image_pixels") or images.DEFAULT_MAX_PIXELS), Int(1, 1 << 40),
                               source=f"model {name}: parameter max_image_pixels", error=PackageError)
        except (KeyError, ValueError) as error:
            raise PackageError(f"model {name}: parameter components / component_max_batch_sizes / "
                               f"component_min_rows / max_image_pixels: {first_line(error)}") from None
        needed = generation_components(package.config)
        missing = [c for c in needed if c not in models]
        if missing:
            raise PackageError(f"model {name}: parameter components names no model for {', '.join(missing)}")

        def engine(component: str) -> TritonEngine:
            if component not in models:
                raise PackageError(f"model {name}: this repository serves no {component} model")
            return TritonEngine(package.specs[component], models[component], int(batch_sizes.get(component, 0)),
                                backend_utils, int(min_rows.get(component, 0)))

        engines = {c: engine(c) for c in needed}
        editing = package.config.has_editing and all(c in models for c in editing_components(package.config))
        return cls(ServedRuntime(package, engines, load_engine=engine), backend_utils,
                   max_image_pixels=max_pixels, editing=editing, name=name,
                   progress=params.get("progress") == "true")

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

    def _given(self, request: Any, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if self._pb.get_input_tensor_by_name(request, n) is not None]

    def is_edit(self, request: Any) -> bool:
        """Whether the request is an edit (it has ``original_subject``)."""
        return self._pb.get_input_tensor_by_name(request, "original_subject") is not None

    def arguments(self, request: Any) -> dict[str, Any]:
        """The runtime's keyword arguments for a request's tensors (a generation's, or an edit's)."""
        edit_only = self._given(request, EDIT_ONLY_INPUTS)
        if edit_only and not self.is_edit(request):
            raise InputError(f"{edit_only[0]}: an input of edits; pass original_subject to edit", field=edit_only[0])
        seed = int(self._scalar(request, "seed"))  # checked with the rest by the runtime's checks
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
        cache_interval = self._scalar(request, "cache_interval", required=False)
        if self.is_edit(request):
            if cache_interval is not None:
                refuse_cache_interval(int(cache_interval), "edit")
            kwargs = self._edit_arguments(request, kwargs)
        elif cache_interval is not None:
            kwargs["cache_interval"] = int(cache_interval)
        return kwargs

    def _edit_arguments(self, request: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """An edit's keyword arguments: the generation's (checked as such) and the edit's own."""
        if not self.editing:
            raise InputError("original_subject: this repository serves no editing graphs (its package was "
                             "exported without them)", field="original_subject")
        generation_only = [k for k in ("condition_image", "controlnet_conditioning_scale") if k in kwargs]
        if generation_only:
            raise InputError(f"{generation_only[0]}: not an input of edits (an edit runs no ControlNet)",
                             field=generation_only[0])
        kwargs["original_subject"] = self._string(request, "original_subject")
        image = self._image(request, "image", required=False)
        if image is not None:
            kwargs["image"] = image
        for name in ("cross_replace_steps", "self_replace_steps", "blend_threshold"):
            value = self._scalar(request, name, required=False)
            if value is not None:
                kwargs[name] = float(value)
        local_blend = self._scalar(request, "local_blend", required=False)
        if local_blend is not None and not bool(local_blend):
            if "blend_threshold" in kwargs:
                raise InputError("blend_threshold and local_blend=false given: pass one of them",
                                 field="blend_threshold")
            kwargs["blend_threshold"] = None
        return kwargs

    # -- serving ----------------------------------------------------------------------------------

    def _stop_check(self, request: Any) -> Callable[[int, int], None]:
        """``check(done, steps)``: raises :class:`RequestStopped` when the request was cancelled (its gRPC
        client cancelled it, or Triton did) or ran past its own ``timeout`` (microseconds, from the
        start of its execution; its time in the queue is bounded by the queue policy)."""
        is_cancelled = getattr(request, "is_cancelled", None)
        timeout_us = getattr(request, "timeout", lambda: 0)() or 0
        deadline = monotonic() + timeout_us / 1e6 if timeout_us > 0 else None

        def check(done: int, steps: int) -> None:
            if is_cancelled is not None and is_cancelled():
                raise RequestStopped(f"cancelled after {done} of {steps} denoising steps", "CANCELLED")
            if deadline is not None and monotonic() > deadline:
                raise RequestStopped(f"timed out: its timeout of {timeout_us / 1000:g} ms passed after {done} of "
                                     f"{steps} denoising steps", "UNAVAILABLE")

        return check

    def generate(self, request: Any, progress: Callable[[int, int], None] | None = None) -> Any:
        """One request's response: the image (an edit's: and its source image), or an error in one line.

        Between denoising steps the request is checked for cancellation and for its own timeout
        (then it stops there: CANCELLED or UNAVAILABLE), and ``progress(done, steps)`` is called."""
        pb = self._pb
        outcome = "failed"
        self.metrics.started()
        try:
            kwargs = self.arguments(request)
            check = self._stop_check(request)
            check(0, int(kwargs["num_inference_steps"]))  # cancelled, or out of time, while it waited in the queue
            last: list[Any] = [None, 0]  # the previous step's end, steps done

            def after_step(*_: Any) -> None:
                now = perf_counter()
                last[1] += 1
                steps = getattr(self.runtime, "loop_steps", 0) or int(kwargs["num_inference_steps"])
                # the first step's time is not known (its start is inside the runtime)
                self.metrics.step(None if last[0] is None else now - last[0])
                last[0] = now
                if progress is not None:
                    progress(last[1], steps)
                check(last[1], steps)

            if "original_subject" in kwargs:
                result = self.runtime.edit(**kwargs, callback=after_step)
                outputs = {"image": result.edited, "source_image": result.source}
            else:
                result = self.runtime(**kwargs, callback=after_step)
                outputs = {"image": result.images[0]}
            self.metrics.stages(result.timings)
            outcome = "ok"
        except RequestStopped as stop:
            outcome = "cancelled" if stop.code == "CANCELLED" else "timed_out"
            return error_response(pb, str(stop), code=stop.code)
        except BlipDiffusionTrtError as error:  # InputError: the request; others (EngineError): the server side
            outcome = "invalid" if isinstance(error, InputError) else "failed"
            return error_response(pb, first_line(error), invalid_argument=isinstance(error, InputError))
        except Exception as error:  # a bug: keep serving, log the traceback, answer one line
            log_error(pb, traceback.format_exc())
            return error_response(pb, f"internal error: {type(error).__name__}: {first_line(error)}",
                                  invalid_argument=False)
        finally:
            self.metrics.finished(outcome)
        # quantised as runtime.images.to_pil does
        tensors = [pb.Tensor(name, np.ascontiguousarray((image * 255).round().astype(np.uint8)))
                   for name, image in outputs.items()]
        return pb.InferenceResponse(output_tensors=tensors)

    def stream(self, request: Any) -> None:
        """The decoupled (streaming) variant: a response with ``step`` and ``steps`` after every
        denoising step, then the final one (the image, or the error) flagged complete."""
        pb = self._pb
        sender = request.get_response_sender()

        def progress(done: int, steps: int) -> None:
            sender.send(pb.InferenceResponse(output_tensors=[
                pb.Tensor("step", np.array([done], np.int32)), pb.Tensor("steps", np.array([steps], np.int32))]))

        sender.send(self.generate(request, progress), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.progress:
            for request in requests:
                self.stream(request)
            return None  # a decoupled model answers through each request's response sender
        return [self.generate(request) for request in requests]

    def close(self) -> None:
        self.metrics.close()
        self.runtime.close()
