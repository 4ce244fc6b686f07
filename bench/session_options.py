"""ONNX Runtime CPU session options, one component at a time: load time, call time, peak RSS.

Each (component, variant) runs in a fresh process, so peak RSS is that session's own. Used to
choose the runtime's CPU defaults (memory-arena policy, graph optimisation level, the CPU-fused
graphs); the results and the commands are in bench/results/cpu-speed/README.md.

    python bench/session_options.py PKG --components unet_plain,vae_decoder --size 512 --runs 3 \\
        --variants "default" "arena=off" "arena=off,pattern=off" "optimization=extended" "graphs=fp32-fused"

Variant keys: arena=on|off (enable_cpu_mem_arena), pattern=on|off (enable_mem_pattern),
optimization=all|extended|basic, threads=N (intra-op), spinning=on|off, graphs=fp32|fp32-fused.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("session_options")


def parse_variant(text: str) -> dict[str, str]:
    if text == "default":
        return {}
    pairs = dict(part.split("=", 1) for part in text.split(","))
    known = {"arena", "pattern", "optimization", "threads", "spinning", "graphs"}
    unknown = sorted(set(pairs) - known)
    if unknown:
        raise SystemExit(f"error: unknown variant key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return pairs


def measure(package: Path, component: str, size: int, variant: dict[str, str], runs: int) -> dict:
    """In this process: create the session, one warm-up call, ``runs`` timed calls."""
    import onnxruntime as ort

    from blipdiffusion_trt.bench.flops import component_point
    from blipdiffusion_trt.components import declare_components
    from blipdiffusion_trt.export.cpu_fusions import package_vocab_sizes
    from blipdiffusion_trt.export.graphs import example_inputs
    from blipdiffusion_trt.package import PackageLayout, read_pipeline_config

    config = read_pipeline_config(package)
    spec = declare_components(config)[component]
    point = component_point(spec, config, batch=1, height=size, width=size)
    feed = example_inputs(spec, point, vocab_sizes=package_vocab_sizes(package))

    options = ort.SessionOptions()
    options.log_severity_level = 3
    levels = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[variant.get("optimization", "all")])
    options.enable_cpu_mem_arena = variant.get("arena", "on") == "on"
    options.enable_mem_pattern = variant.get("pattern", "on") == "on"
    if "threads" in variant:
        options.intra_op_num_threads = int(variant["threads"])
    if "spinning" in variant:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if variant["spinning"] == "on" else "0")
    graph = PackageLayout(package).graph(component, variant.get("graphs", "fp32"))

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    after_load = rss_mb()
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return {"load_s": load, "rss_after_load_mb": after_load, "peak_rss_mb": rss_mb(),
            "p50_s": statistics.median(times), "min_s": min(times), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--components", default="unet_plain,vae_decoder")
    parser.add_argument("--size", type=int, default=512, help="image size (square)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["default", "arena=off"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        component, variant = json.loads(args.child)
        print(json.dumps(measure(args.package, component, args.size, parse_variant(variant), args.runs)))
        return 0

    rows = []
    print("| component | variant | load | call p50 | call min | peak RSS |\n|---|---|---:|---:|---:|---:|")
    for component in args.components.split(","):
        for variant in args.variants:
            parse_variant(variant)  # fail before spawning
            command = [sys.executable, __file__, str(args.package), "--size", str(args.size), "--runs", str(args.runs),
                       "--child", json.dumps([component, variant])]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.error("%s %s failed: %s", component, variant, proc.stderr.strip().splitlines()[-1:])
                continue
            row = {"component": component, "variant": variant, "size": args.size, **json.loads(proc.stdout.splitlines()[-1])}
            rows.append(row)
            print(f"| {component} | {variant} | {row['load_s']:.1f} s | {row['p50_s']:.3f} s | {row['min_s']:.3f} s | "
                  f"{row['peak_rss_mb'] / 1024:.1f} GB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
