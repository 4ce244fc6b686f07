"""Where a generation's host memory goes, component by component, in one fresh process.

Loads a package on one backend (the runtime's defaults unless options are given), then runs one
generation at the benchmark's inputs, and records after each engine's load and around each
component's first call:

- ``anon_mb`` / ``file_mb``: resident private (heap) and file-mapped memory (``RssAnon``/``RssFile``);
- ``uss_mb`` / ``pss_mb``: psutil's unique and proportional set sizes;
- ``peak_mb``: the highest RSS since the previous record (``VmHWM``, reset through
  ``/proc/self/clear_refs`` after each record), i.e. the transient a step adds on top.

    python bench/memory_breakdown.py PACKAGE --backend openvino [--height 512 --width 512 --steps 3 --images 2]
        [--option name=value ...] [--json out.json]

The last line of the output is the JSON record; the table before it is for reading.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import psutil


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.process = psutil.Process()
        self.start = time.perf_counter()

    def record(self, what: str) -> dict:
        status = _status()
        full = self.process.memory_full_info()
        row = {"what": what, "t_s": round(time.perf_counter() - self.start, 2),
               "anon_mb": round(status["RssAnon"]), "file_mb": round(status["RssFile"]),
               "uss_mb": round(full.uss / 2**20), "pss_mb": round(full.pss / 2**20),
               "rss_mb": round(status["VmRSS"]), "peak_mb": round(status["VmHWM"])}
        self.rows.append(row)
        _reset_peak()
        return row


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="generations run one after another (default 2)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a backend option (e.g. inference_precision=f32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rec = Recorder()
    from blipdiffusion_trt.bench.settings import Settings, bench_inputs
    from blipdiffusion_trt.components import generation_components
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends import get_backend
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime
    from blipdiffusion_trt.bench.ours import run_ours

    rec.record("imports")
    backend = get_backend(args.backend)
    options = backend.options(**dict((k, _value(v)) for k, v in (o.split("=", 1) for o in args.option)))
    package = ModelPackage.open(args.package, verify=False)
    rec.record("package opened")
    engines = {}
    for name in generation_components(package.config):
        engines[name] = backend.make_engine(package, name, "fp32", options)
        rec.record(f"load {name}")

    class Watched:
        def __init__(self, name, engine):
            self.name, self.engine, self.calls = name, engine, 0

        def infer(self, feed, keep=()):
            self.calls += 1
            if self.calls == 1:
                rec.record(f"before first {self.name}")
            out = self.engine.infer(feed, keep)
            if self.calls == 1:
                rec.record(f"first {self.name} call")
            return out

        def __getattr__(self, attr):
            return getattr(self.engine, attr)

    runtime = BlipDiffusionRuntime(package, {n: Watched(n, e) for n, e in engines.items()}, cache_size=0,
                                   negative_cache_size=0)
    config = package.config
    settings = Settings(height=args.height, width=args.width, steps=args.steps, batch=1, guidance=7.5,
                        scheduler="pndm", seed=0, precision="fp32", controlnet=config.has_controlnet,
                        latent_shape=(1, config.latent_channels, args.height // config.latent_scale_factor,
                                      args.width // config.latent_scale_factor))
    reference, condition, latents = bench_inputs(settings)
    for image in range(1, args.images + 1):
        run_ours(runtime, settings, reference, condition, latents)
        rec.record(f"after image {image}")

    widths = max(len(r["what"]) for r in rec.rows)
    print(f"{'':{widths}}  {'t s':>7} {'anon':>6} {'file':>6} {'uss':>6} {'pss':>6} {'rss':>6} {'peak':>6}   (MB; peak since the row before)")
    for r in rec.rows:
        print(f"{r['what']:{widths}}  {r['t_s']:7.1f} {r['anon_mb']:6d} {r['file_mb']:6d} {r['uss_mb']:6d} "
              f"{r['pss_mb']:6d} {r['rss_mb']:6d} {r['peak_mb']:6d}")
    record = {"backend": args.backend, "options": {f: getattr(options, f) for f in options.field_names()},
              "height": args.height, "width": args.width, "steps": args.steps,
              "peak_rss_mb": max(r["peak_mb"] for r in rec.rows), "rows": rec.rows,
              "engines": runtime.engine_details()}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
