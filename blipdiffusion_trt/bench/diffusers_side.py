"""diffusers' side of the benchmark: its ``BlipDiffusionPipeline`` (or the ControlNet variant) on
the same device, with the same latents and the scheduler of the same name.

The timed generations run as a user runs them: nothing hooked into them (a synchronisation per
module call would stall diffusers' loop, which otherwise queues the GPU ahead of it). Per-stage
times, the loop time and the host overhead per step come from one more, instrumented generation:
on a GPU, CUDA events around each module call and at the loop's ends (no synchronisation inside
the loop; times on the GPU's timeline), on the CPU host clocks. That generation also records each
module's first call, replayed afterwards to time one call at exactly the shapes it used.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

from ..runtime.schedulers import SCHEDULERS
from .settings import NEGATIVE_PROMPT, PROMPT, SUBJECT, Settings, bench_inputs
from .stats import generation_figures, summarize, time_calls

# the modules whose time is the denoising loop's work; the rest of the loop is host overhead
LOOP_MODULES = ("unet", "unet_plain", "controlnet")


def diffusers_scheduler(name: str) -> str:
    """The diffusers class of our scheduler ``name``: each of ours is named as the one it ports."""
    return SCHEDULERS[name].__name__


def run_diffusers(pipe, settings: Settings, reference, condition, latents, device: str, dtype):
    import torch

    b = settings.batch
    args = ([PROMPT] * b, [reference] * b if b > 1 else reference)
    if condition is not None:
        args += (condition,)
    args += ([SUBJECT] * b, [SUBJECT] * b)
    with torch.no_grad():
        images = pipe(*args, latents=torch.from_numpy(latents).to(device=device, dtype=dtype),
                      guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                      num_inference_steps=settings.steps, neg_prompt=NEGATIVE_PROMPT, output_type="pt").images
    # what output_type="np" does, in float32: diffusers' BLIP image processor converts a bf16 tensor
    # to numpy as it is, which numpy cannot hold
    return images.float().permute(0, 2, 3, 1).cpu().numpy()


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_diffusers(checkpoint: Path, device: str, settings: Settings, *, torch_compile: bool, threads: int | None,
                   precision: str = "fp32"):
    """diffusers' pipeline on ``device`` in ``precision`` (a torch dtype: "fp32", "bf16", "fp16"),
    as a user would set ``torch_dtype``."""
    import torch

    from ..export.exporter import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(checkpoint)
    dtype = getattr(torch, TORCH_DTYPES[precision])
    pipe.to(device=device, dtype=dtype)
    import diffusers

    cls = getattr(diffusers, diffusers_scheduler(settings.scheduler))
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if torch_compile:
        pipe.unet = torch.compile(pipe.unet)
        if getattr(pipe, "controlnet", None) is not None:
            pipe.controlnet = torch.compile(pipe.controlnet)
    return pipe, dtype


class Clock:
    """Marks on the GPU's timeline (CUDA events: no synchronisation) or the host's (CPU)."""

    def __init__(self, gpu: bool):
        import torch

        self.torch, self.gpu = torch, gpu

    def mark(self):
        if self.gpu:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Between two marks; on a GPU only after a synchronisation (the events must have completed)."""
        return start.elapsed_time(end) / 1e3 if self.gpu else end - start


class DiffusersProbe:
    """Forward hooks (and wrappers on ``vae.decode``/``scheduler.step``) on diffusers' pipeline, for
    the instrumented generation only: a mark before and after every module call, at the loop's
    start (first ControlNet/UNet call) and end (the VAE decode), and each stage's first call's
    arguments for the replay."""

    def __init__(self, pipe, clock: Clock):
        self.pipe, self.clock = pipe, clock
        self.marks: list[tuple[str, Any, Any]] = []
        self.recorded: dict[str, tuple[Callable, tuple, dict]] = {}
        self.loop_start = self.loop_end = None
        self.handles: list = []
        self._open: dict[str, tuple[str, Any]] = {}
        modules = {"qformer": pipe.qformer, "text_encoder": pipe.text_encoder, "unet": pipe.unet}
        if getattr(pipe, "controlnet", None) is not None:
            modules["controlnet"] = pipe.controlnet
        self.has_controlnet = "controlnet" in modules
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(key, module), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(key)))
        self._orig_decode = pipe.vae.decode
        self._orig_step = pipe.scheduler.step

        def decode(*a, **kw):
            if self.loop_end is None:
                self.loop_end = clock.mark()
            self._record("vae_decoder", self._orig_decode, a, kw)
            start = clock.mark()
            out = self._orig_decode(*a, **kw)
            self.marks.append(("vae_decoder", start, clock.mark()))
            return out

        def step(*a, **kw):
            start = clock.mark()
            out = self._orig_step(*a, **kw)
            self.marks.append(("scheduler", start, clock.mark()))
            return out

        pipe.vae.decode = decode
        pipe.scheduler.step = step

    def _stage(self, key: str, kwargs) -> str:
        if key == "text_encoder":
            return "text_encoder" if kwargs.get("ctx_embeddings") is not None else "text_encoder_plain"
        if key == "unet" and not self.has_controlnet:
            return "unet_plain"
        return key

    def _pre(self, key: str, module):
        def hook(mod, args, kwargs):
            stage = self._stage(key, kwargs)
            mark = self.clock.mark()
            if key in ("unet", "controlnet") and self.loop_start is None:
                self.loop_start = mark
            self._record(stage, module, args, kwargs)
            self._open[key] = (stage, mark)
            return None

        return hook

    def _post(self, key: str):
        def hook(mod, args, output):
            stage, start = self._open.pop(key)
            self.marks.append((stage, start, self.clock.mark()))
            return None

        return hook

    def _record(self, stage: str, fn, args, kwargs) -> None:
        if stage not in self.recorded:
            self.recorded[stage] = (fn, tuple(args), dict(kwargs))

    def figures(self, total: float) -> dict[str, float]:
        """One generation's figures (after a synchronisation): time per stage, loop, UNet calls."""
        run: dict[str, float] = {"total": total}
        calls = 0
        for stage, start, end in self.marks:
            run[stage] = run.get(stage, 0.0) + self.clock.seconds(start, end)
            calls += stage in ("unet", "unet_plain")
        run["steps"] = float(calls)
        run["denoise_loop"] = self.clock.seconds(self.loop_start, self.loop_end) if self.loop_start else 0.0
        return run

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.pipe.vae.decode = self._orig_decode
        self.pipe.scheduler.step = self._orig_step


def bench_diffusers(checkpoint: Path, device: str, settings: Settings, args, bar, precision: str = "fp32") -> dict[str, Any]:
    """Load, generations, each module's call and a scheduler step of diffusers on ``device`` in ``precision``."""
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    result: dict[str, Any] = {"label": f"diffusers torch {device} {precision}", "device": "cpu" if device == "cpu" else "gpu",
                              "torch_device": device}
    reference, condition, latents = bench_inputs(settings)
    side = f"diffusers {precision}"
    bar.set_postfix_str(f"{side}: load")
    import diffusers.pipelines  # noqa: F401  (imports are the cold start's; this times the loading)
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    pipe, dtype = load_diffusers(checkpoint, device, settings, torch_compile=args.torch_compile, threads=args.threads,
                                 precision=precision)
    sync()
    result["load_warm"] = summarize([time.perf_counter() - t0])
    result["precision"] = precision
    result["torch_compile"] = bool(args.torch_compile)
    result["torch_threads"] = torch.get_num_threads()
    bar.update(1)

    totals, image = [], None
    for i in range(args.warmup + args.runs):  # as a user runs it: nothing hooked in
        bar.set_postfix_str(f"{side}: generation {i + 1}/{args.warmup + args.runs}")
        sync()
        start = time.perf_counter()
        image = run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
        sync()
        total = time.perf_counter() - start
        if i == 0:
            result["first_generation"] = summarize([total])
        if i >= args.warmup:
            totals.append(total)
        bar.update(1)
    probe = DiffusersProbe(pipe, Clock(gpu=device != "cpu"))
    try:
        sync()
        start = time.perf_counter()
        run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
        sync()
        instrumented = probe.figures(time.perf_counter() - start)
    finally:
        probe.remove()
    result.update(generation_figures([instrumented], LOOP_MODULES))
    result["generation"] = summarize(totals)  # the un-instrumented runs
    result["instrumented_generation"] = instrumented["total"]
    result["image"] = image

    stages: dict[str, Any] = {}
    stage_runs = args.stage_runs or args.runs
    for stage, (fn, a, kw) in probe.recorded.items():
        bar.set_postfix_str(f"{side}: {stage}")
        with torch.no_grad():
            stages[stage] = summarize(time_calls(lambda: fn(*a, **kw), args.warmup, stage_runs, sync))
        bar.update(1)
    bar.set_postfix_str(f"{side}: scheduler")
    stages["scheduler_step"] = summarize(_scheduler_samples_torch(pipe, settings, device, dtype, args.warmup, stage_runs, sync))
    bar.update(1)
    result["stages"] = stages
    del pipe, probe
    gc.collect()
    return result


def _scheduler_samples_torch(pipe, settings: Settings, device: str, dtype, warmup: int, runs: int, sync) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(settings.seed + 1)
    noise = torch.randn(settings.latent_shape, generator=generator).to(device=device, dtype=dtype)
    samples: list[float] = []
    for run in range(warmup + runs):
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(settings.steps)
        latents = torch.randn(settings.latent_shape, generator=generator).to(device=device, dtype=dtype)
        for t in sched.timesteps:
            sync()
            start = time.perf_counter()
            latents = sched.step(noise, t, latents).prev_sample
            sync()
            if run >= warmup:
                samples.append(time.perf_counter() - start)
    return samples
