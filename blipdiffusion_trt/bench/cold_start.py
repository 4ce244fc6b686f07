"""Cold start: a fresh process per side, timed from just before its spawn.

``python -m blipdiffusion_trt.bench.cold_start SPEC`` is the child: it imports what a user of
that side pays for, loads the package (pipeline), makes one image and prints one line
(:data:`CHILD_MARK` + JSON) with its times, its peak host RSS and, on a GPU, its GPU memory,
measured the same way for every side (:class:`~.machine.GpuMemorySampler`: NVML, peak minus what
the device held before the child loaded anything).

With ``torch.compile`` every child shares one persistent inductor cache
(``TORCHINDUCTOR_CACHE_DIR``, :func:`inductor_cache_dir`): a cold start then measures loading
compiled kernels, as a deployed service with a persistent cache does, not recompiling them in
every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..package import layout
from .machine import GpuMemorySampler, peak_rss_mb, rss_breakdown_mb
from .settings import Settings, bench_inputs

CHILD_MARK = "BENCH_CHILD_RESULT "
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir() -> str:
    """torch.compile's kernel cache shared by the benchmark and its children: ``TORCHINDUCTOR_CACHE_DIR``
    when set, else ``torchinductor/`` in the per-user cache folder."""
    return os.environ.get(INDUCTOR_CACHE_ENV) or str(layout.user_cache_dir() / "torchinductor")


def cold_start(spec: dict[str, Any], timeout: float = 7200.0) -> dict[str, Any]:
    """Run the child for ``spec`` (which side, its settings and options); times from just before the spawn."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.get("inductor_cache"):
        env[INDUCTOR_CACHE_ENV] = spec["inductor_cache"]
    command = [sys.executable, "-m", __name__, json.dumps(spec)]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"cold-start process failed (exit {proc.returncode}): {' | '.join(tail)}")
    child = json.loads(lines[-1][len(CHILD_MARK):])
    return {
        "imports_done": child["t_imports"] - start,
        "loaded": child["t_loaded"] - start,
        "first_image": child["t_first_image"] - start,
        "first_generation": child["t_first_image"] - child["t_loaded"],
        "peak_rss_mb": child["peak_rss_mb"],
        **{key: value for key, value in child.items() if key.endswith("_after_first_image")},
        "gpu_memory_mb": child.get("gpu_memory_mb"),
        "gpu_memory_method": child.get("gpu_memory_method"),
        **({"engines": child["engines"]} if child.get("engines") else {}),
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: import, load, one image; absolute times (``time.time()``)."""
    settings = Settings(**{**spec["settings"], "latent_shape": tuple(spec["settings"]["latent_shape"])})
    out: dict[str, Any] = {}
    memory = None
    if spec["kind"] == "ours":
        from ..runtime import pipeline  # noqa: F401  (the imports a user of the runtime pays for)
        from .ours import load_runtime, run_ours

        out["t_imports"] = time.time()
        if spec["device"] != "cpu":
            memory = GpuMemorySampler().start()
        runtime = load_runtime(Path(spec["package"]), spec["backend"], settings, verify=spec["verify"],
                               flags=spec.get("option_flags"))
        out["t_loaded"] = time.time()
        reference, condition, latents = bench_inputs(settings)
        run_ours(runtime, settings, reference, condition, latents)
        out["t_first_image"] = time.time()
        out["engines"] = runtime.engine_details()
    else:
        import diffusers  # noqa: F401
        import torch

        from .diffusers_side import load_diffusers, run_diffusers

        out["t_imports"] = time.time()
        device = spec["device"]
        if device != "cpu":
            memory = GpuMemorySampler().start()
        pipe, dtype = load_diffusers(Path(spec["checkpoint"]), device, settings, torch_compile=spec["torch_compile"],
                                     threads=spec.get("threads"), precision=spec.get("precision", "fp32"))
        if device != "cpu":
            torch.cuda.synchronize()
        out["t_loaded"] = time.time()
        reference, condition, latents = bench_inputs(settings)
        run_diffusers(pipe, settings, reference, condition, latents, device, dtype)
        if device != "cpu":
            torch.cuda.synchronize()
        out["t_first_image"] = time.time()
    if memory is not None:
        figure = memory.stop()
        out["gpu_memory_mb"], out["gpu_memory_method"] = figure["mb"], figure["method"]
    out["peak_rss_mb"] = peak_rss_mb()
    out.update({f"{key}_after_first_image": value for key, value in rss_breakdown_mb().items()})
    return out


if __name__ == "__main__":
    result = child(json.loads(sys.argv[1]))
    sys.stdout.write(CHILD_MARK + json.dumps(result) + "\n")
