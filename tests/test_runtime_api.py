"""The runtime's public surface: what a user calls is public, the stages are private, editing is a
part the runtime owns (:class:`Editor`) over a declared interface, and an edit's arguments have one
home (:class:`EditArguments`)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from blipdiffusion_trt.runtime import cli as runtime_cli
from blipdiffusion_trt.runtime.editing import EditArguments, Editor, GenerationStages
from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

PUBLIC = {"from_package", "edit", "invert", "encode_subject", "mix_subjects", "engine", "engine_details", "close"}


def test_the_public_methods_are_what_a_user_calls():
    public = {name for name, value in vars(BlipDiffusionRuntime).items()
              if not name.startswith("_") and callable(getattr(BlipDiffusionRuntime, name))}
    assert public == PUBLIC
    assert callable(BlipDiffusionRuntime.__call__) and hasattr(BlipDiffusionRuntime, "__enter__")
    public_editor = {name for name in vars(Editor) if not name.startswith("_")}
    assert {"edit", "invert"} <= public_editor


def test_the_runtime_provides_what_the_editor_declares_it_uses():
    """GenerationStages is the editor's whole view of its runtime: each method it declares exists on
    the runtime and takes the parameters declared (so the protocol cannot drift from the runtime)."""
    declared = {name: value for name, value in vars(GenerationStages).items()
                if callable(value) and not name.startswith("__")}
    assert "_denoise" in declared and "engine" in declared
    for name, method in declared.items():
        provided = getattr(BlipDiffusionRuntime, name, None)
        assert provided is not None, name
        have = inspect.signature(provided).parameters
        for parameter in inspect.signature(method).parameters.values():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) or parameter.name == "self":
                continue
            assert parameter.name in have, (name, parameter.name)
    for attribute in GenerationStages.__annotations__:
        assert attribute in inspect.getsource(BlipDiffusionRuntime.__init__), attribute
    # the editor reaches its runtime only through what the protocol declares
    used = set(re.findall(r"\bruntime\.(\w+)", inspect.getsource(Editor)))
    assert "_denoise" in used and "engine" in used
    assert used <= set(declared) | set(GenerationStages.__annotations__), used - set(declared)


def test_an_edit_s_arguments_have_one_home():
    fields = {f.name: f for f in dataclasses.fields(EditArguments)}
    edit = inspect.signature(BlipDiffusionRuntime.edit).parameters
    # runtime.edit names the five words and images, and passes the rest to EditArguments by name
    named = [p for p in edit if p not in ("self", "callback", "progress", "arguments")]
    assert named == list(fields)[:5]
    assert all(edit[p].default is inspect.Parameter.empty for p in named)
    # the command line's defaults are EditArguments'
    parser = runtime_cli.argparse.ArgumentParser()
    runtime_cli.add_edit_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions}
    for dest, field in (("steps", "num_inference_steps"), ("guidance", "guidance_scale"),
                        ("negative_prompt", "neg_prompt"), ("cross_replace_steps", "cross_replace_steps"),
                        ("self_replace_steps", "self_replace_steps"), ("blend_threshold", "blend_threshold")):
        assert defaults[dest] == fields[field].default, dest
    with pytest.raises(TypeError, match="blend"):
        EditArguments("p", None, "dog", "dog", "cat", blend=0.5)
    with pytest.raises(TypeError):
        EditArguments("p", None, "dog", "dog", "cat", None)  # the options are keyword-only
