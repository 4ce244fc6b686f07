"""Bad and hostile input: bounded work per request, package files confined and
verified by every command, JSON files checked against their shapes, one-line errors, nothing
left behind. The Triton server's side of these cases is in ``test_triton.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt import fsutil
from blipdiffusion_trt.errors import InputError, PackageError
from blipdiffusion_trt.package import ModelPackage, layout, sha256_file
from blipdiffusion_trt.package import manifest as manifest_module
from blipdiffusion_trt.runtime.inputs import LIMITS
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime, SubjectEmbedding
from blipdiffusion_trt.runtime.text import build_prompts, max_useful_reps

from conftest import shared_runtime  # noqa: E402
from helpers import REPO, copy_package, fixture_config, run_cli  # noqa: E402

STEPS = 2
REFERENCE = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def one_line(text: str, *fragments: str) -> None:
    assert text.strip() and "\n" not in text.strip() and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI's error: exit 2, one ``error:`` line naming ``fragments``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    one_line(lines[0], *fragments)
    return lines[0]


def rewrite(package: Path, name: str, data: bytes | str | dict | list) -> None:
    """Replace a listed file and record its new sha256 and size: a package that passes its
    integrity check but holds what ``data`` says."""
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    (package / name).write_bytes(data)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(package / name)
    manifest.setdefault("sizes", {})[name] = len(data)
    (package / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(package: Path, change) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    change(manifest)
    (package / "manifest.json").write_text(json.dumps(manifest))


def generate_args(package: Path, reference: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(package), "--prompt", "a photo", "--reference-image", str(reference),
            "--source-subject", "dog", "--target-subject", "dog", "--out", str(out), "--steps", str(STEPS), *extra]


@pytest.fixture
def ref_file(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.fromarray(REFERENCE).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Unbounded work from one input -- under a memory and a time limit
# --------------------------------------------------------------------------------------------

BOUNDED_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np

    package, ref, out_dir, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from blipdiffusion_trt.errors import InputError
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime
    from blipdiffusion_trt.cli import main

    runtime = BlipDiffusionRuntime.from_package(package)
    args = dict(prompt="a photo on the beach", reference_image=ref, source_subject_category="dog",
                target_subject_category="dog", num_inference_steps=2, seed=0, output_type="np")
    expected = runtime(**args).images
    # the limit is set once everything is loaded: what follows may only use what one request needs
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report = {}
    for reps in (10**6, 10**8, 10**18):
        report[f"reps {reps}"] = float(np.abs(runtime(**args, prompt_reps=reps).images - expected).max())
    for name, value in (("prompt", "x" * 10**6), ("source_subject_category", "dog " * 250_000),
                        ("target_subject_category", "y" * 10**6), ("neg_prompt", "z" * 10**6)):
        try:
            runtime(**{**args, name: value})
            report[name] = "accepted"
        except InputError as error:
            report[name] = str(error)
    report["cli"] = main(["generate", package, "--prompt", "a photo on the beach", "--reference-image", ref,
                          "--source-subject", "dog", "--target-subject", "dog", "--out", out_dir + "/cli.npy",
                          "--steps", "2", "--prompt-reps", "100000000"])
    report["cli_diff"] = float(np.abs(np.load(out_dir + "/cli.npy") - expected[0]).max())
    print("REPORT " + json.dumps(report))
""")


def test_prompt_and_prompt_reps_bounded_in_memory_and_time(tiny, ref_file, tmp_path):
    """A 1 MB prompt (or subject, or negative prompt) is refused at once, and 10^8
    repetitions of the prompt cost what 20 do and give the same image (API and CLI), under an
    address-space limit of the loaded process plus 1 GiB and a time limit."""
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import resource, sys
        from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime
        runtime = BlipDiffusionRuntime.from_package(sys.argv[1])
        runtime("a photo", sys.argv[2], "dog", "dog", num_inference_steps=2, seed=0, output_type="np")
        print(int(open("/proc/self/status").read().split("VmPeak:")[1].split()[0]) * 1024)
        """), str(tiny.package), str(ref_file)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-2000:]
    limit = int(probe.stdout.split()[-1]) + (1 << 30)
    proc = subprocess.run([sys.executable, "-c", BOUNDED_SCRIPT, str(tiny.package), str(ref_file), str(tmp_path),
                           str(limit)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    for reps in ("reps 1000000", "reps 100000000", "reps 1000000000000000000"):
        assert report[reps] == 0.0, report
    assert report["cli"] == 0 and report["cli_diff"] == 0.0, report
    one_line(report["prompt"], "prompt", f"limit of {LIMITS.max_text_characters}")
    one_line(report["neg_prompt"], "neg_prompt", f"limit of {LIMITS.max_text_characters}")
    for name in ("source_subject_category", "target_subject_category"):
        one_line(report[name], name, f"limit of {LIMITS.max_subject_characters}")


HOSTILE_PROMPTS = ["a photo", "on the beach.", "snow!!!", "it's", "run 's", "x,", "a", "don't stop...", "😀",
                   "東京の夜", "  spaced   out  ", "tab\there", "12 3 456", "'", ",,,", "-", "a" * 300, "dog. " * 40]
HOSTILE_SUBJECTS = ["dog", "x", "'s", ".", "😀", "東", "big dog", "-"]


def test_prompt_repetitions_past_the_encoder_change_nothing(tiny, odd):
    """The repetitions :func:`max_useful_reps` keeps give the very tokens of any larger count,
    on prompts that end in punctuation (which merges with the joining comma), contractions,
    emoji, CJK; checked for both text lengths of the fixtures (77 and 40 positions)."""
    for fixture in (tiny, odd):
        runtime = shared_runtime(fixture)
        length = runtime.config.text_length
        cap = max_useful_reps(length - runtime.tokenizer.num_special_tokens)
        assert cap < 100
        for prompt in HOSTILE_PROMPTS:
            for subject in HOSTILE_SUBJECTS:
                full = runtime.tokenizer.encode(build_prompts(prompt, subject, prompt_reps=100), length, field="prompt")
                for reps in (cap, cap + 1):
                    capped = build_prompts(prompt, subject, prompt_reps=100, max_reps=reps)
                    ids = runtime.tokenizer.encode(capped, length, field="prompt").input_ids
                    np.testing.assert_array_equal(ids, full.input_ids, err_msg=f"{prompt!r} {subject!r} {reps}")


def test_twenty_repetitions_give_the_same_image_as_before(odd):
    """The default 20 repetitions exceed the odd fixture's useful count (its text encoder
    takes 34 tokens): capped, the image is bit for bit what the uncapped prompt gives."""
    runtime = shared_runtime(odd)
    assert max_useful_reps(runtime.config.text_length - runtime.tokenizer.num_special_tokens) < 20
    args = dict(num_inference_steps=STEPS, seed=1, output_type="np")
    image = runtime("a photo on the beach", REFERENCE, "dog", "dog", **args).images
    subject = runtime.encode_subject(REFERENCE, "dog").embeddings[None]
    uncapped = build_prompts(["a photo on the beach"], ["dog"], prompt_reps=20)
    embeddings = np.concatenate([runtime._encode_negative_prompt(""), runtime._encode_prompt(uncapped, subject)])
    sched = runtime._prepare_scheduler("pndm", STEPS)
    latents = runtime._prepare_latents((1, runtime.config.latent_channels,
                                       runtime.config.default_height // runtime.config.latent_scale_factor,
                                       runtime.config.default_width // runtime.config.latent_scale_factor), sched, seed=1)
    expected = runtime._decode_latents(runtime._denoise(latents, sched, embeddings, guidance_scale=7.5))
    np.testing.assert_array_equal(image, expected)


# --------------------------------------------------------------------------------------------
# Package files confined and verified, by every command
# --------------------------------------------------------------------------------------------

def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not part of any package\n")
    return secret


HOSTILE_PACKAGES = {
    # name -> (make(package, tmp_path), message fragment)
    "dotdot-name": (lambda p, t: edit_manifest(p, lambda m: m["files"].update(
        {"../outside/secret.txt": sha256_file(_outside(t))})), "leaves the package"),
    "absolute-name": (lambda p, t: edit_manifest(p, lambda m: m["files"].update(
        {str(_outside(t)): sha256_file(t / "outside" / "secret.txt")})), "absolute path"),
    "symlinked-graph": (lambda p, t: _symlink_graph(p, t), "leads outside the package"),
    "fifo-graph": (lambda p, t: _fifo_graph(p), "not a regular file"),
    "size-mismatch": (lambda p, t: _sparse_graph(p), "records"),
    "altered-tokenizer": (lambda p, t: _flip(p / "tokenizer" / "tokenizer.json"), "does not match its sha256"),
}


def _graph(package: Path) -> Path:
    return package / "onnx" / "fp32" / "vae_decoder.onnx"


def _symlink_graph(package: Path, tmp_path: Path) -> None:
    graph = _graph(package)
    outside = tmp_path / "outside-graph.onnx"
    shutil.move(graph, outside)
    graph.symlink_to(outside)


def _fifo_graph(package: Path) -> None:
    graph = _graph(package)
    graph.unlink()
    os.mkfifo(graph)


def _sparse_graph(package: Path) -> None:
    """A 2 GiB sparse file where the graph was: refused by its size, before a byte is hashed."""
    with open(_graph(package), "r+b") as f:
        f.truncate(2 << 30)


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(HOSTILE_PACKAGES))
def test_package_files_are_confined_and_checked(tiny, tmp_path, case, monkeypatch):
    """Names leaving the package, absolute names, symlinks out of it, FIFOs, files whose
    size differs from the manifest's (a 2 GiB sparse file is refused without hashing it)."""
    package = copy_package(tiny, tmp_path)
    make, fragment = HOSTILE_PACKAGES[case]
    make(package, tmp_path)
    hashed: list[Path] = []
    real_sha = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path, size=None: hashed.append(path) or real_sha(path, size))
    with pytest.raises(PackageError) as error:
        package_obj = ModelPackage.open(package)
        for name in package_obj.specs:
            package_obj.onnx_path(name, "fp32")
    one_line(str(error.value), fragment)
    assert not [p for p in hashed if "vae_decoder" in str(p) or "outside" in str(p)], hashed


def test_symlinks_inside_the_package_are_followed(tiny, tmp_path):
    """A symlink that stays inside the package is a file of the package like any other."""
    package = copy_package(tiny, tmp_path)
    graph = _graph(package)
    moved = package / "onnx" / "fp32" / "moved.onnx.bin"
    shutil.move(graph, moved)
    graph.symlink_to(moved.name)
    assert ModelPackage.open(package).onnx_path("vae_decoder", "fp32") == graph


COMMANDS = {
    "generate": lambda p, t: generate_args(p, t / "ref.png", t / "out.png"),
    "build": lambda p, t: ["build", str(p)],
    "triton": lambda p, t: ["triton", str(p), "--out", str(t / "repo")],
    "fuse": lambda p, t: ["fuse", str(p)],
    "bench": lambda p, t: ["bench", "--package", str(p), "--backends", "cpu", "--no-diffusers", "--no-cold-start",
                           "--no-flops", "--runs", "1", "--warmup", "0", "--steps", "1", "--out", str(t / "bench")],
}


@pytest.mark.parametrize("case", ["dotdot-name", "altered-graph"])
def test_every_command_checks_a_package_the_same_way(tiny, tmp_path, case):
    """The commands generate, build, triton, fuse and bench refuse the same hostile or altered
    package with the same one line (one code path: ModelPackage), writing nothing."""
    package = copy_package(tiny, tmp_path)
    Image.fromarray(REFERENCE).save(tmp_path / "ref.png")
    if case == "dotdot-name":
        HOSTILE_PACKAGES[case][0](package, tmp_path)
        fragment = "leaves the package"
    else:  # a flipped byte in a graph every command reads: the fp16 UNet is what build reads
        for variant in ("fp32", "fp16", "fp32-fused"):
            graph = package / "onnx" / variant / "unet_plain.onnx"
            if graph.exists():
                _flip(graph)
        fragment = "does not match its sha256"
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, args in COMMANDS.items():
        cli_error(run_cli(*args(package, tmp_path), timeout=300), fragment)
    # (bench makes its --out directory before it loads a backend; it stays empty)
    written = [p.name for p in tmp_path.iterdir() if p.name not in before and not (p.name == "bench" and not any(p.iterdir()))]
    assert not written, f"a command wrote {written}"
    assert not list(package.rglob("*.partial-*"))


def test_triton_checks_graphs_before_copying(tiny, tmp_path):
    """A flipped byte in the vae_decoder graph: no repository, one line; --no-verify skips
    the sha256 (not the size and confinement checks)."""
    from blipdiffusion_trt.serving.triton.repository import write_triton_repository

    package = copy_package(tiny, tmp_path)
    for variant in ("fp32", "fp16"):
        _flip(package / "onnx" / variant / "vae_decoder.onnx")
    for flavor in ("python-cpu", "onnxruntime"):
        with pytest.raises(PackageError) as error:
            write_triton_repository(package, tmp_path / "repo", flavor)
        one_line(str(error.value), "vae_decoder.onnx", "sha256")
        assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo.partial-*"))
    write_triton_repository(package, tmp_path / "repo", "python-cpu", verify=False)
    _sparse_graph(package)
    with pytest.raises(PackageError, match="records"):
        write_triton_repository(package, tmp_path / "repo2", "python-cpu", verify=False)


def test_manifest_without_sizes(tiny, tmp_path, caplog):
    """An older manifest (no sizes) still loads, with a warning, and its files are still hashed."""
    package = copy_package(tiny, tmp_path)
    edit_manifest(package, lambda m: m.pop("sizes"))
    with caplog.at_level(logging.WARNING):
        ModelPackage.open(package).onnx_path("vae_decoder", "fp32")
    assert "records no file sizes" in caplog.text
    _flip(_graph(package))
    with pytest.raises(PackageError, match="does not match its sha256"):
        ModelPackage.open(package).onnx_path("vae_decoder", "fp32")


def test_export_and_fuse_record_sizes(tiny, tmp_path):
    manifest = json.loads((tiny.package / "manifest.json").read_text())
    assert set(manifest["sizes"]) == set(manifest["files"])
    assert all(manifest["sizes"][n] == (tiny.package / n).stat().st_size for n in manifest["files"])
    # fuse rewrites one variant's entries (here: the CPU-fused graphs gone): sizes follow files
    package = copy_package(tiny, tmp_path)
    shutil.rmtree(package / "onnx" / layout.CPU_FUSED)
    updated = manifest_module.replace_variant(package, json.loads((package / "manifest.json").read_text()),
                                              layout.CPU_FUSED, cpu_fused={})
    assert set(updated["sizes"]) == set(updated["files"]) and not any("fused" in n for n in updated["files"])
    ModelPackage.open(package)


# --------------------------------------------------------------------------------------------
# The ONNX Runtime optimised-graph cache, keyed by content and verified
# --------------------------------------------------------------------------------------------

def test_optimized_cache_is_keyed_by_content_and_verified(tiny, tmp_path, caplog):
    cache = tmp_path / "cache"
    latents = np.random.default_rng(2).standard_normal(
        (1, fixture_config(tiny).latent_channels, 16, 16)).astype(np.float32)
    size = 16 * fixture_config(tiny).latent_scale_factor

    def generate(package, **options):
        with BlipDiffusionRuntime.from_package(package, **options) as runtime:
            image = runtime("a photo", REFERENCE, "dog", "dog", latents=latents, height=size, width=size,
                            num_inference_steps=STEPS, output_type="np").images
            return image, {name: engine.loaded_from for name, engine in runtime.engines.items()}

    plain, _ = generate(tiny.package)
    cached, paths = generate(tiny.package, optimized_cache=cache)
    assert all(p.parent == cache for p in paths.values())
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-6)
    # the key is the content, not the path or the mtime: a copy of the package (new path, new
    # mtimes) is served from the same entries
    package = copy_package(tiny, tmp_path)
    os.utime(package / "onnx" / "fp32" / "vae_decoder.onnx", (1, 1))
    _, copy_paths = generate(package, optimized_cache=cache)
    assert copy_paths == paths
    # 40 KB overwritten in a cached weights file: detected, rebuilt, never served
    data = paths["vae_decoder"].with_name(paths["vae_decoder"].name + ".data")
    with open(data, "r+b") as f:
        f.seek(0)
        f.write(os.urandom(min(40_000, data.stat().st_size)))
    with caplog.at_level(logging.WARNING):
        again, _ = generate(tiny.package, optimized_cache=cache)
    assert "does not match its sha256" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_allclose(again, plain, rtol=0, atol=1e-6)
    assert not list(cache.glob(".*partial*"))


# --------------------------------------------------------------------------------------------
# Every JSON file checked against its shape
# --------------------------------------------------------------------------------------------

def _pipeline(change):
    def make(package: Path) -> None:
        data = json.loads((package / "pipeline.json").read_text())
        change(data)
        rewrite(package, "pipeline.json", data)
    return make


def _json_file(name: str, change):
    def make(package: Path) -> None:
        data = json.loads((package / name).read_text())
        data = change(data)
        rewrite(package, name, data)
    return make


JSON_CASES = {
    # name -> (make(package), fragments of the one-line error)
    "manifest-list": (lambda p: (p / "manifest.json").write_text("[1, 2, 3]"), ["manifest.json", "expected an object"]),
    "manifest-files-string": (lambda p: edit_manifest(p, lambda m: m.update(files="x")), ["files", "expected an object"]),
    "manifest-bad-sha": (lambda p: edit_manifest(p, lambda m: m["files"].update({"pipeline.json": 5})),
                         ["files['pipeline.json']", "sha256"]),
    "manifest-negative-size": (lambda p: edit_manifest(p, lambda m: m["sizes"].update({"pipeline.json": -1})),
                               ["sizes['pipeline.json']", "in [0, ", "got -1"]),
    "precisions-string": (lambda p: edit_manifest(p, lambda m: m.update(precisions="fp32")),
                          ["precisions", "expected a list", "'fp32'"]),
    "manifest-not-json": (lambda p: (p / "manifest.json").write_text("{"), ["manifest.json", "unreadable"]),
    "pipeline-list": (lambda p: rewrite(p, "pipeline.json", [1, 2, 3]), ["pipeline.json", "expected an object"]),
    "pipeline-string-number": (_pipeline(lambda d: d.update(latent_channels="4")),
                               ["pipeline.json", "latent_channels", "got a string '4'"]),
    "pipeline-latent-factor-0": (_pipeline(lambda d: d.update(latent_scale_factor=0)), ["latent_scale_factor", "[1, 64]"]),
    "pipeline-max-size-1e9": (_pipeline(lambda d: d.update(max_image_size=10**9)), ["max_image_size", "1000000000"]),
    "pipeline-image-size-100000": (_pipeline(lambda d: d.update(image_size=[100000, 100000])), ["image_size[0]", "100000"]),
    "pipeline-negative-size": (_pipeline(lambda d: d.update(default_height=-32)), ["default_height", "-32"]),
    "pipeline-missing": (_pipeline(lambda d: d.pop("num_query_tokens")), ["pipeline.json", "missing num_query_tokens"]),
    "pipeline-inconsistent": (_pipeline(lambda d: d.update(num_query_tokens=d["text_max_length"])),
                              ["text_max_length must exceed"]),
    "tokenizer-settings-no-pad": (_json_file("tokenizer/tokenizer_settings.json", lambda d: {**d, "pad_token_id": None}),
                                  ["tokenizer_settings.json", "pad_token_id", "got null"]),
    "tokenizer-settings-missing-pad": (_json_file("qformer_tokenizer/tokenizer_settings.json",
                                                  lambda d: {k: v for k, v in d.items() if k != "pad_token_id"}),
                                       ["tokenizer_settings.json", "missing pad_token_id"]),
    "scheduler-steps-string": (_json_file("scheduler/scheduler_config.json", lambda d: {**d, "num_train_timesteps": "1000"}),
                               ["scheduler_config.json", "num_train_timesteps", "got a string"]),
    "scheduler-steps-1e9": (_json_file("scheduler/scheduler_config.json", lambda d: {**d, "num_train_timesteps": 10**9}),
                            ["num_train_timesteps", "[1, 10000]"]),
    "scheduler-betas-string": (_json_file("scheduler/scheduler_config.json", lambda d: {**d, "beta_start": "low"}),
                               ["beta_start", "finite number"]),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_json_files_are_checked_against_their_shape(tiny, tmp_path, case):
    """Valid JSON of the wrong shape: one line naming the file, the key and what is expected
    (API: PackageError at load; the runtime's readers of the file included)."""
    package = copy_package(tiny, tmp_path)
    make, fragments = JSON_CASES[case]
    make(package)
    with pytest.raises(PackageError) as error:
        BlipDiffusionRuntime.from_package(package)
    one_line(str(error.value), *fragments)


def test_json_shape_errors_through_the_cli(tiny, tmp_path, ref_file):
    package = copy_package(tiny, tmp_path)
    JSON_CASES["pipeline-max-size-1e9"][0](package)
    cli_error(run_cli(*generate_args(package, ref_file, tmp_path / "out.png")), "max_image_size")
    assert not (tmp_path / "out.png").exists()


def test_engines_json_is_checked(tiny, tmp_path):
    """engines.json: a plan named by a path (``../``) or a wrong type is refused (no file outside
    the engine directory is ever read as a plan)."""
    from blipdiffusion_trt.engines.plans import read_record
    from blipdiffusion_trt.errors import EngineError

    folder = tmp_path / "engines" / "sm_89-trt10.8"
    folder.mkdir(parents=True)
    for entry, fragment in (({"plan": "../../x.plan"}, "plan file name"), ({"size_bytes": "1"}, "size_bytes"),
                            ({"profile": {"x": {"min": [1]}}}, "missing opt, max")):
        (folder / "engines.json").write_text(json.dumps({"format_version": 1, "components": {"unet": entry}}))
        with pytest.raises(EngineError) as error:
            read_record(folder)
        one_line(str(error.value), "engines.json", fragment)


def test_bls_parameters_are_checked(tiny, tmp_path):
    from blipdiffusion_trt.serving.triton.bls import BlipDiffusionModel
    from blipdiffusion_trt.serving.triton.repository import write_triton_repository

    repo = write_triton_repository(tiny.package, tmp_path / "repo")
    version = repo.path / "blip_diffusion" / "1"
    config = {"name": "blip_diffusion", "parameters": {"components": {"string_value": json.dumps({"qformer": 3})}}}
    with pytest.raises(PackageError) as error:
        BlipDiffusionModel.from_model_config(config, version, None)
    one_line(str(error.value), "parameter components", "qformer", "expected a string")


# --------------------------------------------------------------------------------------------
# One-line errors (Python API)
# --------------------------------------------------------------------------------------------

def _api_cases(cfg):
    latent = (1, cfg.latent_channels, cfg.default_height // cfg.latent_scale_factor,
              cfg.default_width // cfg.latent_scale_factor)
    return {
        "subject-word-too-long": ({"source_subject_category": "dog " * 60}, "source_subject_category",
                                  f"limit of {LIMITS.max_subject_characters}"),
        "subject-word-52-tokens": ({"source_subject_category": "dog " * 50}, "source_subject_category",
                                   "52 Q-Former tokens, more than the 48"),
        "seed-negative": ({"seed": -1}, "seed", "got -1"),
        "seed-float": ({"seed": 1.5}, "seed", "got 1.5"),
        "seed-huge": ({"seed": 2**64}, "seed", "9223372036854775807"),
        "prompt-surrogate": ({"prompt": "a \udcff photo"}, "prompt", "not valid UTF-8", "0xff"),
        "subject-surrogate": ({"source_subject_category": "d\udc80g"}, "source_subject_category", "not valid UTF-8"),
        "neg-prompt-surrogate": ({"neg_prompt": "\udcfe"}, "neg_prompt", "not valid UTF-8"),
        "subject-str": ({"subject": "dog", "reference_image": None}, "subject", "SubjectEmbedding", "str"),
        "subject-wrong-shape": ({"subject": SubjectEmbedding(np.zeros((3, 5), np.float32)), "reference_image": None},
                                "subject", f"[{cfg.num_query_tokens}, {cfg.text_hidden_size}]", "[3, 5]"),
        "subject-nan": ({"subject": SubjectEmbedding(np.full((cfg.num_query_tokens, cfg.text_hidden_size), np.nan,
                                                             np.float32)), "reference_image": None}, "subject", "NaN"),
        "guidance-1e38": ({"guidance_scale": 1e38}, "guidance_scale", "[0, 100]", "1e+38"),
        "latents-huge": ({"latents": np.full(latent, 1e30, np.float32)}, "latents", "1e+30"),
        "prompt-reps-0": ({"prompt_reps": 0}, "prompt_reps", ">= 1"),
        "prompt-strength-tiny": ({"prompt_strength": 0.01}, "prompt_strength", "0.01 x 20"),
        "url-uppercase": ({"reference_image": "HTTPS://example.com/dog.png"}, "reference_image", "URLs are not supported"),
    }


def test_api_one_line_errors(tiny):
    runtime = shared_runtime(tiny)
    cfg = runtime.config
    assert runtime.package.specs["qformer"].axes["qformer_text_length"].max == 48  # the tiny fixture declares 48
    base = dict(prompt="a photo", reference_image=REFERENCE, source_subject_category="dog",
                target_subject_category="dog", num_inference_steps=STEPS, seed=0, output_type="np")
    failures = []
    for name, (overrides, field, *fragments) in _api_cases(cfg).items():
        try:
            runtime(**{**base, **overrides})
            failures.append(f"{name}: accepted")
        except InputError as error:
            try:
                one_line(str(error), *fragments)
                assert error.field == field, (error.field, field)
            except AssertionError as failure:
                failures.append(f"{name}: {failure}")
    assert not failures, "\n".join(failures)
    # the declared maximum passes, one token more does not
    words = "dog " * (48 - runtime._subject_tokens("dog").input_ids.shape[1] + 1)
    assert runtime._subject_tokens(words).input_ids.shape[1] == 48
    runtime(**{**base, "source_subject_category": words})
    with pytest.raises(InputError, match="49 Q-Former tokens, more than the 48"):
        runtime(**{**base, "source_subject_category": words + "dog"})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy reports the overflow the test provokes
def test_non_finite_results_are_errors_naming_the_cause(tiny, monkeypatch):
    """When the loop overflows anyway (here: a UNet that returns huge values), the error
    names the step and the inputs that cause it, not the output; the same for the VAE."""
    runtime = BlipDiffusionRuntime.from_package(tiny.package)
    unet = runtime.engines["unet_plain"]
    real = unet.infer
    monkeypatch.setattr(unet, "infer", lambda feed, keep=(): {"noise_pred": real(feed, keep)["noise_pred"] * np.float32(1e38)})
    base = dict(prompt="a photo", reference_image=REFERENCE, source_subject_category="dog",
                target_subject_category="dog", num_inference_steps=3, seed=0, output_type="np")
    with pytest.raises(InputError) as error:
        runtime(**base, guidance_scale=90.0)
    one_line(str(error.value), "denoising loop overflowed at step 1 of", "guidance_scale 90")
    monkeypatch.setattr(unet, "infer", real)
    vae = runtime.engines["vae_decoder"]
    real_vae = vae.infer
    monkeypatch.setattr(vae, "infer", lambda feed, keep=(): {"image": real_vae(feed, keep)["image"] * np.inf})
    with pytest.raises(InputError) as error:
        runtime(**base)
    one_line(str(error.value), "VAE decoder overflowed")
    runtime.close()


# --------------------------------------------------------------------------------------------
# One-line errors through the CLI
# --------------------------------------------------------------------------------------------

def _npy_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return path


def test_cli_one_line_errors(tiny, tmp_path, ref_file, capsys):
    cfg = fixture_config(tiny)
    np.savez(tmp_path / "latents.npz", latents=np.zeros(3, np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    _npy_header_only(tmp_path / "huge.npy", (100000, 100000))
    shape = (1, cfg.latent_channels, cfg.default_height // cfg.latent_scale_factor,
             cfg.default_width // cfg.latent_scale_factor)
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros(shape, np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-8])
    np.save(tmp_path / "huge_values.npy", np.full(shape, 1e30, np.float32))
    (tmp_path / "out_dir.png").mkdir()
    out = tmp_path / "out.png"
    cases = [
        (["--latents", str(tmp_path / "latents.npz")], "--latents", ".npz archive"),
        (["--latents", str(tmp_path / "empty.npy")], "--latents", "empty (0 bytes)"),
        (["--latents", str(tmp_path / "huge.npy")], "--latents", "[100000, 100000]", "more than the"),
        (["--latents", str(truncated)], "--latents", "header promises"),
        (["--latents", str(tmp_path / "huge_values.npy")], "--latents", "1e+30"),
        (["--reference-image", "HTTPS://example.com/dog.png"], "--reference-image", "URLs are not supported"),
        (["--seed", "-1"], "--seed", "got -1"),
        (["--guidance", "1e38"], "--guidance", "[0, 100]"),
        (["--prompt-reps", "0"], "--prompt-reps", ">= 1"),
        (["--source-subject", "dog " * 50], "--source-subject", "Q-Former tokens"),
        (["--out", str(tmp_path / "out_dir.png")], "--out", "is a directory"),
        (["--out", str(ref_file)], "--out", "--reference-image"),
    ]
    from blipdiffusion_trt import cli

    for extra, *fragments in cases:
        rc = cli.main(generate_args(tiny.package, ref_file, out) + extra)  # argparse keeps an option's last value
        err = capsys.readouterr().err
        assert rc == 2, err
        one_line(err.strip().splitlines()[-1], "error:", *fragments)
        assert not out.exists()
    assert Image.open(ref_file).size == (24, 20), "the reference image was overwritten"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert not leftovers, leftovers


def test_cli_bytes_that_are_not_utf8_and_fifos(tiny, tmp_path, ref_file):
    """Prompt and subject bytes that are not UTF-8 (a shell passes them as they are);
    FIFOs as the reference image or the latents (in a subprocess with a time limit: a plain open
    would wait for a writer forever)."""
    os.mkfifo(tmp_path / "fifo.png")
    os.mkfifo(tmp_path / "fifo.npy")
    cases = [([b"--prompt", b"a \xff\xfe dog"], "--prompt", "not valid UTF-8", "0xff"),
             ([b"--source-subject", b"d\xffg"], "--source-subject", "not valid UTF-8", "0xff"),
             ([b"--reference-image", os.fsencode(tmp_path / "fifo.png")], "--reference-image", "not a regular file"),
             ([b"--latents", os.fsencode(tmp_path / "fifo.npy")], "--latents", "not a regular file")]
    for extra, *fragments in cases:
        args = [os.fsencode(a) for a in generate_args(tiny.package, ref_file, tmp_path / "o.png")] + extra
        proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"blipdiffusion_trt.cli", *args], capture_output=True,
                              cwd=REPO, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                           proc.stderr.decode(errors="replace"))
        cli_error(proc, *fragments)


def _read_only_dir(tmp_path: Path):
    """A directory no file can be created in: a read-only tmpfs where this process may mount
    one (root), else a 0555 directory (not root); None when neither works here."""
    target = tmp_path / "readonly"
    target.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                          capture_output=True).returncode == 0:
            return target, lambda: subprocess.run(["umount", str(target)], capture_output=True)
        return None, None
    target.chmod(0o555)
    return target, lambda: target.chmod(0o755)


def _refuse_loading(monkeypatch) -> list:
    loads = []
    monkeypatch.setattr(BlipDiffusionRuntime, "from_package", classmethod(lambda cls, *a, **k: loads.append(a)))
    return loads


def test_output_path_checked_before_any_work(tiny, tmp_path, ref_file, monkeypatch, capsys):
    """--out a directory or equal to an input: refused before the package is even loaded;
    the input is never overwritten."""
    from blipdiffusion_trt import cli

    loads = _refuse_loading(monkeypatch)
    for out, fragment in ((tmp_path, "is a directory"), (ref_file, "--reference-image"),
                          (tmp_path / "missing" / "x.png", "does not exist"), (tmp_path / "x.gif", ".gif")):
        rc = cli.main(generate_args(tiny.package, ref_file, out))
        err = capsys.readouterr().err
        assert rc == 2, err
        one_line(err.strip().splitlines()[-1], "--out", fragment)
    assert not loads, "the package was loaded before the output path was checked"
    assert Image.open(ref_file).size == (24, 20)


def test_output_on_a_read_only_file_system(tiny, tmp_path, ref_file, monkeypatch, capsys):
    """A read-only file system (a real read-only tmpfs where this process may mount one,
    else a 0555 directory) is refused before the package is loaded, not after the generation."""
    from blipdiffusion_trt import cli

    readonly, undo = _read_only_dir(tmp_path)
    if readonly is None:
        pytest.skip("root without permission to mount a tmpfs: no directory here refuses a new file")
    loads = _refuse_loading(monkeypatch)
    try:
        rc = cli.main(generate_args(tiny.package, ref_file, readonly / "out.png"))
        err = capsys.readouterr().err
    finally:
        undo()
    assert rc == 2, err
    one_line(err.strip().splitlines()[-1], "--out", "cannot write to directory")
    assert not loads


def test_fifo_inputs_do_not_hang(tiny, tmp_path):
    """FIFOs as reference image and latents, through the API: refused at once (a plain
    open would wait forever for a writer; the test has a time limit as a hang guard)."""
    os.mkfifo(tmp_path / "ref.fifo")
    os.mkfifo(tmp_path / "lat.fifo")
    script = textwrap.dedent("""
        import sys
        from blipdiffusion_trt.errors import InputError
        from blipdiffusion_trt.runtime.images import load_image
        from blipdiffusion_trt.runtime.inputs import read_npy
        for call in (lambda: load_image(sys.argv[1], field="reference_image"),
                     lambda: read_npy(sys.argv[2], max_elements=10)):
            try:
                call()
            except InputError as error:
                print(error)
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ref.fifo"), str(tmp_path / "lat.fifo")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("not a regular file" in line for line in lines), proc


# --------------------------------------------------------------------------------------------
# Export: signals, leftovers, concurrent writers, permissions, a full disk
# --------------------------------------------------------------------------------------------

def _start_export(checkpoint: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "blipdiffusion_trt.cli", "export", str(checkpoint), "--out", str(out),
                             "--no-validate", "--no-cpu-fusions"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_partial(out: Path, process: subprocess.Popen, timeout: float = 240, *, other: Path | None = None) -> Path:
    """The partial directory ``process`` writes ``out`` in, once it has started writing (not ``other``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in out.parent.glob(f".{out.name}.partial-*") if (p / "pipeline.json").exists() and p != other]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the export never started writing")


def test_export_killed_then_terminated_leaves_nothing(tiny, tmp_path):
    """An export killed with SIGKILL leaves its partial directory; the next export into
    the same place removes it as soon as it starts; SIGTERM is handled like Ctrl-C: the export
    removes its own partial directory and exits 143 with one line."""
    out = tmp_path / "pkg"
    first = _start_export(tiny.checkpoint, out)
    stale = _wait_for_partial(out, first)
    first.kill()
    first.wait(timeout=30)
    assert stale.exists()
    second = _start_export(tiny.checkpoint, out)
    _wait_for_partial(out, second, other=stale)
    assert not stale.exists(), "the killed export's partial directory was not removed"
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "terminated", err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())


def test_two_writers_of_one_target_cannot_both_win(tmp_path):
    """A partial directory held by a live process makes a second writer fail at once;
    one nobody holds (a killed writer's) is removed."""
    target = tmp_path / "pkg"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from blipdiffusion_trt.fsutil import StagingDir
        staging = StagingDir(Path(sys.argv[1]), RuntimeError)
        print(staging.path, flush=True)
        time.sleep(120)
        """), str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.is_dir()
        with pytest.raises(InputError) as error:
            fsutil.StagingDir(target, InputError)
        one_line(str(error.value), "another process is writing", str(target))
        assert sorted(tmp_path.iterdir()) == [live]
    finally:
        holder.kill()
        holder.wait()
    with fsutil.StagingDir(target, InputError) as mine:
        assert not live.exists(), "a dead writer's partial directory was kept"
        (mine / "file").write_text("x")
        fsutil.replace_dir(mine, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_export_refuses_a_live_export_into_the_same_place(tiny, tmp_path):
    """Through the CLI: a second export while another one writes ``--out`` fails in one line."""
    out = tmp_path / "pkg"
    holder = _start_export(tiny.checkpoint, out)
    try:
        _wait_for_partial(out, holder)
        holder.send_signal(signal.SIGSTOP)  # it holds its partial directory, and cannot finish meanwhile
        proc = run_cli("export", tiny.checkpoint, "--out", out, "--no-validate", "--no-cpu-fusions", timeout=300)
        cli_error(proc, "another process is writing", str(out))
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.send_signal(signal.SIGCONT)
        holder.communicate(timeout=120)
    assert not list(tmp_path.iterdir())


def test_packages_are_readable_by_other_users(tiny):
    """The exported package's directories and files have the permissions of ``mkdir`` and
    ``open`` under the umask (0755/0644 under the usual 022), not mkdtemp's or mkstemp's 0700/0600."""
    umask = fsutil.current_umask()
    for path in [tiny.package, *tiny.package.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == wanted, f"{path}: {oct(mode)} instead of {oct(wanted)}"


def _full_disk(tmp_path: Path, monkeypatch):
    """A directory on a real 6 MiB tmpfs (the tokenizers fit, the graphs do not) where this process may mount one (root), else a
    directory whose writes fail with ENOSPC (the writers patched): returns it and its kind."""
    target = tmp_path / "small"
    target.mkdir()
    if os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(target)], capture_output=True).returncode == 0:
        return target, "tmpfs", lambda: subprocess.run(["umount", str(target)], capture_output=True)
    import onnx

    real_save = onnx.save_model

    def full(model, f, *args, **kwargs):
        if str(f).startswith(str(target)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(model, f, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", full)
    monkeypatch.setattr(onnx, "save", full)
    return target, "simulated", None


def test_export_onto_a_full_disk(tiny, tmp_path, monkeypatch, capsys):
    """ENOSPC while exporting: one line naming the cause, nothing left on the disk."""
    from blipdiffusion_trt import cli

    small, kind, undo = _full_disk(tmp_path, monkeypatch)
    try:
        rc = cli.main(["export", str(tiny.checkpoint), "--out", str(small / "pkg"), "--no-validate", "--no-cpu-fusions"])
        err = capsys.readouterr().err
        assert rc == 2, err
        one_line(err.strip().splitlines()[-1], "error: export to", "No space left on device")
        assert not list(small.iterdir()), list(small.iterdir())
    finally:
        if undo:
            undo()
    print(f"full disk: {kind}")


def test_outputs_never_replace_their_inputs(tiny, tmp_path):
    """export --out the checkpoint (or a folder holding it) and triton --out the package: refused
    even with --force, which would otherwise delete what the command reads."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint, checkpoint)
    for args, fragment in ((["export", checkpoint, "--out", checkpoint, "--force"], "would replace the checkpoint"),
                           (["export", checkpoint, "--out", tmp_path, "--force"], "would replace the checkpoint"),
                           (["triton", tiny.package, "--out", tiny.package, "--force"], "would replace the package")):
        cli_error(run_cli(*args, timeout=300), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    ModelPackage.open(tiny.package)
    (checkpoint / "model_index.json").write_text("[1, 2, 3]")
    cli_error(run_cli("export", checkpoint, "--out", tmp_path / "pkg", timeout=300), "model_index.json",
              "expected an object")
