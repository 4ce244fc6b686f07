"""What loading one graph on OpenVINO costs, path by path, each in a fresh process.

For one component of a package (default: the UNet) at a generation's shapes (the package's
``opt`` point: the default size, the guidance batch), this measures in a child process per row:

- ``onnx``: read the package's ONNX graph, (compress the weights to INT8), reshape, compile;
- ``onnx, blob cache``: the same with OpenVINO's ``CACHE_DIR`` already holding the compiled blob;
- ``ir, blob cache``: read an OpenVINO IR saved from that graph (after compression where asked)
  instead, then compile from the blob cache: what a process pays when the converted (and
  compressed) model is cached as well;
- ``save ir``: the cost of writing that IR (``openvino.save_model``) and its size on disk.

Each row gives seconds per step, the process's peak RSS and its RSS after compiling with the model
kept and after dropping it (what holding the ``openvino.Model`` for a later reshape costs).
Used to decide the openvino backend's converted-model cache (docs/backends.md, "OpenVINO options").

    python bench/openvino_load.py PACKAGE [--component unet_plain] [--int8] [--precision bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "OPENVINO_LOAD "


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    import numpy as np

    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends import openvino as ovb

    core = ovb.openvino_core()
    package = ModelPackage.open(spec["package"], verify=False)
    component = package.specs[spec["component"]]
    feed = {t.name: np.zeros(t.shape_at("opt"), dtype=t.dtype) for t in component.inputs}
    out: dict = {"rss_start_mb": _rss_mb()}
    t = time.perf_counter()
    model = core.read_model(spec["source"])
    out["read_s"] = time.perf_counter() - t
    if spec["compress"]:
        t = time.perf_counter()
        model = ovb.compress_weights(model)
        out["compress_s"] = time.perf_counter() - t
    if spec.get("save_ir"):
        t = time.perf_counter()
        ovb.import_openvino().save_model(model, spec["save_ir"], compress_to_fp16=False)
        out["save_ir_s"] = time.perf_counter() - t
        xml = Path(spec["save_ir"])
        out["ir_mb"] = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20
    if spec["precision"] == "bf16":
        ovb.keep_sinusoid_inputs_in_f32(model)
    out["rss_model_mb"] = _rss_mb()
    model.reshape({name: list(a.shape) for name, a in feed.items()})
    config = {"INFERENCE_PRECISION_HINT": spec["precision"], "PERFORMANCE_HINT": "LATENCY"}
    if spec.get("cache_dir"):
        config["CACHE_DIR"] = spec["cache_dir"]
    t = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    out["compile_s"] = time.perf_counter() - t
    out["loaded_from_cache"] = bool(compiled.get_property("LOADED_FROM_CACHE")) if spec.get("cache_dir") else False
    request = compiled.create_infer_request()
    t = time.perf_counter()
    request.infer(feed)
    out["first_infer_s"] = time.perf_counter() - t
    out["rss_compiled_model_kept_mb"] = _rss_mb()
    del model
    out["rss_compiled_model_dropped_mb"] = _rss_mb()
    t = time.perf_counter()
    request.infer(feed)
    out["second_infer_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = _peak_mb()
    return out


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?")
    parser.add_argument("--component", default="unet_plain")
    parser.add_argument("--int8", action="store_true", help="INT8 weight-only compression (NNCF) before compiling")
    parser.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(MARK + json.dumps(child(json.loads(args.child))) + "\n")
        return 0
    from blipdiffusion_trt.package import ModelPackage

    onnx = str(ModelPackage.open(args.package, verify=False).onnx_path(args.component, "fp32"))
    work = Path(tempfile.mkdtemp(prefix="openvino-load-"))
    try:
        base = {"package": args.package, "component": args.component, "precision": args.precision, "compress": args.int8}
        ir = str(work / "ir" / "model.xml")
        rows = {
            "onnx": run_child({**base, "source": onnx, "save_ir": ir}),
            "onnx, blob cache (filling it)": run_child({**base, "source": onnx, "cache_dir": str(work / "blobs")}),
            "onnx, blob cache": run_child({**base, "source": onnx, "cache_dir": str(work / "blobs")}),
            "ir, blob cache": run_child({**base, "source": ir, "compress": False, "cache_dir": str(work / "blobs")}),
        }
        blobs = sum(f.stat().st_size for f in (work / "blobs").iterdir()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"component": args.component, "int8": args.int8, "precision": args.precision,
              "onnx_mb": sum(Path(p).stat().st_size for p in (onnx, onnx + ".data") if Path(p).exists()) / 2**20,
              "blob_cache_mb": blobs, "rows": rows}
    keys = ["read_s", "compress_s", "compile_s", "first_infer_s", "second_infer_s", "loaded_from_cache", "peak_rss_mb",
            "rss_compiled_model_kept_mb", "rss_compiled_model_dropped_mb"]
    print(f"{args.component}, {'int8 weights' if args.int8 else 'fp32 weights'}, {args.precision}: ONNX "
          f"{result['onnx_mb']:.0f} MB, IR {rows['onnx'].get('ir_mb', 0):.0f} MB (saved in {rows['onnx'].get('save_ir_s', 0):.1f} s), "
          f"blob cache {blobs:.0f} MB")
    print("| path | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "–")) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
