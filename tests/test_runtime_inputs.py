"""The torch-free runtime's inputs: validation (Python API and ``generate`` CLI), package
integrity, no torch at run time, the subject / negative-prompt caches and batching.

Every size is read from the package's ``pipeline.json`` (:class:`PipelineConfig`); nothing here
spells a dimension of one particular checkpoint.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt.components import PipelineConfig
from blipdiffusion_trt.errors import InputError, PackageError
from blipdiffusion_trt.package import ModelPackage, read_pipeline_config
from blipdiffusion_trt.package.layout import CPU_FUSED
from blipdiffusion_trt.runtime import images as imgs
from blipdiffusion_trt.runtime.backends import BACKENDS
from blipdiffusion_trt.runtime.pipeline import MAX_STEPS, BlipDiffusionRuntime, SubjectEmbedding

from conftest import shared_runtime  # noqa: E402
from helpers import copy_package, fixture_config, png_bytes, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DIR = REPO / "blipdiffusion_trt" / "runtime"
STEPS = 2

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _ref(seed: int = 0, size: tuple[int, int] = (24, 20)) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _latent_shape(cfg: PipelineConfig, batch: int = 1, height: int | None = None, width: int | None = None):
    height = cfg.default_height if height is None else height
    width = cfg.default_width if width is None else width
    return (batch, cfg.latent_channels, height // cfg.latent_scale_factor, width // cfg.latent_scale_factor)


def _call_kwargs(fixture, **overrides) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        prompt="a photo on the beach",
        reference_image=_ref(),
        source_subject_category="dog",
        target_subject_category="dog",
        num_inference_steps=STEPS,
        seed=0,
        output_type="np",
    )
    if fixture.controlnet:
        kwargs["condition_image"] = _ref(5, (32, 32))
    kwargs.update(overrides)
    return kwargs


def _assert_one_line(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    good = tmp_path / "good_for_corrupt.png"
    _ref(3).save(good)
    data = good.read_bytes()
    path.write_bytes(data[:8] + b"\x00garbage" * 8)  # PNG signature, then nonsense
    return path


def _huge_header_file(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.png"
    side = math.isqrt(imgs.DEFAULT_MAX_PIXELS) * 4
    path.write_bytes(png_bytes(side, side))
    assert path.stat().st_size < 200
    return path


# --------------------------------------------------------------------------------------------
# 1. Bad input through the Python API
# --------------------------------------------------------------------------------------------

# (id, overrides(cfg, tmp_path) -> dict, field named in the message)
Case = tuple[str, Callable[[PipelineConfig, Path], dict], str]

COMMON_CASES: list[Case] = [
    ("empty-prompt", lambda c, t: {"prompt": ""}, "prompt"),
    ("blank-prompt", lambda c, t: {"prompt": "   "}, "prompt"),
    ("prompt-list-with-empty", lambda c, t: {"prompt": ["a photo", ""]}, "prompt"),
    ("empty-prompt-list", lambda c, t: {"prompt": []}, "prompt"),
    ("non-string-prompt", lambda c, t: {"prompt": 42}, "prompt"),
    ("prompt-list-non-string", lambda c, t: {"prompt": ["a photo", None]}, "prompt"),
    ("target-category-missing", lambda c, t: {"target_subject_category": None}, "target_subject_category"),
    ("target-category-empty", lambda c, t: {"target_subject_category": ""}, "target_subject_category"),
    ("target-category-list-empty", lambda c, t: {"target_subject_category": [""]}, "target_subject_category"),
    ("source-category-missing", lambda c, t: {"source_subject_category": None}, "source_subject_category"),
    ("source-category-empty", lambda c, t: {"source_subject_category": ""}, "source_subject_category"),
    ("source-category-non-string", lambda c, t: {"source_subject_category": 3}, "source_subject_category"),
    ("steps-0", lambda c, t: {"num_inference_steps": 0}, "num_inference_steps"),
    ("steps-negative", lambda c, t: {"num_inference_steps": -1}, "num_inference_steps"),
    ("steps-huge", lambda c, t: {"num_inference_steps": 100000}, "num_inference_steps"),
    ("steps-above-max", lambda c, t: {"num_inference_steps": MAX_STEPS + 1}, "num_inference_steps"),
    ("steps-float", lambda c, t: {"num_inference_steps": 2.5}, "num_inference_steps"),
    ("steps-bool", lambda c, t: {"num_inference_steps": True}, "num_inference_steps"),
    ("guidance-nan", lambda c, t: {"guidance_scale": float("nan")}, "guidance_scale"),
    ("guidance-inf", lambda c, t: {"guidance_scale": float("inf")}, "guidance_scale"),
    ("guidance-string", lambda c, t: {"guidance_scale": "x"}, "guidance_scale"),
    ("guidance-none", lambda c, t: {"guidance_scale": None}, "guidance_scale"),
    ("output-type-pt", lambda c, t: {"output_type": "pt"}, "output_type"),
    ("controlnet-scale-inf", lambda c, t: {"controlnet_conditioning_scale": float("inf")}, "controlnet_conditioning_scale"),
    ("scheduler-unknown", lambda c, t: {"scheduler": "foo"}, "scheduler"),
    ("scheduler-non-string", lambda c, t: {"scheduler": None}, "scheduler"),
    ("reference-missing-path", lambda c, t: {"reference_image": str(t / "nope.png")}, "reference_image"),
    ("reference-directory", lambda c, t: {"reference_image": str(t)}, "reference_image"),
    ("reference-corrupt-file", lambda c, t: {"reference_image": str(_corrupt_file(t))}, "reference_image"),
    ("reference-huge-header", lambda c, t: {"reference_image": _huge_header_file(t)}, "reference_image"),
    ("reference-wrong-type", lambda c, t: {"reference_image": 12}, "reference_image"),
    ("reference-float-array", lambda c, t: {"reference_image": np.zeros((8, 8, 3), np.float32)}, "reference_image"),
    ("reference-none", lambda c, t: {"reference_image": None}, "reference_image"),
    ("neg-prompt-non-string", lambda c, t: {"neg_prompt": 5}, "neg_prompt"),
]

SIZE_CASES: list[Case] = [
    ("height-not-multiple", lambda c, t: {"height": c.min_image_size + 1}, "height"),
    ("width-not-multiple", lambda c, t: {"width": c.min_image_size + 1}, "width"),
    ("height-below-min", lambda c, t: {"height": c.min_image_size - c.image_multiple}, "height"),
    ("width-below-min", lambda c, t: {"width": c.min_image_size - c.image_multiple}, "width"),
    ("height-above-max", lambda c, t: {"height": c.max_image_size + c.image_multiple}, "height"),
    ("width-above-max", lambda c, t: {"width": c.max_image_size + c.image_multiple}, "width"),
    ("height-float", lambda c, t: {"height": float(c.default_height)}, "height"),
    ("width-string", lambda c, t: {"width": str(c.default_width)}, "width"),
    ("latents-wrong-shape", lambda c, t: {"latents": np.zeros(_latent_shape(c, height=c.default_height + c.image_multiple), np.float32)}, "latents"),
    ("latents-wrong-batch", lambda c, t: {"latents": np.zeros(_latent_shape(c, batch=2), np.float32)}, "latents"),
    ("latents-wrong-channels", lambda c, t: {"latents": np.zeros((1, c.latent_channels + 1) + _latent_shape(c)[2:], np.float32)}, "latents"),
    ("latents-int", lambda c, t: {"latents": np.zeros(_latent_shape(c), np.int32)}, "latents"),
    ("latents-nan", lambda c, t: {"latents": np.full(_latent_shape(c), np.nan, np.float32)}, "latents"),
    ("latents-inf", lambda c, t: {"latents": np.full(_latent_shape(c), np.inf, np.float32)}, "latents"),
    ("latents-list", lambda c, t: {"latents": np.zeros(_latent_shape(c), np.float32).tolist()}, "latents"),
    ("batch-above-max", lambda c, t: {"prompt": ["a photo"] * (c.max_batch_size + 1)}, "prompt"),
]


def test_size_cases_are_meaningful(tiny, odd):
    for fixture in (tiny, odd):
        cfg = fixture_config(fixture)
        assert cfg.image_multiple > 1, "the not-a-multiple cases need image_multiple > 1"
        assert cfg.min_image_size + 1 <= cfg.max_image_size
        assert cfg.default_height + cfg.image_multiple <= cfg.max_image_size
        assert cfg.image_multiple == cfg.latent_scale_factor * cfg.unet_size_multiple


@pytest.mark.parametrize("case", COMMON_CASES, ids=[c[0] for c in COMMON_CASES])
def test_bad_call_input_plain(tiny, tmp_path, case):
    _, overrides, field_name = case
    runtime = shared_runtime(tiny)
    kwargs = _call_kwargs(tiny, **overrides(fixture_config(tiny), tmp_path))
    with pytest.raises(InputError) as e:
        runtime(**kwargs)
    _assert_one_line(e, field_name)


@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("case", SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_bad_sizes_and_latents(request, tmp_path, name, case):
    _, overrides, field_name = case
    fixture = request.getfixturevalue(name)
    runtime = shared_runtime(fixture)
    kwargs = _call_kwargs(fixture, **overrides(fixture_config(fixture), tmp_path))
    with pytest.raises(InputError) as e:
        runtime(**kwargs)
    _assert_one_line(e, field_name)


def test_size_messages_give_the_allowed_range(odd):
    cfg = fixture_config(odd)
    with pytest.raises(InputError) as e:
        shared_runtime(odd)(**_call_kwargs(odd, height=cfg.min_image_size + 1))
    _assert_one_line(e, "height", str(cfg.image_multiple), str(cfg.min_image_size), str(cfg.max_image_size))


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_allowed_sizes_and_latent_dtypes_work(request, name):
    fixture = request.getfixturevalue(name)
    cfg = fixture_config(fixture)
    runtime = shared_runtime(fixture)
    height = cfg.min_image_size
    width = min(cfg.default_width + cfg.image_multiple, cfg.max_image_size)
    out = runtime(**_call_kwargs(fixture, height=height, width=width))
    assert out.images.shape == (1, height, width, 3)
    assert out.images.dtype == np.float32
    latents = np.random.default_rng(1).standard_normal(_latent_shape(cfg, height=height, width=width))
    a = runtime(**_call_kwargs(fixture, height=height, width=width, latents=latents.astype(np.float32)))
    b = runtime(**_call_kwargs(fixture, height=height, width=width, latents=latents))  # float64 is accepted
    np.testing.assert_array_equal(a.images, b.images)


def test_condition_image_on_plain_package(tiny):
    runtime = shared_runtime(tiny)
    for key in ("condition_image", "canny_image"):
        with pytest.raises(InputError) as e:
            runtime(**_call_kwargs(tiny, **{key: _ref(2)}))
        _assert_one_line(e, key.split("_")[0], "ControlNet")


CN_CASES: list[Case] = [
    ("no-condition-image", lambda c, t: {"condition_image": None}, "condition_image"),
    ("condition-and-canny", lambda c, t: {"canny_image": _ref(6)}, "canny_image"),
    ("controlnet-scale-inf", lambda c, t: {"controlnet_conditioning_scale": float("inf")}, "controlnet_conditioning_scale"),
    ("controlnet-scale-nan", lambda c, t: {"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale"),
    ("condition-missing-path", lambda c, t: {"condition_image": str(t / "nope.png")}, "condition_image"),
    ("condition-corrupt", lambda c, t: {"condition_image": str(_corrupt_file(t))}, "condition_image"),
    ("height-not-multiple", lambda c, t: {"height": c.min_image_size + 1}, "height"),
]


@pytest.mark.parametrize("case", CN_CASES, ids=[c[0] for c in CN_CASES])
def test_bad_call_input_controlnet(tiny_cn, tmp_path, case):
    _, overrides, field_name = case
    runtime = shared_runtime(tiny_cn)
    with pytest.raises(InputError) as e:
        runtime(**_call_kwargs(tiny_cn, **overrides(fixture_config(tiny_cn), tmp_path)))
    message = _assert_one_line(e, field_name)
    if "canny" in field_name:
        assert "condition_image" in message


def _odd_mode_images(tmp_path: Path) -> dict[str, Any]:
    base = _ref(11, (30, 26))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (26, 30), dtype=np.uint8)))
    gray = base.convert("L")
    cmyk = base.convert("CMYK")
    sixteen = Image.fromarray(np.random.default_rng(3).integers(0, 65536, (26, 30), dtype=np.uint16))
    assert sixteen.mode.startswith("I;16"), sixteen.mode
    files = {}
    for name, image, suffix in (("rgba", rgba, ".png"), ("l", gray, ".png"), ("cmyk", cmyk, ".jpg"), ("i16", sixteen, ".png")):
        path = tmp_path / f"{name}{suffix}"
        image.save(path)
        files[f"{name}-file"] = str(path)
    return {"rgba": rgba, "l": gray, "cmyk": cmyk, "i16": sixteen, **files}


def test_unusual_image_modes_are_converted(tiny, tmp_path):
    runtime = shared_runtime(tiny)
    cfg = fixture_config(tiny)
    for name, image in _odd_mode_images(tmp_path).items():
        subject = runtime.encode_subject(image, "dog")
        assert subject.embeddings.shape == (cfg.num_query_tokens, cfg.qformer_hidden_size), name
        assert np.isfinite(subject.embeddings).all(), name
    # ... and through __call__ (a file and a PIL image)
    images = _odd_mode_images(tmp_path)
    for key in ("rgba-file", "i16"):
        out = runtime(**_call_kwargs(tiny, reference_image=images[key]))
        assert out.images.shape == (1, cfg.default_height, cfg.default_width, 3)
        assert np.isfinite(out.images).all()


def test_sixteen_bit_reference_is_not_clipped_white(tiny):
    # A mid-gray 16-bit image must not encode like a white one (Pillow's convert clips 16-bit).
    runtime = shared_runtime(tiny)
    gray16 = Image.fromarray(np.full((20, 20), 0x8000, np.uint16))
    gray8 = Image.fromarray(np.full((20, 20), 0x80, np.uint8)).convert("RGB")
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    a = runtime.encode_subject(gray16, "dog").embeddings
    np.testing.assert_array_equal(a, runtime.encode_subject(gray8, "dog").embeddings)
    assert not np.array_equal(a, runtime.encode_subject(white, "dog").embeddings)


def test_encode_subject_bad_input(tiny, tmp_path):
    runtime = shared_runtime(tiny)
    with pytest.raises(InputError) as e:
        runtime.encode_subject(_ref(), "")
    _assert_one_line(e, "source_subject_category")
    with pytest.raises(InputError) as e:
        runtime.encode_subject(_huge_header_file(tmp_path), "dog")
    _assert_one_line(e, "reference_image", str(imgs.DEFAULT_MAX_PIXELS))
    with pytest.raises(InputError) as e:
        runtime.encode_subject(str(tmp_path / "missing.jpg"), "dog")
    _assert_one_line(e, "reference_image", "missing.jpg")


@pytest.mark.parametrize(
    "weights", [(-1.0, 2.0), (float("nan"), 1.0), (0.0, 0.0), (float("inf"), 1.0), (1.0, -0.0 - 1e-9)],
    ids=["negative", "nan", "zero-sum", "inf", "tiny-negative"],
)
def test_mix_subjects_bad_weights(weights):
    a = SubjectEmbedding(np.ones((3, 4), np.float32), "a")
    b = SubjectEmbedding(np.zeros((3, 4), np.float32), "b")
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.mix_subjects([(a, weights[0]), (b, weights[1])])
    _assert_one_line(e, "weights")


def test_mix_subjects_bad_pairs():
    a = SubjectEmbedding(np.ones((3, 4), np.float32), "a")
    c = SubjectEmbedding(np.ones((2, 4), np.float32), "c")
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.mix_subjects([])
    _assert_one_line(e, "mix_subjects")
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.mix_subjects([(a, 1.0), (c, 1.0)])
    _assert_one_line(e, "mix_subjects", "shape")


@pytest.mark.parametrize("weight", ["x", None, [1.0]], ids=["string", "none", "list"])
def test_mix_subjects_non_numeric_weight(weight):
    a = SubjectEmbedding(np.ones((3, 4), np.float32), "a")
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.mix_subjects([(a, weight)])
    assert "\n" not in str(e.value) and "weights" in str(e.value), str(e.value)


def test_subject_and_reference_together(tiny):
    runtime = shared_runtime(tiny)
    subject = runtime.encode_subject(_ref(), "dog")
    with pytest.raises(InputError) as e:
        runtime(**_call_kwargs(tiny, subject=subject))
    _assert_one_line(e, "subject", "reference_image")


# ---- packages ------------------------------------------------------------------------------


def _open_both_ways(path: Path, **kwargs):
    """ModelPackage.open and from_package must both raise PackageError; returns the two infos."""
    infos = []
    with pytest.raises(PackageError) as e:
        ModelPackage.open(path)
    infos.append(e)
    with pytest.raises(PackageError) as e:
        BlipDiffusionRuntime.from_package(path, **kwargs)
    infos.append(e)
    return infos


def test_package_missing_directory(tmp_path):
    path = tmp_path / "no-such-package"
    for e in _open_both_ways(path):
        _assert_one_line(e, str(path), "does not exist")


def test_package_without_manifest(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for e in _open_both_ways(empty):
        _assert_one_line(e, "manifest.json")
    copy = copy_package(tiny, tmp_path)
    (copy / "manifest.json").unlink()
    for e in _open_both_ways(copy):
        _assert_one_line(e, "manifest.json")
    (copy / "manifest.json").write_text("{not json")
    for e in _open_both_ways(copy):
        _assert_one_line(e, "manifest.json")


def test_package_with_a_missing_graph(tiny, tmp_path):
    copy = copy_package(tiny, tmp_path)
    victim = copy / "onnx" / "fp32" / "unet_plain.onnx"
    victim.unlink()
    for e in _open_both_ways(copy):
        _assert_one_line(e, "missing", "unet_plain.onnx")
    with pytest.raises(PackageError) as e:  # also without the sha256 check
        ModelPackage.open(copy, verify=False)
    _assert_one_line(e, "missing")


@pytest.mark.parametrize("relpath", ["onnx/fp32/qformer.onnx", "onnx/fp32-fused/unet_plain.onnx", "tokenizer/tokenizer.json", "pipeline.json"])
def test_package_with_an_altered_byte(tiny, tmp_path, relpath):
    copy = copy_package(tiny, tmp_path)
    target = copy / relpath
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    if relpath.startswith("onnx/"):
        # graphs are hashed when handed out (a package holds graphs a generation never loads)
        package = ModelPackage.open(copy)
        folder, name = Path(relpath).parent.name, Path(relpath).stem
        infos = []
        with pytest.raises(PackageError) as e:
            package.onnx_path(name, "fp32", cpu_fused=folder == CPU_FUSED)
        infos.append(e)
        with pytest.raises(PackageError) as e:
            BlipDiffusionRuntime.from_package(copy)
        infos.append(e)
        package.onnx_path("vae_decoder", "fp32")  # an intact graph is still handed out
    else:
        infos = _open_both_ways(copy)
    for e in infos:
        message = _assert_one_line(e, Path(relpath).name)
        assert "sha256" in message or "altered" in message, message


def test_fp16_on_fp32_only_package(odd, tiny):
    assert "fp16" not in ModelPackage.open(odd.package).precisions
    with pytest.raises(PackageError) as e:
        BlipDiffusionRuntime.from_package(odd.package, precision="fp16")
    _assert_one_line(e, "fp16", "re-export", "--precision")
    assert "fp16" in ModelPackage.open(tiny.package).precisions


def test_unknown_backend(tiny):
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "tpu")
    _assert_one_line(e, "backend", "tpu", *BACKENDS)


# --------------------------------------------------------------------------------------------
# 2. CLI ``generate``
# --------------------------------------------------------------------------------------------


def _generate(package: Path, ref: Path, out: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    """``blipdiffusion-trt generate`` in a subprocess, one ONNX Runtime thread."""
    return run_cli("generate", package, "--prompt", "a photo on the beach", "--reference-image", ref,
                   "--source-subject", "dog", "--target-subject", "dog", "--out", out, "--steps", steps, *extra,
                   env={**os.environ, "BLIPDIFFUSION_TRT_THREADS": "1"}, timeout=120)


def _assert_cli_error(proc: subprocess.CompletedProcess, out: Path, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    last = lines[-1]
    assert last.startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert not out.exists(), f"{out} was written despite the error"


@pytest.fixture
def ref_file(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    _ref(7, (28, 22)).save(path)
    return path


def test_cli_generate_png_npy_timings_and_latents(tiny, tmp_path, ref_file):
    cfg = fixture_config(tiny)
    height = min(cfg.default_height + cfg.image_multiple, cfg.max_image_size)
    width = cfg.default_width
    assert height != width
    size = ["--height", str(height), "--width", str(width)]

    png = tmp_path / "out.png"
    proc = _generate(tiny.package, ref_file, png, *size)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (width, height) and im.mode == "RGB"

    npy = tmp_path / "out.npy"
    proc = _generate(tiny.package, ref_file, npy, "--timings", *size)
    assert proc.returncode == 0, proc.stderr
    array = np.load(npy)
    assert array.dtype == np.float32 and array.shape == (height, width, 3)
    assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1
    stages = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    for stage in ("qformer", "text_encoder", "unet", "vae_decoder", "total"):
        assert stage in stages, proc.stdout
    # the same as the Python API with the same seed
    api = shared_runtime(tiny)(**_call_kwargs(tiny, reference_image=str(ref_file), prompt="a photo on the beach",
                                        height=height, width=width, seed=0))
    np.testing.assert_allclose(array, api.images[0], rtol=0, atol=1e-5)

    latents = np.random.default_rng(5).standard_normal(_latent_shape(cfg, height=height, width=width)).astype(np.float32)
    latents_file = tmp_path / "latents.npy"
    np.save(latents_file, latents)
    outs = []
    for i, seed in enumerate(("1", "2")):  # the seed is ignored when latents are given
        out = tmp_path / f"lat{i}.npy"
        proc = _generate(tiny.package, ref_file, out, "--latents", str(latents_file), "--seed", seed, *size)
        assert proc.returncode == 0, proc.stderr
        outs.append(np.load(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], array)


def test_cli_generate_errors(tiny, tmp_path, ref_file):
    cfg = fixture_config(tiny)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    shape = _latent_shape(cfg)
    wrong_shape = tmp_path / "wrong_shape.npy"
    np.save(wrong_shape, np.zeros((shape[0], shape[1], shape[2] + 1, shape[3]), np.float32))
    float64 = tmp_path / "float64.npy"
    np.save(float64, np.zeros(shape, np.float64))
    not_npy = tmp_path / "not_npy.npy"
    not_npy.write_text("hello")
    corrupt = _corrupt_file(tmp_path)
    altered = copy_package(tiny, tmp_path)
    unet = altered / "onnx" / CPU_FUSED / "unet_plain.onnx"  # the graph the cpu runtime loads
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))

    cases = [
        ("gif", dict(out=out_dir / "x.gif"), [], ".gif"),
        ("no-suffix", dict(out=out_dir / "x"), [], "--out"),
        ("missing-dir", dict(out=out_dir / "missing" / "x.png"), [], "--out"),
        ("steps-0", dict(steps=0), [], "steps"),
        ("height-not-multiple", {}, ["--height", str(cfg.min_image_size + 1)], "height"),
        ("height-too-big", {}, ["--height", str(cfg.max_image_size + cfg.image_multiple)], "height"),
        ("latents-shape", {}, ["--latents", str(wrong_shape)], "latents"),
        ("latents-float64", {}, ["--latents", str(float64)], "float64"),
        ("latents-missing", {}, ["--latents", str(tmp_path / "nope.npy")], "latents"),
        ("latents-not-npy", {}, ["--latents", str(not_npy)], "latents"),
        ("corrupt-reference", dict(ref=corrupt), [], "reference"),
        ("missing-reference", dict(ref=tmp_path / "nope.png"), [], "reference"),
        ("condition-on-plain", {}, ["--condition-image", str(ref_file)], "condition"),
        ("scheduler", {}, ["--scheduler", "foo"], "scheduler"),
        ("backend", {}, ["--backend", "foo"], "backend"),
        ("precision", {}, ["--precision", "fp8"], "fp8"),
        ("guidance-nan", {}, ["--guidance", "nan"], "guidance"),
        ("altered-package", dict(package=altered), [], "unet_plain.onnx"),
        ("missing-package", dict(package=tmp_path / "no-package"), [], "no-package"),
    ]
    def run(case):
        name, where, extra, _ = case
        out = where.get("out", out_dir / f"{name}.npy")
        return out, _generate(where.get("package", tiny.package), where.get("ref", ref_file), out, *extra,
                         steps=where.get("steps", STEPS))

    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time (2 CPU cores)
        results = list(pool.map(run, cases))
    failures = []
    for (name, _, _, fragment), (out, proc) in zip(cases, results):
        try:
            _assert_cli_error(proc, out, fragment)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, "\n".join(failures)
    leftovers = [p.name for p in out_dir.iterdir()]
    assert not any(".tmp" in name for name in leftovers), leftovers
    assert not leftovers, leftovers


def test_cli_failure_while_saving_leaves_nothing(tiny, tmp_path, ref_file, monkeypatch, capsys):
    """A failure after generation (while writing) leaves neither the output nor a temp file."""
    from blipdiffusion_trt import cli

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "out.png"
    rc = cli.main(["generate", str(tiny.package), "--prompt", "a photo", "--reference-image", str(ref_file),
                   "--source-subject", "dog", "--target-subject", "dog", "--out", str(out), "--steps", str(STEPS)])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error:") and "disk full" in last, err
    assert list(tmp_path.iterdir()) == [ref_file]


# --------------------------------------------------------------------------------------------
# 3. No torch at run time
# --------------------------------------------------------------------------------------------

NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "diffusers", "transformers")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    sys.meta_path.insert(0, Block())
    package, ref, out, steps = sys.argv[1:5]

    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    runtime = BlipDiffusionRuntime.from_package(package)
    result = runtime("a photo", ref, "dog", "dog", num_inference_steps=int(steps), output_type="np", seed=0)
    assert result.images.ndim == 4 and result.images.shape[0] == 1, result.images.shape

    from blipdiffusion_trt.cli import main

    rc = main(["generate", package, "--prompt", "a photo", "--reference-image", ref, "--source-subject", "dog",
               "--target-subject", "dog", "--out", out, "--steps", steps])
    assert rc == 0, rc
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert "torch" not in sys.modules and not loaded, loaded
    exporters = sorted(m for m in sys.modules if m.startswith("blipdiffusion_trt.export"))
    assert not exporters, exporters
    print("NO-TORCH-OK")
    """
)


def test_runtime_runs_without_torch(tiny, tmp_path, ref_file):
    out = tmp_path / "no_torch.npy"
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(tiny.package), str(ref_file), str(out), str(STEPS)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO-TORCH-OK" in proc.stdout
    assert np.load(out).shape == (fixture_config(tiny).default_height, fixture_config(tiny).default_width, 3)


FORBIDDEN_IMPORT_LINE = re.compile(r"^\s*(import|from)\s+(torch|diffusers|transformers)\b", re.MULTILINE)


def test_runtime_sources_import_no_torch_or_export():
    files = sorted(RUNTIME_DIR.rglob("*.py"))
    assert files
    problems = []
    for path in files:
        text = path.read_text()
        for match in FORBIDDEN_IMPORT_LINE.finditer(text):
            problems.append(f"{path.name}: {match.group(0).strip()}")
        for snippet in ("import torch", "from torch", "import diffusers", "from ..export"):
            if snippet in text:
                problems.append(f"{path.name}: contains {snippet!r}")
        # ``blipdiffusion_trt.export`` may be *named* in docs (text.py points at the exporter that
        # writes the tokenizer files); it must never be imported, statically or dynamically.
        tree = ast.parse(text, filename=str(path))
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                modules = ["." * node.level + module] + [f"{'.' * node.level}{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    modules = [node.args[0].value]
            for module in modules:
                root = module.lstrip(".").split(".")[0]
                if root in ("torch", "diffusers", "transformers"):
                    problems.append(f"{path.name}:{node.lineno}: imports {module}")
                if "blipdiffusion_trt.export" in module or re.match(r"^\.\.export\b", module) or (
                    module.startswith("..") and module.lstrip(".").startswith("export")
                ):
                    problems.append(f"{path.name}:{node.lineno}: imports {module}")
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bblipdiffusion_trt\.export\b", code) and re.match(r"\s*(import|from)\b", code):
                problems.append(f"{path.name}:{line_no}: {line.strip()}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# 4. Caches
# --------------------------------------------------------------------------------------------


def _count_calls(monkeypatch, runtime: BlipDiffusionRuntime, engine: str) -> list[int]:
    calls = [0]
    inner = runtime.engines[engine].infer

    def counting(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(runtime.engines[engine], "infer", counting)
    return calls


def test_subject_cache(tiny, monkeypatch):
    runtime = BlipDiffusionRuntime.from_package(tiny.package, verify=False, cache_size=2)
    calls = _count_calls(monkeypatch, runtime, "qformer")

    a1 = runtime.encode_subject(_ref(1), "dog")
    a2 = runtime.encode_subject(_ref(1), "dog")  # a different PIL object with the same pixels
    assert calls[0] == 1
    np.testing.assert_array_equal(a1.embeddings, a2.embeddings)
    runtime.encode_subject(np.asarray(_ref(1)), "dog")  # the same pixels as an array
    assert calls[0] == 1

    runtime.encode_subject(_ref(1), "cat")  # another category
    assert calls[0] == 2
    b = runtime.encode_subject(_ref(2), "dog")  # another image
    assert calls[0] == 3
    assert not np.array_equal(a1.embeddings, b.embeddings)

    # LRU of size 2 holds (ref2, dog) and (ref1, cat); (ref1, dog) was evicted.
    runtime.encode_subject(_ref(1), "cat")
    assert calls[0] == 3
    runtime.encode_subject(_ref(1), "dog")  # evicts the least recently used: (ref2, dog)
    assert calls[0] == 4
    runtime.encode_subject(_ref(1), "cat")
    assert calls[0] == 4
    runtime.encode_subject(_ref(2), "dog")
    assert calls[0] == 5
    assert len(runtime._subject_cache) == 2

    uncached = BlipDiffusionRuntime.from_package(tiny.package, verify=False, cache_size=0)
    calls0 = _count_calls(monkeypatch, uncached, "qformer")
    uncached.encode_subject(_ref(1), "dog")
    uncached.encode_subject(_ref(1), "dog")
    assert calls0[0] == 2


def test_negative_prompt_cache(tiny, monkeypatch):
    runtime = BlipDiffusionRuntime.from_package(tiny.package, verify=False)
    negative = _count_calls(monkeypatch, runtime, "text_encoder_plain")
    qformer = _count_calls(monkeypatch, runtime, "qformer")
    for seed in (1, 2):
        runtime(**_call_kwargs(tiny, reference_image=_ref(seed), guidance_scale=7.5, neg_prompt="blurry"))
    assert qformer[0] == 2
    assert negative[0] == 1
    runtime(**_call_kwargs(tiny, reference_image=_ref(1), guidance_scale=7.5, neg_prompt="ugly"))
    assert negative[0] == 2
    runtime(**_call_kwargs(tiny, reference_image=_ref(1), guidance_scale=1.0, neg_prompt="other"))
    assert negative[0] == 2  # no classifier-free guidance: no negative prompt at all


def test_mix_subjects_and_subject_argument(tiny):
    runtime = shared_runtime(tiny)
    a = runtime.encode_subject(_ref(1), "dog")
    b = runtime.encode_subject(_ref(2), "dog")
    np.testing.assert_array_equal(BlipDiffusionRuntime.mix_subjects([(a, 1), (b, 0)]).embeddings, a.embeddings)
    mean = BlipDiffusionRuntime.mix_subjects([(a, 1), (b, 1)]).embeddings
    np.testing.assert_allclose(mean, (a.embeddings.astype(np.float64) + b.embeddings) / 2, rtol=0, atol=1e-6)
    weighted = BlipDiffusionRuntime.mix_subjects([(a, 3), (b, 1)]).embeddings
    np.testing.assert_allclose(weighted, 0.75 * a.embeddings + 0.25 * b.embeddings, rtol=0, atol=1e-6)
    assert mean.dtype == np.float32

    ref = _ref(1)
    by_image = runtime(**_call_kwargs(tiny, reference_image=ref, source_subject_category="dog", seed=4))
    kwargs = _call_kwargs(tiny, seed=4, subject=a)
    del kwargs["reference_image"], kwargs["source_subject_category"]
    by_subject = runtime(**kwargs)
    np.testing.assert_array_equal(by_image.images, by_subject.images)


# --------------------------------------------------------------------------------------------
# 5. Batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_batch_equals_single_prompts(request, name):
    fixture = request.getfixturevalue(name)
    cfg = fixture_config(fixture)
    runtime = shared_runtime(fixture)
    prompts = ["a photo on the beach", "an oil painting in a garden"]
    latents = np.random.default_rng(9).standard_normal(_latent_shape(cfg, batch=len(prompts))).astype(np.float32)
    batched = runtime(**_call_kwargs(fixture, prompt=prompts, latents=latents, guidance_scale=7.5))
    assert batched.images.shape == (len(prompts), cfg.default_height, cfg.default_width, 3)
    for i, prompt in enumerate(prompts):
        single = runtime(**_call_kwargs(fixture, prompt=prompt, latents=latents[i : i + 1], guidance_scale=7.5))
        np.testing.assert_allclose(batched.images[i], single.images[0], rtol=0, atol=1e-5)
    assert not np.allclose(batched.images[0], batched.images[1])
    pil = runtime(**_call_kwargs(fixture, prompt=prompts, latents=latents, output_type="pil"))
    assert len(pil.images) == len(prompts)
    assert all(im.size == (cfg.default_width, cfg.default_height) for im in pil.images)


def test_batch_reference_list_length_mismatch(tiny):
    runtime = shared_runtime(tiny)
    with pytest.raises(InputError) as e:
        runtime(**_call_kwargs(tiny, prompt=["a", "b"], reference_image=[_ref(1), _ref(2), _ref(3)]))
    _assert_one_line(e, "reference_image")
    with pytest.raises(InputError) as e:
        runtime(**_call_kwargs(tiny, prompt=["a", "b"], target_subject_category=["dog", "cat", "cow"]))
    _assert_one_line(e, "target_subject_category")


def _latents_and_reference(fixture, seed: int):
    """Latents of the package's default size and a small reference image, from ``seed``."""
    config = read_pipeline_config(fixture.package)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(
        (1, config.latent_channels, config.default_height // config.latent_scale_factor,
         config.default_width // config.latent_scale_factor)).astype(np.float32)
    return latents, Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_graph_optimization_levels_agree_and_are_validated(tiny):
    """"extended" (fast start) computes what "all" (fast steps) does; unknown levels are one-line errors."""
    latents, reference = _latents_and_reference(tiny, seed=3)
    images = []
    for level in ("all", "extended"):
        runtime = BlipDiffusionRuntime.from_package(tiny.package, graph_optimization=level)
        images.append(runtime("on a beach", reference, "dog", "dog", latents=latents, num_inference_steps=2,
                              output_type="np").images)
    assert float(np.abs(images[0] - images[1]).max()) <= 1e-5
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, graph_optimization="max")
    assert "graph_optimization" in str(e.value) and "\n" not in str(e.value)


def test_memory_arena_policies(tiny):
    """The arena policy reaches each session (loop: only the per-step components), changes nothing
    in the output, and an unknown policy is a one-line error."""
    latents, reference = _latents_and_reference(tiny, seed=4)
    images = {}
    loop = ("unet", "unet_plain", "controlnet")
    for policy in ("loop", "all", "none", "loop-shrink"):
        runtime = BlipDiffusionRuntime.from_package(tiny.package, memory_arena=policy)
        arenas = {name: e.session.get_session_options().enable_cpu_mem_arena for name, e in runtime.engines.items()}
        expected = {name: policy == "all" or (policy in ("loop", "loop-shrink") and name in loop)
                    for name in runtime.engines}
        assert arenas == expected, (policy, arenas)
        # loop-shrink: the per-step sessions hand their arena back after each call
        shrinking = {name for name, e in runtime.engines.items() if e._run_options is not None and
                     e._run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"}
        assert shrinking == ({name for name in runtime.engines if name in loop} if policy == "loop-shrink" else set())
        images[policy] = runtime("on a beach", reference, "dog", "dog", latents=latents, num_inference_steps=2,
                                 output_type="np").images
    assert float(np.abs(images["loop"] - images["all"]).max()) <= 1e-6
    assert float(np.abs(images["none"] - images["all"]).max()) <= 1e-6
    assert float(np.abs(images["loop-shrink"] - images["all"]).max()) <= 1e-6
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, memory_arena="some")
    assert "memory_arena" in str(e.value) and "\n" not in str(e.value)


def test_optimized_cache(tiny, tmp_path):
    """The optimised-graph cache is written once, reused, and changes nothing in the output."""
    cache = tmp_path / "ort-cache"
    latents, reference = _latents_and_reference(tiny, seed=5)

    def generate(**kwargs):
        runtime = BlipDiffusionRuntime.from_package(tiny.package, **kwargs)
        out = runtime("on a beach", reference, "dog", "dog", latents=latents, num_inference_steps=2, output_type="np")
        return runtime, out.images

    _, plain = generate()
    first, cached_first = generate(optimized_cache=cache)
    written = sorted(p.name for p in cache.iterdir())
    assert all(e.loaded_from.parent == cache for e in first.engines.values())
    assert not [n for n in written if n.startswith(".partial")], written
    second, cached_second = generate(optimized_cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == written, "the second load wrote the cache again"
    assert [e.loaded_from for e in second.engines.values()] == [e.loaded_from for e in first.engines.values()]
    assert float(np.abs(cached_first - plain).max()) <= 1e-6
    assert float(np.abs(cached_second - plain).max()) <= 1e-6

    # a cache that cannot be written costs the cache, not the run (tests/test_caches.py)
