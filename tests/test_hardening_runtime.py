"""Hardening, round 2 (runtime and package): what a second hostile probe broke, each with the
class of fault next to it.

- A: every engine is reached through ``runtime.engine(name)`` (a ControlNet package's editing
  runs on the odd_cn fixture in tests/test_editing.py and tests/test_editing_cli.py);
- B: every ``pipeline.json`` key of :class:`PipelineConfig` is in the declared shape;
- 3: graphs checked against the declarations when opened, outputs against them when run;
- 4: tokenizers checked against the text encoders' vocabularies, their failures one line;
- 7: every public argument of the Python API with a wrong type: one InputError naming it;
- 9: ``--out`` onto a read-only file refused;
- 10: a blend threshold no pixel can pass refused;
- 11: a precision the package lacks, named with the precisions export can write;
- 13: the steps limit read from the scheduler config, checked before any work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.components import PIPELINE_CONFIG_SHAPE, PipelineConfig
from blipdiffusion_trt.errors import InputError, PackageError
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime, SubjectEmbedding
from blipdiffusion_trt.runtime.schedulers import SCHEDULERS, DDIMInverseScheduler
from blipdiffusion_trt.runtime.schedulers.base import TIMESTEP_SPACINGS
from blipdiffusion_trt.runtime.schedulers.ddim_inverse import INVERSE_TIMESTEP_SPACINGS

from helpers import copy_package
from test_hardening import REFERENCE, cli_error, generate_args, one_line, rewrite

# --------------------------------------------------------------------------------------------
# B: pipeline.json in its declared shape
# --------------------------------------------------------------------------------------------


def test_every_pipeline_config_field_is_declared_in_the_shape():
    """The class of B: a PipelineConfig field read from pipeline.json without a shape is read unchecked."""
    declared = {*PIPELINE_CONFIG_SHAPE.required, *PIPELINE_CONFIG_SHAPE.optional}
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert fields <= declared, f"not in PIPELINE_CONFIG_SHAPE: {sorted(fields - declared)}"


def _pipeline_change(**values):
    def change(data: dict) -> dict:
        return {**data, **values}
    return change


PIPELINE_CASES = {
    # name -> (values, fragments of the one-line error)
    "edit-level-string": (dict(edit_attention_downsample="x"), ["edit_attention_downsample", "got a string 'x'"]),
    "edit-level-float": (dict(edit_attention_downsample=2.5), ["edit_attention_downsample", "got a number 2.5"]),
    "edit-level-huge": (dict(edit_attention_downsample=10**9), ["edit_attention_downsample", "1000000000"]),
    "edit-level-negative": (dict(edit_attention_downsample=-1), ["edit_attention_downsample", "got -1"]),
    "edit-level-not-a-level": (dict(edit_attention_downsample=3), ["edit_attention_downsample must be 0"]),
    "edit-level-too-deep": (dict(edit_attention_downsample=2 ** 12), ["edit_attention_downsample must be 0"]),
    "unet-multiple-off": (dict(unet_size_multiple=1, unet_block_out_channels=[8, 8, 8]),
                          ["unet_size_multiple must be a multiple"]),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_json_edit_level_and_levels_are_checked(tiny, tmp_path, case):
    package = copy_package(tiny, tmp_path)
    values, fragments = PIPELINE_CASES[case]
    data = json.loads((package / "pipeline.json").read_text())
    rewrite(package, "pipeline.json", _pipeline_change(**values)(data))
    with pytest.raises(PackageError) as error:
        BlipDiffusionRuntime.from_package(package)
    one_line(str(error.value), "pipeline.json", *fragments)


# --------------------------------------------------------------------------------------------
# 13: the steps limit from the scheduler config
# --------------------------------------------------------------------------------------------

_SCHEDULER_CLASSES = {**SCHEDULERS, "ddim-inverse": DDIMInverseScheduler}


def _configs():
    for name, cls in _SCHEDULER_CLASSES.items():
        spacings = INVERSE_TIMESTEP_SPACINGS if cls is DDIMInverseScheduler else TIMESTEP_SPACINGS
        for spacing in spacings:
            for offset in (0, 1, 7):
                yield pytest.param(name, spacing, offset, id=f"{name}-{spacing}-offset{offset}")


def _run_all_steps(scheduler) -> None:
    latents = np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(0.1 * model_input, t, latents)
    # no finiteness check: DPM-Solver with "linspace" at num_train_timesteps steps gives NaN in
    # diffusers 0.32.2 too (repeated timesteps); the port follows it


@pytest.mark.parametrize("name,spacing,offset", list(_configs()))
def test_steps_limit_comes_from_the_scheduler_config(name, spacing, offset):
    """Every number of steps either is refused (one InputError naming num_inference_steps and the
    largest number that fits) or runs every one of its timesteps without an error."""
    cls = _SCHEDULER_CLASSES[name]
    n_train = 60
    config = dict(num_train_timesteps=n_train, timestep_spacing=spacing, steps_offset=offset)
    if name == "pndm":
        config["skip_prk_steps"] = True
    refused = []
    for steps in range(1, n_train + 1):
        scheduler = cls.from_config(config)
        try:
            checked = scheduler.check_num_inference_steps(steps)
        except InputError as error:
            one_line(str(error), f"num_inference_steps {steps}", f"steps_offset {offset}")
            assert error.field == "num_inference_steps"
            refused.append(steps)
            continue
        assert checked == steps
        scheduler.set_timesteps(steps)
        _run_all_steps(scheduler)  # an IndexError here: the check let through what the loop cannot run
    indexed = name in ("pndm", "ddim", "ddim-inverse")  # the sigma schedulers interpolate any timestep
    if indexed and spacing == "leading" and offset:
        assert n_train in refused  # the case: timestep n_train reached
    if offset == 0 and spacing != "trailing" and indexed:
        assert not refused
    if name == "dpmpp-2m" and spacing != "trailing":  # repeated timesteps at n_train steps
        assert n_train in refused
    for steps in refused:  # the message's advice fits
        scheduler = cls.from_config(config)
        with pytest.raises(InputError) as error:
            scheduler.check_num_inference_steps(steps)
        message = str(error.value)
        if "use at most" in message:
            fits = int(message.rsplit("use at most ", 1)[1].split()[0])
            assert cls.from_config(config).check_num_inference_steps(fits) == fits


def _scheduler_package(fixture, tmp_path: Path, **values) -> Path:
    package = copy_package(fixture, tmp_path)
    name = "scheduler/scheduler_config.json"
    data = json.loads((package / name).read_text())
    rewrite(package, name, {**data, **values})
    return package


def test_steps_beyond_the_scheduler_config_refused_before_any_work(tiny, tmp_path, monkeypatch):
    """13: generate/edit/invert with 1000 steps on a config whose "leading" timesteps reach 1000:
    one line, before any graph runs."""
    package = _scheduler_package(tiny, tmp_path, steps_offset=1, timestep_spacing="leading",
                                 num_train_timesteps=1000)
    runtime = BlipDiffusionRuntime.from_package(package)

    def no_work(name):
        raise AssertionError(f"{name} ran before the steps were checked")

    monkeypatch.setattr(runtime, "engine", no_work)
    image = REFERENCE
    calls = {
        "generate": lambda: runtime("a photo", image, "dog", "dog", num_inference_steps=1000, scheduler="ddim"),
        "generate-pndm": lambda: runtime("a photo", image, "dog", "dog", num_inference_steps=1000),
        "invert": lambda: runtime.invert(image, "a photo", "cat", num_inference_steps=1000),
        "edit-real": lambda: runtime.edit("a photo", image, "dog", "dog", "cat", image=image, num_inference_steps=1000),
        "edit-generated": lambda: runtime.edit("a photo", image, "dog", "dog", "cat", num_inference_steps=1000),
    }
    for what, call in calls.items():
        with pytest.raises(InputError) as error:
            call()
        one_line(str(error.value), "num_inference_steps 1000", "use at most 999 steps")
    # the largest number that fits runs (as far as the check is concerned)
    assert runtime._check_steps("ddim", 999) == 999


def test_steps_beyond_the_scheduler_config_through_the_cli(tiny, tmp_path):
    from helpers import run_cli

    package = _scheduler_package(tiny, tmp_path, steps_offset=1, timestep_spacing="leading",
                                 num_train_timesteps=1000)
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(REFERENCE).save(ref)
    out = tmp_path / "out.png"
    argv = generate_args(package, ref, out)
    argv[argv.index("--steps") + 1] = "1000"
    cli_error(run_cli(*argv), "--steps", "1000", "at most 999")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 3: graphs against the declarations
# --------------------------------------------------------------------------------------------

GRAPH_BACKENDS = ["cpu", pytest.param("openvino", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("openvino"), reason="openvino not installed (pip install .[openvino])"))]


def _swap_graph(package: Path, slot: str, source: Path) -> None:
    rewrite(package, f"onnx/fp32/{slot}.onnx", source.read_bytes())


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_graphs_checked_against_the_declarations_when_opened(tiny, odd, tmp_path, backend):
    """Another component's graph in a slot, another checkpoint's graph (manifest recomputed), a
    pipeline.json image_size the Q-Former graph was not exported for: one PackageError line naming
    the graph, when it is opened (or, where only the dynamic sizes differ, at its first call), on
    every backend; never an image of the wrong size."""
    cases = {
        "another component": (lambda p: _swap_graph(p, "vae_decoder", tiny.package / "onnx/fp32/vae_encoder.onnx"),
                              "vae_decoder.onnx", ["inputs ['image']", "'latents'"]),
        "another checkpoint": (lambda p: _swap_graph(p, "vae_decoder", odd.package / "onnx/fp32/vae_decoder.onnx"),
                               "vae_decoder.onnx", []),
        "another checkpoint's unet": (lambda p: _swap_graph(p, "unet_plain", odd.package / "onnx/fp32/unet_plain.onnx"),
                                      "unet_plain.onnx", []),
        "image_size [1, 1]": (lambda p: rewrite(p, "pipeline.json", {
            **json.loads((p / "pipeline.json").read_text()), "image_size": [1, 1]}), "qformer.onnx",
            ["pixel_values", "dimension 2"]),
    }
    for what, (make, graph, fragments) in cases.items():
        package = copy_package(tiny, tmp_path / what.replace(" ", "-").replace("'", ""))
        make(package)
        with pytest.raises(PackageError) as error:
            runtime = BlipDiffusionRuntime.from_package(package, backend, cpu_fused=False) if backend == "cpu" else \
                BlipDiffusionRuntime.from_package(package, backend)
            config = runtime.config
            runtime("a photo", REFERENCE, "dog", "dog", num_inference_steps=1, output_type="np",
                    height=config.default_height, width=config.default_width)
        one_line(str(error.value), graph, "re-export", *fragments)


def test_tiny_and_odd_differ_where_the_swap_test_needs_it(tiny, odd):
    """The swap cases above mean something: odd's graphs are not tiny's (other latent factor,
    text length, query count), so a check that let them through would fail the test."""
    from helpers import fixture_config

    a, b = fixture_config(tiny), fixture_config(odd)
    assert a.latent_scale_factor != b.latent_scale_factor or a.latent_channels != b.latent_channels
    assert a.text_max_length != b.text_max_length


# --------------------------------------------------------------------------------------------
# 7: every public argument of the Python API with a wrong type
# --------------------------------------------------------------------------------------------

HUGE = 10**400  # no float holds it
FLOAT_BAD = ["7.5", np.full((2, 2), 7.5), None, True, HUGE, [7.5], float("nan")]
INT_BAD = [2.5, "2", True, HUGE, [2], np.float64(2)]
TEXT_BAD = [5, None, b"bytes", 2.5]
BOOL_BAD = ["yes", None, 1, [True]]
CALLABLE_BAD = [5, "print"]
IMAGE_BAD = [5, None, 2.5, b"\x89PNG"]


def _cases(call: str, table: dict) -> list:
    return [pytest.param(call, name, value, id=f"{call}-{name}-{i}")
            for name, values in table.items() for i, value in enumerate(values)]


GENERATE_ARGS = {
    "prompt": [5, None, [5], [], b"x"],
    "reference_image": IMAGE_BAD,
    "source_subject_category": TEXT_BAD,
    "target_subject_category": TEXT_BAD,
    "subject": ["x", np.zeros((2, 2), np.float32)],
    "guidance_scale": FLOAT_BAD,
    "height": INT_BAD,
    "width": INT_BAD,
    "num_inference_steps": [*INT_BAD, None],
    "seed": INT_BAD,
    "latents": ["x", [[1.0]], np.zeros((1,), np.int64)],
    "neg_prompt": [5, None, b"x"],
    "prompt_strength": FLOAT_BAD,
    "prompt_reps": [*(x for x in INT_BAD if x is not HUGE), None],  # no upper bound: cut to what the encoder keeps
    "scheduler": [5, None, ["ddim"]],
    "output_type": [5, None, ["np"]],
    "condition_image": [5, 2.5],
    "canny_image": [5],
    "canny_low_threshold": [*INT_BAD, None],
    "canny_high_threshold": [*INT_BAD, None],
    "controlnet_conditioning_scale": FLOAT_BAD,
    "callback": CALLABLE_BAD,
    "progress": BOOL_BAD,
}
EDIT_ARGS = {
    "prompt": [5, None, ["a photo"]],
    "reference_image": IMAGE_BAD,
    "source_subject_category": TEXT_BAD,
    "target_subject_category": TEXT_BAD,
    "original_subject": TEXT_BAD,
    "image": [5, 2.5],
    "latents": ["x", [[1.0]]],
    "seed": INT_BAD,
    "num_inference_steps": INT_BAD,
    "guidance_scale": FLOAT_BAD,
    "neg_prompt": [5, b"x"],
    "cross_replace_steps": FLOAT_BAD,
    "self_replace_steps": FLOAT_BAD,
    "blend_threshold": [x for x in FLOAT_BAD if x is not None],  # None: no local blend
    "height": INT_BAD,
    "width": INT_BAD,
    "scheduler": [5, ["ddim"]],
    "sample_posterior": BOOL_BAD,
    "output_type": [5, None],
    "callback": CALLABLE_BAD,
    "progress": BOOL_BAD,
}
INVERT_ARGS = {
    "image": IMAGE_BAD,
    "prompt": TEXT_BAD,
    "original_subject": TEXT_BAD,
    "num_inference_steps": INT_BAD,
    "height": INT_BAD,
    "width": INT_BAD,
    "sample_posterior": BOOL_BAD,
    "seed": INT_BAD,
    "callback": CALLABLE_BAD,
    "progress": BOOL_BAD,
}
FROM_PACKAGE_ARGS = {
    "path": [5, None, 2.5],
    "backend": [5, None, "gpu"],
    "precision": [5, None, "fp64", "float32"],
    "verify": BOOL_BAD,
    "options": ["threads=2", 5],
    "cache_size": ["x", -1, 2.5, None, True, HUGE],
    "negative_cache_size": ["x", -1, 2.5, None],
    # the cpu backend's options
    "threads": ["2", 2.5, -1, True],
    "graph_optimization": [5, None, "fast"],
    "optimized_cache": [5, 2.5, True],
    "memory_arena": [5, None, "some"],
    "cpu_fused": ["yes", None, 1],
    "not_an_option": [1],
}
API_CASES = (_cases("call", GENERATE_ARGS) + _cases("edit", EDIT_ARGS) + _cases("invert", INVERT_ARGS)
             + _cases("from_package", FROM_PACKAGE_ARGS))


def _call(runtime, fixture, call: str, name: str, value):
    image = REFERENCE
    config = runtime.config
    size = dict(height=config.default_height, width=config.default_width)
    if call == "call":
        args = dict(prompt="a photo", reference_image=image, source_subject_category="dog",
                    target_subject_category="dog", num_inference_steps=1, output_type="np", **size)
        if name == "subject":
            args.pop("reference_image")
        return runtime(**{**args, name: value})
    if call == "edit":
        args = dict(prompt="a photo", reference_image=image, source_subject_category="dog",
                    target_subject_category="dog", original_subject="cat", num_inference_steps=1, output_type="np",
                    **size)
        return runtime.edit(**{**args, name: value})
    if call == "invert":
        args = dict(image=image, prompt="a photo", original_subject="cat", num_inference_steps=1, **size)
        return runtime.invert(**{**args, name: value})
    args = {"path": fixture.package, name: value}
    return BlipDiffusionRuntime.from_package(**args)


@pytest.mark.parametrize("call,name,value", API_CASES)
def test_public_arguments_with_wrong_types(tiny, call, name, value, monkeypatch):
    """7: an InputError (a ValueError) naming the argument, one line, before any graph runs."""
    from conftest import shared_runtime

    runtime = shared_runtime(tiny)
    engines_used = []
    real_engine = runtime.engine
    monkeypatch.setattr(runtime, "engine", lambda component: engines_used.append(component) or real_engine(component))
    with pytest.raises(InputError) as error:
        _call(runtime, tiny, call, name, value)
    one_line(str(error.value))
    assert error.value.field == name or f"{name} " in str(error.value) or str(error.value).startswith(name), (
        f"{call}({name}={value!r}): {error.value} (field {error.value.field!r})")
    assert not engines_used, f"{call}({name}={value!r}) ran {engines_used} before refusing it"


def test_subject_embedding_and_mix_subjects_arguments(tiny):
    """7: SubjectEmbedding arrays of any float dtype are float32 (the text encoder's input); other
    arrays, and mix_subjects pairs that are not (SubjectEmbedding, number): an InputError each."""
    from conftest import shared_runtime

    runtime = shared_runtime(tiny)
    config = runtime.config
    shape = (config.num_query_tokens, config.text_hidden_size)
    base = np.random.default_rng(0).standard_normal(shape)

    def generate(subject):
        return runtime("a photo", subject=subject, target_subject_category="dog", num_inference_steps=1,
                       output_type="np", seed=0).images

    for dtype in (np.float16, np.float64):
        subject = SubjectEmbedding(base.astype(dtype))
        assert subject.embeddings.dtype == np.float32
        # exactly the float32 values of the array: the same image as the float32 array gives
        expected = generate(SubjectEmbedding(base.astype(dtype).astype(np.float32)))
        np.testing.assert_array_equal(generate(subject), expected)
    for bad in ("x", np.zeros(shape, np.int64), np.zeros(shape[0], np.float32), [[0.0]]):
        with pytest.raises(InputError) as error:
            SubjectEmbedding(bad)
        assert error.value.field == "subject"
    with pytest.raises(InputError) as error:
        SubjectEmbedding(base.astype(np.float32), label=5)
    assert error.value.field == "subject"
    good = SubjectEmbedding(base.astype(np.float32), label="dog")
    for bad in ([("x", 1)], [(good, "1")], [(good, None)], [good], "x", [], None, [(good, HUGE)], [(good, 1, 2)],
                [(good, np.ones(2))]):
        with pytest.raises(InputError) as error:
            runtime.mix_subjects(bad)
        assert error.value.field == "subjects", (bad, error.value)
    mixed = runtime.mix_subjects([(good, 1), (good, np.float32(3))])
    np.testing.assert_allclose(mixed.embeddings, good.embeddings, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 4: tokenizers against the vocabularies; tokenizer failures as one line
# --------------------------------------------------------------------------------------------

def _edit_tokenizer(package: Path, folder: str, change) -> None:
    name = f"{folder}/tokenizer.json"
    data = json.loads((package / name).read_text())
    change(data)
    rewrite(package, name, data)


def _id_past(data: dict, past: int) -> None:
    vocab = data["model"]["vocab"]
    word = next(w for w, i in vocab.items() if i == 5)
    vocab[word] = past


@pytest.mark.parametrize("folder", ["tokenizer", "qformer_tokenizer"])
def test_tokenizer_ids_past_the_vocabulary_refused_when_opened(tiny, tmp_path, folder):
    """4: a tokenizer.json mapping a word past its model's vocabulary (manifest recomputed): one
    PackageError line when the package opens, on every backend (ONNX Runtime raised at the
    Gather, OpenVINO read zeros)."""
    package = copy_package(tiny, tmp_path)
    config = json.loads((package / "pipeline.json").read_text())
    vocab = config["text_vocab_size" if folder == "tokenizer" else "qformer_vocab_size"]
    assert vocab > 0  # recorded by export
    _edit_tokenizer(package, folder, lambda d: _id_past(d, vocab + 10))
    with pytest.raises(PackageError) as error:
        BlipDiffusionRuntime.from_package(package)
    one_line(str(error.value), f"{folder}/tokenizer.json", f"token id {vocab + 10}", "vocabulary")


def test_pipeline_json_records_the_vocabularies(tiny):
    from conftest import load_diffusers

    pipe = load_diffusers(tiny)
    config = json.loads((tiny.package / "pipeline.json").read_text())
    assert config["text_vocab_size"] == pipe.text_encoder.config.vocab_size
    assert config["qformer_vocab_size"] == pipe.qformer.config.qformer_config.vocab_size


def test_tokenizer_panic_is_one_line(tiny, tmp_path):
    """4: a pre-tokenizer regex past Oniguruma's retry limit makes the Rust tokenizer panic
    (PanicException, a BaseException): one PackageError line naming the tokenizer file."""
    package = copy_package(tiny, tmp_path)
    _edit_tokenizer(package, "tokenizer", lambda d: d.update(
        pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a|a)+$"}, "behavior": "Isolated", "invert": False}))
    runtime = BlipDiffusionRuntime.from_package(package)
    with pytest.raises(PackageError) as error:
        runtime("a" * 40 + "b", REFERENCE, "dog", "dog", num_inference_steps=1, output_type="np")
    one_line(str(error.value), "tokenizer/tokenizer.json", "the tokenizer failed on prompt")


# --------------------------------------------------------------------------------------------
# 9, 10, 11: outputs, the blend threshold, precisions
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "invert"])
def test_out_onto_a_read_only_file_is_refused(tiny, tmp_path, capsys, command):
    """9: --out onto an existing read-only file: refused before any work (one line), the file and
    its mode kept (the output would be renamed over it, replacing both)."""
    import os
    import stat

    from PIL import Image

    from blipdiffusion_trt import cli

    ref = tmp_path / "ref.png"
    Image.fromarray(REFERENCE).save(ref)
    out = tmp_path / ("out.png" if command == "generate" else "latent.npy")
    out.write_bytes(b"keep me")
    out.chmod(0o444)
    if command == "generate":
        argv = generate_args(tiny.package, ref, out)
    else:
        argv = ["invert", str(tiny.package), "--image", str(ref), "--prompt", "a photo", "--original-subject", "cat",
                "--steps", "1", "--out", str(out)]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    one_line(lines[0], "--out", "read-only")
    assert out.read_bytes() == b"keep me" and stat.S_IMODE(os.stat(out).st_mode) == 0o444
    # a writable existing file is still replaced
    out.chmod(0o644)
    assert cli.main(argv) == 0
    assert out.read_bytes() != b"keep me"


def test_blend_threshold_that_selects_no_pixel_is_refused(tiny):
    """10: the normalised attention map's largest value is 1 and the mask keeps what lies above
    the threshold, so 1 gives an empty mask (the edit equals the source): refused; just below 1
    keeps at least the largest value's pixels."""
    from conftest import shared_runtime

    runtime = shared_runtime(tiny)
    args = dict(num_inference_steps=1, output_type="np")
    for bad in (1.0, 1, np.float32(1.0)):
        with pytest.raises(InputError) as error:
            runtime.edit("a photo", REFERENCE, "dog", "dog", "cat", blend_threshold=bad, **args)
        one_line(str(error.value), "blend_threshold", "[0, 1)", "selects no pixel")
    out = runtime.edit("a photo", REFERENCE, "dog", "dog", "cat", blend_threshold=0.999, seed=0, **args)
    assert out.mask.any()


def test_precision_no_package_holds_is_an_argument_error(tiny):
    """11: precision="fp64" is a wrong argument (InputError naming the precisions there are), not
    a package to re-export with --precision fp32,fp64."""
    from blipdiffusion_trt.package import ModelPackage

    for call in (lambda: BlipDiffusionRuntime.from_package(tiny.package, precision="fp64"),
                 lambda: ModelPackage.open(tiny.package).require_precision("fp64"),
                 lambda: ModelPackage.open(tiny.package).onnx_path("unet_plain", "fp64")):
        with pytest.raises(InputError) as error:
            call()
        one_line(str(error.value), "precision must be one of fp32, fp16", "'fp64'")
        assert "re-export" not in str(error.value)
