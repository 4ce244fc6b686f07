"""Does one generation complete under a container's memory limit? (cgroup v1, Linux, root)

Runs the benchmark's cold-start child (:mod:`blipdiffusion_trt.bench.cold_start`: a fresh process
imports, loads, makes one image) inside a memory cgroup created for it with ``memory.limit_in_bytes``
set, once per limit given, and reports per limit whether it completed or was killed, its own peak
RSS and the cgroup's peak usage (which, as in a container, also counts the page cache the process
reads through). The cgroup is removed afterwards.

A cgroup is charged for a file page when a process in it brings the page into the page cache; a
page already cached (read by an earlier run) is charged elsewhere and costs this run nothing. So
before each run the model files (``--evict``: the package, the checkpoint, the OpenVINO cache) are
dropped from the page cache (``posix_fadvise(DONTNEED)``, those files only), as in a fresh
container that reads them itself.

    python bench/cgroup_limit.py --side openvino --package PKG --limits-gb 7.5,6,5 [--json out.json]
    python bench/cgroup_limit.py --side diffusers --checkpoint CK --package PKG --limits-gb 7.5

``--side`` is a backend name, or ``diffusers`` / ``diffusers-bf16``. Settings as the benchmark's:
``--height``, ``--width``, ``--steps`` (PNDM, guidance 7.5, batch 1, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def evict_from_page_cache(roots: list[Path]) -> int:
    """Drop the cached pages of every file under ``roots`` (not mapped elsewhere); returns the bytes."""
    total = 0
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if not path.is_file():
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def run_limited(spec: dict, limit_bytes: int, timeout: float) -> dict:
    from blipdiffusion_trt.bench.cold_start import CHILD_MARK

    group = CGROUP_ROOT / f"blipdiffusion-limit-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it allocates is charged to the group
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "blipdiffusion_trt.bench.cold_start", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=enter)
            returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired:
            returncode, stdout, stderr = None, "", "timeout"
        seconds = time.time() - start
        lines = [line for line in stdout.splitlines() if line.startswith(CHILD_MARK)]
        child = json.loads(lines[-1][len(CHILD_MARK):]) if lines and returncode == 0 else {}
        oom = _read(group / "memory.oom_control")
        return {
            "limit_gb": round(limit_bytes / 1e9, 3), "completed": bool(child), "returncode": returncode,
            "seconds": round(seconds, 1), "peak_rss_mb": child.get("peak_rss_mb"),
            "rss_anon_mb_after_first_image": child.get("rss_anon_mb_after_first_image"),
            "rss_file_mb_after_first_image": child.get("rss_file_mb_after_first_image"),
            "cgroup_max_usage_mb": round(int(_read(group / "memory.max_usage_in_bytes") or 0) / 2**20),
            "cgroup_failcnt": int(_read(group / "memory.failcnt") or 0),
            "oom_kill": next((int(line.split()[1]) for line in oom.splitlines() if line.startswith("oom_kill ")), None),
            **({} if child else {"error_tail": (stderr or stdout).strip().splitlines()[-3:]}),
        }
    finally:
        for _ in range(50):  # the killed child's memory is uncharged asynchronously
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", required=True, help="a backend name, or diffusers / diffusers-bf16")
    parser.add_argument("--package", type=Path, required=True, help="the model package (its configuration: "
                        "latent shape; the graphs for a backend)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--limits-gb", required=True, help="comma-separated limits, GB (1e9 bytes)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--openvino-cache", help="the openvino backend's cache_dir (default: its own)")
    parser.add_argument("--evict", type=Path, action="append", default=[],
                        help="a file or directory whose pages are dropped from the page cache before each run")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (CGROUP_ROOT / "cgroup.procs").is_file():
        parser.error(f"{CGROUP_ROOT}: no cgroup v1 memory controller here")

    from blipdiffusion_trt.bench.settings import Settings
    from blipdiffusion_trt.package import ModelPackage

    diffusers = args.side.startswith("diffusers")
    if diffusers and args.checkpoint is None:
        parser.error("--side diffusers needs --checkpoint")
    config = ModelPackage.open(args.package, verify=False).config
    factor = config.latent_scale_factor
    settings = Settings(height=args.height, width=args.width, steps=args.steps, batch=1, scheduler="pndm",
                        guidance=7.5, precision="fp32", seed=0, controlnet=config.has_controlnet,
                        latent_shape=(1, config.latent_channels, args.height // factor, args.width // factor))
    spec = {"kind": "diffusers" if diffusers else "ours", "settings": settings.to_dict(),
            "package": str(args.package), "checkpoint": str(args.checkpoint), "backend": args.side,
            "device": "cpu", "precision": args.side.partition("-")[2] or "fp32" if diffusers else None,
            "verify": True, "threads": None, "torch_compile": False,
            "runtime_options": {"cache_dir": args.openvino_cache} if args.openvino_cache else {}}
    results = []
    for limit in (float(x) for x in args.limits_gb.split(",")):
        evict_from_page_cache(args.evict)
        row = run_limited(spec, int(limit * 1e9), args.timeout)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps({"side": args.side, "settings": settings.to_dict(), "runs": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
