"""Image input/output for the torch-free runtime.

Run-time module: it imports numpy, Pillow and the standard library only (OpenCV lazily, for
:func:`canny_condition`), never torch, transformers or diffusers.

Reference behaviour (diffusers 0.32.2 / transformers 4.48):

* :func:`preprocess_reference` equals ``BlipImageProcessor().preprocess(image, image_mean=mean,
  image_std=std, return_tensors="pt")["pixel_values"]`` (what ``BlipDiffusionPipeline`` feeds the
  Q-Former): PIL resize of the uint8 RGB image (bicubic), ``float64 * (1/255)`` cast to float32,
  ``(x - mean) / std`` in float32, then a center crop to the size it was just resized to (a no-op).
* :func:`preprocess_condition` equals ``BlipDiffusionControlNetPipeline.prepare_control_image``'s
  ``preprocess(image, size={"width": w, "height": h}, do_rescale=True, do_center_crop=False,
  do_normalize=False)``.
* :func:`postprocess` / :func:`to_pil` equal ``BlipImageProcessor.postprocess(..., "np")`` and
  ``diffusers.utils.numpy_to_pil``.
* :func:`load_image` mirrors ``diffusers.utils.load_image`` (EXIF orientation applied) followed by
  transformers' ``convert_to_rgb`` (which is a plain ``PIL.Image.convert("RGB")``: alpha is
  *dropped*, not composited, and a palette's transparency is ignored).

Intentional differences from the reference:

* 16-bit integer images (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` and ``I``) are reduced to
  8 bits with ``value >> 8`` (``I`` is clipped to 0..65535 first). Pillow's ``convert("RGB")``,
  and hence transformers, clips them instead, which turns almost every 16-bit pixel white.
  ``>> 8`` is the reduction Pillow itself applies when it decodes 16-bit RGB/RGBA PNGs, so a
  16-bit grayscale PNG and the same picture stored as 16-bit RGB give identical pixels.
* Images whose height is 1 or 3 pixels are processed correctly; transformers'
  ``infer_channel_dimension_format`` mistakes their height for the channel axis.
* Decoding is bounded (``max_pixels``) and every failure is an :class:`InputError` with a
  one-line message; the reference raises whatever Pillow raises.
"""

from __future__ import annotations

import numbers
import os
import re
import secrets
import stat
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import BlipDiffusionTrtError, InputError, describe
from .inputs import LIMITS

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CANNY_MAX_THRESHOLD",
    "SAVE_SUFFIXES",
    "load_image",
    "to_rgb",
    "preprocess_reference",
    "preprocess_references",
    "preprocess_condition",
    "canny_condition",
    "postprocess",
    "to_pil",
    "check_output_path",
    "save_image",
]

DEFAULT_MAX_PIXELS = LIMITS.max_image_pixels
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, BlipImageProcessor's default
# cv2.Canny (3x3 Sobel, L1 gradient) on 8-bit input can't produce a magnitude above
# 2 * 4 * 255; above it no pixel can be an edge. cv2 itself accepts any double and silently
# swaps low > high.
CANNY_MAX_THRESHOLD = 2040
SAVE_SUFFIXES = (".jpeg", ".jpg", ".npy", ".png")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_pixels(size: tuple[int, int], max_pixels: int, field: str, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{field}: {what} is empty ({width}x{height} pixels)", field=field)
    if width * height > max_pixels:
        raise InputError(
            f"{field}: {what} is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels} pixels"
        , field=field)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "I":
        values = np.clip(values, 0, 65535)
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image to mode RGB the way transformers' ``convert_to_rgb`` does.

    That is ``image.convert("RGB")`` (an RGB image is returned as is), except for 16-bit
    integer modes, which are reduced with ``value >> 8`` instead of being clipped (see the module
    docstring). Raises ``ValueError`` for modes Pillow cannot convert.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return _sixteen_bit_to_l(image).convert("RGB")
    return image.convert("RGB")


def _finish(image: Image.Image, *, field: str, what: str, exif_transpose: bool) -> Image.Image:
    """Decode (load), apply EXIF orientation and convert to RGB; returns an independent image."""
    try:
        image.load()
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise InputError(f"{field}: cannot decode {what}: {describe(error)}", field=field) from error
    try:
        result = ImageOps.exif_transpose(image) if exif_transpose else image
    except Exception as error:
        raise InputError(f"{field}: cannot apply the EXIF orientation of {what}: {describe(error)}", field=field) from error
    try:
        converted = to_rgb(result)
    except Exception as error:
        raise InputError(
            f"{field}: cannot convert {what} from mode {result.mode!r} to RGB: {describe(error)}"
        , field=field) from error
    if converted is image:
        converted = image.copy()
    return converted


def _open_unchecked(fp: Any, filename: str) -> Image.Image:
    """``Image.open`` without Pillow's decompression-bomb check (used only when that check
    refused a header: our own ``max_pixels`` limit is then applied by the caller)."""
    prefix = fp.read(16)
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            result = not accept or accept(prefix)
            if isinstance(result, str) or not result:
                continue
            fp.seek(0)
            try:
                return factory(fp, filename)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise Image.UnidentifiedImageError(f"cannot identify image file {filename!r}")


def _load_file(path: Path, *, field: str, max_pixels: int, exif_transpose: bool) -> Image.Image:
    what = f"image file '{path}'"
    if not path.exists():
        raise InputError(f"{field}: image file '{path}' does not exist", field=field)
    if path.is_dir():
        raise InputError(f"{field}: '{path}' is a directory, not an image file", field=field)
    if not path.is_file():  # a FIFO (opening it would wait for a writer), a device, a socket
        raise InputError(f"{field}: '{path}' is not a regular file", field=field)
    image = None
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        image = None  # Pillow refused the header size: re-open without its check, below
    except Image.UnidentifiedImageError as error:
        raise InputError(f"{field}: {what} is not an image in a format Pillow can read", field=field) from error
    except Exception as error:
        raise InputError(f"{field}: cannot read {what}: {describe(error)}", field=field) from error

    if image is not None:
        with image:
            _check_pixels(image.size, max_pixels, field, what)
            return _finish(image, field=field, what=what, exif_transpose=exif_transpose)

    try:
        with open(path, "rb") as fp:
            image = _open_unchecked(fp, str(path))
            _check_pixels(image.size, max_pixels, field, what)
            return _finish(image, field=field, what=what, exif_transpose=exif_transpose)
    except InputError:
        raise
    except Image.UnidentifiedImageError as error:
        raise InputError(f"{field}: {what} is not an image in a format Pillow can read", field=field) from error
    except Exception as error:
        raise InputError(f"{field}: cannot read {what}: {describe(error)}", field=field) from error


def _from_array(array: np.ndarray, *, field: str, max_pixels: int) -> Image.Image:
    what = f"array of shape {tuple(array.shape)}"
    if array.dtype != np.uint8:
        raise InputError(f"{field}: image arrays must have dtype uint8, got {array.dtype} ({what})", field=field)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(f"{field}: image arrays must be HxWx3 (RGB) or HxW (grayscale), got {what}", field=field)
    _check_pixels((int(array.shape[1]), int(array.shape[0])), max_pixels, field, f"the image {what}")
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(array)


def load_image(
    source: str | os.PathLike | Image.Image | np.ndarray,
    *,
    field: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Load an image as an RGB PIL image.

    ``source`` is a file path, a PIL image or a uint8 numpy array (HxWx3 RGB or HxW grayscale).
    ``field`` names the argument/option in error messages. The header size is checked against
    ``max_pixels`` before any pixel is decoded. For paths and PIL images the EXIF orientation is
    applied (``exif_transpose``), as ``diffusers.utils.load_image`` does. The result never shares
    pixel memory with a PIL ``source``.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels <= 0:
        raise InputError(f"max_pixels: must be a positive integer, got {max_pixels!r}", field="max_pixels")
    max_pixels = int(max_pixels)
    if isinstance(source, Image.Image):
        what = f"the {source.width}x{source.height} PIL image (mode {source.mode})"
        _check_pixels(source.size, max_pixels, field, "the PIL image")
        return _finish(source, field=field, what=what, exif_transpose=exif_transpose)
    if isinstance(source, np.ndarray):
        return _from_array(source, field=field, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", text):
            raise InputError(f"{field}: URLs are not supported ('{text[:200]}'); download the image and pass its path",
                             field=field)
        if not text:
            raise InputError(f"{field}: the image path is empty", field=field)
        return _load_file(Path(text), field=field, max_pixels=max_pixels, exif_transpose=exif_transpose)
    raise InputError(
        f"{field}: expected an image path, a PIL image or a uint8 numpy array, got {type(source).__name__}"
    , field=field)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def _size_pair(size: Sequence[int], name: str) -> tuple[int, int]:
    try:
        height, width = size
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected (height, width), got {size!r}", field=name) from None
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise InputError(f"{name}: height and width must be positive integers, got {size!r}", field=name)
    return int(height), int(width)


def _channel_stats(values: Any, name: str) -> np.ndarray:
    if isinstance(values, numbers.Real):
        values = [values] * 3
    try:
        array = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected 3 numbers, got {values!r}", field=name) from None
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise InputError(f"{name}: expected 3 finite numbers, got {values!r}", field=name)
    return array


def _resized_uint8(image: Image.Image, height: int, width: int, resample: int, name: str) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise InputError(f"{name}: expected a PIL image, got {type(image).__name__}", field=name)
    if image.width <= 0 or image.height <= 0:
        raise InputError(f"{name}: the image is empty ({image.width}x{image.height} pixels)", field=name)
    try:
        rgb = to_rgb(image)
    except ValueError as error:
        raise InputError(f"{name}: cannot convert mode {image.mode!r} to RGB: {describe(error)}", field=name) from error
    try:
        resized = rgb.resize((width, height), resample=resample)
    except ValueError as error:
        raise InputError(f"{name}: invalid resample filter {resample!r}: {describe(error)}", field=name) from error
    return np.asarray(resized, dtype=np.uint8)


def _rescale(array: np.ndarray) -> np.ndarray:
    # transformers.image_transforms.rescale: upcast to float64, multiply, downcast to float32.
    return (array.astype(np.float64) * (1 / 255)).astype(np.float32)


def preprocess_reference(
    image: Image.Image,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resample: int = BICUBIC,
) -> np.ndarray:
    """Reference (subject) image -> float32 ``[1, 3, H, W]`` for the Q-Former, ``size=(H, W)``."""
    height, width = _size_pair(size, "size")
    mean32 = _channel_stats(mean, "mean")
    std32 = _channel_stats(std, "std")
    if np.any(std32 == 0):
        raise InputError(f"std: must not contain zeros, got {list(map(float, std32))}", field="std")
    pixels = _rescale(_resized_uint8(image, height, width, resample, "reference image"))
    pixels = (pixels - mean32) / std32  # float32, as transformers.image_transforms.normalize
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def preprocess_references(
    images: Sequence[Image.Image],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resample: int = BICUBIC,
) -> np.ndarray:
    """Several reference images -> float32 ``[B, 3, H, W]``."""
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("reference images: at least one image is required", field="reference_image")
    return np.concatenate([preprocess_reference(im, size, mean, std, resample) for im in images], axis=0)


def preprocess_condition(image: Image.Image, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """ControlNet condition image -> float32 ``[1, 3, height, width]`` in [0, 1]."""
    height, width = _size_pair((height, width), "condition size")
    pixels = _rescale(_resized_uint8(image, height, width, resample, "condition image"))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def _threshold(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: must be an integer in 0..{CANNY_MAX_THRESHOLD}, got {value!r}", field=name)
    if not 0 <= value <= CANNY_MAX_THRESHOLD:
        raise InputError(f"{name}: must be in 0..{CANNY_MAX_THRESHOLD}, got {value}", field=name)
    return int(value)


def check_canny_thresholds(low_threshold: Any, high_threshold: Any, *,
                           names: tuple[str, str] = ("low_threshold", "high_threshold")) -> tuple[int, int]:
    """(low, high): integers with ``0 <= low <= high <= CANNY_MAX_THRESHOLD``; ``names``: the
    arguments named in the one-line error."""
    low = _threshold(low_threshold, names[0])
    high = _threshold(high_threshold, names[1])
    if low > high:
        raise InputError(f"{names[0]}: must not exceed {names[1]} ({high}), got {low}", field=names[0])
    return low, high


def canny_condition(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edge map of ``image`` as an RGB image (the edges replicated in the three channels),
    as in diffusers' ControlNet docs: ``cv2.Canny(np.array(image), low, high)``.

    Thresholds must be integers with ``0 <= low_threshold <= high_threshold <= 2040``
    (``cv2.Canny`` accepts any number and silently swaps low > high; we reject those).
    """
    low, high = check_canny_thresholds(low_threshold, high_threshold)
    if not isinstance(image, Image.Image):
        raise InputError(f"canny image: expected a PIL image, got {type(image).__name__}", field="canny_image")
    if image.width <= 0 or image.height <= 0:
        raise InputError(f"canny image: the image is empty ({image.width}x{image.height} pixels)", field="canny_image")
    try:
        import cv2
    except ImportError as error:
        raise BlipDiffusionTrtError(
            "canny preprocessing needs OpenCV: pip install opencv-python-headless"
        ) from error
    try:
        rgb = to_rgb(image)
    except ValueError as error:
        raise InputError(f"canny image: cannot convert mode {image.mode!r} to RGB: {describe(error)}", field="canny_image") from error
    edges = cv2.Canny(np.array(rgb), low, high)
    return Image.fromarray(np.ascontiguousarray(np.repeat(edges[:, :, None], 3, axis=2)))


# --------------------------------------------------------------------------------------------
# Postprocessing and saving
# --------------------------------------------------------------------------------------------


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output ``[B, 3, H, W]`` in [-1, 1] -> float32 ``[B, H, W, 3]`` in [0, 1]."""
    decoded = np.asarray(decoded)
    if decoded.ndim != 4:
        raise InputError(f"decoded: expected a [B, C, H, W] array, got shape {tuple(decoded.shape)}", field="decoded")
    images = np.clip(decoded.astype(np.float32, copy=False) / 2 + 0.5, 0, 1)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """``[B, H, W, C]`` (or ``[H, W, C]``) in [0, 1] -> PIL images, as ``diffusers.utils.numpy_to_pil``."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None, ...]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InputError(f"images: expected a [B, H, W, 3] array, got shape {tuple(images.shape)}", field="images")
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def _image_for_saving(image: Any, field: str) -> Image.Image | np.ndarray:
    """Returns an RGB PIL image, or a float HxWx3 array in [0, 1]."""
    if isinstance(image, Image.Image):
        try:
            return to_rgb(image)
        except ValueError as error:
            raise InputError(f"{field}: cannot convert mode {image.mode!r} to RGB: {describe(error)}", field=field) from error
    if not isinstance(image, np.ndarray):
        raise InputError(f"{field}: expected a PIL image or a numpy array, got {type(image).__name__}", field=field)
    array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{field}: expected an HxWx3 image array, got shape {tuple(image.shape)}", field=field)
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{field}: image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}", field=field)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise InputError(f"{field}: float image arrays must hold finite values in [0, 1]", field=field)
    return array


def check_output_path(path: str | os.PathLike, *, field: str = "output",
                      inputs: dict[str, Any] | None = None, suffixes: tuple[str, ...] = SAVE_SUFFIXES) -> Path:
    """An output file ``path`` checked before any work: a supported suffix, not a directory or a
    special file, not an existing read-only file, in an existing directory this process can create
    files in (a read-only file system fails here, not after the generation), and not one of the ``inputs`` (name -> path:
    the command's input files, which are never overwritten, or another of its outputs).
    ``suffixes``: those allowed (default: what :func:`save_image` writes)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{field}: '{path}' is a directory; give a file name", field=field)
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{field} must end in one of {', '.join(suffixes)}, got {path.name!r}", field=field)
    if path.exists() and not path.is_file():
        raise InputError(f"{field}: '{path}' exists and is not a regular file", field=field)
    if path.is_file() and (not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
                           or not os.access(path, os.W_OK)):
        # the output is written beside it and renamed over it, which would replace a file its mode
        # protects (and drop that mode): refused, whoever runs the command
        raise InputError(f"{field}: '{path}' exists and is read-only; not replacing it (remove it or give "
                         "another file)", field=field)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{field}: directory '{parent}' does not exist", field=field)
    for name, value in (inputs or {}).items():
        if isinstance(value, (str, os.PathLike)) and value and _same_file(path, Path(value)):
            raise InputError(f"{field}: '{path}' is the same file as {name}; give another output file", field=field)
    try:  # what writing needs: creating a file in that directory
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        probe.close()
    except OSError as error:
        raise InputError(f"{field}: cannot write to directory '{parent}': {error.strerror or describe(error)}",
                         field=field) from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_image(
    image: Image.Image | np.ndarray,
    path: str | os.PathLike,
    *,
    field: str = "output",
    jpeg_quality: int = 95,
) -> Path:
    """Write ``image`` to ``path`` atomically (temp file in the same directory, then ``os.replace``).

    ``.png``/``.jpg``/``.jpeg`` are written by Pillow (float arrays quantised like
    :func:`to_pil`); ``.npy`` holds float32 HxWx3 in [0, 1] (a float array is stored unquantised,
    a uint8 image as ``value / 255``). Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise InputError(
            f"{field}: unsupported file suffix {path.suffix or '(none)'!r} for '{path}'; "
            f"allowed: {', '.join(SAVE_SUFFIXES)}"
        , field=field)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{field}: directory '{parent}' does not exist (writing '{path}')", field=field)
    if path.is_dir():
        raise InputError(f"{field}: '{path}' is a directory", field=field)
    content = _image_for_saving(image, field)

    tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        # os.open with 0o666 lets the umask decide the final permissions (mkstemp would use 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise InputError(f"{field}: cannot write to directory '{parent}': {describe(error)}", field=field) from error
    try:
        with os.fdopen(fd, "wb") as fp:
            if suffix == ".npy":
                if isinstance(content, Image.Image):
                    array = (np.asarray(content, dtype=np.float64) * (1 / 255)).astype(np.float32)
                else:
                    array = content.astype(np.float32)
                np.save(fp, np.ascontiguousarray(array), allow_pickle=False)
            else:
                pil = content if isinstance(content, Image.Image) else to_pil(content)[0]
                if suffix == ".png":
                    pil.save(fp, format="PNG")
                else:
                    pil.save(fp, format="JPEG", quality=jpeg_quality)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise InputError(f"{field}: cannot write '{path}': {describe(error)}", field=field) from error
        raise
    return path
