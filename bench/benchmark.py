"""Benchmark the runtime against diffusers, stage by stage (see ``blipdiffusion-trt bench --help``).

    python bench/benchmark.py --size tiny --workdir /tmp/bench-tiny --out /tmp/bench-tiny/results
    python bench/benchmark.py --package PKG --checkpoint CK --steps 3 --runs 3 --out bench/results/cpu

The implementation lives in :mod:`blipdiffusion_trt.bench`, so the installed
``blipdiffusion-trt bench`` command runs the same code.
"""

import sys

from blipdiffusion_trt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
