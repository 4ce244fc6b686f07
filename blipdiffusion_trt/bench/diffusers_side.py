"""diffusers' side of the benchmark: its ``BlipDiffusionPipeline`` (or the ControlNet variant) on
the same device, with the same latents and the scheduler of the same name.

Forward hooks time each module during a generation and record its first call, which is replayed
to time one call at exactly the shapes the generation used.
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
        return pipe(*args, latents=torch.from_numpy(latents).to(device=device, dtype=dtype),
                    guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                    num_inference_steps=settings.steps, neg_prompt=NEGATIVE_PROMPT, output_type="np").images


def load_diffusers(checkpoint: Path, device: str, settings: Settings, *, torch_compile: bool, threads: int | None):
    import torch

    from ..export.exporter import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(checkpoint)
    dtype = torch.float16 if settings.precision == "fp16" and device != "cpu" else torch.float32
    pipe.to(device=device, dtype=dtype)
    import diffusers

    cls = getattr(diffusers, diffusers_scheduler(settings.scheduler))
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    if torch_compile:
        pipe.unet = torch.compile(pipe.unet)
        if getattr(pipe, "controlnet", None) is not None:
            pipe.controlnet = torch.compile(pipe.controlnet)
    return pipe, dtype


class _DiffusersProbe:
    """Forward hooks (and a wrapper on ``vae.decode``/``scheduler.step``) on diffusers' pipeline.

    Per generation: the time in each module, the loop time (first ControlNet/UNet call to the VAE
    decode) and the first call's arguments of each stage, for replay at the same shapes.
    """

    def __init__(self, pipe, sync: Callable[[], None]):
        self.pipe = pipe
        self.sync = sync
        self.times: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.recorded: dict[str, tuple[Callable, tuple, dict]] = {}
        self.loop_start: float | None = None
        self.loop_end: float | None = None
        self.handles: list = []
        self._starts: dict[str, float] = {}
        self._current: dict[str, str] = {}
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
            self.loop_end = time.perf_counter() if self.loop_end is None else self.loop_end
            self._record("vae_decoder", self._orig_decode, a, kw)
            self.sync()
            start = time.perf_counter()
            out = self._orig_decode(*a, **kw)
            self.sync()
            self._add("vae_decoder", time.perf_counter() - start)
            return out

        def step(*a, **kw):
            start = time.perf_counter()
            out = self._orig_step(*a, **kw)
            self.sync()
            self._add("scheduler", time.perf_counter() - start)
            return out

        pipe.vae.decode = decode
        pipe.scheduler.step = step

    def _stage(self, key: str, args, kwargs) -> str:
        if key == "text_encoder":
            return "text_encoder" if kwargs.get("ctx_embeddings") is not None else "text_encoder_plain"
        if key == "unet" and not self.has_controlnet:
            return "unet_plain"
        return key

    def _pre(self, key: str, module):
        def hook(mod, args, kwargs):
            stage = self._stage(key, args, kwargs)
            if key in ("unet", "controlnet") and self.loop_start is None:
                self.loop_start = time.perf_counter()
            self._record(stage, module, args, kwargs)
            self.sync()
            self._current[key] = stage
            self._starts[key] = time.perf_counter()
            return None

        return hook

    def _post(self, key: str):
        def hook(mod, args, output):
            self.sync()
            self._add(self._current[key], time.perf_counter() - self._starts[key])
            return None

        return hook

    def _record(self, stage: str, fn, args, kwargs) -> None:
        if stage not in self.recorded:
            self.recorded[stage] = (fn, tuple(args), dict(kwargs))

    def _add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def reset(self) -> None:
        self.times, self.calls = {}, {}
        self.loop_start = self.loop_end = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.pipe.vae.decode = self._orig_decode
        self.pipe.scheduler.step = self._orig_step


def bench_diffusers(checkpoint: Path, device: str, settings: Settings, args, bar) -> dict[str, Any]:
    """Load, generations, each module's call and a scheduler step of diffusers on ``device``."""
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    result: dict[str, Any] = {"label": f"diffusers torch {device}", "device": "cpu" if device == "cpu" else "gpu",
                              "torch_device": device}
    reference, condition, latents = bench_inputs(settings)
    bar.set_postfix_str("diffusers: load")
    import diffusers.pipelines  # noqa: F401  (imports are the cold start's; this times the loading)
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    pipe, dtype = load_diffusers(checkpoint, device, settings, torch_compile=args.torch_compile, threads=args.threads)
    sync()
    result["load_warm"] = summarize([time.perf_counter() - t0])
    result["precision"] = "fp16" if dtype == torch.float16 else "fp32"
    result["torch_compile"] = bool(args.torch_compile)
    result["torch_threads"] = torch.get_num_threads()
    bar.update(1)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()

    probe = _DiffusersProbe(pipe, sync)
    timings, image = [], None
    try:
        for i in range(args.warmup + args.runs):
            bar.set_postfix_str(f"diffusers: generation {i + 1}/{args.warmup + args.runs}")
            probe.reset()
            sync()
            start = time.perf_counter()
            image = run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
            sync()
            total = time.perf_counter() - start
            if i >= args.warmup:
                run = dict(probe.times, total=total, steps=float(probe.calls.get("unet", probe.calls.get("unet_plain", 0))))
                run["denoise_loop"] = (probe.loop_end or start + total) - (probe.loop_start or start)
                timings.append(run)
            bar.update(1)
    finally:
        probe.remove()
    result.update(generation_figures(timings, LOOP_MODULES))
    result["image"] = image

    stages: dict[str, Any] = {}
    stage_runs = args.stage_runs or args.runs
    for stage, (fn, a, kw) in probe.recorded.items():
        bar.set_postfix_str(f"diffusers: {stage}")
        with torch.no_grad():
            stages[stage] = summarize(time_calls(lambda: fn(*a, **kw), args.warmup, stage_runs, sync))
        bar.update(1)
    bar.set_postfix_str("diffusers: scheduler")
    stages["scheduler_step"] = summarize(_scheduler_samples_torch(pipe, settings, device, dtype, args.warmup, stage_runs, sync))
    bar.update(1)
    result["stages"] = stages
    if device != "cpu":
        result["gpu_memory_mb_in_process"] = torch.cuda.max_memory_allocated() / 2**20
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
