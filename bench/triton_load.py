"""Triton under load: throughput and latency of the ``blip_diffusion`` model at 1, 2, 4 clients.

For each package and each pipeline instance count, writes a ``python-cpu`` repository
(``--instances N``, a queue big enough that nothing is rejected), starts the tritonserver that
nvidia-pytriton bundles on 127.0.0.1 (through the test suite's launcher, ``tests/triton_server.py``,
which knows how to run it), warms it up, then runs ``--requests`` generations per client count
with that many gRPC clients, each sending its next request when the last one returns. Reports
images/s and p50/p99 latency per (package, instances, clients), and writes ``results.json`` and
``results.md`` under ``--out``.

``python bench/triton_load.py --package tiny=PKG --package mid=PKG2 --out bench/results/triton-load``.
``--build-mid DIR`` first writes the mid-size random checkpoint and its package (see
:func:`mid_config`). Load goes only to 127.0.0.1; each run is bounded by ``--requests``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("triton_load")


def mid_config() -> dict:
    """Between the tests' tiny architecture and the full one: the tiny text encoder and Q-Former,
    a UNet of 64/128/256 channels over 3 levels and a VAE of 32/64/128 (latent factor 4)."""
    from blipdiffusion_trt.export.random_checkpoint import _tiny_config

    return _tiny_config(text_positions=77, query_tokens=16, image_size=224, unet_channels=(64, 128, 256),
                        vae_channels=(32, 64, 128), sample_size=32)


def build_mid(out: Path) -> Path:
    from blipdiffusion_trt.export.exporter import export_package
    from blipdiffusion_trt.export.random_checkpoint import build_random_checkpoint

    checkpoint = build_random_checkpoint(out / "checkpoint", mid_config(), seed=3)
    package = out / "package"
    export_package(checkpoint, package, precisions=("fp32",), editing=False, progress=False)
    return package


def request_arrays(seed: int, steps: int, side: int) -> dict[str, np.ndarray]:
    image = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return {
        "prompt": np.array([b"a photo in the snow"], dtype=np.object_),
        "reference_image": image,
        "source_subject": np.array([b"dog"], dtype=np.object_),
        "target_subject": np.array([b"dog"], dtype=np.object_),
        "steps": np.array([steps], np.int32),
        "guidance_scale": np.array([7.5], np.float32),
        "seed": np.array([seed], np.int64),
        "height": np.array([side], np.int32),
        "width": np.array([side], np.int32),
        "scheduler": np.array([b"ddim"], dtype=np.object_),
    }


def grpc_inputs(values: dict[str, np.ndarray]) -> list:
    import tritonclient.grpc as grpc

    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in values.items():
        tensor = grpc.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def run_clients(url: str, clients: int, requests: int, steps: int, side: int) -> dict:
    """``requests`` generations spread over ``clients`` closed-loop gRPC clients."""
    import tritonclient.grpc as grpc

    latencies: list[float] = []
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def loop(index: int) -> list[float]:
        client = grpc.InferenceServerClient(url)
        times = []
        try:
            for k in range(per_client[index]):
                start = time.perf_counter()
                client.infer("blip_diffusion", grpc_inputs(request_arrays(index * 1000 + k, steps, side)),
                             client_timeout=600.0)
                times.append(time.perf_counter() - start)
        finally:
            client.close()
        return times

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for times in pool.map(loop, range(clients)):
            latencies += times
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "seconds": round(wall, 3),
            "images_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(float(np.percentile(latencies, 50)), 3), "p99_s": round(float(np.percentile(latencies, 99)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", action="append", default=[], help="NAME=PACKAGE_DIR (repeatable)")
    parser.add_argument("--build-mid", type=Path, help="build the mid-size package in this directory first (as 'mid')")
    parser.add_argument("--instances", default="1,2", help="pipeline instance counts (default 1,2)")
    parser.add_argument("--clients", default="1,2,4", help="concurrent client counts (default 1,2,4)")
    parser.add_argument("--requests", type=int, default=16, help="generations per client count (default 16)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generation (default 10)")
    parser.add_argument("--side", type=int, default=0, help="image side (default: the package's default height)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sys.path.insert(0, str(ROOT / "tests"))
    from triton_server import start_server, stop_server

    from blipdiffusion_trt.package import read_pipeline_config
    from blipdiffusion_trt.serving.triton.repository import write_triton_repository

    packages = dict(item.split("=", 1) for item in args.package)
    if args.build_mid:
        packages["mid"] = str(build_mid(args.build_mid))
    rows = []
    for name, package in packages.items():
        config = read_pipeline_config(Path(package))
        side = args.side or config.default_height
        for instances in (int(v) for v in args.instances.split(",")):
            with tempfile.TemporaryDirectory(prefix="triton-load-") as tmp:
                tmp = Path(tmp)
                repo = write_triton_repository(package, tmp / "repo", "python-cpu", instances=instances,
                                               max_queue_size=64).path
                server = start_server([repo], tmp)
                try:
                    run_clients(server.grpc_url, instances, instances, args.steps, side)  # warm every instance
                    for clients in (int(v) for v in args.clients.split(",")):
                        row = {"package": name, "side": side, "steps": args.steps, "instances": instances,
                               **run_clients(server.grpc_url, clients, args.requests, args.steps, side)}
                        logger.info("%s", row)
                        rows.append(row)
                finally:
                    stop_server(server)
    load = os.getloadavg()
    from blipdiffusion_trt.bench.machine import cpu_info

    machine = {"cpu": cpu_info()["model"], "cores": os.cpu_count(),
               "load_average_at_end": [round(v, 2) for v in load], "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    command = ["python", "bench/triton_load.py", *[a.split("=", 1)[0] + "=" + a.split("=", 1)[0] + "-package"
                                                   if a in args.package else a for a in (argv or sys.argv[1:])]]
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    lines = ["| package | side | steps | instances | clients | requests | images/s | p50 s | p99 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['package']} | {r['side']} | {r['steps']} | {r['instances']} | {r['clients']} | "
                     f"{r['requests']} | {r['images_per_s']} | {r['p50_s']} | {r['p99_s']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
