"""Parity with diffusers' BLIP-Diffusion pipelines, and proof that the fixtures can catch mistakes.

Same checkpoint, same initial latents, guidance 7.5: query embeddings, text embeddings, every
step's latents and the final image must match diffusers within ``PARITY_ATOL`` (image in [0, 1]),
on every backend that runs on the CPU in an exact mode (``cpu``; ``openvino`` in f32).
Random weights are weak witnesses, so ``test_mistakes_move_the_image`` shows that each common
mistake moves the final image by at least ``SENSITIVITY_FACTOR`` times that tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINTS, load_diffusers, shared_runtime

torch = pytest.importorskip("torch", reason="parity tests compare against diffusers on torch (pip install .[export])")

from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime  # noqa: E402
from blipdiffusion_trt.runtime.text import build_prompts  # noqa: E402

PARITY_ATOL = 1e-3
SENSITIVITY_FACTOR = 10
PROMPT = "swimming underwater"
NEGATIVE = "low quality, blurry"
STEPS = 3

def inputs_for(config, seed: int = 0):
    """Non-square size, reference and condition images of other sizes, latents for that size."""
    rng = np.random.default_rng(seed)
    height = config.default_height
    width = config.default_width + config.image_multiple
    latents = rng.standard_normal(
        (1, config.latent_channels, height // config.latent_scale_factor, width // config.latent_scale_factor)
    ).astype(np.float32)
    reference = Image.fromarray(rng.integers(0, 256, (57, 43, 3), dtype=np.uint8))
    condition = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    return height, width, latents, reference, condition


def diffusers_run(pipe, scheduler: str, height, width, latents, reference, condition):
    """diffusers' pipeline with its scheduler's per-step latents and its embeddings recorded."""
    from diffusers import DDIMScheduler, PNDMScheduler

    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[scheduler]
    original_scheduler = pipe.scheduler
    pipe.scheduler = cls.from_config(original_scheduler.config)
    record: dict[str, list] = {"latents": [], "query": [], "text": []}
    step, get_query, encode = pipe.scheduler.step, pipe.get_query_embeddings, pipe.encode_prompt

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        record["latents"].append(out["prev_sample"].numpy().copy())
        return out

    def recording_query(*args, **kwargs):
        out = get_query(*args, **kwargs)
        record["query"].append(out.numpy().copy())
        return out

    def recording_encode(*args, **kwargs):
        out = encode(*args, **kwargs)
        record["text"].append(out.numpy().copy())
        return out

    pipe.scheduler.step, pipe.get_query_embeddings, pipe.encode_prompt = recording_step, recording_query, recording_encode
    try:
        args = (PROMPT, reference, condition, "dog", "dog") if condition is not None else (PROMPT, reference, "dog", "dog")
        image = pipe(
            *args, latents=torch.from_numpy(latents), guidance_scale=7.5, height=height, width=width,
            num_inference_steps=STEPS, neg_prompt=NEGATIVE, output_type="np",
        ).images
    finally:
        del pipe.get_query_embeddings, pipe.encode_prompt
        pipe.scheduler = original_scheduler
    return image, record


# ------------------------------------------------------------------------------------------------
# Whole generations against diffusers, on every backend that runs on this machine's CPU
# ------------------------------------------------------------------------------------------------

_openvino_runtimes: dict[str, BlipDiffusionRuntime] = {}


def _cpu_runtime(fixture, tmp_path_factory) -> BlipDiffusionRuntime:
    return shared_runtime(fixture)


def _openvino_runtime(fixture, tmp_path_factory) -> BlipDiffusionRuntime:
    """OpenVINO in its exact mode (f32), with a model cache of the test session's own."""
    pytest.importorskip("openvino", reason="the openvino backend needs OpenVINO (pip install .[openvino])")
    from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions

    if fixture.name not in _openvino_runtimes:
        options = OpenVINOOptions(inference_precision="f32", cache_dir=tmp_path_factory.mktemp("openvino-cache"))
        _openvino_runtimes[fixture.name] = BlipDiffusionRuntime.from_package(fixture.package, "openvino", options=options)
    return _openvino_runtimes[fixture.name]


def _compiled_once_in_f32(runtime: BlipDiffusionRuntime) -> None:
    """One size, one batch: each component compiled once, whatever ran before on this runtime, and
    in f32 (OpenVINO's CPU default is bf16 where the CPU has it, which would miss the tolerance)."""
    for engine in runtime.engines.values():
        assert engine.inference_precision == "f32"
        assert engine.compilations == 1, (engine.spec.name, engine.compiled_shapes)


# backend -> (its runtime for a fixture, what else must hold after a generation)
PARITY_BACKENDS = {
    "cpu": (_cpu_runtime, None),
    "openvino": (_openvino_runtime, _compiled_once_in_f32),
}


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("backend", [
    "cpu",
    pytest.param("openvino", marks=pytest.mark.slow),
])
def test_parity_with_diffusers(backend, name, scheduler, request, tmp_path_factory):
    fixture = request.getfixturevalue(name)
    load_runtime, check_after = PARITY_BACKENDS[backend]
    runtime = load_runtime(fixture, tmp_path_factory)
    config = runtime.config
    height, width, latents, reference, condition = inputs_for(config)
    condition = condition if fixture.controlnet else None
    expected, record = diffusers_run(load_diffusers(fixture), scheduler, height, width, latents, reference, condition)

    # query and text embeddings
    subject = runtime.encode_subject(reference, "dog")
    np.testing.assert_allclose(subject.embeddings, record["query"][0][0], atol=PARITY_ATOL, rtol=0)
    text = runtime._encode_prompt(build_prompts([PROMPT], ["dog"]), subject.embeddings[None])
    np.testing.assert_allclose(text, record["text"][0], atol=PARITY_ATOL, rtol=0)

    # every step's latents and the final image
    steps: list[np.ndarray] = []
    kwargs = {"condition_image": condition} if fixture.controlnet else {}
    out = runtime(
        PROMPT, reference, "dog", "dog", latents=latents, guidance_scale=7.5, height=height, width=width,
        num_inference_steps=STEPS, neg_prompt=NEGATIVE, scheduler=scheduler, output_type="np",
        callback=lambda i, t, x: steps.append(x.copy()), **kwargs,
    )
    assert len(steps) == len(record["latents"])
    for i, (ours, theirs) in enumerate(zip(steps, record["latents"])):
        diff = float(np.abs(ours - theirs).max())
        assert diff <= PARITY_ATOL, f"step {i}: latents differ by {diff:.2e}"
    assert out.images.shape == expected.shape == (1, height, width, 3)
    diff = float(np.abs(out.images - expected).max())
    assert diff <= PARITY_ATOL, f"final image differs by {diff:.2e}"
    if check_after is not None:
        check_after(runtime)


def _mistakes(fixture, reference, condition, config):
    width, height = reference.size
    cases = {
        "BGR instead of RGB": dict(reference=Image.fromarray(np.asarray(reference)[..., ::-1].copy())),
        "centre crop of the subject": dict(reference=reference.crop((width // 8, height // 8, width - width // 8, height - height // 8))),
        # the VAE's [-1, 1] convention instead of the package's CLIP statistics
        "mean/std 0.5 instead of the package's": dict(config=dataclasses.replace(config, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))),
        "latents not divided by the VAE scaling factor": dict(config=dataclasses.replace(config, vae_scaling_factor=1.0)),
        "wrong subject word": dict(word="cat"),
        "no negative prompt": dict(negative=""),
    }
    if fixture.controlnet:
        cases["black condition image"] = dict(condition=Image.new("RGB", condition.size))
    return cases


@pytest.mark.parametrize("name", ["tiny", "tiny_cn", "odd_cn"])
def test_mistakes_move_the_image(name, request):
    """Each mistake a parity test must catch moves the final image far past the parity tolerance."""
    fixture = request.getfixturevalue(name)
    runtime = BlipDiffusionRuntime.from_package(fixture.package, cache_size=0)
    config = runtime.config
    height, width, latents, reference, condition = inputs_for(config)

    def generate(reference=reference, word="dog", condition=condition, negative=NEGATIVE, config=config):
        runtime.config = config
        try:
            kwargs = {"condition_image": condition} if fixture.controlnet else {}
            return runtime(
                PROMPT, reference, word, "dog", latents=latents, height=height, width=width,
                num_inference_steps=STEPS, neg_prompt=negative, output_type="np", **kwargs,
            ).images
        finally:
            runtime.config = runtime.package.config
            runtime._negative_cache.clear()

    base = generate()
    moved = {label: float(np.abs(generate(**case) - base).max()) for label, case in _mistakes(fixture, reference, condition, config).items()}
    weak = {label: value for label, value in moved.items() if value < SENSITIVITY_FACTOR * PARITY_ATOL}
    assert not weak, f"mistakes that move the image less than {SENSITIVITY_FACTOR}x the tolerance: {weak} (all: {moved})"


def test_euler_against_reference_loop(tiny):
    """Euler: diffusers' BLIP pipeline skips scale_model_input (a bug); we do it, as this loop does.

    The reference loop is diffusers' own pipeline code path on torch with the missing call added.
    """
    from diffusers import EulerDiscreteScheduler

    pipe = load_diffusers(tiny)
    runtime = shared_runtime(tiny)
    config = runtime.config
    height, width, latents, reference, _ = inputs_for(config)
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(reference, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt")["pixel_values"]
        query = pipe.get_query_embeddings(pixels, ["dog"])
        text = pipe.encode_prompt(query, pipe._build_prompt([PROMPT], ["dog"]))
        uncond_ids = pipe.tokenizer([NEGATIVE], padding="max_length", max_length=config.text_max_length, return_tensors="pt").input_ids
        uncond = pipe.text_encoder(input_ids=uncond_ids, ctx_embeddings=None)[0]
        embeddings = torch.cat([uncond, text])
        x = torch.from_numpy(latents) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample
            uncond_noise, text_noise = noise.chunk(2)
            x = scheduler.step(uncond_noise + 7.5 * (text_noise - uncond_noise), t, x).prev_sample
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        expected = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out = runtime(PROMPT, reference, "dog", "dog", latents=latents, height=height, width=width,
                  num_inference_steps=STEPS, neg_prompt=NEGATIVE, scheduler="euler", output_type="np")
    diff = float(np.abs(out.images - expected).max())
    assert diff <= PARITY_ATOL, f"Euler image differs from the reference loop by {diff:.2e}"
    # diffusers' BLIP pipeline with Euler (no scale_model_input) gives a different image: documented.
    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        buggy = pipe(PROMPT, reference, "dog", "dog", latents=torch.from_numpy(latents), height=height, width=width,
                     num_inference_steps=STEPS, neg_prompt=NEGATIVE, output_type="np").images
    finally:
        pipe.scheduler = original
    assert float(np.abs(buggy - expected).max()) > SENSITIVITY_FACTOR * PARITY_ATOL
