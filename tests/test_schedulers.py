"""The numpy scheduler ports against the installed diffusers 0.32.2.

Two references are used, both the installed diffusers code:

* ``exact_torch``: diffusers with torch's ``sqrt``/``log``/``exp`` (and ``** 0.5``) swapped for
  correctly rounded float32 versions. The pip torch wheels compute these with MKL VML, which is
  not correctly rounded (on x86 ``torch.sqrt`` differs from IEEE sqrt by one ulp on ~0.6% of float32
  inputs; 6 of the 1000 training sigmas of BLIP-Diffusion's schedule). With that difference
  removed, every float32 operation of diffusers is reproduced by the ports, and whole sampling
  loops (up to 1000 steps, random model outputs) must be **bit-identical**: IEEE-754 float32
  arithmetic is correctly rounded on every CPU, so nothing in this comparison depends on the CPU.
* stock diffusers (torch untouched): every step is fed diffusers' own current sample
  ("teacher forcing") and a plausible denoiser output, and must agree within
  ``STOCK_ATOL + STOCK_RTOL * max|reference|`` (see the argument at those constants). Whole
  free-running loops are not compared against stock torch: a one-ulp difference in a sqrt/log is
  amplified along 1000 steps (DPM-Solver's h = λ_t − λ_s cancels ~4 digits) to ~1e-5.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    # diffusers 0.32.2 under numpy 2 / its own deprecations; nothing of ours
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver and sde-dpmsolver` is deprecated:FutureWarning"),
]

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from blipdiffusion_trt.errors import InputError  # noqa: E402
from blipdiffusion_trt.runtime import schedulers as S  # noqa: E402

# BLIP-Diffusion's scheduler/scheduler_config.json (the package's config)
BLIP_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 0,
}
BASES = {"blip": BLIP_CONFIG, "blip-offset1": {**BLIP_CONFIG, "steps_offset": 1}}
SPACINGS = [None, "linspace", "leading", "trailing"]  # None: the class default
STEPS = [1, 2, 25, 50, 1000]
SHAPE = (2, 4, 6, 5)

# Bound for comparisons against stock diffusers (torch's own sqrt/log/exp). Stock torch differs
# from an IEEE float32 computation only in rounding: MKL VML's sqrt/log/exp are within one ulp but
# not correctly rounded, and which vectorised kernel torch picks (and whether it fuses a*b + c into
# one FMA) depends on the CPU. With teacher forcing every compared step starts from identical
# inputs, so these differences cannot accumulate: a step's output differs by a few roundings of its
# largest intermediate. A step is a linear combination c1*x + c2*eps (PNDM: of four eps); its
# coefficients reach |c| ~ 8 (PNDM's sqrt(alpha_prev / alpha_t) at t=999 with 2 steps), so its
# intermediates reach ~8x the output's largest value, and two one-ulp roundings of those are
# 2 * 8 = 16 float32 epsilons of that value. The absolute term (8 ulps at |x| = 1, the bound used
# before) covers outputs near zero and DPM-Solver's cancelling lambda differences.
# A real porting mistake (a wrong timestep index, coefficient or order) moves values by > 1e-3
# relative, far past this bound.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
STOCK_RTOL = 16 * FLOAT32_EPS
STOCK_ATOL = 1e-6

REFERENCE = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp-2m": diffusers.DPMSolverMultistepScheduler,
}
# what scheduler_from_config forces for a name (diffusers' from_config kwargs)
FORCED = {"dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2}}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def exact_torch(monkeypatch):
    """Make torch's float32 sqrt/log/exp correctly rounded while diffusers runs."""

    def correctly_rounded(fn64):
        def apply(t):
            a = t.detach().cpu().numpy()
            with np.errstate(all="ignore"):
                r = np.asarray(fn64(a.astype(np.float64))).astype(a.dtype)
            return torch.from_numpy(np.array(r)).reshape(t.shape)

        return apply

    sqrt = correctly_rounded(np.sqrt)
    original_pow = torch.Tensor.__pow__

    def pow_(self, exponent):
        if isinstance(exponent, (int, float)) and exponent == 0.5 and self.dtype == torch.float32:
            return sqrt(self)
        return original_pow(self, exponent)

    monkeypatch.setattr(torch.Tensor, "__pow__", pow_)
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda self: sqrt(self))
    monkeypatch.setattr(torch, "sqrt", sqrt)
    monkeypatch.setattr(torch, "log", correctly_rounded(np.log))
    monkeypatch.setattr(torch, "exp", correctly_rounded(np.exp))
    # sanity: the patch is active (this value is one ulp off with the pip wheel's MKL sqrt)
    x = np.float32(2.2751102)
    assert float(torch.tensor(x) ** 0.5) == float(np.sqrt(x))


def build_pair(name, config, **kwargs):
    """(ours, diffusers') for scheduler ``name``, both from the same config dict."""
    ours = S.scheduler_from_config(name, {**config, **kwargs})
    ref = REFERENCE[name].from_config({**config, **kwargs}, **FORCED.get(name, {}))
    return ours, ref


def config_for(base, spacing, **extra):
    config = dict(BASES[base], **extra)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    return config


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def assert_identical(ours, ref, what):
    """Against the exact-math reference: same dtype, same shape, the same bits (NaN where it is NaN)."""
    ref = _numpy(ref)
    assert ours.shape == ref.shape, what
    assert ours.dtype == ref.dtype, what
    if not ((ours == ref) | (np.isnan(ours) & np.isnan(ref))).all():
        np.testing.assert_array_equal(ours, ref, err_msg=what)


def assert_close_to_stock(ours, ref, what):
    """Against stock torch: within ``STOCK_ATOL + STOCK_RTOL * max|ref|`` (argued at the constants)."""
    ref = _numpy(ref)
    assert ours.shape == ref.shape, what
    assert ours.dtype == ref.dtype, what
    finite = np.isfinite(ref)
    scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
    bound = STOCK_ATOL + STOCK_RTOL * scale
    with np.errstate(invalid="ignore"):
        ok = (np.abs(ours.astype(np.float64) - ref) <= bound) | (ours == ref) | (np.isnan(ours) & np.isnan(ref))
    if not ok.all():  # the fast check above is the same test; this one explains the failure
        np.testing.assert_allclose(ours, ref, rtol=0, atol=bound, err_msg=f"{what} (bound {bound:.3g} for max|ref| {scale:.3g})")


def compare_setup(ours, ref, steps, check=assert_identical):
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    ref_ts = ref.timesteps.numpy()
    assert isinstance(ours.timesteps, np.ndarray)
    assert ours.timesteps.dtype == ref_ts.dtype
    np.testing.assert_array_equal(ours.timesteps, ref_ts)
    assert ours.num_inference_steps == ref.num_inference_steps
    check(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    check(np.asarray(ours.init_noise_sigma, np.float32), np.asarray(float(ref.init_noise_sigma), np.float32), "init_noise_sigma")
    if hasattr(ref, "sigmas"):
        check(ours.sigmas, ref.sigmas, "sigmas")


def run_loop(ours, ref, steps, *, seed=0, teacher_forced=False, denoiser=False, shape=SHAPE):
    """Run both schedulers through a whole sampling loop, comparing each step.

    Free-running loops (``exact_torch`` references) must be bit-identical; ``teacher_forced``
    loops (stock torch: ours is fed diffusers' current sample every step) must stay within the
    stock bound. Model outputs are seeded random float32 arrays, or (``denoiser``) the model input
    plus 10% noise, a stand-in for an ε-prediction that keeps samples at a realistic scale. If
    diffusers raises, ours must raise the same exception type at the same call, and the loop stops
    there. At least one whole step must be compared (a loop that both sides refuse at once compares
    nothing and would pass for anything), unless both refuse the very first step because its
    timestep lies outside the training schedule (``steps_offset=1`` with as many steps as training
    timesteps: PNDM and DDIM index ``alphas_cumprod`` with it; Euler interpolates and runs).
    Returns the last samples.
    """
    check = assert_close_to_stock if teacher_forced else assert_identical
    compare_setup(ours, ref, steps, check)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape, dtype=np.float32) * np.float32(float(ref.init_noise_sigma))
    ref_x = torch.from_numpy(latents.copy())
    our_x = latents.copy()
    compared, refused = 0, None
    for i, t in enumerate(ref.timesteps):
        if teacher_forced:
            our_x = ref_x.numpy().copy()
        our_t = ours.timesteps[i]
        noise = rng.standard_normal(shape, dtype=np.float32)

        ref_err = our_err = None
        try:
            ref_in = ref.scale_model_input(ref_x, t)
        except Exception as e:  # noqa: BLE001 - diffusers' behaviour is what we match
            ref_err = e
        try:
            our_in = ours.scale_model_input(our_x, our_t)
        except Exception as e:  # noqa: BLE001
            our_err = e
        if ref_err is not None or our_err is not None:
            assert ref_err is not None and isinstance(our_err, type(ref_err)), (i, ref_err, our_err)
            refused = i
            break
        check(our_in, ref_in, f"scale_model_input at step {i} (t={our_t})")

        model_output = (ref_in.numpy() + np.float32(0.1) * noise) if denoiser else noise
        try:
            ref_x = ref.step(torch.from_numpy(model_output.copy()), t, ref_x).prev_sample
        except Exception as e:  # noqa: BLE001
            ref_err = e
        try:
            our_x = ours.step(model_output, our_t, our_x)
        except Exception as e:  # noqa: BLE001
            our_err = e
        if ref_err is not None or our_err is not None:
            assert ref_err is not None and isinstance(our_err, type(ref_err)), (i, ref_err, our_err)
            refused = i
            break
        check(our_x, ref_x, f"prev_sample at step {i} (t={our_t})")
        compared += 1
    first, trained = int(ref.timesteps[0]), ref.config.num_train_timesteps
    assert compared >= 1 or (refused == 0 and first >= trained), (
        f"no step compared ({len(ref.timesteps)} timesteps from t={first}, refused at step {refused})")
    return our_x, ref_x.numpy()


# ----------------------------------------------------------------------------------------------
# whole loops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s or "default")
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_loop_matches_diffusers(name, base, spacing, steps, exact_torch):
    ours, ref = build_pair(name, config_for(base, spacing))
    run_loop(ours, ref, steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s or "default")
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_each_step_matches_stock_diffusers(name, base, spacing, steps):
    ours, ref = build_pair(name, config_for(base, spacing))
    run_loop(ours, ref, steps, teacher_forced=True, denoiser=True)


@pytest.mark.parametrize("steps", [2, 25])
@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_stock_bound_rejects_a_small_porting_error(name, steps, monkeypatch):
    """The stock bound is not loose: a 0.1% error in the model-output term of a step fails it."""
    ours, ref = build_pair(name, BLIP_CONFIG)
    step = type(ours).step

    def slightly_wrong(self, model_output, *args, **kwargs):
        return step(self, model_output * np.float32(1.001), *args, **kwargs)

    monkeypatch.setattr(type(ours), "step", slightly_wrong)
    with pytest.raises(AssertionError, match="prev_sample at step"):
        run_loop(ours, ref, steps, teacher_forced=True, denoiser=True)


# name -> configs beyond the BLIP base that change the math (each run as a 25-step loop)
VARIANTS = {
    "pndm": [
        {"prediction_type": "v_prediction"},
        {"beta_schedule": "linear", "set_alpha_to_one": True},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()},
    ],
    "ddim": [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"clip_sample": False},
        {"clip_sample_range": 1.5},
        {"set_alpha_to_one": True},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
    "euler": [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"final_sigmas_type": "sigma_min"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"beta_schedule": "linear"},
        {"timestep_type": "continuous"},  # only changes anything together with v_prediction
    ],
    "dpmpp-2m": [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"solver_type": "heun"},
        {"lower_order_final": False},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    ],
}


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize(
    "name,extra",
    [(name, extra) for name, extras in VARIANTS.items() for extra in extras],
    ids=lambda v: ",".join(f"{k}={v[k]}" if k != "trained_betas" else "trained_betas" for k in v) if isinstance(v, dict) else v,
)
def test_variant_loop_matches_diffusers(name, extra, steps, exact_torch):
    ours, ref = build_pair(name, BLIP_CONFIG, **extra)
    run_loop(ours, ref, steps, seed=1)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpmpp-2m"])
def test_v_prediction_each_step_matches_stock_diffusers(name):
    ours, ref = build_pair(name, BLIP_CONFIG, prediction_type="v_prediction")
    run_loop(ours, ref, 50, teacher_forced=True, seed=2)


@pytest.mark.parametrize("steps", [4, 25, 50, 1000])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_pndm_runge_kutta_warmup_matches_diffusers(spacing, steps, exact_torch):
    config = dict(BLIP_CONFIG, skip_prk_steps=False, timestep_spacing=spacing)
    ours = S.PNDMScheduler.from_config(config)
    ref = diffusers.PNDMScheduler.from_config(config)
    run_loop(ours, ref, steps, seed=3)
    assert len(ours.prk_timesteps) == 12


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (3, "midpoint"), (3, "heun")])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_orders_match_diffusers(order, solver_type, steps, exact_torch):
    config = dict(BLIP_CONFIG, solver_order=order, solver_type=solver_type)
    ours = S.DPMSolverMultistepScheduler.from_config(config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    run_loop(ours, ref, steps, seed=4)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_first_generation_algorithm_matches_diffusers(solver_type, exact_torch):
    config = dict(BLIP_CONFIG, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type=solver_type)
    ours = S.DPMSolverMultistepScheduler.from_config(config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    run_loop(ours, ref, 20, seed=5)


def test_dpm_solver_learned_variance_uses_first_three_channels(exact_torch):
    config = dict(BLIP_CONFIG, variance_type="learned_range")
    ours = S.DPMSolverMultistepScheduler.from_config(config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    compare_setup(ours, ref, 10)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 4, 5), dtype=np.float32)
    ref_x = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal((1, 6, 4, 5), dtype=np.float32)
        ref_x = ref.step(torch.from_numpy(out), t, ref_x).prev_sample
        x = ours.step(out, ours.timesteps[i], x)
        assert_identical(x, ref_x, f"step {i}")


def test_ddim_eta_with_variance_noise_matches_diffusers(exact_torch):
    ours, ref = build_pair("ddim", BLIP_CONFIG)
    compare_setup(ours, ref, 25)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    ref_x = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        ref_x = ref.step(
            torch.from_numpy(out), t, ref_x, eta=0.7, use_clipped_model_output=True, variance_noise=torch.from_numpy(noise)
        ).prev_sample
        x = ours.step(out, ours.timesteps[i], x, eta=0.7, use_clipped_model_output=True, variance_noise=noise)
        assert_identical(x, ref_x, f"step {i}")
    with pytest.raises(InputError, match="variance_noise"):
        ours.step(out, ours.timesteps[0], x, eta=0.5)


def test_ddim_clip_sample_default_true_and_false_differs(exact_torch):
    ddim = S.DDIMScheduler.from_config(BLIP_CONFIG)
    assert ddim.config.clip_sample is True  # DDIM's own default: BLIP's PNDM config does not set it
    assert diffusers.DDIMScheduler.from_config(BLIP_CONFIG).config.clip_sample is True
    finals = {}
    for clip in (True, False):
        ours, ref = build_pair("ddim", BLIP_CONFIG, clip_sample=clip)
        finals[clip], _ = run_loop(ours, ref, 25, seed=8)
    # random ε at high noise predicts |x_0| > 1, so clipping must change the result
    assert np.abs(finals[True] - finals[False]).max() > 0.1


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_config_fields_and_defaults_are_diffusers(name):
    params = inspect.signature(REFERENCE[name].__init__).parameters
    expected = [(k, p.default) for k, p in params.items() if k != "self"]
    got = [(f.name, f.default) for f in dataclasses.fields(S.SCHEDULERS[name].config_class)]
    assert got == expected
    assert dataclasses.is_dataclass(S.SCHEDULERS[name].config_class)
    assert S.SCHEDULERS[name].config_class.__dataclass_params__.frozen


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_from_config_ignores_foreign_keys_and_uses_class_defaults(name):
    config = {
        **BLIP_CONFIG,
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.32.2",
        "clip_sample": False,  # a DDIM field: foreign to the others
        "solver_order": 3,  # a DPM field: foreign to the others
        "some_future_option": 1,
    }
    ours = S.SCHEDULERS[name].from_config(config)
    ref = REFERENCE[name].from_config(config)
    for field in dataclasses.fields(ours.config):
        expected = ref.config[field.name]
        value = getattr(ours.config, field.name)
        if field.name == "trained_betas":
            assert value is None and expected is None
        else:
            assert value == expected, field.name
    assert not hasattr(ours.config, "_class_name")
    # from_config also takes our own config object back, and keyword overrides win
    again = S.SCHEDULERS[name].from_config(ours.config, steps_offset=1)
    assert again.config == dataclasses.replace(ours.config, steps_offset=1)


def test_from_config_defaults_per_class():
    ddim = S.DDIMScheduler.from_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True})
    assert ddim.config.clip_sample is True and ddim.config.steps_offset == 0
    assert ddim.config.set_alpha_to_one is True and ddim.config.timestep_spacing == "leading"
    euler = S.EulerDiscreteScheduler.from_config({})
    assert euler.config.timestep_spacing == "linspace"
    pndm = S.PNDMScheduler.from_config({})
    assert pndm.config.skip_prk_steps is False and pndm.config.set_alpha_to_one is False


def test_scheduler_from_config_registry_and_forced_dpm_options():
    assert S.SCHEDULERS == {
        "pndm": S.PNDMScheduler,
        "ddim": S.DDIMScheduler,
        "euler": S.EulerDiscreteScheduler,
        "dpmpp-2m": S.DPMSolverMultistepScheduler,
    }
    dpm = S.scheduler_from_config("dpmpp-2m", {**BLIP_CONFIG, "algorithm_type": "dpmsolver", "solver_order": 3})
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert isinstance(S.scheduler_from_config("pndm", BLIP_CONFIG), S.PNDMScheduler)


def test_trained_betas_match_diffusers():
    betas = np.linspace(0.0001, 0.02, 1000).tolist()
    ours = S.DDIMScheduler.from_config({"trained_betas": betas})
    ref = diffusers.DDIMScheduler.from_config({"trained_betas": betas})
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    assert isinstance(ours.config.trained_betas, tuple)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("n_train", [1000, 999, 10])
def test_betas_are_bit_identical(schedule, n_train):
    config = {"beta_schedule": schedule, "num_train_timesteps": n_train, "beta_start": 0.00085, "beta_end": 0.012}
    for name in S.SCHEDULERS:
        ours, ref = S.SCHEDULERS[name].from_config(config), REFERENCE[name].from_config(config)
        np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_unknown_scheduler_name_raises_input_error():
    with pytest.raises(InputError) as info:
        S.scheduler_from_config("heun", BLIP_CONFIG)
    message = str(info.value)
    assert "\n" not in message and "'heun'" in message
    for name in S.SCHEDULERS:
        assert name in message


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, "10", None])
def test_bad_num_inference_steps_raise_input_error(name, steps):
    scheduler = S.scheduler_from_config(name, BLIP_CONFIG)
    with pytest.raises(InputError, match=r"^num_inference_steps must be an integer in \[1, 1000\], got "):
        scheduler.set_timesteps(steps)


def test_num_inference_steps_message():
    with pytest.raises(InputError) as info:
        S.PNDMScheduler.from_config(BLIP_CONFIG).set_timesteps(0)
    assert str(info.value) == "num_inference_steps must be an integer in [1, 1000], got 0"
    S.PNDMScheduler.from_config(BLIP_CONFIG).set_timesteps(np.int64(50))  # numpy integers are fine


@pytest.mark.parametrize(
    "name,option",
    [
        ("ddim", {"thresholding": True}),
        ("euler", {"use_karras_sigmas": True}),
        ("euler", {"use_exponential_sigmas": True}),
        ("euler", {"use_beta_sigmas": True}),
        ("euler", {"interpolation_type": "log_linear"}),
        ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
        ("dpmpp-2m", {"use_karras_sigmas": True}),
        ("dpmpp-2m", {"use_lu_lambdas": True}),
        ("dpmpp-2m", {"use_flow_sigmas": True}),
        ("dpmpp-2m", {"thresholding": True}),
        ("pndm", {"prediction_type": "sample"}),
        ("pndm", {"beta_schedule": "cosine"}),
        ("ddim", {"timestep_spacing": "karras"}),
    ],
)
def test_unported_or_invalid_options_raise(name, option):
    with pytest.raises(ValueError) as info:
        S.SCHEDULERS[name].from_config({**BLIP_CONFIG, **option})
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_dpm_sde_variants_raise(algorithm):
    with pytest.raises(InputError, match="not supported"):
        S.DPMSolverMultistepScheduler.from_config({**BLIP_CONFIG, "algorithm_type": algorithm, "final_sigmas_type": "sigma_min"})


def test_dpm_algorithm_aliases_and_zero_final_sigma_rule():
    config = {"algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min"}
    dpm = S.DPMSolverMultistepScheduler.from_config(config)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    assert (dpm.config.algorithm_type, dpm.config.solver_type) == ("dpmsolver++", "midpoint")
    assert (ref.config.algorithm_type, ref.config.solver_type) == ("dpmsolver++", "midpoint")
    # diffusers checks final_sigmas_type="zero" (the default) against the name it was given
    for algorithm in ("dpmsolver", "deis"):
        with pytest.raises(ValueError):
            diffusers.DPMSolverMultistepScheduler.from_config({"algorithm_type": algorithm})
        with pytest.raises(InputError, match="sigma_min"):
            S.DPMSolverMultistepScheduler.from_config({"algorithm_type": algorithm})


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError):  # diffusers: a numpy broadcasting error
        diffusers.PNDMScheduler().set_timesteps(3)
    with pytest.raises(InputError, match="num_inference_steps >= 4"):
        S.PNDMScheduler().set_timesteps(3)


def test_euler_rejects_integer_timesteps_like_diffusers():
    euler = S.EulerDiscreteScheduler.from_config(BLIP_CONFIG)
    euler.set_timesteps(10)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="integer indices"):
        euler.step(x, 3, x)


# ----------------------------------------------------------------------------------------------
# state, dtypes, torch-free import
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_set_timesteps_resets_state(name):
    scheduler = S.scheduler_from_config(name, BLIP_CONFIG)

    def loop():
        scheduler.set_timesteps(12)
        rng = np.random.default_rng(9)
        x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(scheduler.init_noise_sigma)
        for t in scheduler.timesteps:
            x = scheduler.step(rng.standard_normal(SHAPE, dtype=np.float32), t, scheduler.scale_model_input(x, t))
        return x

    first = loop()
    np.testing.assert_array_equal(loop(), first)


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_state_does_not_alias_caller_buffers(name):
    """An engine that reuses its output buffer must not corrupt the multistep history."""
    a, b = S.scheduler_from_config(name, BLIP_CONFIG), S.scheduler_from_config(name, BLIP_CONFIG)
    a.set_timesteps(10)
    b.set_timesteps(10)
    rng = np.random.default_rng(10)
    xa = xb = rng.standard_normal(SHAPE, dtype=np.float32)
    buffer = np.empty(SHAPE, np.float32)
    for t in a.timesteps:
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        buffer[...] = out
        xa = a.step(buffer, t, a.scale_model_input(xa, t))
        xb = b.step(out.copy(), t, b.scale_model_input(xb, t))
        buffer[...] = np.nan  # the "engine" reuses its output buffer
    np.testing.assert_array_equal(xa, xb)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_step_returns_sample_dtype(name, dtype):
    scheduler = S.scheduler_from_config(name, BLIP_CONFIG)
    scheduler.set_timesteps(5)
    x = np.ones(SHAPE, dtype)
    t = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(x, t)
    assert scaled.dtype == dtype
    out = scheduler.step(np.ones(SHAPE, dtype), t, scaled)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == SHAPE


def test_attributes_before_set_timesteps_match_diffusers():
    for name in S.SCHEDULERS:
        ours, ref = S.SCHEDULERS[name].from_config(BLIP_CONFIG), REFERENCE[name].from_config(BLIP_CONFIG)
        assert ours.num_inference_steps is None
        if ref.timesteps is None:
            assert ours.timesteps is None
        else:
            assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        assert len(ours) == len(ref) == 1000
        assert ours.order == ref.order


def test_import_without_torch():
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(
        """
        import sys
        for blocked in ("torch", "diffusers", "transformers"):
            sys.modules[blocked] = None  # any `import torch` now raises ImportError
        import numpy as np
        from blipdiffusion_trt.runtime import schedulers as S
        for name in S.SCHEDULERS:
            s = S.scheduler_from_config(name, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012, "skip_prk_steps": True})
            s.set_timesteps(5)
            x = np.zeros((1, 4, 2, 2), np.float32)
            for t in s.timesteps:
                x = s.step(x, t, s.scale_model_input(x, t))
        assert sys.modules["torch"] is None
        assert not [m for m in sys.modules if m.startswith("torch.")]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_source_has_no_torch_import():
    files = sorted(Path(S.__file__).parent.glob("*.py"))
    assert len(files) > 1
    for path in files:
        source = path.read_text()
        assert "import torch" not in source and "from torch" not in source, path.name
