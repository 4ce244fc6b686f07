"""One measured side per process: ``python bench/gpu/sides.py SPEC.json RESULT.json``.

Sides: ``ours`` (our runtime on the mode's backend; never imports torch), ``diffusers`` (eager) and
``diffusers-compile`` (``torch.compile`` of the UNet). Each side loads the ControlNet checkpoint's
pipeline and a plain one sharing its modules / engines, and measures, for both pipelines, with the
benchmark's own pieces (:mod:`blipdiffusion_trt.bench`: the workload, our runtime's call and
recorded feeds, diffusers' call, probe and clock, the statistics):

- whole generations (warm-up, then timed runs; nothing hooked into the timed runs);
- per stage: each side replays each component's first call of a generation (ours: ``infer``
  blocks until the GPU is done; diffusers: synchronised after each call); diffusers' loop and host
  overhead come from one extra generation with CUDA events around each module call
  (:class:`~blipdiffusion_trt.bench.diffusers_side.DiffusersProbe`), never synchronised inside the loop;
- host overhead per step: (denoising loop - time in UNet/ControlNet calls) / steps, both sides;
- device memory peak over the process's life (:class:`common.MemorySampler`, same method for all);
- ours only: the outputs of every component on fixed example inputs (``components.npz``), which
  ``validate.py`` compares with PyTorch fp32.

The final images of every timed pipeline are saved (``images.npz``) for the PSNR comparison.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/gpu is not a package)
from common import Mode, settings_from_dict  # noqa: E402

from blipdiffusion_trt.bench.settings import Settings, bench_inputs  # noqa: E402
from blipdiffusion_trt.bench.stats import generation_figures, summarize, time_calls  # noqa: E402

logger = logging.getLogger("bench.gpu.sides")

LOOP_STAGES = ("unet", "unet_plain", "controlnet")
# untimed calls before a stage is timed (the benchmark's: the first captures a CUDA graph)
SETTLE_CALLS = 2


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------

def _ours_generations(runtime, gen: Settings, warmup: int, runs: int, stage_runs: int) -> dict[str, Any]:
    from blipdiffusion_trt.bench.ours import RecordingEngine, replay_feed, run_ours

    reference, condition, latents = bench_inputs(gen)
    originals = dict(runtime.engines)
    recorders = {name: RecordingEngine(engine) for name, engine in originals.items()}
    timings, image = [], None
    first_generation = None
    for i in range(warmup + runs):
        runtime.engines.update(recorders if i == 0 else originals)
        start = time.perf_counter()
        out = run_ours(runtime, gen, reference, condition, latents)
        if i == 0:
            first_generation = time.perf_counter() - start
        if i >= warmup or warmup == 0:
            timings.append(out.timings)
        image = out.images[0]
    runtime.engines.update(originals)
    # generation, loop, host overhead per step, time per stage in a generation, UNet calls (PNDM: one more than the steps)
    result: dict[str, Any] = {"first_generation_s": first_generation, **generation_figures(timings, LOOP_STAGES)}
    stages = {}
    for name, recorder in recorders.items():
        if recorder.first is None:
            continue
        # fresh device inputs: the recorded uploads and ControlNet residuals were overwritten since
        feed, keep = replay_feed(name, recorders, originals)
        engine = originals[name]
        # settle: an input at a new device address is a new CUDA graph, captured in its first call
        stages[name] = summarize(time_calls(lambda: engine.infer(feed, keep), SETTLE_CALLS, stage_runs))
    result["stages"] = stages
    return result, image


def component_outputs(package, engines: dict, mode: Mode, gen: Settings) -> dict[str, Any]:
    """Every component's outputs on example inputs at this generation's shapes (for validate.py)."""
    import numpy as np

    from blipdiffusion_trt.export.graphs import example_inputs

    arrays: dict[str, Any] = {}
    for name, engine in engines.items():
        feed = example_inputs(package.specs[name], component_point(package, name, gen), vocab_sizes=vocab(package), seed=11)
        out = engine.infer(feed)
        for key, value in feed.items():
            arrays[f"{name}/in/{key}"] = value
        for key in engine.output_names:
            arrays[f"{name}/out/{key}"] = np.asarray(out[key])
    return arrays


def component_point(package, name: str, gen: Settings) -> dict[str, int]:
    """Axis values of one generation with guidance: batch 1, UNet batch 2, the generation's size
    (latent and residual sizes from the declaration, as the benchmark's FLOP count derives them)."""
    from blipdiffusion_trt.bench.flops import component_point as point_of

    return point_of(package.specs[name], package.config, batch=1, height=gen.height, width=gen.width)


def cuda_graph_probe(package, engines: dict, mode: Mode, gen: Settings, runs: int = 5) -> dict[str, Any]:
    """Which components run under ONNX Runtime CUDA graphs (``enable_cuda_graph``), and how fast.

    CUDA graphs need every node on the CUDA provider, static shapes and fixed input/output
    addresses: inputs and preallocated outputs are bound as device OrtValues, the first run
    captures (ONNX Runtime 1.31: warm-up, capture and replay inside that call), later runs replay. Each result is compared with the engine's eager output. This is
    the data for choosing which components the CUDA engine captures (not used in the timings above).
    """
    import numpy as np
    import onnxruntime as ort

    from blipdiffusion_trt.export.graphs import example_inputs

    results: dict[str, Any] = {}
    for name in ("unet_plain", "unet", "controlnet", "vae_decoder", "text_encoder", "qformer"):
        if name not in engines:
            continue
        spec = package.specs[name]
        point = component_point(package, name, gen)
        feed = example_inputs(spec, point, vocab_sizes=vocab(package), seed=12)
        try:
            options = common.backend_options(mode).cuda_provider_options(cuda_graph=True)
            session = ort.InferenceSession(str(engines[name].path), providers=[("CUDAExecutionProvider", options)])
            binding = session.io_binding()
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0) for k, v in feed.items()}
            outputs = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape_at(point)), np.float32, "cuda", 0)
                       for t in spec.outputs}
            for key, value in inputs.items():
                binding.bind_ortvalue_input(key, value)
            for key, value in outputs.items():
                binding.bind_ortvalue_output(key, value)
            start = time.perf_counter()
            session.run_with_iobinding(binding)  # warm-up, capture, replay
            first = time.perf_counter() - start
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                samples.append(time.perf_counter() - start)
            eager = engines[name].infer(feed)
            diff = max(float(np.max(np.abs(outputs[k].numpy().astype(np.float64) - np.asarray(eager[k], np.float64))))
                       for k in spec.output_names)
            results[name] = {"ok": True, "first_run_s": first, "replay": summarize(samples), "max_abs_vs_eager": diff}
            del session, binding, inputs, outputs
        except Exception as error:  # noqa: BLE001 -- a refusal is the finding
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
    return results


def vocab(package) -> dict[str, int]:
    from blipdiffusion_trt.export.cpu_fusions import package_vocab_sizes

    return package_vocab_sizes(package.root)


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    mode = Mode(**spec["mode"])
    memory = common.MemorySampler(mode.gpu).start()
    t0 = time.perf_counter()
    cn_runtime, graphs = common.load_our_runtime(Path(spec["package_controlnet"]), mode)
    # the plain pipeline shares every engine but its UNet (the package view without the ControlNet)
    plain_package = ModelPackage.open(spec["package_plain"])
    plain_engines = {k: v for k, v in cn_runtime.engines.items() if k not in ("unet", "controlnet")}
    plain_engines["unet_plain"] = common.make_engine(plain_package, "unet_plain", mode)
    graphs["unet_plain"] = common.graph_of(plain_engines["unet_plain"], plain_package)
    plain_runtime = BlipDiffusionRuntime(plain_package, plain_engines, cache_size=0, negative_cache_size=0)
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {"side": "ours", "label": f"ours {mode.backend} ({mode.precision})", "load_s": load_s,
                              "graphs": graphs, "pipelines": {}}
    images = {}
    for key, runtime in (("plain", plain_runtime), ("controlnet", cn_runtime)):
        gen = settings_from_dict(spec["generations"][key])
        result["pipelines"][key], images[key] = _ours_generations(runtime, gen, spec["warmup"], spec["runs"],
                                                                  spec["stage_runs"])
    result["memory"] = memory.stop()
    result["torch_imported"] = sys.modules.get("torch") is not None  # must stay False: no torch at run time
    # CUDA graphs our engines captured in the generations above (None: the engine has no CUDA graphs)
    result["engine_cuda_graphs"] = {name: getattr(engine, "cuda_graphs_captured", None)
                                    for name, engine in {**cn_runtime.engines, **plain_engines}.items()}
    np.savez(spec["images"], **images)
    # component outputs for the accuracy check, after the timings (not timed, not in the memory figure)
    gen = settings_from_dict(spec["generations"]["controlnet"])
    engines = {**cn_runtime.engines, "unet_plain": plain_engines["unet_plain"]}
    # fast mode's graphs are checked against PyTorch like every other component (timed in fast_mode.py)
    from blipdiffusion_trt.components import step_cache_components

    for name in step_cache_components(cn_runtime.package.config):
        engines[name] = common.make_engine(cn_runtime.package, name, mode)
        graphs[name] = common.graph_of(engines[name], cn_runtime.package)
    np.savez(spec["components"], **component_outputs(cn_runtime.package, engines, mode, gen))
    if mode.gpu and spec.get("cuda_graph_probe"):
        result["cuda_graphs"] = cuda_graph_probe(cn_runtime.package, engines, mode, gen)
    return result


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------

def load_diffusers_pair(checkpoint: Path, device: str, precision: str, settings: Settings, *,
                        torch_compile: bool = False, threads: int | None = None):
    """(plain pipeline, ControlNet pipeline, torch dtype): the benchmark's diffusers pipeline of the
    ControlNet checkpoint, and a plain one sharing its modules and the scheduler's config."""
    from diffusers.pipelines import BlipDiffusionPipeline

    from blipdiffusion_trt.bench.diffusers_side import load_diffusers

    cn, dtype = load_diffusers(checkpoint, device, settings, torch_compile=False, threads=threads, precision=precision)
    plain = BlipDiffusionPipeline(tokenizer=cn.tokenizer, text_encoder=cn.text_encoder, vae=cn.vae, unet=cn.unet,
                                  scheduler=type(cn.scheduler).from_config(cn.scheduler.config), qformer=cn.qformer,
                                  image_processor=cn.image_processor, ctx_begin_pos=cn.config.ctx_begin_pos,
                                  mean=cn.config.mean, std=cn.config.std)
    plain.set_progress_bar_config(disable=True)
    if torch_compile:  # the plain pipeline's UNet only (its own module object: the ControlNet pipeline stays eager)
        import torch

        plain.unet = torch.compile(plain.unet)
    return plain, cn, dtype


def run_diffusers_generation(pipe, gen: Settings, device: str, dtype):
    """One generation of the benchmark's workload, its image (float32, HWC)."""
    from blipdiffusion_trt.bench.diffusers_side import run_diffusers as run

    reference, condition, latents = bench_inputs(gen)
    return run(pipe, gen, reference, condition, latents, device, dtype)[0]


def _diffusers_pipeline(pipe, gen: Settings, mode: Mode, dtype, warmup: int, runs: int, stage_runs: int, sync):
    """Whole generations (nothing hooked in), one instrumented generation (the benchmark's probe),
    and each module's first call of it replayed: one pipeline's figures and its last image."""
    import torch

    from blipdiffusion_trt.bench.diffusers_side import LOOP_MODULES, Clock, DiffusersProbe

    samples, first, image = [], None, None
    for i in range(warmup + runs):
        sync()
        start = time.perf_counter()
        image = run_diffusers_generation(pipe, gen, mode.device, dtype)
        sync()
        if i == 0:
            first = time.perf_counter() - start
        if i >= warmup or warmup == 0:
            samples.append(time.perf_counter() - start)
    probe = DiffusersProbe(pipe, Clock(gpu=mode.gpu))
    try:
        sync()
        start = time.perf_counter()
        run_diffusers_generation(pipe, gen, mode.device, dtype)
        sync()
        instrumented = probe.figures(time.perf_counter() - start)
    finally:
        probe.remove()
    figures = generation_figures([instrumented], LOOP_MODULES)
    stages = {}
    for stage, (fn, a, kw) in probe.recorded.items():
        with torch.no_grad():
            stages[stage] = summarize(time_calls(lambda: fn(*a, **kw), SETTLE_CALLS, stage_runs, sync))
    return {**figures, "first_generation_s": first, "generation": summarize(samples),
            "instrumented_generation_s": instrumented["total"], "stages": stages}, image


def run_diffusers(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    mode = Mode(**spec["mode"])
    compiled = spec["side"] == "diffusers-compile"
    memory = common.MemorySampler(mode.gpu).start()
    sync = torch.cuda.synchronize if mode.gpu else (lambda: None)
    t0 = time.perf_counter()
    gens = {key: settings_from_dict(value) for key, value in spec["generations"].items()}
    # dry run: one thread (steady timings on a shared CPU; the figures are not the point)
    plain, cn, dtype = load_diffusers_pair(Path(spec["checkpoint"]), mode.device, mode.diffusers_precision,
                                           gens["controlnet"], torch_compile=compiled, threads=None if mode.gpu else 1)
    sync()
    result: dict[str, Any] = {"side": spec["side"], "load_s": time.perf_counter() - t0, "pipelines": {},
                              "label": f"diffusers {mode.diffusers_precision} {mode.device}"
                                       + (" torch.compile" if compiled else " eager")}
    images = {}
    pipes = {"plain": plain} if compiled else {"plain": plain, "controlnet": cn}
    for key, pipe in pipes.items():
        result["pipelines"][key], images[key] = _diffusers_pipeline(pipe, gens[key], mode, dtype, spec["warmup"],
                                                                    spec["runs"], spec["stage_runs"], sync)
    result["memory"] = memory.stop()
    np.savez(spec["images"], **images)
    del plain, cn
    gc.collect()
    return result


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    result = run_ours(spec) if spec["side"] == "ours" else run_diffusers(spec)
    common.write_json(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
