"""One measured side per process: ``python bench/gpu/sides.py SPEC.json RESULT.json``.

Sides: ``ours`` (our runtime on the mode's backend; never imports torch), ``diffusers`` (eager) and
``diffusers-compile`` (``torch.compile`` of the UNet). Each side loads the ControlNet checkpoint's
pipeline and a plain one sharing its modules / engines, and measures, for both pipelines:

- whole generations (warm-up, then timed runs; nothing hooked into the timed runs);
- per stage: ours replays each component's first feed of a generation (``infer`` blocks until the
  GPU is done); diffusers records CUDA events around each module call in one extra instrumented
  generation, so its loop is never synchronised by the measurement;
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
from common import Generation, Mode, summarize  # noqa: E402

logger = logging.getLogger("bench.gpu.sides")

LOOP_STAGES = ("unet", "unet_plain", "controlnet")


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------

def _ours_generations(runtime, gen: Generation, warmup: int, runs: int, stage_runs: int) -> dict[str, Any]:
    from blipdiffusion_trt.bench.ours import RecordingEngine, replay_feed

    reference, condition, latents = common.generation_inputs(gen)
    originals = dict(runtime.engines)
    recorders = {name: RecordingEngine(engine) for name, engine in originals.items()}
    timings, image = [], None
    first_generation = None
    for i in range(warmup + runs):
        runtime.engines.update(recorders if i == 0 else originals)
        start = time.perf_counter()
        out = common.run_ours(runtime, gen, reference, condition, latents)
        if i == 0:
            first_generation = time.perf_counter() - start
        if i >= warmup or warmup == 0:
            timings.append(out.timings)
        image = out.images[0]
    runtime.engines.update(originals)
    steps = timings[0]["steps"]
    result: dict[str, Any] = {
        "first_generation_s": first_generation,
        "generation": summarize([t["total"] for t in timings]),
        "denoise_loop": summarize([t["denoise_loop"] for t in timings]),
        "host_overhead_per_step": summarize([(t["denoise_loop"] - sum(t.get(k, 0.0) for k in LOOP_STAGES)) / steps
                                             for t in timings]),
        "in_generation": {k: summarize([t.get(k, 0.0) for t in timings])
                          for k in sorted({k for t in timings for k in t} - {"steps", "total", "denoise_loop"})},
        "unet_calls": int(steps),  # PNDM: one more than the steps requested
    }
    stages = {}
    for name, recorder in recorders.items():
        if recorder.first is None:
            continue
        # fresh device inputs: the recorded uploads and ControlNet residuals were overwritten since
        feed, keep = replay_feed(name, recorders, originals)
        engine = originals[name]
        for _ in range(2):  # warm; an input at a new device address is a new CUDA graph, captured on its second call
            engine.infer(feed, keep)
        samples = []
        for _ in range(stage_runs):
            start = time.perf_counter()
            engine.infer(feed, keep)
            samples.append(time.perf_counter() - start)
        stages[name] = summarize(samples)
    result["stages"] = stages
    return result, image


def component_outputs(package, engines: dict, mode: Mode, gen: Generation) -> dict[str, Any]:
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


def component_point(package, name: str, gen: Generation) -> dict[str, int]:
    """Axis values of one generation with guidance: batch 1, UNet batch 2, the generation's size
    (latent and residual sizes from the declaration, as the benchmark's FLOP count derives them)."""
    from blipdiffusion_trt.bench.flops import component_point as point_of

    return point_of(package.specs[name], package.config, batch=1, height=gen.height, width=gen.width)


def cuda_graph_probe(package, engines: dict, mode: Mode, gen: Generation, runs: int = 5) -> dict[str, Any]:
    """Which components run under ONNX Runtime CUDA graphs (``enable_cuda_graph``), and how fast.

    CUDA graphs need every node on the CUDA provider, static shapes and fixed input/output
    addresses: inputs and preallocated outputs are bound as device OrtValues, the first run
    captures, later runs replay. Each result is compared with the engine's eager output. This is
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
            session.run_with_iobinding(binding)  # captures
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
        gen = Generation.from_dict(spec["generations"][key])
        result["pipelines"][key], images[key] = _ours_generations(runtime, gen, spec["warmup"], spec["runs"],
                                                                  spec["stage_runs"])
    result["memory"] = memory.stop()
    result["torch_imported"] = sys.modules.get("torch") is not None  # must stay False: no torch at run time
    # CUDA graphs our engines captured in the generations above (None: the engine has no CUDA graphs)
    result["engine_cuda_graphs"] = {name: getattr(engine, "cuda_graphs_captured", None)
                                    for name, engine in {**cn_runtime.engines, **plain_engines}.items()}
    np.savez(spec["images"], **images)
    # component outputs for the accuracy check, after the timings (not timed, not in the memory figure)
    gen = Generation.from_dict(spec["generations"]["controlnet"])
    engines = {**cn_runtime.engines, "unet_plain": plain_engines["unet_plain"]}
    np.savez(spec["components"], **component_outputs(cn_runtime.package, engines, mode, gen))
    if mode.gpu and spec.get("cuda_graph_probe"):
        result["cuda_graphs"] = cuda_graph_probe(cn_runtime.package, engines, mode, gen)
    return result


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------

def load_diffusers_pair(checkpoint: Path, device: str, dtype_name: str):
    """(plain pipeline, ControlNet pipeline) sharing their modules, on ``device`` in ``dtype``."""
    import torch
    from diffusers.pipelines import BlipDiffusionPipeline

    from blipdiffusion_trt.export.exporter import load_pipeline

    dtype = getattr(torch, dtype_name)
    cn = load_pipeline(checkpoint)
    cn.to(device=device, dtype=dtype)
    plain = BlipDiffusionPipeline(tokenizer=cn.tokenizer, text_encoder=cn.text_encoder, vae=cn.vae, unet=cn.unet,
                                  scheduler=type(cn.scheduler).from_config(cn.scheduler.config), qformer=cn.qformer,
                                  image_processor=cn.image_processor, ctx_begin_pos=cn.config.ctx_begin_pos,
                                  mean=cn.config.mean, std=cn.config.std)
    plain.set_progress_bar_config(disable=True)
    return plain, cn, dtype


def run_diffusers_generation(pipe, gen: Generation, device: str, dtype):
    import torch

    reference, condition, latents = common.generation_inputs(gen)
    args = [[common.PROMPT], reference] + ([condition] if condition is not None else []) + [[common.SUBJECT], [common.SUBJECT]]
    with torch.no_grad():
        return pipe(*args, latents=torch.from_numpy(latents).to(device=device, dtype=dtype), guidance_scale=gen.guidance,
                    height=gen.height, width=gen.width, num_inference_steps=gen.steps, neg_prompt=common.NEGATIVE_PROMPT,
                    output_type="np").images[0]


class _EventProbe:
    """CUDA events (GPU) or host clocks (CPU) around every module call of one generation: no
    synchronisation inside the loop on a GPU; one at the VAE decode, which ends the loop."""

    def __init__(self, pipe, gpu: bool):
        import torch

        self.torch, self.gpu, self.pipe = torch, gpu, pipe
        self.calls: list[tuple[str, Any, Any]] = []
        self.handles = []
        self.loop_start = self.loop_end = None
        modules = {"qformer": pipe.qformer, "text_encoder": pipe.text_encoder, "unet": pipe.unet}
        self.has_controlnet = getattr(pipe, "controlnet", None) is not None
        if self.has_controlnet:
            modules["controlnet"] = pipe.controlnet
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(key), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post()))
        self._decode = pipe.vae.decode

        def decode(*a, **kw):
            self._sync()
            self.loop_end = time.perf_counter()
            start = self._mark()
            out = self._decode(*a, **kw)
            self.calls.append(("vae_decoder", start, self._mark()))
            return out

        pipe.vae.decode = decode
        self._open: list[tuple[str, Any]] = []

    def _sync(self):
        if self.gpu:
            self.torch.cuda.synchronize()

    def _mark(self):
        if self.gpu:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, key):
        def hook(module, args, kwargs):
            stage = key
            if key == "text_encoder":
                stage = "text_encoder" if kwargs.get("ctx_embeddings") is not None else "text_encoder_plain"
            elif key == "unet" and not self.has_controlnet:
                stage = "unet_plain"
            if key in ("unet", "controlnet") and self.loop_start is None:
                self.loop_start = time.perf_counter()
            self._open.append((stage, self._mark()))

        return hook

    def _post(self):
        def hook(module, args, output):
            stage, start = self._open.pop()
            self.calls.append((stage, start, self._mark()))

        return hook

    def results(self) -> dict[str, Any]:
        self._sync()
        per_stage: dict[str, list[float]] = {}
        for stage, start, end in self.calls:
            seconds = start.elapsed_time(end) / 1e3 if self.gpu else end - start
            per_stage.setdefault(stage, []).append(seconds)
        loop = (self.loop_end or 0.0) - (self.loop_start or 0.0)
        in_loop = sum(sum(per_stage.get(k, [])) for k in LOOP_STAGES)
        calls = len(per_stage.get("unet", per_stage.get("unet_plain", [])))
        return {"stages": {k: summarize(v) for k, v in per_stage.items()}, "denoise_loop_instrumented": loop,
                "host_overhead_per_step": summarize([max(0.0, loop - in_loop) / max(1, calls)]), "unet_calls": calls}

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.pipe.vae.decode = self._decode


def run_diffusers(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    mode = Mode(**spec["mode"])
    compiled = spec["side"] == "diffusers-compile"
    if not mode.gpu:
        torch.set_num_threads(1)  # dry run: steady timings on a shared CPU; the figures are not the point
    memory = common.MemorySampler(mode.gpu).start()
    sync = torch.cuda.synchronize if mode.gpu else (lambda: None)
    t0 = time.perf_counter()
    plain, cn, dtype = load_diffusers_pair(Path(spec["checkpoint"]), mode.device, mode.diffusers_dtype)
    if compiled:
        plain.unet = torch.compile(plain.unet)
    sync()
    result: dict[str, Any] = {"side": spec["side"], "load_s": time.perf_counter() - t0, "pipelines": {},
                              "label": f"diffusers {mode.diffusers_dtype.replace('float', 'fp')} {mode.device}"
                                       + (" torch.compile" if compiled else " eager")}
    images = {}
    pipes = {"plain": plain} if compiled else {"plain": plain, "controlnet": cn}
    for key, pipe in pipes.items():
        gen = Generation.from_dict(spec["generations"][key])
        samples, first = [], None
        for i in range(spec["warmup"] + spec["runs"]):
            sync()
            start = time.perf_counter()
            images[key] = run_diffusers_generation(pipe, gen, mode.device, dtype)
            sync()
            if i == 0:
                first = time.perf_counter() - start
            if i >= spec["warmup"] or spec["warmup"] == 0:
                samples.append(time.perf_counter() - start)
        probe = _EventProbe(pipe, mode.gpu)
        try:
            run_diffusers_generation(pipe, gen, mode.device, dtype)
            instrumented = probe.results()
        finally:
            probe.remove()
        result["pipelines"][key] = {"first_generation_s": first, "generation": summarize(samples), **instrumented}
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
