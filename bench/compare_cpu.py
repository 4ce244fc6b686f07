"""One generation, per stage, on ONNX Runtime (this project) next to diffusers on torch.

    python bench/compare_cpu.py --checkpoint CK --package PKG --sizes 256,512 --steps 3 --out bench/results/x.json

Both run the same checkpoint (the package exported from it), the same latents, guidance 7.5,
PNDM, batch 1, fp32 on the CPU, after one warm-up generation each. diffusers' stages are timed
with forward hooks on its modules; ours come from the runtime's own timings. Medians over
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image


def diffusers_stage_timer(pipe):
    """Forward hooks that add each module's wall time to a per-stage dict."""
    times: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    stages = {"qformer": pipe.qformer, "text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae.decoder}
    if getattr(pipe, "controlnet", None) is not None:
        stages["controlnet"] = pipe.controlnet
    for name, module in stages.items():
        module.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: times.__setitem__(name, times[name] + time.perf_counter() - starts[name]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--package", required=True)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from blipdiffusion_trt.export.exporter import load_pipeline
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    t0 = time.perf_counter()
    runtime = BlipDiffusionRuntime.from_package(args.package)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = load_pipeline(args.checkpoint)
    load_theirs = time.perf_counter() - t0
    times = diffusers_stage_timer(pipe)
    cfg = runtime.config
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {"steps": args.steps, "guidance_scale": 7.5, "scheduler": "pndm", "batch": 1, "precision": "fp32", "repeats": args.repeats},
        "load_seconds": {"ours": load_ours, "diffusers": load_theirs},
        "sizes": {},
    }
    for size in [int(s) for s in args.sizes.split(",")]:
        latents = rng.standard_normal((1, cfg.latent_channels, size // cfg.latent_scale_factor, size // cfg.latent_scale_factor)).astype(np.float32)
        control = {"condition_image": condition} if cfg.has_controlnet else {}
        ours_runs, theirs_runs = [], []
        for repeat in range(args.repeats + 1):  # first run is the warm-up
            out = runtime("swimming underwater", reference, "dog", "dog", latents=latents, height=size, width=size,
                          num_inference_steps=args.steps, neg_prompt="low quality", output_type="np", **control)
            times.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                dargs = ("swimming underwater", reference, condition, "dog", "dog") if control else ("swimming underwater", reference, "dog", "dog")
                expected = pipe(*dargs, latents=torch.from_numpy(latents), height=size, width=size,
                                num_inference_steps=args.steps, neg_prompt="low quality", output_type="np").images
            theirs = dict(times, total=time.perf_counter() - t0)
            if repeat:
                ours_runs.append(out.timings)
                theirs_runs.append(theirs)
        median = lambda runs, key: statistics.median(r.get(key, 0.0) for r in runs)  # noqa: E731
        keys = ["qformer", "text_encoder", "controlnet", "unet", "vae_decoder", "total"]
        rows = {k: {"ours": median(ours_runs, k), "diffusers": median(theirs_runs, k)} for k in keys if k in ours_runs[0] or k in theirs_runs[0]}
        rows["scheduler+host"] = {"ours": median(ours_runs, "denoise_loop") - median(ours_runs, "unet") - median(ours_runs, "controlnet"), "diffusers": None}
        results["sizes"][str(size)] = {"stages": rows, "max_abs_image_diff": float(np.abs(out.images - expected).max()),
                                       "denoise_steps": int(ours_runs[0]["steps"])}
        print(f"\n{size}x{size}, {int(ours_runs[0]['steps'])} UNet steps (PNDM, {args.steps} requested), CFG, batch 1, fp32 CPU")
        print("| stage | ours ONNX Runtime (s) | diffusers torch (s) | ratio diffusers/ours |")
        print("|---|---|---|---|")
        for name, row in rows.items():
            theirs = row["diffusers"]
            ratio = f"{theirs / row['ours']:.2f}" if theirs and row["ours"] else "-"
            print(f"| {name} | {row['ours']:.3f} | {theirs if theirs is None else round(theirs, 3)} | {ratio} |")
        print(f"max |image diff| vs diffusers: {results['sizes'][str(size)]['max_abs_image_diff']:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
