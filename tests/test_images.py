"""Image I/O of the runtime against diffusers' BlipImageProcessor / transformers' convert_to_rgb."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt.errors import InputError
from blipdiffusion_trt.runtime import images as rt

from helpers import png_bytes

torch = pytest.importorskip("torch")
blip_mod = pytest.importorskip("diffusers.pipelines.blip_diffusion.blip_image_processing")
from diffusers.utils import load_image as diffusers_load_image  # noqa: E402
from diffusers.utils import numpy_to_pil  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402

BlipImageProcessor = blip_mod.BlipImageProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CUSTOM_MEAN = [0.5, 0.25, 0.125]
CUSTOM_STD = [0.2, 0.7, 1.3]


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_input_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------
# Preprocessing against the reference
# ---------------------------------------------------------------------------------------------

IMAGE_SIZES = [(7, 5), (5, 7), (300, 200), (224, 224), (640, 480), (2, 2)]  # (width, height)


@pytest.mark.parametrize("wh", IMAGE_SIZES)
@pytest.mark.parametrize("size", [(224, 224), (40, 56)])
@pytest.mark.parametrize("stats", [(CLIP_MEAN, CLIP_STD), (CUSTOM_MEAN, CUSTOM_STD)], ids=["clip", "custom"])
def test_preprocess_reference_matches_blip_image_processor(wh, size, stats):
    mean, std = stats
    image = _random_rgb(*wh, seed=wh[0] * 1000 + wh[1])
    processor = BlipImageProcessor(size={"height": size[0], "width": size[1]})
    expected = processor.preprocess(image, image_mean=mean, image_std=std, return_tensors="pt")["pixel_values"]
    got = rt.preprocess_reference(image, size, mean, std)
    assert got.dtype == np.float32 and got.shape == (1, 3, *size) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)


def test_preprocess_reference_default_processor_is_224_bicubic():
    # What BlipDiffusionPipeline actually calls: the checkpoint's processor (224x224, bicubic).
    image = _random_rgb(123, 77, seed=3)
    expected = BlipImageProcessor().preprocess(image, image_mean=CLIP_MEAN, image_std=CLIP_STD, return_tensors="pt")
    got = rt.preprocess_reference(image, (224, 224), CLIP_MEAN, CLIP_STD, resample=Image.BICUBIC)
    np.testing.assert_array_equal(got, expected["pixel_values"].numpy())


def test_preprocess_reference_resample_parameter():
    image = _random_rgb(50, 31, seed=4)
    processor = BlipImageProcessor(size={"height": 24, "width": 24}, resample=Image.BILINEAR)
    expected = processor.preprocess(image, image_mean=CLIP_MEAN, image_std=CLIP_STD, return_tensors="pt")
    got = rt.preprocess_reference(image, (24, 24), CLIP_MEAN, CLIP_STD, resample=Image.BILINEAR)
    np.testing.assert_allclose(got, expected["pixel_values"].numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(got, rt.preprocess_reference(image, (24, 24), CLIP_MEAN, CLIP_STD))


def test_preprocess_references_batch():
    imgs = [_random_rgb(30, 20, seed=1), _random_rgb(17, 40, seed=2)]
    expected = BlipImageProcessor().preprocess(imgs, image_mean=CLIP_MEAN, image_std=CLIP_STD, return_tensors="pt")
    got = rt.preprocess_references(imgs, (224, 224), CLIP_MEAN, CLIP_STD)
    assert got.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(got, expected["pixel_values"].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(InputError):
        rt.preprocess_references([], (224, 224), CLIP_MEAN, CLIP_STD)


def test_height_one_or_three_images_are_handled():
    # transformers infers channels-first for an HxWx3 array with H in (1, 3); we don't.
    image = _random_rgb(10, 3, seed=9)
    got = rt.preprocess_reference(image, (8, 8), CLIP_MEAN, CLIP_STD)
    resized = np.asarray(image.resize((8, 8), Image.BICUBIC), dtype=np.float64) / 255
    expected = ((resized.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


@pytest.mark.parametrize("hw", [(32, 48), (64, 64)])
@pytest.mark.parametrize("wh", [(7, 5), (300, 200), (64, 64)])
def test_preprocess_condition_matches_prepare_control_image(hw, wh):
    height, width = hw
    image = _random_rgb(*wh, seed=wh[0] + wh[1])
    expected = BlipImageProcessor().preprocess(
        image,
        size={"width": width, "height": height},
        do_rescale=True,
        do_center_crop=False,
        do_normalize=False,
        return_tensors="pt",
    )["pixel_values"]
    got = rt.preprocess_condition(image, height, width)
    assert got.dtype == np.float32 and got.shape == (1, 3, height, width)
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)


def test_preprocess_argument_errors():
    image = _random_rgb(8, 8)
    with pytest.raises(InputError) as e:
        rt.preprocess_reference(image, (0, 8), CLIP_MEAN, CLIP_STD)
    _assert_input_error(e, "size")
    with pytest.raises(InputError) as e:
        rt.preprocess_reference(image, (8, 8), [0.5, 0.5], CLIP_STD)
    _assert_input_error(e, "mean")
    with pytest.raises(InputError) as e:
        rt.preprocess_reference(image, (8, 8), CLIP_MEAN, [0.5, 0.0, 0.5])
    _assert_input_error(e, "std")
    with pytest.raises(InputError) as e:
        rt.preprocess_condition(Image.new("RGB", (0, 4)), 8, 8)
    _assert_input_error(e, "condition image", "empty")


# ---------------------------------------------------------------------------------------------
# Postprocessing
# ---------------------------------------------------------------------------------------------


def test_postprocess_and_to_pil_match_diffusers():
    rng = np.random.default_rng(5)
    decoded = (rng.standard_normal((2, 3, 24, 40)) * 1.5).astype(np.float32)
    processor = BlipImageProcessor()
    expected_np = processor.postprocess(torch.from_numpy(decoded), output_type="np")
    got = rt.postprocess(decoded)
    assert got.dtype == np.float32 and got.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(got, expected_np)
    expected_pil = processor.postprocess(torch.from_numpy(decoded), output_type="pil")
    got_pil = rt.to_pil(got)
    assert len(got_pil) == 2
    for a, b in zip(got_pil, expected_pil):
        assert a.mode == b.mode == "RGB" and a.size == b.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(rt.to_pil(got[0]), numpy_to_pil(got[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Mode conversion
# ---------------------------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    rgba[:3, :, 3] = 0  # fully transparent rows
    rgba[3:5, :, 3] = 128
    out = {"RGBA": Image.fromarray(rgba)}
    la = rng.integers(0, 256, (9, 13, 2), dtype=np.uint8)
    la[:3, :, 1] = 0
    out["LA"] = Image.merge("LA", (Image.fromarray(la[:, :, 0]), Image.fromarray(la[:, :, 1])))
    p = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).quantize(16)
    p.info["transparency"] = 0
    out["P"] = p
    out["L"] = Image.fromarray(rng.integers(0, 256, (9, 13), dtype=np.uint8))
    out["CMYK"] = Image.frombytes("CMYK", (13, 9), rng.integers(0, 256, 9 * 13 * 4, dtype=np.uint8).tobytes())
    out["1"] = Image.fromarray(rng.integers(0, 2, (9, 13), dtype=np.uint8) * 255).convert("1")
    return out


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1"])
def test_mode_conversion_matches_convert_to_rgb(mode, tmp_path):
    image = _mode_images()[mode]
    assert image.mode == mode
    expected = np.asarray(convert_to_rgb(image))
    # PIL input
    got = rt.load_image(image, field="reference_image")
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), expected)
    # preprocess_reference on the non-RGB image equals the processor's own conversion
    ref = BlipImageProcessor().preprocess(image, image_mean=CLIP_MEAN, image_std=CLIP_STD, return_tensors="pt")
    np.testing.assert_allclose(
        rt.preprocess_reference(image, (224, 224), CLIP_MEAN, CLIP_STD), ref["pixel_values"].numpy(), atol=1e-6
    )
    # file input (PNG keeps the mode; CMYK goes through TIFF)
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
        expected_file = np.asarray(convert_to_rgb(reopened))
    np.testing.assert_array_equal(np.asarray(rt.load_image(path, field="reference_image")), expected_file)
    np.testing.assert_array_equal(
        np.asarray(rt.load_image(str(path), field="reference_image")), np.asarray(diffusers_load_image(str(path)))
    )


def test_alpha_is_dropped_not_composited():
    # transformers' convert_to_rgb is Image.convert("RGB"): the color under a transparent pixel stays.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 10
    got = np.asarray(rt.load_image(Image.fromarray(rgba), field="x"))
    assert (got[..., 0] == 10).all() and (got[..., 1:] == 0).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode, tmp_path):
    rng = np.random.default_rng(12)
    values = rng.integers(0, 65536, (6, 10)).astype(np.uint16)
    values[0, :4] = [0, 255, 256, 65535]
    if mode == "I;16":
        image = Image.fromarray(values)
    elif mode == "I;16B":
        image = Image.frombytes("I;16B", (10, 6), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.int32))
    assert image.mode == mode
    got = np.asarray(rt.load_image(image, field="reference_image"))
    expected8 = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected8[:, :, None], 3, axis=2))
    assert got[0, :4, 0].tolist() == [0, 0, 1, 255]
    # Documented difference: transformers/PIL clip instead (everything >= 255 becomes white).
    clipped = np.asarray(convert_to_rgb(image))[..., 0]
    assert (clipped[values >= 255] == 255).all()
    assert not np.array_equal(got[..., 0], clipped)


def test_sixteen_bit_gray_png_equals_sixteen_bit_rgb_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(13)
    gray = rng.integers(0, 65536, (8, 11)).astype(np.uint16)
    gray_path, rgb_path = tmp_path / "g16.png", tmp_path / "rgb16.png"
    assert cv2.imwrite(str(gray_path), gray)
    assert cv2.imwrite(str(rgb_path), np.repeat(gray[:, :, None], 3, axis=2))
    with Image.open(gray_path) as im:
        assert im.mode == "I;16"
    a = np.asarray(rt.load_image(gray_path, field="x"))
    b = np.asarray(rt.load_image(rgb_path, field="x"))  # Pillow itself reduces 16-bit RGB by >> 8
    np.testing.assert_array_equal(a, b)


def test_exif_orientation_is_applied_like_diffusers_load_image(tmp_path):
    image = _random_rgb(12, 7, seed=21)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    path = tmp_path / "rot.png"
    image.save(path, exif=exif)
    got = rt.load_image(path, field="x")
    assert got.size == (7, 12)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(diffusers_load_image(str(path))))
    assert rt.load_image(path, field="x", exif_transpose=False).size == (12, 7)


def test_numpy_and_pil_sources():
    array = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    got = rt.load_image(array, field="x")
    assert got.mode == "RGB" and got.size == (6, 5)
    np.testing.assert_array_equal(np.asarray(got), array)
    gray = array[:, :, 0]
    np.testing.assert_array_equal(np.asarray(rt.load_image(gray, field="x")), np.repeat(gray[:, :, None], 3, 2))
    source = Image.fromarray(array)
    out = rt.load_image(source, field="x")
    assert out is not source
    np.testing.assert_array_equal(np.asarray(out), array)
    for bad in (array.astype(np.float32), np.zeros((5, 6, 4), np.uint8), [[1, 2]]):
        with pytest.raises(InputError) as e:
            rt.load_image(bad, field="reference_image")
        _assert_input_error(e, "reference_image")


# ---------------------------------------------------------------------------------------------
# Load errors
# ---------------------------------------------------------------------------------------------


def test_corrupt_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", str(path))


def test_truncated_png(tmp_path):
    buffer = io.BytesIO()
    _random_rgb(64, 64).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", str(path))


def test_missing_file_directory_and_url(tmp_path):
    with pytest.raises(InputError) as e:
        rt.load_image(tmp_path / "nope.png", field="condition_image")
    _assert_input_error(e, "condition_image", "nope.png", "does not exist")
    with pytest.raises(InputError) as e:
        rt.load_image(tmp_path, field="condition_image")
    _assert_input_error(e, "condition_image", "directory")
    with pytest.raises(InputError) as e:
        rt.load_image("https://example.com/a.png", field="condition_image")
    _assert_input_error(e, "condition_image", "URL")


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\nsecond line\n")
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", str(path))


def test_huge_header_is_rejected_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(100_000, 100_000))
    assert path.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as e:
            rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", str(path), "100000x100000", str(rt.DEFAULT_MAX_PIXELS))


def test_header_between_pil_warning_and_our_limit(tmp_path):
    # 10000x10000 = 1e8 pixels: above Pillow's warning threshold, below its error threshold.
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes
        with pytest.raises(InputError) as e:
            rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", "10000x10000", "limit")


def test_custom_max_pixels(tmp_path):
    path = tmp_path / "small.png"
    _random_rgb(100, 100).save(path)
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image", max_pixels=5000)
    _assert_input_error(e, "reference_image", "100x100", "5000")
    with pytest.raises(InputError) as e:
        rt.load_image(_random_rgb(100, 100), field="reference_image", max_pixels=5000)
    _assert_input_error(e, "reference_image", "100x100", "5000")
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image", max_pixels=0)
    _assert_input_error(e, "max_pixels")


def test_limit_above_pillows_own_bomb_limit(tmp_path, monkeypatch):
    # When Pillow's decompression-bomb error fires but our limit allows the image, we still load it.
    path = tmp_path / "ok.png"
    image = _random_rgb(100, 100, seed=7)
    image.save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    got = rt.load_image(path, field="x", max_pixels=1_000_000)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(image))
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="x", max_pixels=9999)
    _assert_input_error(e, "x", "100x100", "9999")


def test_zero_size_images(tmp_path):
    for source in (Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(InputError) as e:
            rt.load_image(source, field="reference_image")
        _assert_input_error(e, "reference_image", "empty")
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes(0, 5))
    with pytest.raises(InputError) as e:
        rt.load_image(path, field="reference_image")
    _assert_input_error(e, "reference_image", str(path))


# ---------------------------------------------------------------------------------------------
# Canny
# ---------------------------------------------------------------------------------------------


def test_canny_matches_diffusers_recipe():
    cv2 = pytest.importorskip("cv2")
    image = _random_rgb(40, 30, seed=8).resize((80, 60), Image.NEAREST)
    got = rt.canny_condition(image, 50, 150)
    edges = cv2.Canny(np.array(image), 50, 150)[:, :, None]
    expected = np.concatenate([edges, edges, edges], axis=2)
    assert got.mode == "RGB" and got.size == (80, 60)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert rt.canny_condition(image).size == (80, 60)


@pytest.mark.parametrize(
    "low, high, field",
    [(-1, 100, "low_threshold"), (100, 5000, "high_threshold"), (200, 100, "low_threshold"),
     (1.5, 100, "low_threshold"), (True, 100, "low_threshold")],
)
def test_canny_bad_thresholds(low, high, field):
    with pytest.raises(InputError) as e:
        rt.canny_condition(_random_rgb(8, 8), low, high)
    _assert_input_error(e, field)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def test_save_formats_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    array = rng.random((6, 9, 3), dtype=np.float32)
    rt.save_image(array, tmp_path / "a.npy")
    loaded = np.load(tmp_path / "a.npy")
    assert loaded.dtype == np.float32 and loaded.shape == (6, 9, 3)
    np.testing.assert_array_equal(loaded, array)
    rt.save_image(array[None], tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(rt.to_pil(array)[0]))
    pil = rt.to_pil(array)[0]
    rt.save_image(pil, tmp_path / "b.JPG")
    with Image.open(tmp_path / "b.JPG") as im:
        assert im.format == "JPEG" and im.size == (9, 6)
    rt.save_image(pil, tmp_path / "b.npy")
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.asarray(pil) / 255, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.png", "b.JPG", "b.npy"]


def test_save_errors(tmp_path):
    image = rt.to_pil(np.zeros((4, 4, 3), np.float32))[0]
    with pytest.raises(InputError) as e:
        rt.save_image(image, tmp_path / "out.gif", field="output")
    _assert_input_error(e, "output", ".gif", ".png", ".jpg", ".npy")
    with pytest.raises(InputError) as e:
        rt.save_image(image, tmp_path / "missing" / "out.png", field="output")
    _assert_input_error(e, "output", "does not exist")
    with pytest.raises(InputError) as e:
        rt.save_image(np.full((4, 4, 3), 2.0, np.float32), tmp_path / "out.png", field="output")
    _assert_input_error(e, "output", "[0, 1]")
    assert list(tmp_path.iterdir()) == []


def test_save_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    image = rt.to_pil(np.zeros((4, 4, 3), np.float32))[0]
    # 1) os.replace fails: the target is an existing non-empty directory (checked late on purpose)
    target = tmp_path / "out.png"
    monkeypatch.setattr(Path, "is_dir", lambda self: self != target and os.path.isdir(self))
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(InputError) as e:
        rt.save_image(image, target, field="output")
    _assert_input_error(e, "output", str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    monkeypatch.undo()

    # 2) the encoder fails half-way
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(InputError) as e:
        rt.save_image(image, tmp_path / "b.png", field="output")
    _assert_input_error(e, "output", "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]

    # 3) a non-OSError failure propagates unchanged and also cleans up
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        rt.save_image(image, tmp_path / "c.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")
    rt.save_image(rt.to_pil(np.ones((3, 3, 3), np.float32))[0], path)
    assert np.asarray(Image.open(path)).min() == 255
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---------------------------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------------------------


def test_imports_without_torch():
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "import blipdiffusion_trt.runtime.images as m\n"
        "assert 'cv2' not in sys.modules, 'cv2 must be imported lazily'\n"
        "import numpy as np\n"
        "x = m.preprocess_reference(m.load_image(np.zeros((5, 5, 3), np.uint8), field='f'), (8, 8), [0.5]*3, [0.5]*3)\n"
        "assert x.shape == (1, 3, 8, 8)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
