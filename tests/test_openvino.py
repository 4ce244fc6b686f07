"""The openvino backend: tolerance against PyTorch, parity with diffusers, bf16 and INT8 weights
against f32, the compiled-model cache, shapes, and bad input.

- ``inference_precision="f32"``: every component against the ORIGINAL diffusers modules (as
  tests/test_export.py calls them) within the component's declared ``atol``, at the export point and
  a second point (other batch, other non-square size, shorter text). Whole generations against
  diffusers with identical latents are tests/test_parity.py's, parametrised over backends.
- bf16 (where the CPU runs it natively; skipped with the reason elsewhere): every component
  finite with cosine >= ``BF16_MIN_COSINE`` against f32; and bf16 moves the UNet past the f32
  tolerance, so the f32 tests would catch OpenVINO silently computing in bf16 (its CPU default
  where bf16 is native).
- INT8 weight-only compression: compressed components finite, cosine against f32 reported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

openvino = pytest.importorskip("openvino", reason="the openvino backend's tests need OpenVINO (pip install .[openvino])")
torch = pytest.importorskip("torch", reason="tolerance tests compare against diffusers on torch (pip install .[export])")

from blipdiffusion_trt.components import ComponentSpec, declare_components  # noqa: E402
from blipdiffusion_trt.errors import EngineError, InputError, PackageError  # noqa: E402
from blipdiffusion_trt.export.exporter import export_point, second_point  # noqa: E402
from blipdiffusion_trt.package import ModelPackage, sha256_file  # noqa: E402
from blipdiffusion_trt.runtime.backends import get_backend  # noqa: E402
from blipdiffusion_trt.runtime.backends import openvino as ove  # noqa: E402
from blipdiffusion_trt.runtime.backends.openvino import (  # noqa: E402
    WEIGHT_COMPRESSED_COMPONENTS,
    OpenVINOEngine,
    OpenVINOOptions,
    make_openvino_engine,
)
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime  # noqa: E402

from conftest import CHECKPOINTS, Fixture, load_diffusers  # noqa: E402
from helpers import REPO, cosine, fixture_config, run_cli  # noqa: E402
from test_parity import PARITY_ATOL  # noqa: E402

pytestmark = pytest.mark.slow

# bf16 keeps 8 significant bits (relative rounding 2^-9 per value); through a few dozen layers the
# output direction stays within this of fp32's, the bound the fp16 graphs meet (components.py).
BF16_MIN_COSINE = 0.999
# INT8 per-channel weights: a weight moves by at most half a step of (max - min) / 255.
INT8_MIN_COSINE = 0.99
# fixtures whose components, together, are every component (UNet with residuals, ControlNet, odd sizes)
CN_FIXTURES = [name for name, (_, controlnet, _, _) in CHECKPOINTS.items() if controlnet]


def _bf16_native() -> bool:
    return "BF16" in ove.cpu_capabilities()


needs_bf16 = pytest.mark.skipif(
    not _bf16_native(),
    reason=f"needs a CPU with native bf16 (AVX512-BF16/AMX): OpenVINO lists {', '.join(ove.cpu_capabilities())} here",
)


@pytest.fixture(scope="session")
def ov_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
    """Nothing here writes to the user's cache directory."""
    monkeypatch.delenv("BLIPDIFFUSION_TRT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


_engines: dict[tuple, OpenVINOEngine] = {}


def _engine(fixture: Fixture, component: str, cache: Path, **options) -> OpenVINOEngine:
    """One engine per fixture/component/options, shared by the tests (compiled models are kept per shape)."""
    key = (fixture.name, component, tuple(sorted(options.items())))
    if key not in _engines:
        package = ModelPackage.open(fixture.package)
        _engines[key] = make_openvino_engine(package, component, "fp32", OpenVINOOptions(cache_dir=cache, **options))
    return _engines[key]


def _specs(fixture: Fixture) -> dict[str, ComponentSpec]:
    return declare_components(fixture_config(fixture))


def _components(fixture: Fixture) -> list[str]:
    return list(_specs(fixture))


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _t(array: np.ndarray):
    return torch.tensor(np.array(array))


# ---------------------------------------------------------------------------------------------
# Inputs and the PyTorch reference, per component
# ---------------------------------------------------------------------------------------------

QFORMER_WORDS = {"export": ["teapot", "red backpack"], "second": ["dog"]}  # padding inside a batch of 2


def _points(spec: ComponentSpec) -> list[tuple[str, dict[str, int]]]:
    return [("export", export_point(spec)), ("second", second_point(spec))]


def _feed(fixture: Fixture, spec: ComponentSpec, label: str, point: dict[str, int]) -> dict[str, np.ndarray]:
    """Inputs as the pipeline feeds them: real tokens, timesteps in range, latents / scaling factor."""
    pipe = load_diffusers(fixture)
    rng = _rng(fixture.name, spec.name, label)
    if spec.name == "qformer":
        words = QFORMER_WORDS[label]
        tokens = pipe.qformer.tokenizer(words, return_tensors="np", padding=True)
        shape = spec.inputs[0].shape_at({**point, "batch": len(words), "qformer_text_length": tokens.input_ids.shape[1]})
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32),
                "input_ids": tokens.input_ids.astype(np.int64), "attention_mask": tokens.attention_mask.astype(np.int64)}
    feed = {}
    for tensor in spec.inputs:
        shape = tensor.shape_at(point)
        if tensor.name == "input_ids":
            feed[tensor.name] = rng.integers(0, int(pipe.text_encoder.config.vocab_size), size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feed[tensor.name] = rng.uniform(0, _train_timesteps(fixture) - 1, size=shape).astype(np.float32)
        elif tensor.name == "conditioning_scale":
            feed[tensor.name] = np.array([0.7], dtype=np.float32)
        elif tensor.name == "controlnet_cond":
            feed[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        elif tensor.name == "latents":
            feed[tensor.name] = (rng.standard_normal(shape) / pipe.vae.config.scaling_factor).astype(np.float32)
        elif tensor.name.endswith("_res") or tensor.name.startswith("down_block_res"):
            feed[tensor.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feed[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _train_timesteps(fixture: Fixture) -> int:
    return int(ModelPackage.open(fixture.package).scheduler_config()["num_train_timesteps"])


def _diffusers_outputs(fixture: Fixture, spec: ComponentSpec, feed: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    """The original diffusers module, called as the diffusers pipelines call it."""
    pipe = load_diffusers(fixture)
    with torch.no_grad():
        if spec.name == "qformer":
            out = [pipe.qformer(text_input=QFORMER_WORDS[label], image_input=_t(feed["pixel_values"]), return_dict=False)]
        elif spec.name == "text_encoder":
            batch = feed["input_ids"].shape[0]
            out = [pipe.text_encoder(input_ids=_t(feed["input_ids"]), ctx_embeddings=_t(feed["ctx_embeddings"]),
                                     ctx_begin_pos=[pipe.config.ctx_begin_pos] * batch)[0]]
        elif spec.name == "text_encoder_plain":
            out = [pipe.text_encoder(input_ids=_t(feed["input_ids"]), ctx_embeddings=None)[0]]
        elif spec.name in ("unet", "unet_plain"):
            residuals = [_t(feed[t.name]) for t in spec.inputs[3:]]
            extra = {"down_block_additional_residuals": tuple(residuals[:-1]),
                     "mid_block_additional_residual": residuals[-1]} if residuals else {}
            out = [pipe.unet(_t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
                             **extra).sample]
        elif spec.name == "controlnet":
            down, mid = pipe.controlnet(
                _t(feed["sample"]), _t(feed["timestep"]), encoder_hidden_states=_t(feed["encoder_hidden_states"]),
                controlnet_cond=_t(feed["controlnet_cond"]), conditioning_scale=float(feed["conditioning_scale"][0]),
                return_dict=False,
            )
            out = [*down, mid]
        elif spec.name == "vae_decoder":
            out = [pipe.vae.decode(_t(feed["latents"])).sample]
        else:
            raise AssertionError(f"no diffusers reference for {spec.name}")
    return [o.float().numpy() for o in out]


# ---------------------------------------------------------------------------------------------
# 1. f32 against PyTorch, every component, every fixture
# ---------------------------------------------------------------------------------------------

COMPONENT_CASES = [(name, c) for name in CHECKPOINTS for c in
                   ["qformer", "text_encoder", "text_encoder_plain", "unet", "unet_plain", "vae_decoder"]
                   + (["controlnet"] if CHECKPOINTS[name][1] else [])]


@pytest.mark.parametrize("name,component", COMPONENT_CASES)
def test_f32_component_matches_diffusers(name, component, request, ov_cache):
    fixture = request.getfixturevalue(name)
    spec = _specs(fixture)[component]
    engine = _engine(fixture, component, ov_cache, inference_precision="f32")
    for label, point in _points(spec):
        feed = _feed(fixture, spec, label, point)
        expected = _diffusers_outputs(fixture, spec, feed, label)
        got = engine.infer(feed)
        assert engine.inference_precision == "f32"
        assert len(expected) == len(spec.outputs)
        for tensor, e in zip(spec.outputs, expected):
            g = got[tensor.name]
            assert g.dtype == np.float32 and g.shape == e.shape, (tensor.name, g.dtype, g.shape, e.shape)
            diff = float(np.max(np.abs(g.astype(np.float64) - e)))
            assert diff <= spec.atol, (
                f"{name} {component}.{tensor.name} at {label} {point}: OpenVINO f32 vs diffusers max abs "
                f"{diff:.3e} > atol {spec.atol:g} (output max |x| {float(np.max(np.abs(e))):.3g})"
            )


# ---------------------------------------------------------------------------------------------
# 2. bf16 and INT8 weights against f32
# ---------------------------------------------------------------------------------------------

def _cn_component_cases() -> list[tuple[str, str]]:
    return [(name, c) for name in CN_FIXTURES
            for c in ["qformer", "text_encoder", "text_encoder_plain", "unet", "unet_plain", "controlnet", "vae_decoder"]]


@needs_bf16
@pytest.mark.parametrize("name,component", _cn_component_cases())
def test_bf16_component_close_to_f32(name, component, request, ov_cache):
    fixture = request.getfixturevalue(name)
    spec = _specs(fixture)[component]
    label, point = _points(spec)[0]
    feed = _feed(fixture, spec, label, point)
    exact = _engine(fixture, component, ov_cache, inference_precision="f32").infer(feed)
    bf16 = _engine(fixture, component, ov_cache, inference_precision="bf16")
    got = bf16.infer(feed)
    assert bf16.inference_precision == "bf16"
    for tensor in spec.outputs:
        g, e = got[tensor.name], exact[tensor.name]
        assert np.isfinite(g).all(), f"{component}.{tensor.name}: bf16 output not finite"
        cos = cosine(g, e)
        assert cos >= BF16_MIN_COSINE, f"{component}.{tensor.name}: bf16 vs f32 cosine {cos:.6f} < {BF16_MIN_COSINE}"


@needs_bf16
def test_bf16_would_fail_the_f32_tolerance(tiny_cn, ov_cache):
    """bf16 (OpenVINO's CPU default where bf16 is native) moves the UNet far past the f32 atol."""
    spec = _specs(tiny_cn)["unet"]
    label, point = _points(spec)[0]
    feed = _feed(tiny_cn, spec, label, point)
    expected = _diffusers_outputs(tiny_cn, spec, feed, label)[0]
    got = _engine(tiny_cn, "unet", ov_cache, inference_precision="bf16").infer(feed)["noise_pred"]
    assert float(np.abs(got - expected).max()) > 10 * spec.atol
    # and OpenVINO's own default on this CPU is bf16: the backend must set the precision itself
    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    assert ove._precision_name(default) == "bf16"


@needs_bf16
def test_bf16_keeps_the_timestep_embedding_in_f32(tiny, ov_cache):
    """At a real first timestep, bf16 sinusoid arguments would cost the UNet far more than bf16 elsewhere."""
    from blipdiffusion_trt.runtime.schedulers import scheduler_from_config

    scheduler = scheduler_from_config("pndm", ModelPackage.open(tiny.package).scheduler_config())
    scheduler.set_timesteps(50)
    spec = _specs(tiny)["unet_plain"]
    label, point = _points(spec)[0]
    feed = _feed(tiny, spec, label, point)
    feed["timestep"] = np.full_like(feed["timestep"], float(scheduler.timesteps[0]))
    exact = _engine(tiny, "unet_plain", ov_cache, inference_precision="f32").infer(feed)["noise_pred"]
    engine = _engine(tiny, "unet_plain", ov_cache, inference_precision="bf16")
    kept = cosine(engine.infer(feed)["noise_pred"], exact)
    assert engine.f32_sinusoids > 0 and kept >= BF16_MIN_COSINE, (engine.f32_sinusoids, kept)
    # the same graph compiled as OpenVINO would by itself
    core = openvino.Core()
    model = core.read_model(str(engine.path))
    model.reshape({name: list(value.shape) for name, value in feed.items()})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    rounded = cosine(compiled(feed)[compiled.outputs[0]], exact)
    assert 1 - rounded > 10 * (1 - kept), f"bf16 sinusoid arguments: cosine {rounded:.6f}, kept in f32: {kept:.6f}"


def test_int8_weights(tiny_cn, ov_cache, record_property):
    """Compressed components are finite and close to f32; the encoders are left as they are.

    One fixture: it has every component, and compression works per weight tensor, whatever the shapes.
    """
    fixture, name = tiny_cn, tiny_cn.name
    cosines = {}
    for component in _components(fixture):
        spec = _specs(fixture)[component]
        engine = _engine(fixture, component, ov_cache, inference_precision="f32", compress_weights=True)
        cached = openvino.Core().read_model(str(engine.ir_path))  # what later processes load
        u8 = [op for op in cached.get_ops() if op.get_type_name() == "Constant"
              and op.get_output_element_type(0).get_type_name() in ("u8", "i8")]
        assert engine.weights_compressed == (component in WEIGHT_COMPRESSED_COMPONENTS)
        assert bool(u8) == engine.weights_compressed, f"{component}: {len(u8)} int8 constants"
        if not engine.weights_compressed:
            continue
        assert engine.cache_dir.name.endswith("-int8")
        label, point = _points(spec)[0]
        feed = _feed(fixture, spec, label, point)
        exact = _engine(fixture, component, ov_cache, inference_precision="f32").infer(feed)
        got = engine.infer(feed)
        for tensor in spec.outputs:
            assert np.isfinite(got[tensor.name]).all(), f"{component}.{tensor.name}: int8-weight output not finite"
            cosines[f"{component}.{tensor.name}"] = cosine(got[tensor.name], exact[tensor.name])
    record_property("int8_weights_cosine_vs_f32", json.dumps(cosines))
    logging.getLogger(__name__).info("%s int8 weights, cosine vs f32: %s", name, cosines)
    low = {k: v for k, v in cosines.items() if v < INT8_MIN_COSINE}
    assert cosines and not low, f"int8 weights vs f32 cosine below {INT8_MIN_COSINE}: {low} (all: {cosines})"


# ---------------------------------------------------------------------------------------------
# 3. Compiled-model cache, shapes, threads, close
# ---------------------------------------------------------------------------------------------

def _vae_feed(fixture: Fixture, seed: int = 0) -> dict[str, np.ndarray]:
    spec = _specs(fixture)["vae_decoder"]
    return _feed(fixture, spec, f"cache-{seed}", export_point(spec))


def _fresh_engine(package_dir: Path, component: str, **options) -> OpenVINOEngine:
    return make_openvino_engine(ModelPackage.open(package_dir), component, "fp32", OpenVINOOptions(**options))


SECOND_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions, make_openvino_engine

    package_dir, cache, feed_file, out_file = sys.argv[1:5]
    engine = make_openvino_engine(ModelPackage.open(package_dir), "vae_decoder", "fp32",
                                  OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    np.save(out_file, engine.infer({"latents": np.load(feed_file)})["image"])
    print("LOADED_FROM_CACHE", engine.loaded_from_cache, "MODEL_SOURCE", engine.model_source)
    """
)


def test_second_process_loads_from_the_cache(tiny, tmp_path):
    cache = tmp_path / "cache"
    feed = _vae_feed(tiny)
    first = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="f32")
    out = first.infer(feed)["image"]
    assert first.loaded_from_cache is False
    digest = ModelPackage.open(tiny.package).graph_content_sha256("vae_decoder", "fp32")
    assert first.cache_dir == cache / f"vae_decoder-{digest[:16]}"
    # converted once: the IR is cached and compiled, and the blobs take their weights from it
    assert first.model_source == "onnx, cached as ir" and first.ir_path.is_file()
    assert (first.cache_dir / ove.IR_BIN).is_file() and first.model is None
    blobs = [f for f in first.cache_dir.iterdir() if f.name not in (ove.IR_XML, ove.IR_BIN)]
    assert blobs, "OpenVINO wrote no compiled model"
    assert not list(cache.rglob("*partial*"))
    np.save(tmp_path / "feed.npy", feed["latents"])
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(tiny.package), str(cache), str(tmp_path / "feed.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED_FROM_CACHE True MODEL_SOURCE ir cache" in proc.stdout, proc.stdout + proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), out)
    off = _fresh_engine(tiny.package, "vae_decoder", model_cache=False, inference_precision="f32")
    np.testing.assert_array_equal(off.infer(feed)["image"], out)
    assert off.cache_dir is None and off.loaded_from_cache is False


def test_cache_key_covers_the_external_data():
    """A graph over 2 GB keeps its weights in its data file: the key changes with either file."""
    from blipdiffusion_trt.package.manifest import files_sha256

    names = ("onnx/fp32/unet.onnx", "onnx/fp32/unet.onnx.data")
    plain = {"files": {names[0]: "a" * 64}}
    with_data = {"files": {names[0]: "a" * 64, names[1]: "b" * 64}}
    other_data = {"files": {names[0]: "a" * 64, names[1]: "c" * 64}}
    assert files_sha256(plain, names, source=Path("manifest.json")) == "a" * 64
    keys = {files_sha256(m, names, source=Path("manifest.json")) for m in (plain, with_data, other_data)}
    assert len(keys) == 3
    with pytest.raises(PackageError) as e:
        files_sha256({"files": {}}, names, source=Path("manifest.json"))
    _assert_one_line(e, "onnx/fp32/unet.onnx", "not listed")


def test_unreadable_cached_ir_is_converted_again(tiny, tmp_path, caplog):
    """A damaged IR in the cache (a broken model.xml, a truncated weights file, one changed weight
    byte, a missing record) is replaced from the graph: the IR is checked against the sizes and
    sha256 recorded when it was written, as the ONNX Runtime cache's entries are."""
    cache = tmp_path / "cache"
    feed = _vae_feed(tiny)
    first = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="f32")
    expected = first.infer(feed)["image"]
    entry = first.cache_dir
    def flip_a_weight_byte():
        data = bytearray((entry / ove.IR_BIN).read_bytes())
        data[len(data) // 2] ^= 0x01  # same size, still a valid IR: only the record catches it
        (entry / ove.IR_BIN).write_bytes(bytes(data))

    for damage in (lambda: (entry / ove.IR_XML).write_text("<net broken"),
                   lambda: (entry / ove.IR_BIN).write_bytes((entry / ove.IR_BIN).read_bytes()[:100]),
                   flip_a_weight_byte,
                   lambda: (entry / ove.IR_RECORD).unlink()):
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=ove.__name__):
            engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="f32")
            got = engine.infer(feed)["image"]
        assert engine.model_source == "onnx, cached as ir", engine.model_source
        assert any("converting vae_decoder.onnx again" in r.getMessage() for r in caplog.records), caplog.text
        np.testing.assert_array_equal(got, expected)
        assert _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache).model_source == "ir cache"


def test_ir_cache_that_cannot_be_written(tiny, tmp_path, monkeypatch, caplog):
    """The graph runs as read from ONNX, with full blobs, and nothing half-written is left behind."""
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(openvino, "save_model", refuse)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger=ove.__name__):
        engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="f32")
    assert engine.model_source == "onnx" and not engine.ir_path.exists()
    assert "not cached as IR" in caplog.text and "No space left" in caplog.text and str(cache) in caplog.text
    out = engine.infer(_vae_feed(tiny))["image"]
    assert engine.model is not None  # kept: it cannot be read again cheaply
    assert engine.loaded_from_cache is False and not engine.cache_dir.exists()  # no blobs without their IR
    assert sorted(f.name for f in cache.rglob("*partial*")) == []
    np.testing.assert_array_equal(
        out, _fresh_engine(tiny.package, "vae_decoder", model_cache=False, inference_precision="f32").infer(_vae_feed(tiny))["image"])


def test_changed_graph_is_not_served_from_the_cache(tiny, tmp_path):
    """Same path, same file time, other weights: a new cache entry and the new graph's outputs."""
    onnx = pytest.importorskip("onnx", reason="rewriting a graph needs onnx (the export extra)")
    from onnx import numpy_helper

    copy = tmp_path / "package"
    shutil.copytree(tiny.package, copy)
    cache = tmp_path / "cache"
    feed = _vae_feed(tiny)
    before = _fresh_engine(copy, "vae_decoder", cache_dir=cache, inference_precision="f32")
    old = before.infer(feed)["image"]

    graph = copy / "onnx" / "fp32" / "vae_decoder.onnx"
    stat = graph.stat()
    model = onnx.load(str(graph))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(weight) * 1.5).astype(np.float32), weight.name))
    onnx.save(model, str(graph))
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["onnx/fp32/vae_decoder.onnx"] = sha256_file(graph)
    (copy / "manifest.json").write_text(json.dumps(manifest))

    after = _fresh_engine(copy, "vae_decoder", cache_dir=cache, inference_precision="f32")
    new = after.infer(feed)["image"]
    assert after.cache_dir != before.cache_dir and after.loaded_from_cache is False
    uncached = _fresh_engine(copy, "vae_decoder", model_cache=False, inference_precision="f32").infer(feed)["image"]
    np.testing.assert_allclose(new, uncached, atol=1e-6, rtol=0)
    assert float(np.abs(new - old).max()) > 1e-3, "the changed weights did not change the output"


@needs_bf16
def test_precision_is_not_served_from_the_cache(tiny, tmp_path):
    """A graph without sinusoids has one OpenVINO cache entry for f32 and bf16: what runs follows the request."""
    cache = tmp_path / "cache"
    feed = _vae_feed(tiny)
    exact = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="f32").infer(feed)["image"]
    cached = _fresh_engine(tiny.package, "vae_decoder", cache_dir=cache, inference_precision="bf16")
    got = cached.infer(feed)["image"]
    assert cached.inference_precision == "bf16"
    # (OpenVINO 2025.0 hashes a graph read twice in one process differently, and compiles it again)
    assert cached.loaded_from_cache or openvino.__version__ < "2026", "bf16 did not reuse the f32 cache entry"
    uncached = _fresh_engine(tiny.package, "vae_decoder", model_cache=False, inference_precision="bf16").infer(feed)["image"]
    np.testing.assert_allclose(got, uncached, atol=1e-6, rtol=0)
    assert float(np.abs(got - exact).max()) > 1e-4, "bf16 ran as f32"


def test_default_cache_directory(tiny, tmp_path, monkeypatch):
    """``openvino`` in the per-user cache folder: $BLIPDIFFUSION_TRT_CACHE, else $XDG_CACHE_HOME's."""
    monkeypatch.setenv("BLIPDIFFUSION_TRT_CACHE", str(tmp_path / "user-cache"))
    assert _fresh_engine(tiny.package, "text_encoder_plain").cache_dir.parent == tmp_path / "user-cache" / "openvino"
    monkeypatch.delenv("BLIPDIFFUSION_TRT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    engine = _fresh_engine(tiny.package, "text_encoder_plain")
    assert engine.cache_dir.parent == tmp_path / "xdg" / "blipdiffusion-trt" / "openvino"
    # a default directory that cannot be created: a warning, no cache, still runs
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    engine = _fresh_engine(tiny.package, "text_encoder_plain")
    assert engine.cache_dir is None
    spec = _specs(tiny)["text_encoder_plain"]
    assert np.isfinite(engine.infer(_feed(tiny, spec, "export", export_point(spec)))["text_embeddings"]).all()


def test_shape_cache_is_a_bounded_lru(tiny, ov_cache):
    """Compiled per shape, lazily; at most max_shapes kept; every shape computes the same as its own engine."""
    spec = _specs(tiny)["text_encoder_plain"]
    engine = _fresh_engine(tiny.package, "text_encoder_plain", cache_dir=ov_cache, inference_precision="f32", max_shapes=2)
    assert engine.compiled_shapes == [] and engine.compilations == 0
    axis = spec.axes["plain_text_length"]
    lengths = [axis.max, axis.max - 1, axis.max - 2]
    feeds = {n: {"input_ids": _rng("lru", n).integers(0, 100, size=(1, n), dtype=np.int64)} for n in lengths}
    outs = {n: engine.infer(feeds[n])["text_embeddings"] for n in lengths}
    assert engine.compilations == 3
    assert engine.model is None and engine.model_from_ir  # each shape read the cached IR again
    assert engine.compiled_shapes == [((1, lengths[1]),), ((1, lengths[2]),)]
    engine.infer(feeds[lengths[2]])  # kept: no compilation
    assert engine.compilations == 3
    again = engine.infer(feeds[lengths[0]])["text_embeddings"]  # evicted: compiled again
    assert engine.compilations == 4 and engine.compiled_shapes[-1] == ((1, lengths[0]),)
    np.testing.assert_array_equal(again, outs[lengths[0]])
    for n in lengths:
        alone = _fresh_engine(tiny.package, "text_encoder_plain", cache_dir=ov_cache, inference_precision="f32")
        np.testing.assert_array_equal(alone.infer(feeds[n])["text_embeddings"], outs[n])


def test_threads_option_and_close(tiny, ov_cache, monkeypatch):
    engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=ov_cache, threads=1)
    engine.infer(_vae_feed(tiny))
    request = next(iter(engine._compiled.values()))
    assert int(request.get_compiled_model().get_property("INFERENCE_NUM_THREADS")) == 1
    # from_package's threads= replaces the options' value; BLIPDIFFUSION_TRT_THREADS is the default
    runtime = BlipDiffusionRuntime.from_package(tiny.package, "openvino", threads=1, options=OpenVINOOptions(cache_dir=ov_cache))
    assert all(e.options.threads == 1 for e in runtime.engines.values())
    runtime.close()
    monkeypatch.setenv("BLIPDIFFUSION_TRT_THREADS", "1")
    assert OpenVINOOptions().threads == 1 and OpenVINOOptions(threads=2).threads == 2
    engine.close()
    engine.close()
    with pytest.raises(EngineError) as e:
        engine.infer(_vae_feed(tiny))
    _assert_one_line(e, "closed")


def test_registered_backend():
    """One registry line: the fp32 graphs only, on the CPU, available where OpenVINO is installed."""
    backend = get_backend("openvino")
    assert backend is ove.OPENVINO and backend.options_class is OpenVINOOptions
    assert backend.device == "cpu" and backend.is_available()
    assert backend.capabilities.precisions == ("fp32",) and backend.capabilities.optimized_cache
    assert not backend.capabilities.cpu_fused_graphs and not backend.capabilities.device_outputs
    # a command line's flags: the ONNX Runtime ones are not OpenVINO's
    options = backend.options_from({"graph_optimization": "extended", "threads": 2, "inference_precision": "f32"})
    assert options == OpenVINOOptions(threads=2, inference_precision="f32")


def test_auto_precision_follows_the_cpu(tiny, ov_cache, monkeypatch, caplog):
    engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=ov_cache)
    engine.infer(_vae_feed(tiny))
    assert engine.inference_precision == ("bf16" if _bf16_native() else "f32")
    # on a CPU without native bf16 (its capabilities as OpenVINO would list them): auto compiles f32
    monkeypatch.setattr(ove, "cpu_capabilities", lambda: ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    ove._log_auto_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger=ove.__name__):
        engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=ov_cache)
        _fresh_engine(tiny.package, "text_encoder_plain", cache_dir=ov_cache)
    engine.infer(_vae_feed(tiny))
    assert engine.requested_precision == engine.inference_precision == "f32"
    fallbacks = [r.getMessage() for r in caplog.records if "auto -> f32" in r.getMessage()]
    assert len(fallbacks) == 1 and "no native bf16" in fallbacks[0], fallbacks  # logged once per process


# ---------------------------------------------------------------------------------------------
# 4. Bad input: one line, no traceback
# ---------------------------------------------------------------------------------------------

def _assert_one_line(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert message.strip() and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize("options,fragments", [
    (dict(inference_precision="fp16"), ("inference_precision", "fp16", "auto, f32, bf16")),
    (dict(inference_precision="BF16"), ("inference_precision", "BF16")),
    (dict(threads=-1), ("threads", ">= 0")),
    (dict(threads="2"), ("threads",)),
    (dict(max_shapes=0), ("max_shapes", ">= 1")),
    (dict(cache_dir=3), ("cache_dir", "path")),
    (dict(model_cache="no"), ("model_cache", "True or False")),
    (dict(compress_weights=1), ("compress_weights", "True or False")),
])
def test_bad_options(options, fragments):
    with pytest.raises(InputError) as e:
        OpenVINOOptions(**options)
    _assert_one_line(e, *fragments)
    assert e.value.field == next(iter(options))


def test_bf16_on_a_cpu_without_it(tiny, monkeypatch):
    monkeypatch.setattr(ove, "cpu_capabilities", lambda: ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "openvino", options=OpenVINOOptions(inference_precision="bf16"))
    _assert_one_line(e, "bf16", "no native bf16", "auto or f32")
    assert e.value.field == "inference_precision"


def test_wrong_precision_options_and_backend(tiny):
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "openvino", precision="fp16")
    _assert_one_line(e, "fp32 graphs", "inference_precision")
    assert e.value.field == "precision"
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "cpu", options=OpenVINOOptions())
    _assert_one_line(e, "cpu", "OpenVINOOptions")
    with pytest.raises(InputError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "openvino", options={"inference_precision": "f32"})
    _assert_one_line(e, "OpenVINOOptions", "dict")


def _rewrite(copy: Path, rel: str, data: bytes) -> None:
    """Replace a package file and record its sha256 and size, as a (broken) export would have."""
    (copy / rel).write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][rel] = sha256_file(copy / rel)
    manifest["sizes"][rel] = len(data)
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_broken_and_wrong_graphs(tiny, tmp_path):
    copy = tmp_path / "package"
    shutil.copytree(tiny.package, copy)
    options = OpenVINOOptions(model_cache=False)
    # tampered: the manifest's sha256 catches it before OpenVINO reads anything
    graph = copy / "onnx" / "fp32" / "unet_plain.onnx"
    original = graph.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(PackageError) as e:
        BlipDiffusionRuntime.from_package(copy, "openvino", options=options)
    message = _assert_one_line(e, "unet_plain.onnx")
    assert "sha256" in message or "altered" in message, message
    graph.write_bytes(original)
    # not a graph at all, with a matching sha256 (or unchecked): OpenVINO cannot read it
    _rewrite(copy, "onnx/fp32/vae_decoder.onnx", b"\x08\x07garbage, not a protobuf" * 64)
    for verify in (True, False):
        with pytest.raises(EngineError) as e:
            BlipDiffusionRuntime.from_package(copy, "openvino", verify=verify, options=options)
        _assert_one_line(e, "vae_decoder.onnx", "OpenVINO cannot read it")
    # another component's graph in its place: the package's fault, as on every backend (check_graph_io)
    _rewrite(copy, "onnx/fp32/vae_decoder.onnx", (copy / "onnx" / "fp32" / "text_encoder_plain.onnx").read_bytes())
    with pytest.raises(PackageError) as e:
        BlipDiffusionRuntime.from_package(copy, "openvino", options=options)
    _assert_one_line(e, "vae_decoder.onnx", "inputs", "latents")


def test_explicit_cache_dir_not_writable(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(EngineError) as e:
        BlipDiffusionRuntime.from_package(tiny.package, "openvino", options=OpenVINOOptions(cache_dir=blocker / "cache"))
    _assert_one_line(e, "cache_dir", str(blocker / "cache"), "not writable")


def test_missing_openvino_or_nncf(tiny, monkeypatch):
    package = ModelPackage.open(tiny.package)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(EngineError) as e:
        make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(compress_weights=True, model_cache=False))
    _assert_one_line(e, "compress_weights needs NNCF", "pip install")
    monkeypatch.setitem(sys.modules, "openvino", None)
    ove.openvino_core.cache_clear()
    try:
        with pytest.raises(EngineError) as e:
            BlipDiffusionRuntime.from_package(tiny.package, "openvino")
        _assert_one_line(e, "needs OpenVINO", "pip install")
    finally:
        ove.openvino_core.cache_clear()


# ---------------------------------------------------------------------------------------------
# 5. CLI and no torch at run time
# ---------------------------------------------------------------------------------------------

def _cli(package: Path, ref: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("generate", package, "--prompt", "a photo on the beach", "--reference-image", ref,
                   "--source-subject", "dog", "--target-subject", "dog", "--out", out, "--steps", "2", *extra,
                   env={**os.environ, "BLIPDIFFUSION_TRT_THREADS": "1"}, timeout=180)


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:"), last
    return last


def test_cli_generate_with_openvino(tiny, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.fromarray(_rng("cli").integers(0, 256, (22, 28, 3), dtype=np.uint8)).save(ref)
    out = tmp_path / "ov.npy"
    cache = tmp_path / "cache"
    proc = _cli(tiny.package, ref, out, "--backend", "openvino", "--inference-precision", "f32",
                "--openvino-cache", str(cache), "--threads", "1", "--timings")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inference precision: f32 (openvino)" in proc.stdout, proc.stdout
    assert any(cache.iterdir())
    expected = _cli(tiny.package, ref, tmp_path / "cpu.npy")
    assert expected.returncode == 0, expected.stderr
    assert float(np.abs(np.load(out) - np.load(tmp_path / "cpu.npy")).max()) <= PARITY_ATOL

    for extra, fragments in (
        (["--backend", "cpu", "--inference-precision", "bf16"], ["--inference-precision", "not an option of the cpu backend"]),
        (["--backend", "cpu", "--openvino-int8-weights"], ["--openvino-int8-weights", "cpu backend"]),
        (["--backend", "openvino", "--openvino-cache", str(ref / "sub")], ["cache_dir", "not writable"]),
        (["--backend", "openvino", "--precision", "fp16"], ["--precision", "fp32 graphs", "inference_precision"]),
        (["--backend", "openvino", "--threads", "-2"], ["--threads", ">= 0"]),
    ):
        bad = tmp_path / "bad.png"
        last = _last_error_line(_cli(tiny.package, ref, bad, *extra))
        assert all(f in last for f in fragments), (extra, last)
        assert not bad.exists()
    proc = _cli(tiny.package, ref, tmp_path / "bad.png", "--backend", "openvino", "--inference-precision", "fp16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid choice: 'fp16'" in proc.stderr, proc.stderr


def test_cli_bf16_on_a_cpu_without_it(tiny, tmp_path):
    """The CLI names the flag; the CPU's capabilities are OpenVINO's, as a CPU without bf16 lists them."""
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.fromarray(_rng("cli bf16").integers(0, 256, (22, 28, 3), dtype=np.uint8)).save(ref)
    script = textwrap.dedent(
        """
        import sys
        from blipdiffusion_trt import cli
        from blipdiffusion_trt.runtime.backends import openvino
        openvino.cpu_capabilities = lambda: ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT")
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    args = ["generate", str(tiny.package), "--prompt", "a photo", "--reference-image", str(ref), "--source-subject", "dog",
            "--target-subject", "dog", "--out", str(tmp_path / "x.png"), "--steps", "1", "--backend", "openvino"]
    proc = subprocess.run([sys.executable, "-c", script, *args, "--inference-precision", "bf16"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    last = _last_error_line(proc)
    assert last.startswith("error: --inference-precision bf16:") and "no native bf16" in last and "auto or f32" in last, last
    proc = subprocess.run([sys.executable, "-c", script, *args, "--timings"], capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    assert proc.returncode == 0 and "inference precision: f32 (openvino)" in proc.stdout, proc.stdout + proc.stderr


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    package, ref, cache = sys.argv[1:4]
    assert "torch" not in sys.modules
    runtime = BlipDiffusionRuntime.from_package(
        package, "openvino", options=OpenVINOOptions(compress_weights=True, cache_dir=cache))
    result = runtime("a photo", ref, "dog", "dog", num_inference_steps=2, output_type="np", seed=0)
    assert np.isfinite(result.images).all()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
    assert not loaded, loaded[:10]
    assert "nncf" in sys.modules
    from blipdiffusion_trt.runtime.backends.openvino import WEIGHT_COMPRESSED_COMPONENTS
    from blipdiffusion_trt.runtime.cli import describe_engine_details
    line = describe_engine_details("openvino", runtime.engine_details())
    compressed = [name for name in runtime.engines if name in WEIGHT_COMPRESSED_COMPONENTS]
    assert line.endswith("; int8 weights: " + ", ".join(compressed)), line
    print("NO-TORCH-OK")
    """
)


def test_openvino_with_int8_weights_imports_no_torch(tiny, tmp_path):
    """torch is installed here, and NNCF imports it when it can: the backend keeps it out."""
    import importlib.util

    assert importlib.util.find_spec("torch") is not None
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.fromarray(_rng("no torch").integers(0, 256, (22, 28, 3), dtype=np.uint8)).save(ref)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(tiny.package), str(ref), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0 and "NO-TORCH-OK" in proc.stdout, proc.stdout + proc.stderr


@needs_bf16
def test_compiled_model_does_not_keep_the_ir_weights_resident(tiny, tmp_path):
    """Compiling touches every page of the IR's mapped weights. A bf16 model loaded from its blob
    (every process after the first) holds its own copies, so those pages leave the process after its
    first call and stay out; a model compiled now reads some of them on each call, and those come
    back. Outputs are the same either way, and the same as without the cache."""
    from blipdiffusion_trt.runtime.backends.mapped_files import resident_mb

    cache = tmp_path / "cache"
    spec = _specs(tiny)["unet_plain"]
    feed = _feed(tiny, spec, "resident", export_point(spec))
    outs = []
    for source in ("onnx, cached as ir", "ir cache"):
        engine = _fresh_engine(tiny.package, "unet_plain", cache_dir=cache, inference_precision="bf16")
        outs.append(engine.infer(feed)["noise_pred"])
        assert engine.model_source == source and engine.inference_precision == "bf16"
        weights = engine.cache_dir / ove.IR_BIN
        assert resident_mb(weights) < 0.05 * weights.stat().st_size / 2**20, (source, resident_mb(weights))
        np.testing.assert_array_equal(engine.infer(feed)["noise_pred"], outs[-1])
        if engine.loaded_from_cache:
            assert resident_mb(weights) < 0.25 * weights.stat().st_size / 2**20, resident_mb(weights)
        engine.close()
    assert engine.loaded_from_cache
    np.testing.assert_array_equal(outs[1], outs[0])
    uncached = _fresh_engine(tiny.package, "unet_plain", model_cache=False, inference_precision="bf16")
    np.testing.assert_array_equal(uncached.infer(feed)["noise_pred"], outs[0])


def test_memory_arena_policies(tiny, ov_cache):
    """Which compiled models hand their intermediate buffers back after each call (the ONNX Runtime
    backends' memory_arena values); the outputs are the same under every policy, on every call."""
    spec = _specs(tiny)["vae_decoder"]
    feeds = [_vae_feed(tiny, seed) for seed in (0, 1)]
    outs = {}
    for policy in ("all", "loop", "none", "loop-shrink"):
        engine = _fresh_engine(tiny.package, "vae_decoder", cache_dir=ov_cache, inference_precision="f32",
                               memory_arena=policy)
        assert engine.keeps_intermediate_memory() == (policy == "all")
        outs[policy] = [engine.infer(feed)[spec.output_names[0]] for feed in feeds + feeds]
        loop = _fresh_engine(tiny.package, "unet_plain", cache_dir=ov_cache, memory_arena=policy)
        assert loop.keeps_intermediate_memory() == (policy in ("all", "loop"))
    for policy, got in outs.items():
        for a, b in zip(got, outs["all"]):
            np.testing.assert_array_equal(a, b, err_msg=policy)
        np.testing.assert_array_equal(got[2], got[0])  # a call after the buffers were handed back
    with pytest.raises(InputError) as e:
        OpenVINOOptions(memory_arena="some")
    assert e.value.field == "memory_arena" and "\n" not in str(e.value)
