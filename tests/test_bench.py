"""Smoke test of the benchmark (``blipdiffusion-trt bench``) on the tiny fixture, and FLOP counting.

No timing assertions: the figures only have to be there, positive and consistent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt.bench import cli as bench_cli
from blipdiffusion_trt.bench import flops
from blipdiffusion_trt.bench import stats as bench_stats
from blipdiffusion_trt.errors import InputError

STAGES = ("qformer", "text_encoder", "text_encoder_plain", "unet_plain", "vae_decoder", "scheduler_step")


@pytest.fixture(scope="module")
def bench_run(tiny, tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the chart needs the dev extra (pip install .[dev])")
    out = tmp_path_factory.mktemp("bench")
    code = bench_cli.main([
        "--package", str(tiny.package), "--checkpoint", str(tiny.checkpoint), "--backends", "cpu",
        "--runs", "1", "--warmup", "0", "--steps", "2", "--threads", "1", "--peak-tflops", "cpu=1.5",
        "--diffusers-precisions", "fp32", "--no-progress", "--out", str(out), "--edit", "--cache-interval", "1,2",
    ])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def _positive_stats(stat: dict) -> None:
    for key in ("p50", "p90", "p99", "mean"):
        assert stat[key] > 0, (key, stat)
    assert stat["p50"] <= stat["p90"] <= stat["p99"]
    assert stat["n"] >= 1


def test_json_is_well_formed(bench_run):
    _, results = bench_run
    assert results["schema"] == bench_cli.SCHEMA
    assert results["machine"]["cpu"]["model"] and results["machine"]["cpu"]["logical_cores"] >= 1
    assert results["machine"]["ram_gb"] > 0
    assert {"onnxruntime", "numpy", "torch", "diffusers"} <= set(results["versions"])
    settings = results["settings"]
    assert (settings["steps"], settings["runs"], settings["warmup"], settings["batch"]) == (2, 1, 0, 1)
    assert settings["diffusers"] is True and settings["backends"] == ["cpu"]

    impls = results["implementations"]
    assert set(impls) == {"diffusers", "cpu"}
    for name, impl in impls.items():
        assert "error" not in impl, impl.get("error")
        for stage in STAGES:
            _positive_stats(impl["stages"][stage])
        for key in ("generation", "denoise_loop", "loop_it_per_s", "load_warm"):
            _positive_stats(impl[key])
        assert impl["host_overhead_per_step"]["p50"] >= 0
        assert impl["unet_calls"] >= 2
        cold = impl["cold_start"]
        assert "error" not in cold, cold
        assert 0 < cold["imports_done"] <= cold["loaded"] <= cold["first_image"]
        assert cold["peak_rss_mb"] > 0
    # same latents, same checkpoint: the images agree (the parity tests check this strictly)
    assert impls["cpu"]["max_abs_image_diff_vs_diffusers"] < 1e-2

    flops = results["flops"]
    for name in ("qformer", "text_encoder", "text_encoder_plain", "unet_plain", "vae_decoder"):
        assert flops[name]["flops"] > 0 and flops[name]["unresolved"] == 0, (name, flops[name])
    assert flops["unet_plain"]["input_shapes"]["sample"][0] == 2  # classifier-free guidance doubles the batch

    rows = {row["key"]: row for row in results["table"]["rows"]}
    for key in ("qformer", "unet_plain", "vae_decoder", "scheduler_step", "generation", "loop_it_per_s",
                "cold_first_image", "peak_rss_mb"):
        assert rows[key]["values"]["diffusers"] > 0 and rows[key]["values"]["cpu"] > 0
        assert rows[key]["ratio"]["cpu"] > 0, key
    assert rows["unet_plain"]["gflop"] > 0
    assert 0 < rows["unet_plain"]["fraction_of_peak"]["cpu"]
    assert results["peak_tflops"]["cpu"]["tflops"] == 1.5


def test_edit_against_the_generation(bench_run):
    """--edit: whole edits and one unet_p2p call on our side, set against the generation's."""
    out, results = bench_run
    impl = results["implementations"]["cpu"]
    edit = impl["edit"]
    for key in ("generation", "denoise_loop", "loop_it_per_s"):
        _positive_stats(edit[key])
    assert edit["unet_calls"] == impl["unet_calls"] and edit["in_generation"]["unet"]["p50"] > 0
    _positive_stats(impl["stages"]["unet_p2p"])
    comparison = edit["comparison"]
    assert comparison["unet_call"]["rows"] == {"unet_plain": 2, "unet_p2p": 4}  # guidance, batch 1
    for part in ("loop_per_step", "unet_call"):
        assert comparison[part]["ratio"] > 0
    assert comparison["loop_per_step"]["edit"] == pytest.approx(edit["denoise_loop"]["p50"] / edit["unet_calls"])
    assert results["flops"]["unet_p2p"]["flops"] > results["flops"]["unet_plain"]["flops"] > 0
    assert "diffusers" not in impl["edit"] and "edit" not in results["implementations"]["diffusers"]
    markdown = (out / "bench.md").read_text()
    assert "| unet_p2p (1 call, 4 rows) |" in markdown and "| edit / generation, per step |" in markdown


def test_fast_mode_beside_the_exact_mode(bench_run):
    """--cache-interval 1,2: fast mode's generations, loop, one full and one shallow UNet call, the
    speed-up over the exact mode and the image's difference from the exact mode's, in json and md."""
    out, results = bench_run
    assert results["settings"]["cache_intervals"] == [1, 2]
    impl = results["implementations"]["cpu"]
    mode = impl["fast_mode"]["2"]
    for key in ("generation", "denoise_loop"):
        _positive_stats(mode[key])
        assert mode["speedup_vs_exact"][key] == pytest.approx(impl[key]["p50"] / mode[key]["p50"])
    assert set(mode["unet_call"]) == {"unet_plain_full_step", "unet_plain_shallow_step"}
    for stat in mode["unet_call"].values():
        _positive_stats(stat)
    calls = impl["unet_calls"]
    assert mode["unet_calls"] == calls and mode["full_unet_calls"] == len(range(0, calls, 2))
    image = mode["image_vs_exact"]
    assert 0 < image["mean_abs"] <= image["max_abs"] <= 1 and image["psnr_db"] > 0
    assert "fast_mode" not in results["implementations"]["diffusers"]
    markdown = (out / "bench.md").read_text()
    assert "Fast mode (DeepCache step caching" in markdown
    assert any(line.startswith("| ours cpu") and "| 2 |" in line for line in markdown.splitlines())


def test_bad_cache_intervals_are_one_line():
    with pytest.raises(InputError, match=r"^--cache-interval must list integers in \[1, 1000\], got '0'"):
        bench_cli._cache_intervals(["1", "0"])
    assert bench_cli._cache_intervals(["3", "1", "3"]) == (1, 3)


def test_markdown_has_the_table(bench_run):
    out, _ = bench_run
    lines = (out / "bench.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| stage |"))
    assert lines[header] == "| stage | GFLOP | diffusers torch cpu fp32 | ours cpu | × (cpu) |"
    assert set(lines[header + 1]) <= set("|-: ")
    assert any(line.startswith("| UNet (1 call) |") for line in lines)
    assert any("% of" in line or "%)" in line for line in lines)  # fraction of the given peak


def test_chart_opens(bench_run):
    out, _ = bench_run
    with Image.open(out / "bench.png") as image:
        image.verify()
    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def _tiny_graph():
    """Conv x[N,3,H,W] * w[4,3,3,3] (pad 1) -> y; MatMul a[2,5,6] @ b[6,7] -> z; grouped strided Conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((6, 7)).astype(np.float32), "b")
    g = numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "g")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "b"], ["z"]),
        helper.make_node("Conv", ["u", "g"], ["v"], group=2, strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5, 6]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, None)],
        initializer=[w, b, g],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_by_hand():
    pytest.importorskip("onnx")
    counted = flops.count_flops(_tiny_graph(), {"x": [1, 3, 8, 8]})
    conv = 2 * (1 * 4 * 8 * 8) * (3 * 3 * 3)  # output elements x MACs each
    grouped = 2 * (1 * 6 * 4 * 4) * (4 // 2 * 3 * 3)  # 9x9, kernel 3, stride 2 -> 4x4; 2 input channels per group
    matmul = 2 * 2 * 5 * 7 * 6  # batch x M x N x K
    assert counted["by_op"] == {"Conv": conv + grouped, "MatMul": matmul}
    assert counted["flops"] == conv + grouped + matmul == 13824 + 3456 + 840
    assert counted["unresolved"] == 0
    # the dynamic input's size matters: a batch of 3 at 16x16 is 12 times the convolution
    assert flops.count_flops(_tiny_graph(), {"x": [3, 3, 16, 16]})["by_op"]["Conv"] == 12 * conv + grouped


def test_summarize():
    stats = bench_stats.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["p50"], stats["mean"], stats["min"], stats["max"], stats["n"]) == (3.0, 3.0, 1.0, 5.0, 5)
    assert stats["p90"] == pytest.approx(4.6) and stats["p99"] == pytest.approx(4.96)


def test_add_bench_registers_the_subcommand():
    from blipdiffusion_trt.cli import build_parser

    args = build_parser().parse_args(["bench", "--size", "tiny", "--backends", "cpu,cuda", "--runs", "2"])
    assert args.run is bench_cli.run_bench
    assert args.backends == ["cpu", "cuda"] and args.runs == 2 and args.steps is None


def test_default_backends_are_the_registry_s_available_ones(monkeypatch):
    """Only backends that can run here: the GPU wheel lists the CUDA and TensorRT providers on any
    machine, so a GPU backend also needs a GPU the driver sees, and ort-tensorrt the TensorRT
    library its provider links."""
    import dataclasses

    import onnxruntime as ort

    from blipdiffusion_trt.runtime.backends import ort_install
    from blipdiffusion_trt.runtime.backends import openvino as openvino_backend
    from blipdiffusion_trt.runtime.backends import tensorrt as tensorrt_backend

    gpu_wheel = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_wheel)
    monkeypatch.setattr(ort_install, "cuda_device_count", lambda load=None: 1)
    monkeypatch.setattr(ort_install, "find_tensorrt_library",
                        lambda ort, load=None: ort_install.TensorRTLibrary("libnvinfer.so.10", loaded=False))
    monkeypatch.setattr(tensorrt_backend, "TENSORRT", dataclasses.replace(tensorrt_backend.TENSORRT, is_available=lambda: True))
    monkeypatch.setattr(openvino_backend, "OPENVINO", dataclasses.replace(openvino_backend.OPENVINO, is_available=lambda: True))
    # TensorRT plans are built from fp16 graphs only; OpenVINO reads the fp32 graphs only
    assert bench_cli.default_backends("fp32") == ["cpu", "cuda", "openvino"]
    assert bench_cli.default_backends("fp16") == ["cpu", "cuda", "tensorrt"]  # no libnvinfer.so.10: no ort-tensorrt
    monkeypatch.setattr(openvino_backend, "OPENVINO", dataclasses.replace(openvino_backend.OPENVINO, is_available=lambda: False))
    assert bench_cli.default_backends("fp32") == ["cpu", "cuda"]
    monkeypatch.setattr(ort_install, "find_tensorrt_library",
                        lambda ort, load=None: ort_install.TensorRTLibrary("libnvinfer.so.10", loaded=True))
    assert bench_cli.default_backends("fp16") == ["cpu", "cuda", "ort-tensorrt", "tensorrt"]
    monkeypatch.setattr(ort_install, "cuda_device_count", lambda load=None: 0)  # the GPU wheel on a machine without GPU
    monkeypatch.setattr(tensorrt_backend, "TENSORRT", dataclasses.replace(tensorrt_backend.TENSORRT, is_available=lambda: False))
    assert bench_cli.default_backends("fp16") == ["cpu"]


def test_a_backend_chosen_by_default_may_fail_one_named_may_not():
    from blipdiffusion_trt.errors import EngineError

    def fails():
        raise EngineError("no TensorRT plan for this GPU")

    assert bench_cli._guarded("ours tensorrt", fails, strict=False) == {
        "label": "ours tensorrt", "error": "no TensorRT plan for this GPU"}
    with pytest.raises(EngineError):
        bench_cli._guarded("ours tensorrt", fails, strict=True)
    # anything else is the side's error either way (a provider failing at load)
    assert "RuntimeError: CUDA failure" in bench_cli._guarded(
        "ours cuda", lambda: (_ for _ in ()).throw(RuntimeError("CUDA failure")))["error"]


def test_session_options_script_runs(tiny, tmp_path):
    """bench/session_options.py: one row per (component, variant), well-formed (smoke only)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "session_options.py"
    out = tmp_path / "rows.json"
    variants = ["default", "arena=off", "graphs=fp32-fused"]
    from blipdiffusion_trt.package import read_pipeline_config

    size = read_pipeline_config(tiny.package).default_height
    proc = subprocess.run([sys.executable, str(script), str(tiny.package), "--components", "unet_plain,vae_decoder",
                           "--size", str(size), "--runs", "1", "--variants", *variants, "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    # vae_decoder has no CPU-fused graph: that row fails (logged) and is left out
    assert [(r["component"], r["variant"]) for r in rows] == [
        ("unet_plain", v) for v in variants] + [("vae_decoder", v) for v in variants[:2]]
    for row in rows:
        assert row["load_s"] > 0 and row["p50_s"] > 0 and row["peak_rss_mb"] > 0
    assert proc.stdout.count("\n| ") == len(rows)


# ------------------------------------------------------------------------------------------------
# Measuring both sides the same way
# ------------------------------------------------------------------------------------------------

class _Bar:
    def set_postfix_str(self, text):
        pass

    def update(self, n=1):
        pass


def _bench_args(**overrides):
    """The benchmark's arguments as its parser makes them (every option at its default), then ``overrides``."""
    args = bench_cli.build_parser().parse_args(["--warmup", "1", "--runs", "2", "--stage-runs", "1", "--threads", "1",
                                                "--no-verify", "--graph-optimization", "extended"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def _settings(package, steps=2):
    from blipdiffusion_trt.bench.settings import Settings
    from blipdiffusion_trt.package import read_pipeline_config

    config = read_pipeline_config(package)
    f = config.latent_scale_factor
    return Settings(height=config.default_height, width=config.default_width, steps=steps, batch=1, scheduler="pndm",
                    guidance=7.5, precision="fp32", seed=0, controlnet=config.has_controlnet,
                    latent_shape=(1, config.latent_channels, config.default_height // f, config.default_width // f))


def test_results_are_written_after_every_side_and_a_failing_side_loses_nothing(tiny, tmp_path, monkeypatch):
    """Each side's figures reach bench.json as soon as it finishes; a default backend that fails
    (here: one raising RuntimeError at load, as a GPU provider can) is reported, the others kept."""
    seen_when_cuda_ran = {}

    def fake_ours(backend, package, settings, args, bar):
        if backend == "cuda":
            seen_when_cuda_ran.update(json.loads((tmp_path / "out" / "bench.json").read_text()))
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return {"label": f"ours {backend}", "backend": backend, "device": "cpu", "precision": "fp32",
                "generation": bench_stats.summarize([1.0])}

    monkeypatch.setattr(bench_cli, "bench_ours", fake_ours)
    monkeypatch.setattr(bench_cli, "default_backends", lambda precision: ["cpu", "cuda"])
    code = bench_cli.main(["--package", str(tiny.package), "--no-diffusers", "--no-cold-start", "--no-flops",
                           "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    assert seen_when_cuda_ran["complete"] is False and set(seen_when_cuda_ran["implementations"]) == {"cpu"}
    final = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert final["complete"] is True
    assert final["implementations"]["cuda"]["error"].startswith("RuntimeError: CUDA failure 100")
    assert final["implementations"]["cpu"]["generation"]["p50"] == 1.0
    assert not list((tmp_path / "out").glob(".bench.json.partial-*"))


def test_diffusers_timed_generations_run_without_hooks(tiny, monkeypatch):
    """Only the one instrumented generation after the timed ones carries hooks (on a GPU: CUDA
    events, no synchronisation inside the loop); its figures give the stages and the loop."""
    from blipdiffusion_trt.bench import diffusers_side

    hooks_per_call = []
    original = diffusers_side.run_diffusers

    def counting(pipe, *args, **kwargs):
        hooks_per_call.append(len(pipe.unet._forward_pre_hooks) + len(pipe.unet._forward_hooks))
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(diffusers_side, "run_diffusers", counting)
    args = _bench_args()
    result = diffusers_side.bench_diffusers(tiny.checkpoint, "cpu", _settings(tiny.package), args, _Bar())
    assert hooks_per_call[:args.warmup + args.runs] == [0] * (args.warmup + args.runs)
    assert len(hooks_per_call) == args.warmup + args.runs + 1 and hooks_per_call[-1] > 0
    assert result["generation"]["n"] == args.runs  # the un-hooked runs
    assert result["in_generation"]["unet_plain"]["p50"] > 0 and result["denoise_loop"]["p50"] > 0
    assert result["unet_calls"] > 2 and result["host_overhead_per_step"]["p50"] >= 0
    assert set(result["stages"]) >= {"qformer", "text_encoder", "text_encoder_plain", "unet_plain", "vae_decoder"}


def test_gpu_memory_is_the_nvml_peak_minus_the_baseline():
    """Fake of nvidia-ml-py (pynvml): nvmlDeviceGetMemoryInfo(handle).used in bytes, polled."""
    import types

    from blipdiffusion_trt.bench.machine import GpuMemorySampler

    readings = iter([1000, 1000, 5000, 9000, 4000] + [3000] * 10_000)
    nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=next(readings) * 2**20))
    sampler = GpuMemorySampler(interval=0.001, nvml=nvml).start()
    import time

    deadline = time.monotonic() + 5
    while sampler.peak < 9000 and time.monotonic() < deadline:
        time.sleep(0.01)
    figure = sampler.stop()
    assert figure == {"mb": 8000.0, "method": GpuMemorySampler.METHOD, "baseline_mb": 1000.0}

    def no_nvml():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    missing = GpuMemorySampler(nvml=types.SimpleNamespace(nvmlInit=no_nvml)).start().stop()
    assert missing["mb"] is None and "nvidia-ml-py" in missing["method"]


def test_cold_start_children_share_one_inductor_cache(monkeypatch, tmp_path):
    import subprocess

    from blipdiffusion_trt.bench import cold_start as cold

    captured = {}

    def run(command, **kwargs):
        captured.update(kwargs["env"])
        child = {"t_imports": 1.0, "t_loaded": 2.0, "t_first_image": 3.0, "peak_rss_mb": 10.0}
        return subprocess.CompletedProcess(command, 0, stdout=cold.CHILD_MARK + json.dumps(child) + "\n", stderr="")

    monkeypatch.setattr(cold.subprocess, "run", run)
    cache = str(tmp_path / "inductor")
    result = cold.cold_start({"kind": "diffusers", "inductor_cache": cache})
    assert captured[cold.INDUCTOR_CACHE_ENV] == cache and result["first_generation"] == 1.0
    monkeypatch.delenv(cold.INDUCTOR_CACHE_ENV, raising=False)
    monkeypatch.setenv("BLIPDIFFUSION_TRT_CACHE", str(tmp_path / "user-cache"))
    assert cold.inductor_cache_dir() == str(tmp_path / "user-cache" / "torchinductor")


def test_diffusers_precisions():
    avx512_bf16 = {"simd": ["avx512f", "avx512_bf16"]}
    plain = {"simd": ["avx2", "fma"]}
    # default: a user's best torch setting next to fp32 (the reference, first)
    assert bench_cli.diffusers_precisions(None, "cpu", "fp32", avx512_bf16) == ["fp32", "bf16"]
    assert bench_cli.diffusers_precisions(None, "cpu", "fp32", plain) == ["fp32"]
    assert bench_cli.diffusers_precisions(None, "cuda", "fp16", plain) == ["fp16"]
    assert bench_cli.diffusers_precisions(["bf16", "fp32", "bf16"], "cpu", "fp32", plain) == ["bf16", "fp32"]
    for bad, fragment in ((["fp8"], "unknown fp8"), (["fp32", "fp16"], "GPU only")):
        with pytest.raises(InputError) as e:
            bench_cli.diffusers_precisions(bad, "cpu", "fp32", plain)
        assert fragment in str(e.value) and str(e.value).startswith("--diffusers-precisions")


def test_cpu_peak_in_bf16():
    from blipdiffusion_trt.bench.machine import peak_tflops

    cpu = {"model": "Some Xeon @ 2.00GHz", "simd": ["avx512f", "avx512_bf16"], "physical_cores": 2}
    fp32 = peak_tflops("cpu", None, "fp32", cpu, None, None)
    assert fp32["tflops"] == pytest.approx(2 * 2.0 * 64 / 1000)
    assert peak_tflops("cpu", None, "bf16", cpu, None, None)["tflops"] == pytest.approx(2 * fp32["tflops"])
    assert peak_tflops("cpu", None, "bf16", {**cpu, "simd": ["avx512f"]}, None, None)["tflops"] == fp32["tflops"]
    assert peak_tflops("cpu", None, "bf16", {**cpu, "simd": ["avx512f", "amx_tile", "amx_bf16"]}, None, None) is None
    assert peak_tflops("cpu", None, "bf16", cpu, None, "cpu=1,cpu-bf16=3")["tflops"] == 3.0
    assert peak_tflops("cpu", None, "fp32", cpu, None, "cpu=1,cpu-bf16=3")["tflops"] == 1.0


def test_openvino_next_to_diffusers_fp32_and_bf16(tiny, tmp_path):
    """cpu and openvino next to diffusers in fp32 and bf16, one run: what ran is recorded, --threads
    reaches OpenVINO, the cold start reads the model cache the in-process load wrote (smoke only)."""
    pytest.importorskip("openvino", reason="the openvino backend needs OpenVINO (pip install .[openvino])")
    pytest.importorskip("matplotlib", reason="the chart needs the dev extra (pip install .[dev])")
    from blipdiffusion_trt.runtime.backends.openvino import cpu_capabilities

    out, workdir = tmp_path / "out", tmp_path / "work"
    code = bench_cli.main([
        "--package", str(tiny.package), "--checkpoint", str(tiny.checkpoint), "--backends", "cpu,openvino",
        "--diffusers-precisions", "fp32,bf16", "--runs", "1", "--warmup", "0", "--steps", "2", "--threads", "1",
        "--no-flops", "--no-progress", "--workdir", str(workdir), "--out", str(out),
    ])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    impls = results["implementations"]
    assert list(impls) == ["diffusers", "diffusers-bf16", "cpu", "openvino"]
    assert results["settings"]["diffusers_precisions"] == ["fp32", "bf16"]
    assert impls["diffusers"]["precision"] == "fp32" and impls["diffusers-bf16"]["precision"] == "bf16"
    for key, impl in impls.items():
        assert "error" not in impl and "error" not in impl["cold_start"], (key, impl.get("error"), impl["cold_start"])
        cold = impl["cold_start"]
        assert impl["first_generation"]["p50"] > 0 and cold["peak_rss_mb"] > 0
        assert 0 < cold["rss_anon_mb_after_first_image"] and 0 <= cold["rss_file_mb_after_first_image"]
        assert cold["rss_anon_mb_after_first_image"] + cold["rss_file_mb_after_first_image"] <= cold["peak_rss_mb"] + 1
        if key != "diffusers":  # every row's image against diffusers fp32, same latents
            assert 0 <= impl["mean_abs_image_diff_vs_diffusers"] <= impl["max_abs_image_diff_vs_diffusers"] < 1, key
    assert impls["cpu"]["max_abs_image_diff_vs_diffusers"] < 1e-2
    ran = "bf16" if "BF16" in cpu_capabilities() else "f32"
    openvino = impls["openvino"]
    assert openvino["inference_precision"] == ran and openvino["label"] == f"ours openvino ({ran})"
    assert set(openvino["engines"]) == set(impls["cpu"]["stages"]) - {"scheduler_step"}
    for name, details in openvino["engines"].items():
        assert details["inference_precision"] == ran and details["threads"] == 1, (name, details)
        assert details["model_source"] == "onnx, cached as ir"  # a fresh cache: converted in this run
    for name, details in openvino["cold_start"]["engines"].items():
        assert details["model_source"] == "ir cache" and details["loaded_from_cache"] is True, (name, details)
    assert not list(workdir.glob("openvino-cache-*")), "the benchmark's model cache was left behind"
    rows = {row["key"]: row for row in results["table"]["rows"]}
    assert rows["generation"]["ratios"]["diffusers-bf16"]["openvino"] > 0
    assert rows["generation"]["ratios"]["diffusers"]["diffusers-bf16"] > 0
    lines = (out / "bench.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| stage | GFLOP | diffusers"))
    assert header == (f"| stage | GFLOP | diffusers torch cpu fp32 | diffusers torch cpu bf16 | ours cpu | × (cpu) | "
                      f"× bf16 (cpu) | ours openvino ({ran}) | × (openvino) | × bf16 (openvino) |")
    assert any(line.startswith(f"- ours openvino ({ran}): inference precision that ran {ran}") for line in lines)
