"""Backend options are declared once, on their options class: the flags of generate, edit, invert and
bench come from the registry, and a flag given reaches the chosen backend's options."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from blipdiffusion_trt import cli
from blipdiffusion_trt.bench.ours import load_runtime, runtime_options
from blipdiffusion_trt.bench.settings import Settings
from blipdiffusion_trt.errors import InputError
from blipdiffusion_trt.runtime import backends
from blipdiffusion_trt.runtime import cli as runtime_cli
from blipdiffusion_trt.runtime.backends import (REGISTRY, Backend, add_option_arguments, given_flags, option,
                                                option_flags, options_from_flags)
from blipdiffusion_trt.runtime.backends.base import option_info
from blipdiffusion_trt.runtime.backends.onnxruntime import OnnxRuntimeOptions, make_cpu_engine

COMMANDS = ("generate", "edit", "invert", "bench")
# The flags users' scripts pass, with the value each option has when the flag is not given.
EXISTING = {
    "--threads": None, "--graph-optimization": "all", "--ort-cache": None, "--memory-arena": "loop",
    "--no-cpu-fused": True, "--device-id": 0, "--cuda-graph": "loop", "--cudnn-conv-algo-search": "HEURISTIC",
    "--inference-precision": "auto", "--openvino-cache": None, "--no-openvino-cache": True,
    "--openvino-int8-weights": False,
}


def _subparser(command: str):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command]


def _required(command: str, package: Path, tmp_path: Path) -> list[str]:
    ref = str(tmp_path / "ref.png")
    return {
        "generate": [str(package), "--prompt", "p", "--reference-image", ref, "--source-subject", "dog",
                     "--target-subject", "dog", "--out", str(tmp_path / "o.png")],
        "edit": [str(package), "--prompt", "p", "--reference-image", ref, "--source-subject", "dog",
                 "--target-subject", "dog", "--original-subject", "cat", "--out", str(tmp_path / "o.png")],
        "invert": [str(package), "--image", ref, "--prompt", "p", "--original-subject", "cat",
                   "--out", str(tmp_path / "o.npy")],
        "bench": ["--package", str(package)],
    }[command]


@dataclasses.dataclass(frozen=True)
class ProbeOptions(OnnxRuntimeOptions):
    """The cpu backend's options plus one new option: the one line a contributor adds."""

    probe_level: int = option(3, flag="--probe-level", type=int, help="a new option")


@pytest.fixture()
def probe_backend(monkeypatch):
    """A backend "probe" (the cpu engines) whose factory records the options it is given."""
    made: list[ProbeOptions] = []

    def factory(package, component, precision, options):
        made.append(options)
        return make_cpu_engine(package, component, precision, options)

    module = types.ModuleType(f"{backends.__name__}.probe")
    module.PROBE = Backend("probe", "a test backend", ProbeOptions, factory)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(REGISTRY, "probe", ("probe", "PROBE"))
    return made


def test_every_option_is_declared_and_the_flags_keep_their_names_and_defaults():
    for name in REGISTRY:
        for f in dataclasses.fields(backends.get_backend(name).options_class):
            assert option_info(f).help, (name, f.name)
    flags = option_flags()
    assert set(EXISTING) <= set(flags), set(EXISTING) - set(flags)
    for flag, default in EXISTING.items():
        assert flags[flag].default == default, flag
    assert flags["--threads"].backends == ("cpu", "cuda", "ort-tensorrt", "openvino")
    assert flags["--openvino-cache"].field == "cache_dir" and flags["--openvino-cache"].backends == ("openvino",)


def test_every_command_has_every_flag(tmp_path):
    for command in COMMANDS:
        sub = _subparser(command)
        have = {s for a in sub._actions for s in a.option_strings}
        assert set(option_flags()) <= have, (command, set(option_flags()) - have)
        # bench lacked these before the flags came from the registry
        args = sub.parse_args([*_required(command, tmp_path / "pkg", tmp_path), "--cuda-graph", "none",
                               "--device-id", "1", "--cudnn-conv-algo-search", "EXHAUSTIVE", "--no-cpu-fused"])
        assert given_flags(args) == {"--cuda-graph": "none", "--device-id": 1, "--cudnn-conv-algo-search": "EXHAUSTIVE",
                                     "--no-cpu-fused": False}, command
        options = options_from_flags("cuda", given_flags(args))
        assert (options.cuda_graph, options.device_id, options.cudnn_conv_algo_search, options.cpu_fused) == \
            ("none", 1, "EXHAUSTIVE", False)
        # nothing given: every option keeps its declared default
        args = sub.parse_args(_required(command, tmp_path / "pkg", tmp_path))
        assert given_flags(args) == {} and options_from_flags("openvino", given_flags(args)) == \
            backends.get_backend("openvino").options()


def test_a_new_option_reaches_the_backend_from_every_command(tiny, tmp_path, probe_backend):
    assert option_flags()["--probe-level"].backends == ("probe",)
    for command in COMMANDS:
        sub = _subparser(command)
        assert "--probe-level" in sub.format_help(), command
        backend = ["--backends" if command == "bench" else "--backend", "probe"]
        args = sub.parse_args([*_required(command, tiny.package, tmp_path), *backend, "--probe-level", "7"])
        probe_backend.clear()
        if command == "bench":
            assert runtime_options(args)["probe_level"] == 7
            settings = Settings(height=64, width=64, steps=1, batch=1, scheduler="pndm", guidance=7.5, precision="fp32",
                                seed=0, controlnet=False, latent_shape=(1, 4, 8, 8))
            runtime = load_runtime(tiny.package, "probe", settings, verify=False, flags=given_flags(args))
        else:
            runtime = runtime_cli.open_runtime(args)
        with runtime:
            assert probe_backend and all(o.probe_level == 7 for o in probe_backend), command
    # not given: its declared default
    probe_backend.clear()
    args = _subparser("generate").parse_args([*_required("generate", tiny.package, tmp_path), "--backend", "probe"])
    with runtime_cli.open_runtime(args):
        assert probe_backend and all(o.probe_level == 3 for o in probe_backend)


def test_a_flag_the_backend_lacks_is_one_error_naming_it(tmp_path, probe_backend, capsys):
    with pytest.raises(InputError) as e:
        options_from_flags("cpu", {"--probe-level": 7})
    assert str(e.value).startswith("--probe-level: not an option of the cpu backend")
    # the benchmark gives each backend the flags it has
    assert options_from_flags("cpu", {"--probe-level": 7, "--threads": 1}, strict=False) == OnnxRuntimeOptions(threads=1)
    # on the command line: one line naming the flag, before anything loads
    code = cli.main(["generate", *_required("generate", tmp_path / "missing", tmp_path), "--backend", "probe",
                     "--probe-level", "7", "--device-id", "0"])
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert code == 2 and last.startswith("error: --device-id: not an option of the probe backend"), last
    # a bad value of a declared option is named by its flag, not by its field
    code = cli.main(["generate", *_required("generate", tmp_path / "missing", tmp_path), "--threads", "-2"])
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert code == 2 and last.startswith("error: --threads must be an integer >= 0"), last


def test_a_flag_declared_differently_by_two_backends_is_refused(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Clash(OnnxRuntimeOptions):
        other: str = option("x", flag="--memory-arena", help="the same flag, another option")

    module = types.ModuleType(f"{backends.__name__}.clash")
    module.CLASH = Backend("clash", "a test backend", Clash, make_cpu_engine)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(REGISTRY, "clash", ("clash", "CLASH"))
    with pytest.raises(TypeError, match="--memory-arena"):
        add_option_arguments(__import__("argparse").ArgumentParser())
