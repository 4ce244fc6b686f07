"""FLOPs of every component of a model package at one generation's shapes (from the ONNX graphs).

    python bench/flops.py PKG [--height 512 --width 512 --batch 1 --precision fp32]

Counts Conv, ConvTranspose, MatMul, Gemm and Einsum as 2 x multiply-accumulates, with shapes from
ONNX Runtime's symbolic shape inference; weights are not loaded. The UNet and ControlNet run on the
classifier-free-guidance batch (2 x batch). ``blipdiffusion-trt bench`` reports the same counts
next to the measured latencies.
"""

from __future__ import annotations

import argparse
import json
import sys

from blipdiffusion_trt.bench.flops import component_input_shapes, count_flops
from blipdiffusion_trt.components import declare_components, generation_components
from blipdiffusion_trt.package import ModelPackage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    package = ModelPackage.open(args.package)  # confined and checked, as every command reads a package
    config = package.config
    height, width = args.height or config.default_height, args.width or config.default_width
    results = {}
    specs = declare_components(config)
    for name in generation_components(config):
        spec = specs[name]
        shapes = component_input_shapes(spec, config, batch=args.batch, height=height, width=width)
        results[name] = {**count_flops(package.onnx_path(name, args.precision), shapes),
                         "input_shapes": {k: list(v) for k, v in shapes.items()}}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{height}x{width}, batch {args.batch}, {args.precision}")
    print(f"{'component':<20} {'GFLOP':>10}  by op")
    for name, r in results.items():
        ops = ", ".join(f"{op} {v / 1e9:.3g}" for op, v in sorted(r["by_op"].items()))
        extra = f"  ({r['unresolved']} nodes with unknown shapes)" if r["unresolved"] else ""
        print(f"{name:<20} {r['flops'] / 1e9:>10.3f}  {ops}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
