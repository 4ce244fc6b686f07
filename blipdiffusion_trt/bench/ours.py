"""Our side of the benchmark: the runtime on one backend of the registry.

One generation is recorded (each engine's first feed) and replayed, so each component is timed
at exactly the shapes a generation feeds it; the scheduler step is timed on its own. Subject and
negative-prompt caches are off: diffusers encodes both every call.

A recorded feed may hold device values (GPU backends): the text embeddings and control map the
denoising stage uploaded, the ControlNet's residuals. By replay time those buffers hold other
values or are refused as overwritten (TensorRT's ``DeviceTensor``), so the replay feeds fresh
ones: uploads are uploaded again from a host copy taken when the feed was recorded (in the first,
warm-up, generation), and the residuals come from running the ControlNet on its recorded feed
right before the UNet is timed.

With ``Settings.edit``, an edit of the generated image (the first prompt's latents, the same
scheduler, steps and guidance) is timed the same way: whole edits, and ``unet_p2p``'s first call
replayed; :func:`edit_comparison` sets them against the generation per step and per UNet call.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..runtime.backends import get_backend, given_flags, option_flags, options_from_flags
from .settings import NEGATIVE_PROMPT, ORIGINAL_SUBJECT, PROMPT, SUBJECT, Settings, bench_inputs
from .stats import generation_figures, summarize, time_calls

# the engines whose time is the denoising loop's work; the rest of the loop is host overhead
LOOP_ENGINES = ("unet", "controlnet")
# untimed calls before a GPU stage is timed: the first captures the CUDA graph of its input
# addresses (ONNX Runtime 1.31: warm-up run, capture and replay in that one call), the second settles
SETTLE_CALLS = 2


def run_ours(runtime, settings: Settings, reference, condition, latents, cache_interval: int = 1):
    return runtime(
        [PROMPT] * settings.batch, reference, SUBJECT, SUBJECT, latents=latents, height=settings.height,
        width=settings.width, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        neg_prompt=NEGATIVE_PROMPT, scheduler=settings.scheduler, output_type="np", condition_image=condition,
        cache_interval=cache_interval,
    )


def run_edit(runtime, settings: Settings, reference, latents):
    """An edit of the image the first prompt's latents generate: its subject replaced by the reference's."""
    return runtime.edit(
        PROMPT, reference, SUBJECT, SUBJECT, ORIGINAL_SUBJECT, latents=latents[:1], height=settings.height,
        width=settings.width, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        neg_prompt=NEGATIVE_PROMPT, scheduler=settings.scheduler, output_type="np",
    )


def runtime_options(args) -> dict[str, Any]:
    """Our runtime's start-up options as bench.json records them: every backend option with a flag,
    as given or its default (field -> value)."""
    given = given_flags(args)
    return {flag.field: given.get(flag.flag, flag.default) for flag in option_flags().values()}


def summarize_details(details: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the backend chose, over the components: the precision it computed in (one value, or
    per component where they differ) and the components with INT8 weights."""
    out: dict[str, Any] = {}
    ran = {name: d["inference_precision"] for name, d in details.items() if d.get("inference_precision")}
    if ran:
        out["inference_precision"] = next(iter(ran.values())) if len(set(ran.values())) == 1 else ran
    compressed = [name for name, d in details.items() if d.get("int8_weights")]
    if compressed:
        out["int8_weights"] = compressed
    return out


def load_runtime(package: Path, backend: str, settings: Settings, *, verify: bool,
                 flags: Mapping[str, Any] | None = None):
    """Our runtime on ``backend``, with the backend flags given (:func:`given_flags`) it has."""
    from ..runtime.pipeline import BlipDiffusionRuntime

    options = options_from_flags(backend, flags or {}, strict=False)
    # diffusers encodes the subject and the negative prompt every call; so do we here (no caches).
    return BlipDiffusionRuntime.from_package(package, backend, precision=settings.precision, verify=verify,
                                             options=options, cache_size=0, negative_cache_size=0)


class RecordingEngine:
    """Wraps an engine for one generation: remembers the first feed (and ``keep``) it was given,
    with a host copy of every device value in it."""

    def __init__(self, engine):
        self.engine = engine
        self.first: tuple[dict, tuple] | None = None
        self.host_copies: dict[str, Any] = {}

    def infer(self, feed, keep=()):
        if self.first is None:
            import numpy as np

            self.first = (dict(feed), tuple(keep))
            self.host_copies = {k: self.engine.to_host(v) for k, v in feed.items() if not isinstance(v, np.ndarray)}
        return self.engine.infer(feed, keep)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def replay_feed(name: str, recorders: Mapping[str, RecordingEngine], engines: Mapping[str, Any]) -> tuple[dict, tuple]:
    """The recorded feed of ``name`` with fresh device values: another engine's outputs (the
    ControlNet's residuals) from running that engine on its own recorded feed now, uploads uploaded
    again from their host copies."""
    feed, keep = recorders[name].first
    feed = dict(feed)
    producers = {out: other for other, engine in engines.items() if other != name and recorders[other].first is not None
                 for out in engine.output_names}
    ran: dict[str, dict[str, Any]] = {}
    for key, host in recorders[name].host_copies.items():
        producer = producers.get(key)
        if producer is None:
            feed[key] = engines[name].upload(key, host)
            continue
        if producer not in ran:
            producer_feed, _ = replay_feed(producer, recorders, engines)
            ran[producer] = engines[producer].infer(producer_feed, keep=engines[producer].output_names)
        feed[key] = ran[producer][key]
    return feed, keep


def device_kind(backend: str) -> str:
    """"cpu" or "gpu": where the backend's engines run (the benchmark's columns, the device peak)."""
    return "cpu" if get_backend(backend).device == "cpu" else "gpu"


def bench_ours(backend: str, package: Path, settings: Settings, args, bar) -> dict[str, Any]:
    """Load, generations, each component's call and a scheduler step of our runtime on ``backend``."""
    from ..runtime.schedulers import scheduler_from_config

    result: dict[str, Any] = {"label": f"ours {backend}", "backend": backend, "precision": settings.precision,
                              "device": device_kind(backend)}
    reference, condition, latents = bench_inputs(settings)
    bar.set_postfix_str(f"ours {backend}: load")
    import onnxruntime  # noqa: F401  (imports are the cold start's; this times the loading)

    t0 = time.perf_counter()
    runtime = load_runtime(package, backend, settings, verify=not args.no_verify, flags=given_flags(args))
    result["load_warm"] = summarize([time.perf_counter() - t0])
    bar.update(1)

    sync = device_sync(backend)
    recorders = {name: RecordingEngine(engine) for name, engine in runtime.engines.items()}
    originals = dict(runtime.engines)
    timings, image = [], None
    for i in range(args.warmup + args.runs):
        bar.set_postfix_str(f"ours {backend}: generation {i + 1}/{args.warmup + args.runs}")
        if i == 0:
            runtime.engines.update(recorders)
        try:
            out = run_ours(runtime, settings, reference, condition, latents)
        finally:
            runtime.engines.update(originals)
        if i == 0:  # includes what a backend does on first use (OpenVINO compiles each shape then)
            result["first_generation"] = summarize([out.timings["total"]])
        if i >= args.warmup:
            timings.append(out.timings)
        image = out.images
        bar.update(1)
    result.update(generation_figures(timings, LOOP_ENGINES))
    result["image"] = image

    stages: dict[str, Any] = {}
    feeds: dict[str, dict[str, list[int]]] = {}
    stage_runs = args.stage_runs or args.runs
    for name, rec in recorders.items():
        bar.set_postfix_str(f"ours {backend}: {name}")
        if rec.first is None:
            bar.update(1)
            continue
        feed, keep = replay_feed(name, recorders, originals)  # fresh device inputs, right before timing
        engine = originals[name]
        # an input at a new device address is a new CUDA graph, captured in its first call: settle first
        warmup = max(args.warmup, SETTLE_CALLS) if get_backend(backend).device != "cpu" else args.warmup
        stages[name] = summarize(time_calls(lambda: engine.infer(feed, keep), warmup, stage_runs, sync))
        feeds[name] = {k: _value_shape(v) for k, v in feed.items()}
        bar.update(1)

    bar.set_postfix_str(f"ours {backend}: scheduler")
    stages["scheduler_step"] = summarize(_scheduler_samples_numpy(
        scheduler_from_config, runtime.scheduler_config, settings, args.warmup, stage_runs))
    bar.update(1)
    if any(n > 1 for n in settings.cache_intervals):
        result["fast_mode"] = bench_fast_mode(runtime, settings, args, bar, sync, (reference, condition, latents),
                                              result)
    if settings.edit:
        result["edit"] = bench_edit(runtime, settings, args, bar, sync, reference, latents, stages, feeds)
        result["edit"]["comparison"] = edit_comparison(result, result["edit"], stages, feeds, settings)
    result["stages"] = stages
    result["feed_shapes"] = feeds
    # what ran, as the backend reports it (e.g. OpenVINO's inference precision, INT8 weights)
    result["engines"] = runtime.engine_details()
    chosen = summarize_details(result["engines"])
    result.update(chosen)
    precision = chosen.get("inference_precision")
    if isinstance(precision, str):
        result["compute_precision"] = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)
        result["label"] = f"ours {backend} ({precision}{', int8 weights' if chosen.get('int8_weights') else ''})"
    runtime.close()
    del runtime, recorders, originals
    gc.collect()
    return result


def bench_edit(runtime, settings: Settings, args, bar, sync, reference, latents, stages: dict[str, Any],
               feeds: dict[str, Any]) -> dict[str, Any]:
    """Whole edits (figures as a generation's) and one ``unet_p2p`` call replayed (into ``stages``)."""
    engine = runtime.engine("unet_p2p")  # loaded before the timed runs
    recorder = RecordingEngine(engine)
    timings = []
    for i in range(args.warmup + args.runs):
        bar.set_postfix_str(f"edit {i + 1}/{args.warmup + args.runs}")
        if i == 0:
            runtime.engines["unet_p2p"] = recorder
        try:
            out = run_edit(runtime, settings, reference, latents)
        finally:
            runtime.engines["unet_p2p"] = engine
        if i >= args.warmup:
            timings.append(out.timings)
        bar.update(1)
    bar.set_postfix_str("unet_p2p")
    feed, keep = recorder.first
    # a device value recorded in the edit may hold other values by now: uploaded again from its host copy
    feed = {**feed, **{k: engine.upload(k, host) for k, host in recorder.host_copies.items()}}
    stages["unet_p2p"] = summarize(time_calls(lambda: engine.infer(feed, keep), args.warmup,
                                              args.stage_runs or args.runs, sync))
    feeds["unet_p2p"] = {k: _value_shape(v) for k, v in feed.items()}
    bar.update(1)
    return generation_figures(timings, LOOP_ENGINES)


def bench_fast_mode(runtime, settings: Settings, args, bar, sync, inputs, exact: Mapping[str, Any]) -> dict[str, Any]:
    """Fast mode at each cache interval > 1 of ``settings`` beside the exact mode's figures
    (``exact``: this backend's generation figures and image): whole generations, the denoising loop,
    one call of each step-cache graph (replayed as the exact mode's components are), the speed-up
    over the exact mode and the image's difference from the exact mode's (max, mean, PSNR)."""
    from ..components import step_cache_graphs

    graphs = step_cache_graphs(runtime.config, control=settings.controlnet)
    loop_engines = LOOP_ENGINES + tuple(graphs.names)
    for name in graphs.names:  # loaded (OpenVINO: compiled) before any timed run
        runtime.engine(name)
    modes: dict[str, Any] = {}
    for interval in (n for n in settings.cache_intervals if n > 1):
        recorded = [*graphs.names, "controlnet"] if settings.controlnet else list(graphs.names)
        originals = {name: runtime.engines[name] for name in recorded}
        recorders = {name: RecordingEngine(engine) for name, engine in originals.items()}
        timings, image = [], None
        for i in range(args.warmup + args.runs):
            bar.set_postfix_str(f"fast mode {interval}: generation {i + 1}/{args.warmup + args.runs}")
            if i == 0:
                runtime.engines.update(recorders)
            try:
                out = run_ours(runtime, settings, *inputs, cache_interval=interval)
            finally:
                runtime.engines.update(originals)
            if i >= args.warmup:
                timings.append(out.timings)
            image = out.images
            bar.update(1)
        mode = generation_figures(timings, loop_engines)
        calls: dict[str, Any] = {}
        for name in graphs.names:
            bar.set_postfix_str(f"fast mode {interval}: {name}")
            feed, keep = replay_feed(name, recorders, originals)
            engine = originals[name]
            warmup = max(args.warmup, SETTLE_CALLS) if get_backend(exact["backend"]).device != "cpu" else args.warmup
            calls[name] = summarize(time_calls(lambda: engine.infer(feed, keep), warmup, args.stage_runs or args.runs, sync))
            bar.update(1)
        mode["unet_call"] = calls
        mode["speedup_vs_exact"] = {key: exact[key]["p50"] / mode[key]["p50"] for key in ("denoise_loop", "generation")}
        mode["image_vs_exact"] = image_difference(image, exact["image"])
        mode["full_unet_calls"] = sum(1 for i in range(mode["unet_calls"]) if i % interval == 0)
        modes[str(interval)] = mode
        del recorders
        gc.collect()
    return modes


def image_difference(image, reference) -> dict[str, float]:
    """max and mean absolute difference of two images in [0, 1], and the PSNR (dB) of ``image``
    against ``reference`` (inf when equal)."""
    import numpy as np

    diff = np.asarray(image, np.float64) - np.asarray(reference, np.float64)
    mse = float(np.mean(diff ** 2))
    return {"max_abs": float(np.abs(diff).max()), "mean_abs": float(np.abs(diff).mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))}


def edit_comparison(generation: Mapping[str, Any], edit: Mapping[str, Any], stages: Mapping[str, Any],
                    feeds: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The edit against the generation (p50s): the denoising loop per UNet call, and one UNet call
    (``unet_p2p`` against the generation's UNet, with their rows)."""
    unet = "unet" if settings.controlnet else "unet_plain"
    per_step = {"generation": generation["denoise_loop"]["p50"] / generation["unet_calls"],
                "edit": edit["denoise_loop"]["p50"] / edit["unet_calls"]}
    call = {unet: stages[unet]["p50"], "unet_p2p": stages["unet_p2p"]["p50"]}
    return {
        "loop_per_step": {**per_step, "ratio": per_step["edit"] / per_step["generation"]},
        "unet_call": {**call, "ratio": call["unet_p2p"] / call[unet], "generation_unet": unet,
                      "rows": {unet: feeds[unet]["sample"][0], "unet_p2p": feeds["unet_p2p"]["sample"][0]}},
        "whole": {"generation": generation["generation"]["p50"], "edit": edit["generation"]["p50"]},
    }


def device_sync(backend: str) -> Callable[[], None]:
    """A synchronisation for timing GPU backends whose ``infer`` may return before the GPU is done
    (outputs kept on the device). ONNX Runtime's own run already waits; this is a cheap extra."""
    if get_backend(backend).device == "cpu":
        return lambda: None
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            import importlib

            cudart = importlib.import_module(module)
        except ImportError:
            continue
        return lambda: cudart.cudaDeviceSynchronize()
    return lambda: None


def _value_shape(value) -> list[int]:
    """Shape of a numpy array, an ORT ``OrtValue`` (``shape()``) or a device tensor."""
    shape = value.shape
    return [int(d) for d in (shape() if callable(shape) else shape)]


def _scheduler_samples_numpy(make, config, settings: Settings, warmup: int, runs: int) -> list[float]:
    """Time every step of full scheduler passes (the multistep schedulers keep state)."""
    import numpy as np

    rng = np.random.default_rng(settings.seed + 1)
    noise = rng.standard_normal(settings.latent_shape).astype(np.float32)
    samples: list[float] = []
    for run in range(warmup + runs):
        sched = make(settings.scheduler, config)
        sched.set_timesteps(settings.steps)
        latents = rng.standard_normal(settings.latent_shape).astype(np.float32)
        for t in sched.timesteps:
            start = time.perf_counter()
            latents = sched.step(noise, t, latents).astype(np.float32, copy=False)
            if run >= warmup:
                samples.append(time.perf_counter() - start)
    return samples
