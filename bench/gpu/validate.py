"""One-shot GPU validation: accuracy and speed of the ``cuda`` backend against PyTorch and diffusers.

    python bench/gpu/validate.py --out OUT              # one H100/H200: full-size random weights
    python bench/gpu/validate.py --out OUT --dry-run    # CPU, tiny checkpoint: the same code path

In one run, inside a wall-clock budget (default 540 s, including the weights and the export):

1. a full-size random-weight BLIP-Diffusion + ControlNet checkpoint (diffusers ``save_pretrained``);
2. its package: fp32 and fp16 graphs, and the fp16 graphs with ONNX Runtime's CUDA fusions
   (``export --gpu-fusions``), exported by parallel worker processes; a plain package view
   (the same files without the ControlNet) for the plain pipeline;
3. our runtime in its own process (``sides.py ours``): 512x512, 25 PNDM steps, guidance 7.5,
   batch 1, plain and ControlNet: whole generations, each stage, host overhead per step, device
   memory; and every component's outputs on example inputs;
4. diffusers fp16 eager in its own process, measured the same way (``sides.py diffusers``);
5. accuracy, here: every component's fp16 CUDA output against the PyTorch fp32 module on the same
   GPU (cosine >= the component's declared minimum, max abs, no NaN/inf), and whole generations
   against diffusers fp16 and fp32 with identical latents (PSNR);
6. the physical floor: UNet FLOPs per guidance step from the graph, the fp16 matrix-product rate
   measured here, and the fraction of that floor each side reaches;
7. diffusers with ``torch.compile``, and which components ONNX Runtime runs under CUDA graphs,
   when the budget still allows;
8. fast mode (DeepCache step caching, ``fast_mode.py`` in its own process), when the budget still
   allows: cache intervals 1, 3, 5 on the plain and ControlNet packages, loop and generation
   speed-up over the exact mode and the image's difference from it.

Results go to ``OUT/validation.json`` and ``OUT/validation.md`` after every step (a run stopped
by its time limit keeps what it finished). The dry run uses our ``cpu`` backend on the fp32
graphs and diffusers fp32 on the CPU; the CUDA-fused graphs are still exported (and checked)
there, not run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (bench/gpu is not a package)
import report  # noqa: E402
from common import DRY_RUN, GPU, Budget, Mode, settings_of  # noqa: E402

logger = logging.getLogger("bench.gpu")

SCHEMA = "blipdiffusion-trt-gpu-validation/1"
# Pins the export side needs (docs/install.md, "Why these pins"); the GPU machine's own are newer.
PINNED = {"diffusers": "0.32.2", "transformers": "4.48.", "huggingface_hub": "0."}
# Rough costs (s) of each phase on one H100/H200 machine (16 cores): a phase starts only when its
# estimate still fits the budget; a dry run scales them by DRY_RUN_SCALE (a tiny checkpoint).
ESTIMATES = {"checkpoint": 45.0, "export": 300.0, "ours": 90.0, "diffusers": 60.0, "accuracy": 60.0,
             "compile": 150.0, "flops": 10.0, "fast_mode": 90.0}
DRY_RUN_SCALE = 0.2
FAST_MODE_INTERVALS = (1, 3, 5)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for validation.json / validation.md")
    p.add_argument("--work", type=Path,
                   help="scratch folder: checkpoint, package, intermediate files; removed at the end (default OUT/work)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny checkpoint, cpu backend: checks the script itself")
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for the whole run (default 540)")
    p.add_argument("--jobs", type=int, help="parallel export processes (default: 4 on a GPU machine, 2 in a dry run)")
    p.add_argument("--checkpoint", type=Path,
                   help="an existing BLIP-Diffusion ControlNet checkpoint to use instead of building random weights")
    p.add_argument("--package", type=Path,
                   help="that checkpoint's exported ControlNet package (with --gpu-fusions) instead of exporting it")
    p.add_argument("--prepare-only", action="store_true",
                   help="stop after the checkpoint and the export, keeping them in --work for a later --checkpoint/--package run")
    p.add_argument("--steps", type=int, help="PNDM steps (default 25; dry run 3)")
    p.add_argument("--size", type=int, help="image height and width (default 512; dry run: the package's default)")
    p.add_argument("--runs", type=int, help="timed generations per pipeline (default 3; dry run 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    p.add_argument("--keep-work", action="store_true", help="keep the checkpoint and package (about 30 GB at full size)")
    return p.parse_args(argv)


def environment(mode: Mode) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("numpy", "torch", "onnxruntime-gpu", "onnxruntime", "onnx", "diffusers", "transformers", "tokenizers",
                 "huggingface_hub", "safetensors", "nvidia-ml-py"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    import onnxruntime

    env: dict[str, Any] = {"versions": versions, "onnxruntime_module": onnxruntime.__file__,
                           "onnxruntime_module_version": onnxruntime.__version__,
                           "onnxruntime_providers": onnxruntime.get_available_providers(),
                           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if mode.gpu:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda_capability"] = list(torch.cuda.get_device_capability(0))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def check_environment(env: dict[str, Any], mode: Mode) -> list[str]:
    """Problems that would make the results meaningless, each in one line (empty: fine)."""
    problems = []
    versions = env["versions"]
    for dist, prefix in PINNED.items():
        if not str(versions.get(dist, "")).startswith(prefix):
            problems.append(f"{dist} {versions.get(dist)} is not the pinned {prefix}*: the carried wheels must come "
                            "first on PYTHONPATH (transformers 5 silently drops the text encoder's causal mask)")
    if mode.gpu and "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
        problems.append(f"ONNX Runtime {env['onnxruntime_module_version']} from {env['onnxruntime_module']} has no CUDA "
                        "provider: the onnxruntime-gpu wheel must come first on PYTHONPATH")
    return problems


class Run:
    """The results so far, written after every phase."""

    def __init__(self, out: Path, mode: Mode, budget: Budget, argv):
        self.out, self.mode, self.budget = out, mode, budget
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "mode": mode.to_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": ["python", "bench/gpu/validate.py", *argv], "budget_s": budget.seconds, "phases": {},
        }

    def phase(self, name: str, fn, *args, **kwargs):
        logger.info("[%5.0f s] %s", self.budget.used, name)
        start = time.monotonic()
        try:
            value = fn(*args, **kwargs)
            status = "done"
        except Exception as error:  # noqa: BLE001 -- one failed step must not lose the others' results
            logger.exception("%s failed", name)
            value, status = None, f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self.data["phases"][name] = {"status": status, "seconds": round(time.monotonic() - start, 1)}
        self.save()
        return value

    def fits(self, name: str) -> bool:
        """Whether phase ``name``'s estimate still fits the budget (else it is recorded as skipped)."""
        estimate = ESTIMATES[name] * (1.0 if self.mode.gpu else DRY_RUN_SCALE)
        if self.budget.fits(estimate):
            return True
        self.skip(name, f"{self.budget.left:.0f} s left, needs about {estimate:.0f} s")
        return False

    def skip(self, name: str, why: str) -> None:
        logger.warning("skipping %s: %s", name, why)
        self.data["phases"][name] = {"status": f"skipped: {why}", "seconds": 0.0}
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.used, 1)
        common.write_json(self.out / "validation.json", self.data)
        tmp = self.out / ".validation.md.partial"
        tmp.write_text(report.markdown(self.data))
        os.replace(tmp, self.out / "validation.md")


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------

def clean_work(work: Path, keep: list[Path]) -> None:
    """Remove the scratch folder, except a given checkpoint or package inside it (prepared by a
    ``--prepare-only`` call, kept for a rerun of the measure phase on the same machine)."""
    keep = [k.resolve() for k in keep]
    for child in list(work.iterdir()) if work.is_dir() else []:
        if not any(k == child or child in k.parents for k in keep):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def build_checkpoint(work: Path, mode: Mode) -> Path:
    from blipdiffusion_trt.export.random_checkpoint import build_random_checkpoint

    checkpoint = work / f"{mode.size}-controlnet-checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    # on the GPU: modules created and initialised there (seconds instead of minutes), saved from the CPU
    build_random_checkpoint(checkpoint, mode.size, controlnet=True, seed=0, device=mode.device)
    return checkpoint


def export(checkpoint: Path, work: Path, mode: Mode, jobs: int) -> dict[str, Any]:
    from blipdiffusion_trt.export.exporter import export_package

    package = work / f"{mode.size}-controlnet-package"
    precisions = ("fp32", "fp16") if mode.precision == "fp16" else ("fp32",)
    # only what is measured: no editing graphs (a third full UNet trace), no CPU fusions
    result = export_package(checkpoint, package, precisions=precisions, validate=False, cpu_fusions=False,
                            editing=False, gpu_fusions=True, jobs=jobs, force=True, progress=False)
    plain = plain_view(package, work / f"{mode.size}-plain-package")
    return {"package": str(package), "plain_package": str(plain), "precisions": list(precisions), "jobs": jobs,
            "export_s": result.seconds, "gpu_fused": result.gpu_fused}


def plain_view(package: Path, view: Path) -> Path:
    """The ControlNet package without its ControlNet: what a plain export of the same checkpoint
    writes (same weights, same graphs), as hard links; pipeline.json and the manifest rewritten."""
    import dataclasses

    from blipdiffusion_trt.package import PackageLayout, pipeline_config_json, read_pipeline_config
    from blipdiffusion_trt.package.manifest import read_manifest, sha256_file, write_manifest

    shutil.rmtree(view, ignore_errors=True)
    source, files_of_view = PackageLayout(package), PackageLayout(view)
    manifest = read_manifest(package)
    config = read_pipeline_config(package)
    from blipdiffusion_trt.components import CONTROLNET_STEP_CACHE

    controlnet_only = {"controlnet", *CONTROLNET_STEP_CACHE.names}  # the ControlNet and its fast-mode graphs
    files = {name: digest for name, digest in manifest["files"].items() if Path(name).stem not in controlnet_only}
    for name in files:
        files_of_view.path(name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source.path(name), files_of_view.path(name))
        except OSError:
            shutil.copy2(source.path(name), files_of_view.path(name))
    files_of_view.pipeline_config.unlink()  # a hard link: replaced, never written through
    files_of_view.pipeline_config.write_text(pipeline_config_json(dataclasses.replace(config, has_controlnet=False)))
    rewritten = files_of_view.name_of(files_of_view.pipeline_config)
    files[rewritten] = sha256_file(files_of_view.pipeline_config)
    # write_manifest records the size of every file whose size is not given: the rewritten one's
    sizes = {k: v for k, v in (manifest.get("sizes") or {}).items() if k in files and k != rewritten}
    manifest.update(files=dict(sorted(files.items())), sizes=sizes,
                    components={k: v for k, v in manifest["components"].items() if k not in controlnet_only},
                    gpu_fused={k: v for k, v in manifest.get("gpu_fused", {}).items() if k not in controlnet_only},
                    source={**manifest["source"], "view_of": package.name})
    write_manifest(view, manifest)
    return view


def generations(package: Path, mode: Mode, args) -> dict[str, Any]:
    """The benchmark's ``Settings`` of each pipeline ("plain", "controlnet")."""
    from blipdiffusion_trt.package import read_pipeline_config

    config = read_pipeline_config(package)
    size = args.size or (512 if mode.gpu else config.default_height)
    steps = args.steps or (25 if mode.gpu else 3)
    f = config.latent_scale_factor
    return {key: settings_of(height=size, width=size, steps=steps, controlnet=key == "controlnet",
                             latent_shape=(1, config.latent_channels, size // f, size // f), precision=mode.precision)
            for key in ("plain", "controlnet")}


def run_side(side: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """``sides.py`` in a fresh process (own memory figure, own cold start); its result JSON."""
    spec_path, result_path = work / f"{side}.spec.json", work / f"{side}.result.json"
    result_path.unlink(missing_ok=True)
    common.write_json(spec_path, {**spec, "side": side})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / "sides.py"), str(spec_path), str(result_path)],
                          capture_output=True, text=True, timeout=max(30.0, timeout))
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{side} exited {proc.returncode}: {tail}")
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.monotonic() - start, 1)
    return result


def run_fast_mode(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """``fast_mode.py`` in a fresh process; its result JSON."""
    spec_path, result_path = work / "fast-mode.spec.json", work / "fast-mode.result.json"
    result_path.unlink(missing_ok=True)
    common.write_json(spec_path, spec)
    proc = subprocess.run([sys.executable, str(HERE / "fast_mode.py"), str(spec_path), str(result_path)],
                          capture_output=True, text=True, timeout=max(30.0, timeout))
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"fast mode exited {proc.returncode}: {tail}")
    return json.loads(result_path.read_text())


def start_flop_count(package: Path, gens: dict[str, Any], work: Path) -> subprocess.Popen:
    """FLOPs of the UNet and ControlNet per guidance step, counted from the fp32 graphs in the
    background (symbolic shape inference on the CPU, while the GPU sides run)."""
    gen = gens["plain"]
    out = work / "flops.json"
    out.unlink(missing_ok=True)
    code = (
        "import json, sys\n"
        "from blipdiffusion_trt.bench.flops import component_input_shapes, count_flops\n"
        "from blipdiffusion_trt.package import ModelPackage\n"
        f"package = ModelPackage.open({str(package)!r}, verify=False)\n"
        "out = {}\n"
        "for name in ('unet_plain', 'unet', 'controlnet'):\n"
        f"    shapes = component_input_shapes(package.specs[name], package.config, batch=1, height={gen.height}, "
        f"width={gen.width})\n"
        "    out[name] = count_flops(package.layout.graph(name, 'fp32'), shapes)\n"
        f"open({str(out)!r}, 'w').write(json.dumps(out))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def collect_flops(proc: subprocess.Popen, work: Path, timeout: float) -> dict[str, Any]:
    try:
        _, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("FLOP count did not finish within the budget") from None
    if proc.returncode != 0:
        raise RuntimeError(f"FLOP count failed: {' | '.join(err.strip().splitlines()[-3:])}")
    return json.loads((work / "flops.json").read_text())


def accuracy(checkpoint: Path, package: Path, mode: Mode, gens: dict[str, Any], work: Path) -> dict[str, Any]:
    """PyTorch fp32 on the mode's device against our components' outputs, and the fp32 diffusers images."""
    import numpy as np
    import torch

    import sides
    from blipdiffusion_trt.export.exporter import component_modules
    from blipdiffusion_trt.package import ModelPackage

    if not mode.gpu:
        torch.set_num_threads(1)  # dry run on a shared CPU
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    pkg = ModelPackage.open(package, verify=False)
    plain, cn, dtype = sides.load_diffusers_pair(checkpoint, mode.device, "fp32", gens["controlnet"],
                                                 threads=None if mode.gpu else 1)
    factories = component_modules(cn, pkg.config)
    outputs = np.load(work / "components.npz")
    ours_graphs = json.loads((work / "ours.result.json").read_text())["graphs"]
    components: dict[str, Any] = {}
    for name, spec in pkg.specs.items():
        if f"{name}/out/{spec.output_names[0]}" not in outputs:
            continue
        module = factories[name]()  # wraps the pipeline's own modules, already on the device
        with torch.no_grad():
            ref = module(*[torch.from_numpy(outputs[f"{name}/in/{t}"]).to(mode.device) for t in spec.input_names])
        refs = [r.float().cpu().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        got = [outputs[f"{name}/out/{t}"] for t in spec.output_names]
        metrics = common.compare(got, refs)
        if mode.precision == "fp16":
            metrics["criterion"] = f"finite, cosine >= {spec.fp16_min_cosine}"
            metrics["passed"] = metrics["finite"] and metrics["cosine"] >= spec.fp16_min_cosine
        else:
            tolerance = spec.atol * max(1.0, metrics["max_abs_reference"])
            metrics["criterion"] = f"finite, max abs <= {tolerance:.3g} (fp32 export tolerance)"
            metrics["passed"] = metrics["finite"] and metrics["max_abs"] <= tolerance
        metrics["graph"] = ours_graphs.get(name)
        components[name] = metrics
        del module
    # whole generations in fp32 on the same device, same latents
    del factories
    images = {key: sides.run_diffusers_generation(p, gens[key], mode.device, dtype)
              for key, p in (("plain", plain), ("controlnet", cn))}
    np.savez(work / "diffusers-fp32.images.npz", **images)
    result = {"components": components, "ceiling": matmul_ceiling() if mode.gpu else None}
    del plain, cn
    if mode.gpu:
        torch.cuda.empty_cache()
    return result


def matmul_ceiling(n: int = 8192, runs: int = 10) -> dict[str, Any]:
    """fp16 matrix-product rate measured on this GPU (torch/cuBLAS, random data)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / runs
    return {"tflops": 2 * n**3 / seconds / 1e12, "method": f"torch fp16 {n}x{n}x{n} matmul, mean of {runs} after 3 warm-ups"}


def image_parity(work: Path, sides_run: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    images = {name: np.load(work / f"{name}.images.npz") for name in ("ours", "diffusers", "diffusers-fp32")
              if (work / f"{name}.images.npz").is_file()}
    out = {}
    for key in ("plain", "controlnet"):
        have = {name: data[key] for name, data in images.items() if key in data}
        pairs = {"ours_vs_diffusers": ("ours", "diffusers"), "ours_vs_diffusers_fp32": ("ours", "diffusers-fp32"),
                 "diffusers_vs_diffusers_fp32": ("diffusers", "diffusers-fp32")}
        row = {label: common.psnr(have[a], have[b]) for label, (a, b) in pairs.items() if a in have and b in have}
        if "ours_vs_diffusers_fp32" in row and "diffusers_vs_diffusers_fp32" in row:
            # ours may not stray from the fp32 truth by much more than diffusers' own reduced precision does
            row["criterion"] = "PSNR(ours, diffusers fp32) >= min(PSNR(diffusers, diffusers fp32) - 3 dB, 40 dB)"
            row["passed"] = row["ours_vs_diffusers_fp32"] >= min(row["diffusers_vs_diffusers_fp32"] - 3.0, 40.0)
        out[key] = row
    return out


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"  # nothing here needs the network; the GPU machine has none
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mode = DRY_RUN if args.dry_run else GPU
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or args.out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, mode, budget, argv)
    env = run.data["environment"] = environment(mode)
    problems = run.data["environment_problems"] = check_environment(env, mode)
    run.save()
    if problems:
        for problem in problems:
            logger.error("%s", problem)
        return 2
    if mode.gpu:
        import dataclasses

        from blipdiffusion_trt.runtime.backends.ort_install import ensure_cuda_libraries

        run.data["environment"]["cuda_libraries"] = dataclasses.asdict(ensure_cuda_libraries())

    if args.checkpoint:
        checkpoint = args.checkpoint.resolve()
        run.data["phases"]["checkpoint"] = {"status": f"given: {checkpoint.name}", "seconds": 0.0}
    else:
        checkpoint = run.phase("checkpoint", build_checkpoint, work, mode) if run.fits("checkpoint") else None
    jobs = args.jobs or (4 if mode.gpu else 2)
    if args.package:
        package = args.package.resolve()
        exported = {"package": str(package), "plain_package": str(plain_view(package, work / "plain-package-view"))}
        run.data["phases"]["export"] = {"status": f"given: {package.name}", "seconds": 0.0}
    else:
        exported = run.phase("export", export, checkpoint, work, mode, jobs) if checkpoint and run.fits("export") else None
    if not exported:
        return 1
    run.data["export"] = exported
    if args.prepare_only:
        run.save()
        logger.info("prepared in %.0f s: --checkpoint %s --package %s", budget.used, checkpoint, exported["package"])
        return 0
    package, plain = Path(exported["package"]), Path(exported["plain_package"])
    gens = generations(package, mode, args)
    run.data["generations"] = {k: g.to_dict() for k, g in gens.items()}
    flops_proc = start_flop_count(package, gens, work)

    runs = args.runs or (3 if mode.gpu else 1)
    spec = {"mode": mode.to_dict(), "generations": {k: g.to_dict() for k, g in gens.items()}, "warmup": 1, "runs": runs,
            "stage_runs": max(3, runs), "package_controlnet": str(package), "package_plain": str(plain),
            "checkpoint": str(checkpoint), "components": str(work / "components.npz"),
            "cuda_graph_probe": mode.gpu and budget.fits(ESTIMATES["ours"] + ESTIMATES["diffusers"] + ESTIMATES["accuracy"] + 60)}
    sides_run = run.data.setdefault("sides", {})
    for side in ("ours", "diffusers"):
        if not run.fits(side):
            continue
        result = run.phase(side, run_side, side, {**spec, "images": str(work / f"{side}.images.npz")}, work, budget.left)
        if result:
            sides_run[side] = result
    if "ours" in sides_run and run.fits("accuracy"):
        acc = run.phase("accuracy", accuracy, checkpoint, package, mode, gens, work)
        if acc:
            run.data["accuracy"] = acc
    run.data["image_parity"] = image_parity(work, sides_run)
    run.save()
    if args.no_compile or not mode.gpu:
        run.skip("diffusers-compile", "--no-compile" if args.no_compile else "GPU only")
    elif budget.fits(ESTIMATES["compile"]):
        result = run.phase("diffusers-compile", run_side, "diffusers-compile",
                           {**spec, "images": str(work / "diffusers-compile.images.npz")}, work, budget.left)
        if result:
            sides_run["diffusers-compile"] = result
    else:
        run.skip("diffusers-compile", f"{budget.left:.0f} s left, needs about {ESTIMATES['compile']:.0f} s")
    # --- fast mode (DeepCache step caching): its own process and phase ---
    if run.fits("fast_mode"):
        result = run.phase("fast_mode", run_fast_mode, {**spec, "cache_intervals": list(FAST_MODE_INTERVALS)}, work,
                           budget.left)
        if result:
            run.data["fast_mode"] = result
    flops = run.phase("flops", collect_flops, flops_proc, work, budget.left)
    if flops:
        run.data["flops"] = flops
    run.data["tensorrt_imported"] = sys.modules.get("tensorrt") is not None
    run.save()
    if not args.keep_work:
        clean_work(work, keep=[p for p in (args.checkpoint, args.package) if p])
    print(report.markdown(run.data))
    failed = [name for name, p in run.data["phases"].items() if p["status"].startswith("failed")]
    return 1 if failed or not report.all_passed(run.data) else 0


if __name__ == "__main__":
    sys.exit(main())
