"""Fast mode (DeepCache step caching) in the GPU validation, in its own process.

    python bench/gpu/fast_mode.py SPEC.json RESULT.json

On the plain and the ControlNet package: our runtime's whole generations at each cache interval of
the spec (1: the exact mode), the denoising loop and the generation (p50), the speed-up over the
exact mode, one call of each step-cache graph, and each mode's image against the exact mode's on
the same backend (max, mean, PSNR). Kept apart from ``sides.py`` so that the validation's other
phases do not change.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (bench/gpu is not a package)
from common import Mode, settings_from_dict  # noqa: E402

from blipdiffusion_trt.bench.ours import run_ours  # noqa: E402
from blipdiffusion_trt.bench.settings import Settings, bench_inputs  # noqa: E402
from blipdiffusion_trt.bench.stats import summarize  # noqa: E402


def _generations(runtime, gen: Settings, interval: int, warmup: int, runs: int):
    reference, condition, latents = bench_inputs(gen)
    timings, image = [], None
    for i in range(warmup + runs):
        out = run_ours(runtime, gen, reference, condition, latents, cache_interval=interval)
        if i >= warmup:
            timings.append(out.timings)
        image = out.images[0]
    stages = sorted({k for t in timings for k in t} - {"steps", "total", "denoise_loop"})
    return {"generation": summarize([t["total"] for t in timings]),
            "denoise_loop": summarize([t["denoise_loop"] for t in timings]),
            "in_generation": {k: summarize([t.get(k, 0.0) for t in timings]) for k in stages},
            "unet_calls": int(timings[0]["steps"])}, image


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from blipdiffusion_trt.components import step_cache_graphs

    mode = Mode(**spec["mode"])
    results: dict[str, Any] = {}
    for key, gen_dict in spec["generations"].items():
        gen = settings_from_dict(gen_dict)
        package_dir = Path(spec["package_controlnet"] if gen.controlnet else spec["package_plain"])
        runtime, _ = common.load_our_runtime(package_dir, mode)
        runtime.load_engine = lambda component, package=runtime.package: common.make_engine(package, component, mode)
        graphs = step_cache_graphs(runtime.config, control=gen.controlnet)
        if graphs is None:
            results[key] = {"skipped": f"{package_dir.name} has no step-cache graphs"}
            continue
        for name in graphs.names:  # loaded before the timed runs
            runtime.engine(name)
        exact, exact_image = _generations(runtime, gen, 1, spec["warmup"], spec["runs"])
        modes: dict[str, Any] = {"1": exact}
        for interval in spec["cache_intervals"]:
            if interval == 1:
                continue
            figures, image = _generations(runtime, gen, interval, spec["warmup"], spec["runs"])
            diff = common.compare([image], [exact_image])
            figures["speedup_vs_exact"] = {k: exact[k]["p50"] / figures[k]["p50"] for k in ("denoise_loop", "generation")}
            figures["image_vs_exact"] = {"max_abs": diff["max_abs"],
                                         "mean_abs": float(abs(image.astype("float64") - exact_image).mean()),
                                         "psnr_db": common.psnr(image, exact_image)}
            modes[str(interval)] = figures
        results[key] = modes
        runtime.close()
    return results


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    result["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
