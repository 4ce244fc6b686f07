"""TensorRT optimization profiles from the component declarations (no TensorRT needed).

Profiles of real test packages and of the full-size architecture's pipeline config (as export
writes it, read from ``configs/blipdiffusion-full.json`` without weights), checked against the
exported ONNX graphs and run through ONNX Runtime at their min/opt/max points; option errors.
"""

from __future__ import annotations


import pytest

from blipdiffusion_trt.components import PipelineConfig, controlnet_residual_shapes, declare_components
from blipdiffusion_trt.engines.profiles import (
    axis_ranges,
    check_shape,
    component_profiles,
    parse_range,
    profile_from_json,
    profile_to_json,
)
from blipdiffusion_trt.errors import InputError

from helpers import fixture_config, onnx_inputs, vocab_bound


def _expected_static(cfg: PipelineConfig, batch: int, height: int, width: int) -> dict[str, dict[str, tuple]]:
    """The static shapes written out from the config, independently of profiles.py."""
    f = cfg.latent_scale_factor
    lh, lw = height // f, width // f
    ub = 2 * batch
    unet = {
        "sample": (ub, cfg.latent_channels, lh, lw),
        "timestep": (ub,),
        "encoder_hidden_states": (ub, cfg.text_max_length, cfg.text_hidden_size),
    }
    down, (mid_ch, mid_scale) = controlnet_residual_shapes(cfg, ub, lh, lw)
    residuals = {f"down_block_res_{i}": (ub, ch, lh // s, lw // s) for i, (ch, s) in enumerate(down)}
    residuals["mid_block_res"] = (ub, mid_ch, lh // mid_scale, lw // mid_scale)
    expected = {
        "text_encoder": {"input_ids": (batch, cfg.text_length),
                         "ctx_embeddings": (batch, cfg.num_query_tokens, cfg.text_hidden_size)},
        "text_encoder_plain": {"input_ids": (batch, cfg.text_max_length)},
        "unet": {**unet, **residuals},
        "unet_plain": unet,
        "vae_decoder": {"latents": (batch, cfg.latent_channels, lh, lw)},
    }
    if cfg.has_controlnet:
        expected["controlnet"] = {**unet, "controlnet_cond": (ub, cfg.controlnet_conditioning_channels, height, width),
                                  "conditioning_scale": (1,)}
    if cfg.has_editing:
        expected["vae_encoder"] = {"image": (batch, 3, height, width)}
        tokens = cfg.text_max_length
        expected["unet_p2p"] = {"cross_weights": (tokens,), "token_map": (tokens, tokens), "self_gate": (1,)}
    return expected


def _check_static(cfg: PipelineConfig, profiles, batch: int, height: int, width: int) -> None:
    expected = _expected_static(cfg, batch, height, width)
    assert set(profiles) == set(declare_components(cfg))
    for component, inputs in expected.items():
        for name, shape in inputs.items():
            assert profiles[component][name] == (shape, shape, shape), (component, name)
    # The Q-Former's text is padded to the longest word: its length keeps the declared range.
    qformer = profiles["qformer"]
    text_axis = declare_components(cfg)["qformer"].axes["qformer_text_length"]
    low, opt, high = qformer["input_ids"]
    assert (low[1], opt[1], high[1]) == (text_axis.min, text_axis.opt, text_axis.max)
    assert low[0] == opt[0] == high[0] == batch
    assert qformer["pixel_values"][0] == (batch, 3, *cfg.image_size)
    # An edit's UNet rows: 2 (no guidance), 3 (a real image), 4 (a generated image with guidance),
    # whatever the generation batch; the rest of its shapes are the generation size's.
    if cfg.has_editing:
        f = cfg.latent_scale_factor
        rows = {"sample": (cfg.latent_channels, height // f, width // f), "timestep": (),
                "encoder_hidden_states": (cfg.text_max_length, cfg.text_hidden_size)}
        for name, rest in rows.items():
            assert profiles["unet_p2p"][name] == ((2, *rest), (4, *rest), (4, *rest)), name


@pytest.mark.parametrize("name", ["tiny", "tiny_cn", "odd"])
def test_static_profiles_from_package_declarations(request, name):
    fixture = request.getfixturevalue(name)
    cfg = fixture_config(fixture)
    _check_static(cfg, component_profiles(cfg), 1, cfg.default_height, cfg.default_width)
    # another size and batch: latent and residual sizes follow the pixel size
    height, width = cfg.default_height + cfg.image_multiple, cfg.default_width - cfg.image_multiple
    batch = min(2, cfg.max_batch_size)
    _check_static(cfg, component_profiles(cfg, batch=batch, height=height, width=str(width)), batch, height, width)


def test_static_profiles_full_size(full_cfg):
    cfg = full_cfg
    profiles = component_profiles(cfg)
    _check_static(cfg, profiles, 1, cfg.default_height, cfg.default_width)
    f = cfg.latent_scale_factor
    assert profiles["unet"]["sample"][0] == (2, cfg.latent_channels, cfg.default_height // f, cfg.default_width // f)
    assert profiles["controlnet"]["controlnet_cond"][1] == (2, 3, cfg.default_height, cfg.default_width)


def test_static_default_size_is_read_from_the_package(tiny, odd):
    """No 512 anywhere: the static size is each package's default_height/default_width."""
    for fixture in (tiny, odd):
        cfg = fixture_config(fixture)
        ranges = axis_ranges(cfg)
        assert ranges["height"] == (cfg.default_height,) * 3 and ranges["width"] == (cfg.default_width,) * 3
        assert ranges["latent_height"] == (cfg.default_height // cfg.latent_scale_factor,) * 3
    assert fixture_config(tiny).default_height != fixture_config(odd).default_height or fixture_config(tiny).latent_scale_factor != fixture_config(odd).latent_scale_factor


@pytest.mark.parametrize("name", ["tiny_cn", "odd"])
def test_dynamic_profiles_are_the_declared_ranges(request, name):
    fixture = request.getfixturevalue(name)
    cfg = fixture_config(fixture)
    specs = declare_components(cfg)
    profiles = component_profiles(cfg, "dynamic")
    for component, spec in specs.items():
        for tensor in spec.inputs:
            low, opt, high = profiles[component][tensor.name]
            declared = tuple(tensor.shape_at(p) for p in ("min", "opt", "max"))
            assert (low, opt, high) == declared, (component, tensor.name)
    ranges = axis_ranges(cfg, "dynamic")
    assert ranges["unet_batch"] == (1, 2, 2 * cfg.max_batch_size)


def test_dynamic_profiles_narrowed_by_options(tiny_cn, full_cfg):
    for cfg in (fixture_config(tiny_cn), full_cfg):
        m, f = cfg.image_multiple, cfg.latent_scale_factor
        h = (cfg.min_image_size, cfg.default_height, cfg.default_height + 2 * m)
        ranges = axis_ranges(cfg, "dynamic", batch="1:2:3", height=f"{h[0]}:{h[1]}:{h[2]}", width=cfg.default_width)
        assert ranges["batch"] == (1, 2, 3)
        assert ranges["unet_batch"] == (1, 4, 6)
        assert ranges["height"] == h and ranges["width"] == (cfg.default_width,) * 3
        assert ranges["latent_height"] == tuple(v // f for v in h)
        for scale in (2, 4):
            if f"latent_height_{scale}" in ranges:
                assert ranges[f"latent_height_{scale}"] == tuple(v // f // scale for v in h)
        profiles = component_profiles(cfg, "dynamic", batch="1:2:3", height=f"{h[0]}:{h[1]}:{h[2]}",
                                      width=cfg.default_width)
        channels = cfg.controlnet_conditioning_channels
        assert profiles["controlnet"]["controlnet_cond"] == tuple(
            (b, channels, v, cfg.default_width) for b, v in zip((1, 4, 6), h))
        assert profiles["vae_decoder"]["latents"] == tuple(
            (b, cfg.latent_channels, v // f, cfg.default_width // f) for b, v in zip((1, 2, 3), h))


def _bad_options(cfg: PipelineConfig):
    m, lo, hi, mb = cfg.image_multiple, cfg.min_image_size, cfg.max_image_size, cfg.max_batch_size
    d = cfg.default_height
    return [
        ({"shapes": "fast"}, "--shapes", "static, dynamic"),
        ({"batch": 0}, "--batch", f"[1, {mb}]"),
        ({"batch": mb + 1}, "--batch", f"[1, {mb}]"),
        ({"batch": "two"}, "--batch", "MIN:OPT:MAX"),
        ({"batch": "1:2"}, "--batch", "MIN:OPT:MAX"),
        ({"height": d + 1}, "--height", f"multiple of {m} in [{lo}, {hi}]"),
        ({"width": hi + m}, "--width", f"multiple of {m} in [{lo}, {hi}]"),
        ({"height": 0}, "--height", f"multiple of {m} in [{lo}, {hi}]"),
        ({"shapes": "dynamic", "height": f"{d}:{lo}:{hi}"}, "--height", "MIN <= OPT <= MAX"),
        ({"shapes": "dynamic", "width": f"{lo}:{d}:{hi + m}"}, "--width", f"[{lo}, {hi}]"),
        ({"shapes": "dynamic", "batch": f"2:1:{mb}"}, "--batch", "MIN <= OPT <= MAX"),
        ({"shapes": "static", "batch": f"1:1:{mb}"}, "--batch", "--shapes dynamic"),
    ]


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_bad_profile_options_are_one_line_errors(request, name, full_cfg):
    for cfg in (fixture_config(request.getfixturevalue(name)), full_cfg):
        for kwargs, option, allowed in _bad_options(cfg):
            kwargs = dict(kwargs)
            shapes = kwargs.pop("shapes", "static")
            with pytest.raises(InputError) as info:
                axis_ranges(cfg, shapes, **kwargs)
            message = str(info.value)
            assert option in message and allowed in message and "\n" not in message, (kwargs, message)
    with pytest.raises(InputError, match="--components: unknown nope"):
        component_profiles(full_cfg, components=["unet", "nope"])


def test_parse_range_and_check_shape():
    assert parse_range("--batch", None) is None
    assert parse_range("--batch", 2) == (2, 2, 2)
    assert parse_range("--batch", " 1 : 2 : 4 ") == (1, 2, 4)
    assert parse_range("--batch", (1, 1, 3)) == (1, 1, 3)
    for bad in ("", "1:2:3:4", "a", True, 1.5j):
        with pytest.raises(InputError):
            parse_range("--batch", bad)
    profile = ((1, 4, 8), (2, 4, 8), (4, 4, 16))
    assert check_shape("x", (3, 4, 10), profile) is None
    assert "outside the engine's profile" in check_shape("x", (5, 4, 8), profile)
    assert "dimensions" in check_shape("x", (5, 4), profile)
    assert "built for exactly" in check_shape("x", (1, 4, 8), ((2, 4, 8),) * 3)
    assert profile_from_json(profile_to_json({"x": profile})) == {"x": profile}


@pytest.mark.parametrize("name", ["tiny_cn", "odd"])
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_profiles_fit_the_exported_graphs(request, name, shapes):
    """What TensorRT would check: ranks, fixed dims equal, dynamic dims where the graph has them;
    and the min/opt/max points are joint shapes the graph runs at (ONNX Runtime fp32)."""
    import onnxruntime as ort

    from blipdiffusion_trt.export.graphs import example_inputs

    fixture = request.getfixturevalue(name)
    cfg = fixture_config(fixture)
    ranges = axis_ranges(cfg, shapes)
    profiles = component_profiles(cfg, shapes)
    vocab = vocab_bound(fixture.package)
    for component, spec in declare_components(cfg).items():
        graph = fixture.package / "onnx" / "fp32" / f"{component}.onnx"
        inputs = onnx_inputs(graph)
        assert set(inputs) <= set(profiles[component]), component
        for input_name, dims in inputs.items():
            low, opt, high = profiles[component][input_name]
            assert len(dims) == len(low), (component, input_name)
            for d, a, b, c in zip(dims, low, opt, high):
                if isinstance(d, int) and d > 0:
                    assert a == b == c == d, (component, input_name, dims, low)
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        points = [0, 2] if shapes == "dynamic" else [1]
        for index in points:
            point = {axis: r[index] for axis, r in ranges.items()}
            if component == "qformer" and index == 2:
                point["qformer_text_length"] = min(point["qformer_text_length"], 16)  # keep the CPU run short
            feed = example_inputs(spec, point, vocab_sizes={k: vocab for k in ("qformer", "text_encoder", "text_encoder_plain")})
            for input_name, array in feed.items():
                assert check_shape(input_name, array.shape, profiles[component][input_name]) is None
            outputs = session.run(None, feed)
            for tensor, out in zip(spec.outputs, outputs):
                assert out.shape == tensor.shape_at(point), (component, tensor.name)


