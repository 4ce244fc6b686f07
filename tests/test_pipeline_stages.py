"""The generation's stages as separate methods: composed by hand they are ``__call__``; each is
usable alone (plain-text encoding, a denoising loop with another flow's UNet feed, decoding);
input errors carry the field they are about."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from blipdiffusion_trt.errors import InputError
from blipdiffusion_trt.runtime.inputs import GenerationInputs

from conftest import shared_runtime


def _reference(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 26, 3), dtype=np.uint8))


def _latents(runtime, seed: int = 1, batch: int = 1) -> np.ndarray:
    cfg = runtime.config
    shape = (batch, cfg.latent_channels, cfg.default_height // cfg.latent_scale_factor,
             cfg.default_width // cfg.latent_scale_factor)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", ["tiny", "tiny_cn"])
def test_stages_composed_by_hand_are_the_call(request, name):
    fixture = request.getfixturevalue(name)
    runtime = shared_runtime(fixture)
    reference, latents = _reference(), _latents(runtime)
    control = {"condition_image": _reference(5)} if fixture.controlnet else {}
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, neg_prompt="blurry", scheduler="ddim", **control)
    expected = runtime("on a beach", reference, "dog", "dog", latents=latents, output_type="np", **kwargs).images

    inputs = runtime._check_inputs("on a beach", reference, "dog", "dog", latents=latents, **kwargs)
    assert isinstance(inputs, GenerationInputs) and inputs.prompts == ["on a beach"] and inputs.targets == ["dog"]
    assert (inputs.height, inputs.width) == (runtime.config.default_height, runtime.config.default_width)
    subject = runtime._encode_subjects(inputs.references, inputs.sources)
    text = runtime._encode_text(inputs.prompts, inputs.targets, subject, guidance_scale=inputs.guidance_scale,
                               neg_prompt=inputs.neg_prompt)
    assert text.shape[0] == 2  # [negative; positive]
    scheduler = runtime._prepare_scheduler(inputs.scheduler, inputs.num_inference_steps)
    start = runtime._prepare_latents(inputs.latent_shape, scheduler, latents=inputs.latents)
    condition = None
    if fixture.controlnet:
        condition = runtime._prepare_control(inputs.height, inputs.width, text.shape[0],
                                            condition_image=inputs.condition_image)
    final = runtime._denoise(start, scheduler, text, guidance_scale=inputs.guidance_scale, control=condition)
    np.testing.assert_array_equal(runtime._decode_latents(final), expected)

    # the same loop with another flow's own UNet feed: [negative; positive] built by hand
    scheduler = runtime._prepare_scheduler(inputs.scheduler, inputs.num_inference_steps)
    start = runtime._prepare_latents(inputs.latent_shape, scheduler, latents=inputs.latents)

    def predict(sample, t):
        doubled = scheduler.scale_model_input(np.concatenate([sample, sample]), t).astype(np.float32)
        uncond, cond = np.split(runtime._predict_noise(doubled, t, text, condition), 2)
        return uncond + inputs.guidance_scale * (cond - uncond)

    steps = []
    final = runtime._denoise(start, scheduler, predict=predict, callback=lambda i, t, x: steps.append(i))
    assert steps == list(range(inputs.num_inference_steps))
    np.testing.assert_allclose(runtime._decode_latents(final), expected, rtol=0, atol=1e-6)


def test_plain_prompt_encoding(tiny):
    runtime = shared_runtime(tiny)
    cfg = runtime.config
    embeddings = runtime._encode_plain_prompt(["a dog", "a cat on a sofa"])
    assert embeddings.shape == (2, cfg.text_max_length, cfg.text_hidden_size)
    assert not np.allclose(embeddings[0], embeddings[1])
    np.testing.assert_array_equal(runtime._encode_negative_prompt("a cat on a sofa")[0], embeddings[1])


def test_decode_latents_gives_images_in_unit_range(tiny):
    runtime = shared_runtime(tiny)
    images = runtime._decode_latents(_latents(runtime, batch=2))
    cfg = runtime.config
    assert images.shape == (2, cfg.default_height, cfg.default_width, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("overrides, field", [
    ({"height": 7}, "height"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"scheduler": "heun"}, "scheduler"),
    ({"reference_image": None}, "reference_image"),
    ({"target_subject_category": ""}, "target_subject_category"),
    ({"latents": np.zeros((1, 1, 1, 1), np.float32)}, "latents"),
    ({"condition_image": _reference(3)}, "condition_image"),
])
def test_input_errors_carry_their_field(tiny, overrides, field):
    runtime = shared_runtime(tiny)
    kwargs = dict(prompt="a photo", reference_image=_reference(), source_subject_category="dog",
                  target_subject_category="dog", num_inference_steps=2, output_type="np")
    kwargs.update(overrides)
    with pytest.raises(InputError) as e:
        runtime._check_inputs(**{k: v for k, v in kwargs.items()})
    assert e.value.field == field, str(e.value)
    renamed = e.value.renamed("--option")
    assert "--option" in str(renamed) and renamed.field == field and "\n" not in str(renamed)


def test_renamed_replaces_the_leading_field_only():
    error = InputError("height must be a multiple of 8, got 7", field="height")
    assert str(error.renamed("--height")) == "--height must be a multiple of 8, got 7"
    other = InputError("unknown scheduler 'x'; allowed: pndm", field="scheduler")
    assert str(other.renamed("--scheduler")) == "--scheduler: unknown scheduler 'x'; allowed: pndm"
