"""The editing graphs against PyTorch: ``vae_encoder`` vs diffusers, ``unet_p2p`` vs diffusers'
UNet (control off) and vs the reference attention processors of tests/p2p_reference.py (control on).

Tolerance: ``spec.atol`` (1e-4), the per-component tolerance every exported graph is validated
with. ``unet_p2p`` computes the reference's explicit-probability control with fused attention and
the algebra of export/p2p.py: the same products in another order, float32 rounding of order 1e-6
relative on outputs of order 1-10 on any x86 CPU, so 1e-4 leaves a wide margin. The control's
effect on the outputs is shown to be far larger than the tolerance, so the comparison can fail.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="graph tests compare against diffusers (pip install .[export])")
torch = pytest.importorskip("torch", reason="graph tests compare against torch (pip install .[export])")
onnx = pytest.importorskip("onnx", reason="graph tests need onnx (the export extra)")
ort = pytest.importorskip("onnxruntime", reason="graph tests need onnxruntime")

from blipdiffusion_trt.components import PipelineConfig, declare_components  # noqa: E402
from blipdiffusion_trt.export.graphs import export_point, second_point  # noqa: E402
from blipdiffusion_trt.export.p2p import layer_downsample, p2p_processors, P2PAttnProcessor, P2PControl  # noqa: E402
from blipdiffusion_trt.package import PackageLayout, layout  # noqa: E402
from blipdiffusion_trt.runtime.p2p import token_map_matrix  # noqa: E402

from conftest import EDITING_FIXTURES, load_diffusers  # noqa: E402
from helpers import fixture_config  # noqa: E402
from p2p_reference import find_levels, reference_unet_call  # noqa: E402

pytestmark = pytest.mark.slow

VARIANTS = ["fp32", layout.CPU_FUSED]
# the control must move the outputs by this many times the tolerance (else the test could not fail)
SENSITIVITY_FACTOR = 100

_sessions: dict[str, object] = {}


def _session(fixture, component: str, variant: str = "fp32"):
    path = PackageLayout(fixture.package).graph(component, variant)
    if str(path) not in _sessions:
        _sessions[str(path)] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _sessions[str(path)]


def _run(fixture, component: str, feed: dict, variant: str = "fp32") -> list[np.ndarray]:
    return _session(fixture, component, variant).run(None, feed)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _config(fixture) -> PipelineConfig:
    return fixture_config(fixture)


def _non_square(config: PipelineConfig) -> tuple[int, int]:
    """A non-square size inside the declared range: default height, one multiple wider."""
    return config.default_height, config.default_width + config.image_multiple


def _unet_feed(config, rows: int, height: int, width: int, rng) -> dict[str, np.ndarray]:
    f = config.latent_scale_factor
    return {
        "sample": rng.standard_normal((rows, config.latent_channels, height // f, width // f)).astype(np.float32),
        "timestep": np.full((rows,), rng.uniform(50, 950), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, config.text_max_length, config.text_hidden_size)).astype(np.float32),
    }


def _control(config, rng, *, alpha: float, gate: float) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """unet_p2p's control inputs, and the mapper / beta they come from."""
    tokens = config.text_max_length
    mapper = rng.integers(0, tokens, size=tokens)
    beta = rng.integers(0, 2, size=tokens).astype(np.float32)
    feed = {"cross_weights": (alpha * beta).astype(np.float32), "token_map": token_map_matrix(mapper),
            "self_gate": np.array([gate], dtype=np.float32)}
    return feed, mapper, beta


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(params=EDITING_FIXTURES)
def edit_fixture(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------
# vae_encoder
# ---------------------------------------------------------------------------------------------

def test_vae_encoder_matches_diffusers(edit_fixture):
    pipe = load_diffusers(edit_fixture)
    config = _config(edit_fixture)
    spec = declare_components(config)["vae_encoder"]
    height, width = _non_square(config)
    points = [export_point(spec), second_point(spec), {"batch": 1, "height": height, "width": width}]
    for point in points:
        shape = spec.inputs[0].shape_at(point)
        image = _rng(edit_fixture.name, "vae_encoder", shape).uniform(-1, 1, size=shape).astype(np.float32)
        with torch.no_grad():
            posterior = pipe.vae.encode(torch.from_numpy(image.copy())).latent_dist
        mean, logvar = _run(edit_fixture, "vae_encoder", {"image": image})
        assert mean.shape == logvar.shape == tuple(posterior.mean.shape)
        for name, got, expected in (("mean", mean, posterior.mean), ("logvar", logvar, posterior.logvar)):
            diff = _max_diff(got, expected.numpy())
            assert diff <= spec.atol, f"vae_encoder {name} at {shape}: {diff:.2e} > {spec.atol}"


def test_vae_encoder_fp16(tiny):
    spec = declare_components(_config(tiny))["vae_encoder"]
    shape = spec.inputs[0].shape_at(export_point(spec))
    image = _rng("fp16 vae_encoder").uniform(-1, 1, size=shape).astype(np.float32)
    got = np.concatenate([o.ravel() for o in _run(tiny, "vae_encoder", {"image": image}, "fp16")])
    expected = np.concatenate([o.ravel() for o in _run(tiny, "vae_encoder", {"image": image})])
    cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert np.isfinite(got).all() and cosine >= spec.fp16_min_cosine


# ---------------------------------------------------------------------------------------------
# unet_p2p
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [4, 3, 2])
def test_unet_p2p_with_control_off_equals_unet_plain(edit_fixture, variant, rows):
    """Weights 0 and the gate off: the plain UNet (graph and diffusers) on the same rows."""
    pipe = load_diffusers(edit_fixture)
    config = _config(edit_fixture)
    spec = declare_components(config)["unet_p2p"]
    rng = _rng(edit_fixture.name, "control off", rows)
    feed = _unet_feed(config, rows, *_non_square(config), rng)
    control, _, _ = _control(config, rng, alpha=0.0, gate=0.0)
    noise, maps = _run(edit_fixture, "unet_p2p", {**feed, **control}, variant)
    plain = _run(edit_fixture, "unet_plain", feed)[0]
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(feed["sample"].copy()), torch.from_numpy(feed["timestep"].copy()),
                             encoder_hidden_states=torch.from_numpy(feed["encoder_hidden_states"].copy())).sample.numpy()
    assert _max_diff(noise, plain) <= spec.atol
    assert _max_diff(noise, expected) <= spec.atol
    assert maps.shape == spec.outputs[1].shape_at({"latent_height": feed["sample"].shape[2],
                                                    "latent_width": feed["sample"].shape[3],
                                                    **_map_axes(spec, feed["sample"].shape[2:])})


def _map_axes(spec, latent_hw) -> dict[str, int]:
    axes = {}
    for name in spec.axes:
        for i, latent in enumerate(("latent_height", "latent_width")):
            if name.startswith(latent + "_"):
                axes[name] = latent_hw[i] // int(name.rsplit("_", 1)[1])
    return axes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [4, 3])
def test_unet_p2p_matches_reference_processors(edit_fixture, variant, rows):
    """Control on (cross, self, both): noise_pred and the blend maps vs LAVIS-style processors."""
    pipe = load_diffusers(edit_fixture)
    config = _config(edit_fixture)
    spec = declare_components(config)["unet_p2p"]
    height, width = _non_square(config)
    rng = _rng(edit_fixture.name, "control on", variant, rows)
    feed = _unet_feed(config, rows, height, width, rng)
    latent_hw = feed["sample"].shape[2:]
    levels = find_levels(pipe.unet, torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                         torch.from_numpy(feed["encoder_hidden_states"]), latent_hw)
    outputs = {}
    for alpha, gate in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)):
        control, mapper, beta = _control(config, _rng(edit_fixture.name, "mapper", rows), alpha=alpha, gate=gate)
        noise, maps = _run(edit_fixture, "unet_p2p", {**feed, **control}, variant)
        expected_noise, expected_maps = reference_unet_call(
            pipe, levels, sample=feed["sample"], timestep=feed["timestep"], embeddings=feed["encoder_hidden_states"],
            mapper=torch.from_numpy(mapper), alphas=torch.from_numpy(beta), alpha=alpha, self_on=bool(gate),
        )
        where = f"alpha {alpha} gate {gate} rows {rows}"
        assert maps.shape == expected_maps.shape, where
        assert _max_diff(noise, expected_noise) <= spec.atol, f"noise_pred, {where}: {_max_diff(noise, expected_noise):.2e}"
        assert _max_diff(maps, expected_maps) <= spec.atol, f"maps, {where}: {_max_diff(maps, expected_maps):.2e}"
        outputs[(alpha, gate)] = noise
    # each control moves the target row far past the tolerance, and only the target row
    off = outputs[(0.0, 0.0)]
    for key in ((1.0, 0.0), (0.0, 1.0)):
        moved = _max_diff(outputs[key][-1], off[-1])
        assert moved > SENSITIVITY_FACTOR * spec.atol, f"control {key} moves the target only {moved:.2e}"
        assert _max_diff(outputs[key][:-1], off[:-1]) <= spec.atol, f"control {key} moved another row"


def test_unet_p2p_levels_match_the_unet(edit_fixture):
    """The declared map size and the layers export/p2p.py controls are those of the real UNet at a
    non-square size: blend maps at the deepest down level with cross-attention, self-attention
    replaced there and below, the large self-attention layers untouched (and fused on the CPU)."""
    pipe = load_diffusers(edit_fixture)
    config = _config(edit_fixture)
    spec = declare_components(config)["unet_p2p"]
    feed = _unet_feed(config, 2, *_non_square(config), _rng(edit_fixture.name, "levels"))
    latent_hw = feed["sample"].shape[2:]
    levels = find_levels(pipe.unet, torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                         torch.from_numpy(feed["encoder_hidden_states"]), latent_hw)
    declared = spec.outputs[1].shape_at({"latent_height": latent_hw[0], "latent_width": latent_hw[1],
                                         **_map_axes(spec, latent_hw)})
    assert declared[1:] == levels.map_hw
    processors = p2p_processors(pipe.unet, P2PControl())
    blend = sorted(n for n, p in processors.items() if isinstance(p, P2PAttnProcessor) and p.blend)
    assert blend == sorted(levels.blend_layers)
    controlled_self = {n for n, p in processors.items() if isinstance(p, P2PAttnProcessor) and not p.cross}
    assert controlled_self == {n for n in levels.seq if n.endswith("attn1.processor") and levels.seq[n] <= levels.blend_seq}
    num_levels = len(config.unet_block_out_channels)
    for name, length in levels.seq.items():  # the names' factors are the real sequence lengths
        factor = layer_downsample(name, num_levels)
        assert length == (latent_hw[0] // factor) * (latent_hw[1] // factor), name
    large_self = len([n for n in levels.seq if n.endswith("attn1.processor")]) - len(controlled_self)
    fused = onnx.load(str(PackageLayout(edit_fixture.package).graph("unet_p2p", layout.CPU_FUSED)),
                      load_external_data=False)
    attention = [n for n in fused.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    assert len(attention) == large_self, "the CPU fusion must find exactly the untouched self-attention layers"


def test_unet_p2p_fp16(tiny):
    config = _config(tiny)
    spec = declare_components(config)["unet_p2p"]
    rng = _rng("fp16 unet_p2p")
    feed = {**_unet_feed(config, 4, *_non_square(config), rng), **_control(config, rng, alpha=1.0, gate=1.0)[0]}
    for got, expected in zip(_run(tiny, "unet_p2p", feed, "fp16"), _run(tiny, "unet_p2p", feed)):
        x, y = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
        cosine = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        assert np.isfinite(x).all() and cosine >= spec.fp16_min_cosine
