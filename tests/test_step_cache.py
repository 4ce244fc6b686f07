"""Fast mode (DeepCache step caching, branch 0): the exported split, the exact mode untouched, whole
generations against diffusers with DeepCache's own helper, the mistakes that comparison catches,
the deep feature kept on the device by the GPU backends (stand-ins), and the one-line refusals.

The reference is diffusers' BLIP-Diffusion pipeline with ``DeepCacheSDHelper`` (PyPI ``deepcache``)
at cache_branch_id 0, its schedule counted in UNet calls: the helper itself reads the timestep from
the UNet's positional arguments (the BLIP pipelines pass it by keyword) and takes its first index in
``scheduler.timesteps`` (PNDM repeats a timestep), so it is wrapped to count calls instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from blipdiffusion_trt.components import (
    CONTROLNET_STEP_CACHE,
    DEEP_FEATURE,
    PLAIN_STEP_CACHE,
    step_cache_components,
    step_cache_graphs,
)
from blipdiffusion_trt.errors import InputError
from blipdiffusion_trt.export.graphs import example_inputs, export_point, ort_session, second_point
from blipdiffusion_trt.package import ModelPackage
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime
from blipdiffusion_trt.runtime.step_cache import StepCache

from conftest import load_diffusers

PARITY_ATOL = 1e-3  # the image in [0, 1], as tests/test_parity.py
SENSITIVITY_FACTOR = 10
PROMPT = "swimming underwater"
NEGATIVE = "low quality, blurry"
STEPS = 7  # PNDM: 8 UNet calls, so interval 5 has a second full step


def _inputs(config, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = config.default_height, config.default_width + config.image_multiple
    latents = rng.standard_normal((1, config.latent_channels, height // config.latent_scale_factor,
                                   width // config.latent_scale_factor)).astype(np.float32)
    reference = Image.fromarray(rng.integers(0, 256, (57, 43, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    return height, width, latents, reference, condition


_runtimes: dict[str, BlipDiffusionRuntime] = {}


def _runtime(fixture) -> BlipDiffusionRuntime:
    if fixture.name not in _runtimes:
        _runtimes[fixture.name] = BlipDiffusionRuntime.from_package(fixture.package, cache_size=0)
    return _runtimes[fixture.name]


def _ours(runtime, fixture, scheduler: str, interval: int, steps: int = STEPS) -> np.ndarray:
    height, width, latents, reference, condition = _inputs(runtime.config)
    kwargs = {"condition_image": condition} if fixture.controlnet else {}
    return runtime(PROMPT, reference, "dog", "dog", latents=latents, guidance_scale=7.5, height=height, width=width,
                   num_inference_steps=steps, neg_prompt=NEGATIVE, scheduler=scheduler, output_type="np",
                   cache_interval=interval, **kwargs).images


def _deepcache_helper(pipe, interval: int, branch: int):
    """DeepCache's own helper on ``pipe``, its schedule counted in UNet calls (see the module docstring)."""
    from DeepCache import DeepCacheSDHelper

    class CallIndexHelper(DeepCacheSDHelper):
        def reset_states(self):
            super().reset_states()
            self.calls = 0

        def wrap_unet_forward(self):
            self.function_dict["unet_forward"] = self.pipe.unet.forward

            def wrapped_forward(*args, **kwargs):
                self.cur_timestep = self.calls
                self.calls += 1
                return self.function_dict["unet_forward"](*args, **kwargs)

            self.pipe.unet.forward = wrapped_forward

    helper = CallIndexHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    return helper


def _reference(fixture, scheduler: str, interval: int, *, branch: int = 0, steps: int = STEPS) -> np.ndarray:
    """diffusers + DeepCache (full ControlNet every step), same latents, inputs and scheduler."""
    torch = pytest.importorskip("torch", reason="the reference runs diffusers on torch (pip install .[export])")
    pytest.importorskip("DeepCache", reason="the reference is DeepCache's own helper (pip install --no-deps deepcache)")
    from diffusers import DDIMScheduler, PNDMScheduler

    pipe = load_diffusers(fixture)
    config = _runtime(fixture).config
    height, width, latents, reference, condition = _inputs(config)
    original = pipe.scheduler
    pipe.scheduler = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[scheduler].from_config(original.config)
    helper = _deepcache_helper(pipe, interval, branch)
    helper.enable()
    try:
        args = (PROMPT, reference, condition, "dog", "dog") if fixture.controlnet else (PROMPT, reference, "dog", "dog")
        with torch.no_grad():
            return pipe(*args, latents=torch.from_numpy(latents), guidance_scale=7.5, height=height, width=width,
                        num_inference_steps=steps, neg_prompt=NEGATIVE, output_type="np").images
    finally:
        helper.disable()
        # the helper restores bound methods as instance attributes: drop them, the shared pipe stays as loaded
        for module in pipe.unet.modules():
            module.__dict__.pop("forward", None)
        pipe.scheduler = original


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------------------------
# The declarations and the split
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_the_split_is_exact(name, request):
    """The shallow graph fed the deep feature the full graph produced at the same step and inputs
    gives the full graph's noise prediction; the full graph's equals the exact mode's UNet; the
    shallow ControlNet's residual is the ControlNet's first."""
    _check_split(request.getfixturevalue(name))


def _check_split(fixture) -> None:
    package = ModelPackage.open(fixture.package)
    specs = package.specs
    graphs = step_cache_graphs(package.config, control=fixture.controlnet)
    exact = specs["unet" if fixture.controlnet else "unet_plain"]
    full, shallow = specs[graphs.full], specs[graphs.shallow]
    # the ControlNet's points also set the pixel size its control map takes
    widest = specs["controlnet"] if fixture.controlnet else full
    for point in (export_point(widest), second_point(widest)):
        feed = example_inputs(full, point, vocab_sizes={}, seed=5)
        if fixture.controlnet:
            controlnet = specs["controlnet"]
            control_feed = {**example_inputs(controlnet, point, vocab_sizes={}, seed=6), **{
                k: feed[k] for k in ("sample", "timestep", "encoder_hidden_states")}}
            residuals = dict(zip(controlnet.output_names,
                                 ort_session(package.layout.graph("controlnet", "fp32")).run(None, control_feed)))
            feed.update(residuals)
            first = ort_session(package.layout.graph(graphs.controlnet, "fp32")).run(None, {
                k: control_feed[k] for k in specs[graphs.controlnet].input_names})[0]
            np.testing.assert_allclose(first, residuals["down_block_res_0"], atol=specs[graphs.controlnet].atol, rtol=0)
        noise_full, deep = ort_session(package.layout.graph(graphs.full, "fp32")).run(None, feed)
        noise_exact = ort_session(package.layout.graph(exact.name, "fp32")).run(None, {k: feed[k] for k in exact.input_names})[0]
        np.testing.assert_allclose(noise_full, noise_exact, atol=exact.atol, rtol=0)
        shallow_feed = {k: feed[k] for k in shallow.input_names if k != DEEP_FEATURE}
        noise_shallow = ort_session(package.layout.graph(graphs.shallow, "fp32")).run(None, {**shallow_feed, DEEP_FEATURE: deep})[0]
        scale = max(1.0, float(np.abs(noise_full).max()))
        assert _max_diff(noise_shallow, noise_full) <= shallow.atol * scale
        # and the deep feature matters: another one moves the prediction far past that
        other = ort_session(package.layout.graph(graphs.shallow, "fp32")).run(None, {**shallow_feed, DEEP_FEATURE: deep[::-1].copy()})[0]
        assert _max_diff(other, noise_full) > SENSITIVITY_FACTOR * shallow.atol * scale


# ------------------------------------------------------------------------------------------------
# The exact mode is untouched
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_interval_1_is_the_exact_mode(name, request):
    """cache_interval=1 runs the exact mode's graphs: the same image, bit for bit, and no
    step-cache engine is made."""
    fixture = request.getfixturevalue(name)
    runtime = BlipDiffusionRuntime.from_package(fixture.package, cache_size=0)
    exact = _ours(runtime, fixture, "pndm", 1, steps=3)
    height, width, latents, reference, condition = _inputs(runtime.config)
    default = runtime(PROMPT, reference, "dog", "dog", latents=latents, height=height, width=width,
                      num_inference_steps=3, neg_prompt=NEGATIVE, output_type="np",
                      condition_image=condition if fixture.controlnet else None).images
    np.testing.assert_array_equal(exact, default)
    assert not set(step_cache_components(runtime.config)) & set(runtime.engines)


# ------------------------------------------------------------------------------------------------
# Whole generations against diffusers + DeepCache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [2, 3, 5])
@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_generation_matches_diffusers_with_deepcache(name, scheduler, interval, request):
    fixture = request.getfixturevalue(name)
    runtime = _runtime(fixture)
    expected = _reference(fixture, scheduler, interval)
    got = _ours(runtime, fixture, scheduler, interval)
    assert got.shape == expected.shape
    diff = _max_diff(got, expected)
    assert diff <= PARITY_ATOL, f"interval {interval}: image differs from diffusers + DeepCache by {diff:.2e}"


@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_mistakes_fail_the_comparison(name, request, monkeypatch):
    """Each mistake the comparison above must catch moves the image at least SENSITIVITY_FACTOR x
    its tolerance from the reference (interval 3, PNDM): caching the wrong layer (DeepCache's
    branch 1 instead of 0), a schedule off by one call, omitting ControlNet's first residual on
    shallow steps; and the mode is not the exact mode on these weights."""
    fixture = request.getfixturevalue(name)
    runtime = _runtime(fixture)
    expected = _reference(fixture, "pndm", 3)
    moved = {
        "wrong layer cached (branch 1)": _max_diff(_reference(fixture, "pndm", 3, branch=1), expected),
        "exact mode": _max_diff(_ours(runtime, fixture, "pndm", 1), expected),
    }
    with monkeypatch.context() as patch:  # full steps on calls 0, 1, 4, 7: the count started one call late
        patch.setattr(StepCache, "next_is_full", lambda self: self.calls == 0 or (self.calls - 1) % self.interval == 0)
        moved["schedule off by one"] = _max_diff(_ours(runtime, fixture, "pndm", 3), expected)
    if fixture.controlnet:
        shallow = runtime.engine(CONTROLNET_STEP_CACHE.controlnet)
        original = shallow.infer
        with monkeypatch.context() as patch:
            patch.setattr(shallow, "infer", lambda feed, keep=(): {
                k: np.zeros_like(v) for k, v in original(feed).items()})
            moved["no ControlNet residual on shallow steps"] = _max_diff(_ours(runtime, fixture, "pndm", 3), expected)
    weak = {label: value for label, value in moved.items() if value < SENSITIVITY_FACTOR * PARITY_ATOL}
    assert not weak, f"mistakes that move the image less than {SENSITIVITY_FACTOR}x the tolerance: {weak} (all: {moved})"


def test_schedule_counts_unet_calls():
    """Full on call 0 and every interval-th call after it, whatever the timesteps (PNDM repeats one)."""
    cache = StepCache(3, PLAIN_STEP_CACHE)
    full = []
    for _ in range(8):
        full.append(cache.next_is_full())
        cache.calls += 1
    assert full == [True, False, False, True, False, False, True, False]


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, 10**6])
def test_bad_cache_interval_is_one_line(tiny, value):
    runtime = _runtime(tiny)
    height, width, latents, reference, _ = _inputs(runtime.config)
    with pytest.raises(InputError, match=r"^cache_interval must be an integer in \[1, \d+\], got"):
        runtime(PROMPT, reference, "dog", "dog", latents=latents, height=height, width=width, num_inference_steps=2,
                cache_interval=value)


def test_edit_and_invert_refuse_fast_mode(tiny):
    runtime = _runtime(tiny)
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match=r"^cache_interval 3 is for generation only: edit runs every UNet call"):
        runtime.edit("on a beach", image, "dog", "dog", "cat", num_inference_steps=2, cache_interval=3)
    with pytest.raises(InputError, match=r"^cache_interval 2 is for generation only: invert runs every UNet call"):
        runtime.invert(image, "on a beach", "cat", num_inference_steps=2, cache_interval=2)


# ------------------------------------------------------------------------------------------------
# The GPU backends keep the deep feature on the device (stand-ins: tests/fakes/)
# ------------------------------------------------------------------------------------------------


def _deep_feature_bytes(runtime, fixture) -> int:
    config = runtime.config
    height, width = _inputs(config)[:2]
    f = config.latent_scale_factor
    return 2 * config.step_cache_channels * (height // f) * (width // f) * 4  # guidance batch, float32


def _spy_deep_feature(engine, seen: list):
    original = engine.infer

    def spy(feed, keep=()):
        seen.append(feed[DEEP_FEATURE])
        return original(feed, keep)

    engine.infer = spy


@pytest.mark.slow
def test_cuda_backend_keeps_the_deep_feature_on_the_device(fake_ort_gpu, tiny_cn):
    """On the cuda backend (IO binding) the deep feature goes from the full-step engine to the
    shallow one as an OrtValue, never copied to the host; the image is the cpu backend's."""
    with BlipDiffusionRuntime.from_package(tiny_cn.package, verify=False, cpu_fused=False, threads=1) as cpu:
        expected = _ours(cpu, tiny_cn, "pndm", 3)
    gpu = fake_ort_gpu.gpu
    seen: list = []
    with BlipDiffusionRuntime.from_package(tiny_cn.package, "cuda", verify=False, cache_size=0) as runtime:
        _spy_deep_feature(runtime.engine(CONTROLNET_STEP_CACHE.shallow), seen)
        got = _ours(runtime, tiny_cn, "pndm", 3)
        deep_bytes = _deep_feature_bytes(runtime, tiny_cn)
    assert _max_diff(got, expected) <= 1e-5
    assert seen and all(isinstance(value, fake_ort_gpu.OrtValue) for value in seen)
    assert not [copy for copy in gpu.d2h if copy[1] == deep_bytes], "the deep feature was copied to the host"


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_tensorrt_keeps_the_deep_feature_on_the_device(tiny_cn, fake_trt, monkeypatch, tmp_path, shapes):
    """TensorRT (plans for the step-cache graphs, dynamic and static): the deep feature is a
    DeviceTensor handed to the shallow engine, never copied to the host; the image is the cpu
    backend's."""
    from blipdiffusion_trt.components import generation_components
    from blipdiffusion_trt.engines.build import build_engines
    from blipdiffusion_trt.runtime.backends import tensorrt

    from fakes.cuda import FAKE_CUDA
    from fakes.tensorrt import FAKE_RUNNING
    from helpers import copy_package

    monkeypatch.setattr(tensorrt, "import_cudart", lambda: FAKE_CUDA)
    monkeypatch.setattr(tensorrt, "_running_here", lambda: dict(FAKE_RUNNING))
    monkeypatch.delenv(tensorrt.CUDA_GRAPH_ENV, raising=False)
    package_dir = copy_package(tiny_cn, tmp_path)
    config = ModelPackage.open(package_dir).config
    build_engines(package_dir, shapes=shapes, components=generation_components(config) + step_cache_components(config),
                  progress=False, **({"height": _inputs(config)[0], "width": _inputs(config)[1]} if shapes == "static" else {}))
    package = ModelPackage.open(package_dir)
    engines = {n: tensorrt.TENSORRT.make_engine(package, n, "fp16") for n in generation_components(config)}
    runtime = BlipDiffusionRuntime(package, engines, cache_size=0,
                                   load_engine=lambda c: tensorrt.TENSORRT.make_engine(package, c, "fp16"))
    seen: list = []
    _spy_deep_feature(runtime.engine(CONTROLNET_STEP_CACHE.shallow), seen)
    copies = []
    to_host = tensorrt.DeviceTensor.numpy
    monkeypatch.setattr(tensorrt.DeviceTensor, "numpy", lambda self: copies.append(self.shape) or to_host(self))
    got = _ours(runtime, tiny_cn, "pndm", 3)
    with BlipDiffusionRuntime.from_package(package_dir, verify=False, cpu_fused=False) as cpu:
        expected = _ours(cpu, tiny_cn, "pndm", 3)
    runtime.close()
    assert _max_diff(got, expected) <= 1e-6
    assert seen and all(isinstance(value, tensorrt.DeviceTensor) for value in seen)
    assert not [shape for shape in copies if len(shape) == 4 and shape[1] == config.step_cache_channels]


# ------------------------------------------------------------------------------------------------
# Another architecture (its fixtures are built last)
# ------------------------------------------------------------------------------------------------


def test_step_cache_graphs_are_declared_from_the_unet(tiny, tiny_cn, odd_cn, odd):
    """Branch 0's deep feature has the channels of the UNet's first block (its last up block's
    input besides conv_in's skip), for every architecture; a package without the graphs has none."""
    for fixture in (tiny, tiny_cn, odd_cn):
        config = ModelPackage.open(fixture.package).config
        assert config.step_cache_channels == config.unet_block_out_channels[0]
        package = ModelPackage.open(fixture.package)
        names = step_cache_components(config)
        assert names and all(name in package.specs for name in names)
        assert (CONTROLNET_STEP_CACHE.controlnet in names) == fixture.controlnet
        deep = next(t for t in package.specs[PLAIN_STEP_CACHE.full].outputs if t.name == DEEP_FEATURE)
        assert deep.shape_at("opt")[1] == config.step_cache_channels
    config = ModelPackage.open(odd.package).config
    assert not config.has_step_cache and step_cache_components(config) == []
    assert step_cache_graphs(config, control=False) is None


def test_odd_architecture_matches_diffusers_with_deepcache(odd_cn):
    """Three UNet blocks, latent factor 4, 40 text positions: the branch is read from the UNet, the
    split is exact and a generation matches diffusers + DeepCache."""
    _check_split(odd_cn)
    expected = _reference(odd_cn, "pndm", 3)
    diff = _max_diff(_ours(_runtime(odd_cn), odd_cn, "pndm", 3), expected)
    assert diff <= PARITY_ATOL, f"image differs from diffusers + DeepCache by {diff:.2e}"


def test_a_package_without_the_graphs_says_how_to_re_export(odd):
    runtime = BlipDiffusionRuntime.from_package(odd.package)
    height, width, latents, reference, _ = _inputs(runtime.config)
    with pytest.raises(InputError, match=r"^cache_interval 3 needs the step-cache graphs.*re-export it with "
                                         r"`blipdiffusion-trt export") as error:
        runtime(PROMPT, reference, "dog", "dog", latents=latents, height=height, width=width, num_inference_steps=2,
                cache_interval=3)
    assert "\n" not in str(error.value)


def test_generate_cli_refuses_a_package_without_the_graphs_in_one_line(odd, tmp_path):
    from PIL import Image

    from helpers import run_cli

    reference = tmp_path / "ref.png"
    Image.new("RGB", (40, 40), (200, 100, 50)).save(reference)
    proc = run_cli("generate", str(odd.package), "--prompt", "on a beach", "--reference-image", str(reference),
                   "--source-subject", "dog", "--target-subject", "dog", "--out", str(tmp_path / "out.png"),
                   "--steps", "2", "--cache-interval", "3")
    assert proc.returncode != 0 and not (tmp_path / "out.png").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cache-interval 3 needs the step-cache graphs"), proc.stderr
    assert "blipdiffusion-trt export CHECKPOINT --out DIR" in lines[0]
