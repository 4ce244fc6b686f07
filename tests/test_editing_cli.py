"""``blipdiffusion-trt edit`` and ``invert``: outputs equal to the Python API's, and bad input as
one line naming the option (never a traceback, nothing written).

The editing algorithm itself is tested against the PyTorch reference in tests/test_editing.py;
these tests check what the command line adds: options to arguments, files in and out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt import cli

from conftest import shared_runtime
from helpers import fixture_config, run_cli

PROMPT = "sitting on a sofa"
STEPS = 2
# subprocesses: one ONNX Runtime thread, as the generate CLI tests run them
ONE_THREAD = {**os.environ, "BLIPDIFFUSION_TRT_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    """A reference image and a real image (other sizes than the output's) as files."""
    root = tmp_path_factory.mktemp("edit-cli")
    rng = np.random.default_rng(3)
    paths = {"reference": root / "reference.png", "real": root / "real.png"}
    Image.fromarray(rng.integers(0, 256, (45, 38, 3), dtype=np.uint8)).save(paths["reference"])
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(paths["real"])
    return paths


def _size(config) -> tuple[int, int]:
    """Non-square: one multiple wider than the default."""
    return config.default_height, config.default_width + config.image_multiple


def _edit_args(package, files, out, *extra) -> list:
    return ["edit", package, "--prompt", PROMPT, "--reference-image", files["reference"], "--source-subject", "dog",
            "--target-subject", "dog", "--original-subject", "cat", "--steps", STEPS, "--out", out, *extra]


# a plain package, and a ControlNet one exported with the editing graphs (its generations load no
# unet_plain: the inversion loads it on first use)
@pytest.mark.parametrize("name", ["tiny", "odd_cn"])
def test_cli_invert_and_edit_equal_the_api(name, request, files, tmp_path):
    tiny = request.getfixturevalue(name)
    config = fixture_config(tiny)
    height, width = _size(config)
    size = ["--height", height, "--width", width]
    runtime = shared_runtime(tiny)

    latent_file = tmp_path / "latent.npy"
    proc = run_cli("invert", tiny.package, "--image", files["real"], "--prompt", PROMPT, "--original-subject", "cat",
                   "--steps", STEPS, "--out", latent_file, *size, env=ONE_THREAD, timeout=120)
    assert proc.returncode == 0, proc.stderr
    latent = np.load(latent_file)
    expected = runtime.invert(str(files["real"]), PROMPT, "cat", num_inference_steps=STEPS, height=height, width=width)
    assert latent.dtype == np.float32 and latent.shape == expected.shape
    np.testing.assert_allclose(latent, expected, rtol=0, atol=1e-5)

    # a real image: the edited image as .npy, its reconstruction as .png
    edited, source = tmp_path / "edited.npy", tmp_path / "source.png"
    proc = run_cli(*_edit_args(tiny.package, files, edited, "--image", files["real"], "--source-out", source,
                               "--timings", *size), env=ONE_THREAD, timeout=120)
    assert proc.returncode == 0, proc.stderr
    api = runtime.edit(PROMPT, str(files["reference"]), "dog", "dog", "cat", image=str(files["real"]),
                       num_inference_steps=STEPS, height=height, width=width, output_type="np")
    array = np.load(edited)
    assert array.dtype == np.float32 and array.shape == (height, width, 3) and 0 <= array.min() <= array.max() <= 1
    np.testing.assert_allclose(array, api.edited, rtol=0, atol=1e-5)
    with Image.open(source) as image:
        assert image.size == (width, height)
        expected_source = np.asarray(Image.fromarray((api.source * 255).round().astype(np.uint8)), np.int16)
        assert np.abs(np.asarray(image, np.int16) - expected_source).max() <= 1
    assert {"inversion", "unet", "vae_encoder", "total"} <= {line.split()[0] for line in proc.stdout.splitlines()
                                                              if line.strip()}

    # a generated image from the inverted latent, no local blend, other fractions, as .png
    out = tmp_path / "edited.png"
    proc = run_cli(*_edit_args(tiny.package, files, out, "--latents", latent_file, "--no-local-blend",
                               "--cross-replace-steps", "0.5", "--self-replace-steps", "0.2", "--scheduler", "ddim",
                               *size), env=ONE_THREAD, timeout=120)
    assert proc.returncode == 0, proc.stderr
    api = runtime.edit(PROMPT, str(files["reference"]), "dog", "dog", "cat", latents=latent, num_inference_steps=STEPS,
                       blend_threshold=None, cross_replace_steps=0.5, self_replace_steps=0.2, scheduler="ddim",
                       height=height, width=width, output_type="np")
    with Image.open(out) as image:
        expected_png = np.asarray(Image.fromarray((api.edited * 255).round().astype(np.uint8)), np.int16)
        assert np.abs(np.asarray(image, np.int16) - expected_png).max() <= 1


def _bad_cases(tiny, tiny_cn, files, tmp_path) -> dict[str, tuple[list, Path, list[str]]]:
    """name -> (argv, the output it must not write, words of the one-line error)."""
    out = tmp_path / "out.png"
    latent = tmp_path / "latent.npy"
    edit = lambda *extra: _edit_args(tiny.package, files, out, *extra)  # noqa: E731
    invert = ["invert", tiny.package, "--image", files["real"], "--prompt", PROMPT, "--original-subject", "cat",
              "--steps", STEPS]
    return {
        "cross fraction above 1": (edit("--cross-replace-steps", "1.5"), out, ["--cross-replace-steps", "[0, 1]"]),
        "self fraction below 0": (edit("--self-replace-steps", "-0.1"), out, ["--self-replace-steps", "[0, 1]"]),
        "threshold above 1": (edit("--blend-threshold", "2"), out, ["--blend-threshold", "[0, 1)"]),
        "threshold 1 selects no pixel": (edit("--blend-threshold", "1"), out, ["--blend-threshold", "[0, 1)"]),
        "blank original subject": ([a if a != "cat" else " " for a in edit()], out, ["--original-subject"]),
        "real image with pndm": (edit("--image", files["real"], "--scheduler", "pndm"), out, ["--scheduler", "ddim"]),
        "missing real image": (edit("--image", tmp_path / "nope.png"), out, ["--image", "nope.png"]),
        "steps 0": (edit("--steps", "0"), out, ["--steps"]),
        "unknown scheduler": (edit("--scheduler", "heun"), out, ["scheduler", "heun"]),
        "gif output": (_edit_args(tiny.package, files, tmp_path / "x.gif"), tmp_path / "x.gif", ["--out", ".gif"]),
        "same outputs": (edit("--source-out", out), out, ["--source-out", "same file"]),
        "no editing graphs": (_edit_args(tiny_cn.package, files, out), out, ["re-export", "unet_p2p"]),
        "invert to png": (invert + ["--out", tmp_path / "l.png"], tmp_path / "l.png", ["--out", ".npy"]),
        "invert blank subject": ([a if a != "cat" else "" for a in invert] + ["--out", latent], latent,
                                 ["--original-subject"]),
        "invert missing image": ([a if a != files["real"] else tmp_path / "nope.png" for a in invert]
                                 + ["--out", latent], latent, ["--image", "nope.png"]),
    }


def test_cli_edit_and_invert_bad_input(tiny, tiny_cn, files, tmp_path, capsys):
    failures = []
    for name, (argv, out, words) in _bad_cases(tiny, tiny_cn, files, tmp_path).items():
        code = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error:") or "Traceback" in err:
            problems.append(f"exit {code}, stderr {err!r}")
        problems += [f"{w!r} not in {lines[-1]!r}" for w in words if lines and w not in lines[-1]]
        if out.exists():
            problems.append(f"{out} written")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert not [p.name for p in tmp_path.iterdir()], "files left behind"
