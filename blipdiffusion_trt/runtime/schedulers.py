"""Pure-numpy ports of the diffusers 0.32.2 noise schedulers BLIP-Diffusion can sample with.

No torch, no diffusers: this module only needs numpy and the standard library.

Four schedulers, with diffusers' class names, config field names, defaults and attribute names:

* :class:`PNDMScheduler`           (``scheduling_pndm.py``; BLIP-Diffusion's own, PLMS with ``skip_prk_steps``)
* :class:`DDIMScheduler`           (``scheduling_ddim.py``)
* :class:`EulerDiscreteScheduler`  (``scheduling_euler_discrete.py``)
* :class:`DPMSolverMultistepScheduler` (``scheduling_dpmsolver_multistep.py``; "DPM++ 2M" by default)

Usage mirrors diffusers, except that ``step`` returns the previous sample itself (diffusers'
``.prev_sample``)::

    scheduler = PNDMScheduler.from_config(json.load(open("scheduler/scheduler_config.json")))
    scheduler.set_timesteps(50)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noise_pred = unet(scheduler.scale_model_input(latents, t), t, ...)
        latents = scheduler.step(noise_pred, t, latents)

Numerics. diffusers keeps ``alphas_cumprod``/``sigmas`` as float32 torch tensors and does every
scalar and tensor operation of a step in float32. These ports repeat the same float32 operations in
the same order, so with float32 latents they agree with diffusers to a few float32 ulps (the tests
check 1e-6 over whole 1000-step loops). The only differences come from transcendental functions:
torch's CPU ``sqrt``/``log``/``exp`` (MKL VML in the pip wheels) are not always correctly rounded,
while these ports use correctly rounded float32 results (float64 evaluation, then one rounding).
Samples of any float dtype are accepted; the arithmetic is float32 (as diffusers does for float32
latents, and as its Euler/DPM-Solver steps do for every dtype) and the result has the dtype of the
input ``sample``.

Config options that change the math and are not ported (Karras/exponential/beta sigmas, dynamic
thresholding, SDE variants, ...) raise :class:`~blipdiffusion_trt.errors.InputError` (a
``ValueError``) when the scheduler is built; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, Union

import numpy as np

from ..errors import InputError

__all__ = [
    "PNDMScheduler",
    "PNDMSchedulerConfig",
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "EulerDiscreteScheduler",
    "EulerDiscreteSchedulerConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepSchedulerConfig",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "check_scheduler_name",
    "scheduler_from_config",
]

_f32 = np.float32
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ----------------------------------------------------------------------------------------------
# float32 helpers reproducing torch's float32 behaviour
# ----------------------------------------------------------------------------------------------


def _sqrt(x) -> np.float32:
    """``x ** 0.5`` of a float32 scalar, correctly rounded to float32."""
    with np.errstate(invalid="ignore"):
        return _f32(np.sqrt(np.float64(x)))


def _log(x) -> np.float32:
    """``torch.log`` of a float32 scalar (log(0) = -inf, like torch)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _f32(np.log(np.float64(x)))


def _exp(x) -> np.float32:
    """``torch.exp`` of a float32 scalar (overflows to inf, like torch)."""
    with np.errstate(over="ignore"):
        return _f32(np.exp(np.float64(x)))


def _as_f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``step = (end - start) / (steps - 1)`` in float32 and fills the first half as
    ``start + step * i`` and the second half as ``end - step * (steps - 1 - i)``; the multiply-add
    is contracted to one fused (singly rounded) operation in the x86 kernels. float64 evaluates the
    product and the sum exactly for any sane beta range, so one rounding to float32 reproduces it.
    """
    start32, end32 = _f32(start), _f32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = _f32(_f32(end32 - start32) / _f32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    halfway = steps // 2
    out = np.where(
        idx < halfway,
        np.float64(start32) + np.float64(step) * idx,
        np.float64(end32) - np.float64(step) * (steps - 1 - idx),
    )
    return out.astype(np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 tensor on CPU: float64 accumulator, each output rounded."""
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (``squaredcos_cap_v2``), diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (https://arxiv.org/pdf/2305.08891.pdf, Algorithm 1)."""
    # Convert betas to alphas_bar_sqrt
    alphas = _f32(1.0) - betas
    alphas_cumprod = _cumprod_f32(alphas)
    alphas_bar_sqrt = np.sqrt(alphas_cumprod)
    # Store old values.
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0]
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1]
    # Shift so the last timestep is zero.
    alphas_bar_sqrt = alphas_bar_sqrt - alphas_bar_sqrt_T
    # Scale so the first timestep is back to the old value.
    alphas_bar_sqrt = alphas_bar_sqrt * _f32(alphas_bar_sqrt_0 / _f32(alphas_bar_sqrt_0 - alphas_bar_sqrt_T))
    # Convert alphas_bar_sqrt to betas
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt  # Revert sqrt
    alphas = alphas_bar[1:] / alphas_bar[:-1]  # Revert cumprod
    alphas = np.concatenate([alphas_bar[0:1], alphas])
    return _f32(1.0) - alphas


def _make_betas(config) -> np.ndarray:
    if config.trained_betas is not None:
        return _as_f32(config.trained_betas)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        # this schedule is very specific to the latent diffusion model.
        root = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        # Glide cosine schedule
        return betas_for_alpha_bar(n)
    raise InputError(f"beta_schedule must be one of {', '.join(_BETA_SCHEDULES)}, got {config.beta_schedule!r}")


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


class _ConfigMixin:
    """``from_dict`` with diffusers' ``from_config`` semantics for the frozen config dataclasses."""

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, config: Union[Mapping[str, Any], "_ConfigMixin", None] = None, **overrides: Any):
        """Keys that are fields are used, anything else (``_class_name``, ``_diffusers_version``,
        another scheduler's options) is ignored; missing fields keep this class's defaults;
        ``overrides`` win over ``config``."""
        if config is None:
            config = {}
        elif dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        elif not isinstance(config, Mapping):
            raise InputError(f"a scheduler config must be a mapping, got {type(config).__name__}")
        names = set(cls.field_names())
        values = {k: v for k, v in config.items() if k in names}
        values.update({k: v for k, v in overrides.items() if k in names})
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        if out.get("trained_betas") is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out

    def __post_init__(self):
        tb = getattr(self, "trained_betas", None)
        if tb is not None and not isinstance(tb, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in np.asarray(tb).ravel()))


@dataclass(frozen=True)
class PNDMSchedulerConfig(_ConfigMixin):
    """``PNDMScheduler.__init__`` arguments of diffusers 0.32.2, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0


@dataclass(frozen=True)
class DDIMSchedulerConfig(_ConfigMixin):
    """``DDIMScheduler.__init__`` arguments of diffusers 0.32.2, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False


@dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(_ConfigMixin):
    """``EulerDiscreteScheduler.__init__`` arguments of diffusers 0.32.2, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: Optional[bool] = False
    use_exponential_sigmas: Optional[bool] = False
    use_beta_sigmas: Optional[bool] = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"


@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(_ConfigMixin):
    """``DPMSolverMultistepScheduler.__init__`` arguments of diffusers 0.32.2, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: Optional[bool] = False
    use_exponential_sigmas: Optional[bool] = False
    use_beta_sigmas: Optional[bool] = False
    use_lu_lambdas: Optional[bool] = False
    use_flow_sigmas: Optional[bool] = False
    flow_shift: Optional[float] = 1.0
    final_sigmas_type: Optional[str] = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: Optional[str] = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False


# ----------------------------------------------------------------------------------------------
# shared scheduler machinery
# ----------------------------------------------------------------------------------------------


class _SchedulerBase:
    config_class: ClassVar[Type[_ConfigMixin]]
    order: ClassVar[int] = 1
    _prediction_types: ClassVar[Tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init__(self, config: Optional[_ConfigMixin] = None, **kwargs: Any):
        """``Cls(**diffusers_init_kwargs)`` like diffusers, or ``Cls(config_dataclass)``."""
        if config is not None:
            if not isinstance(config, self.config_class):
                raise InputError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
            config = dataclasses.replace(config, **kwargs) if kwargs else config
        else:
            config = self.config_class(**kwargs)
        self.config = config
        self._validate_config()

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], _ConfigMixin, None] = None, **kwargs: Any):
        """Like diffusers' ``Cls.from_config``: foreign keys ignored, missing keys get this class's defaults."""
        return cls(cls.config_class.from_dict(config, **kwargs))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- validation ----------------------------------------------------------------------------

    def _validate_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        n = cfg.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise InputError(f"{name}: num_train_timesteps must be a positive integer, got {n!r}")
        if cfg.trained_betas is None and cfg.beta_schedule not in _BETA_SCHEDULES:
            raise InputError(
                f"{name}: beta_schedule must be one of {', '.join(_BETA_SCHEDULES)}, got {cfg.beta_schedule!r}"
            )
        if cfg.trained_betas is not None and len(cfg.trained_betas) != n:
            raise InputError(f"{name}: trained_betas has {len(cfg.trained_betas)} values, num_train_timesteps is {n}")
        if cfg.timestep_spacing not in _TIMESTEP_SPACINGS:
            raise InputError(
                f"{name}: timestep_spacing must be one of {', '.join(_TIMESTEP_SPACINGS)}, got {cfg.timestep_spacing!r}"
            )
        if cfg.prediction_type not in self._prediction_types:
            raise InputError(
                f"{name}: prediction_type must be one of {', '.join(self._prediction_types)}, got {cfg.prediction_type!r}"
            )

    def _not_ported(self, option: str, value: Any) -> None:
        raise InputError(
            f"{type(self).__name__}: {option}={value!r} is not supported by the numpy port "
            "(it changes the sampling math and was not ported from diffusers)"
        )

    def _check_num_inference_steps(self, num_inference_steps: Any) -> int:
        n_train = self.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, numbers.Integral)
            or not 1 <= num_inference_steps <= n_train
        ):
            raise InputError(f"num_inference_steps must be an integer in [1, {n_train}], got {num_inference_steps!r}",
                             field="num_inference_steps")
        return int(num_inference_steps)

    def _alpha_cumprod_at(self, timestep: int) -> np.float32:
        n_train = self.config.num_train_timesteps
        if not -n_train <= timestep < n_train:
            raise IndexError(
                f"timestep {timestep} is out of range for num_train_timesteps={n_train} "
                f"(timestep_spacing={self.config.timestep_spacing!r}, steps_offset={self.config.steps_offset})"
            )
        return self.alphas_cumprod[timestep]

    @staticmethod
    def _work(array) -> np.ndarray:
        """A float32 working copy of an input array (all step arithmetic is float32).

        Always a copy: the multistep state (PNDM's ``ets``, DPM-Solver's ``model_outputs``) must not
        alias an engine output buffer that the next model call overwrites."""
        return np.array(array, dtype=np.float32, copy=True)

    @staticmethod
    def _out(result: np.ndarray, like) -> np.ndarray:
        dtype = np.asarray(like).dtype
        if not np.issubdtype(dtype, np.floating):
            dtype = np.dtype(np.float32)
        return result.astype(dtype, copy=False)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Identity: this scheduler does not scale the denoising model input."""
        return sample


def _leading_or_trailing_timesteps(config, num_inference_steps: int) -> np.ndarray:
    """DDIM's (and PNDM's, ascending) integer timesteps for "leading"/"trailing"/"linspace"."""
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        step_ratio = n_train // num_inference_steps
        # creates integer timesteps by multiplying by ratio
        # casting to int to avoid issues when num_inference_step is power of 3
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        timesteps += config.steps_offset
        return timesteps
    # "trailing"
    step_ratio = n_train / num_inference_steps
    timesteps = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64)
    timesteps -= 1
    return timesteps


# ----------------------------------------------------------------------------------------------
# PNDM
# ----------------------------------------------------------------------------------------------


class PNDMScheduler(_SchedulerBase):
    """Pseudo numerical methods for diffusion models (https://arxiv.org/abs/2202.09778).

    With ``skip_prk_steps=True`` (BLIP-Diffusion, Stable Diffusion) this is PLMS, crowsonkb's
    linear multistep sampler; with ``skip_prk_steps=False`` the first 12 model calls are the
    F-PNDM Runge-Kutta warm-up, then PLMS.

    Stateful like diffusers (``ets``, ``counter``, ``cur_sample``, ``cur_model_output``);
    :meth:`set_timesteps` resets the state.
    """

    config_class = PNDMSchedulerConfig

    def __init__(self, config: Optional[PNDMSchedulerConfig] = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        self.betas = _make_betas(cfg)
        self.alphas = _f32(1.0) - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        self.final_alpha_cumprod = _f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0
        # F-PNDM: Runge-Kutta warm-up of order 4 (formulas (9), (12), (13), Algorithm 2 of the paper)
        self.pndm_order = 4
        # running values
        self.cur_model_output: Union[int, np.ndarray] = 0
        self.counter = 0
        self.cur_sample: Optional[np.ndarray] = None
        self.ets: List[np.ndarray] = []
        # setable values
        self.num_inference_steps: Optional[int] = None
        self._timesteps = np.arange(0, cfg.num_train_timesteps)[::-1].copy()
        self.prk_timesteps: Optional[np.ndarray] = None
        self.plms_timesteps: Optional[np.ndarray] = None
        self.timesteps: Optional[np.ndarray] = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the timesteps of the sampling loop and reset the multistep state."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if not cfg.skip_prk_steps and num_inference_steps < self.pndm_order:
            raise InputError(
                f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= {self.pndm_order} "
                f"for its Runge-Kutta warm-up, got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
        # (ascending here; PNDM reverses after building the PRK/PLMS lists)
        self._timesteps = _leading_or_trailing_timesteps(cfg, num_inference_steps)[::-1].copy()

        if cfg.skip_prk_steps:
            # for some models like stable diffusion the prk steps can/should be skipped to produce better results.
            # Based on crowsonkb's PLMS sampler: https://github.com/CompVis/latent-diffusion/pull/51
            # The second-to-last timestep is repeated: the second model call of the PLMS warm-up.
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate(
                [self._timesteps[:-1], self._timesteps[-2:-1], self._timesteps[-1:]]
            )[::-1].copy()
        else:
            prk_timesteps = np.array(self._timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, n_train // num_inference_steps // 2]), self.pndm_order
            )
            self.prk_timesteps = (prk_timesteps[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()

        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.ets = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One sampling step: Runge-Kutta while warming up (``skip_prk_steps=False``), else PLMS.

        Returns the previous sample x_(t-δ) with the dtype of ``sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_prk(self._work(model_output), int(timestep), self._work(sample))
        else:
            prev_sample = self._step_plms(self._work(model_output), int(timestep), self._work(sample))
        return self._out(prev_sample, sample)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Fourth-order pseudo Runge-Kutta (formula (13)): four model calls per step."""
        n_train = self.config.num_train_timesteps
        # 1. the four calls of one step alternate between t and the half step t - δ/2
        diff_to_prev = 0 if self.counter % 2 else n_train // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        # 2. accumulate e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6
        if self.counter % 4 == 0:
            self.cur_model_output = self.cur_model_output + _f32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output = self.cur_model_output + _f32(1 / 3) * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output = self.cur_model_output + _f32(1 / 3) * model_output
        elif (self.counter - 3) % 4 == 0:
            model_output = self.cur_model_output + _f32(1 / 6) * model_output
            self.cur_model_output = 0

        # 3. transfer from the sample at the start of the step: x_(t-δ) = φ(x_t, e', t, t-δ)
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Pseudo linear multistep (formula (12)), one model call per step."""
        n_train = self.config.num_train_timesteps
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                "PNDMScheduler can only run PLMS steps after the Runge-Kutta warm-up (12 model calls) "
                "when skip_prk_steps=False"
            )

        # 1. get previous step value (=t-δ)
        prev_timestep = timestep - n_train // self.num_inference_steps

        # 2. record e_θ(x_t, t); the second call of the warm-up re-evaluates the *first* step
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + n_train // self.num_inference_steps

        # 3. linear multistep combination e' of the stored noise predictions
        if len(self.ets) == 1 and self.counter == 0:
            # first call: plain step x_t -> x_(t-δ) with e_0, remembered for the warm-up
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            # second call (same t-δ): improved Euler, e' = (e_0 + e_1) / 2, from the original x_t
            model_output = (model_output + self.ets[-1]) / _f32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            # e' = (3 e_0 - e_-1) / 2
            model_output = (_f32(3) * self.ets[-1] - self.ets[-2]) / _f32(2)
        elif len(self.ets) == 3:
            # e' = (23 e_0 - 16 e_-1 + 5 e_-2) / 12
            model_output = (_f32(23) * self.ets[-1] - _f32(16) * self.ets[-2] + _f32(5) * self.ets[-3]) / _f32(12)
        else:
            # e' = (55 e_0 - 59 e_-1 + 37 e_-2 - 9 e_-3) / 24
            model_output = _f32(1 / 24) * (
                _f32(55) * self.ets[-1] - _f32(59) * self.ets[-2] + _f32(37) * self.ets[-3] - _f32(9) * self.ets[-4]
            )

        # 4. transfer x_t -> x_(t-δ) with e'
        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray) -> np.ndarray:
        # See formula (9) of PNDM paper https://arxiv.org/pdf/2202.09778.pdf
        # this function computes x_(t−δ) using the formula of (9)
        # Note that x_t needs to be added to both sides of the equation

        # Notation (<variable name> -> <name in paper>
        # alpha_prod_t -> α_t
        # alpha_prod_t_prev -> α_(t−δ)
        # beta_prod_t -> (1 - α_t)
        # beta_prod_t_prev -> (1 - α_(t−δ))
        # sample -> x_t
        # model_output -> e_θ(x_t, t)
        # prev_sample -> x_(t−δ)
        alpha_prod_t = self._alpha_cumprod_at(timestep)
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep) if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = _f32(1) - alpha_prod_t
        beta_prod_t_prev = _f32(1) - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            # e = sqrt(α_t) v + sqrt(1 - α_t) x_t
            model_output = _sqrt(alpha_prod_t) * model_output + _sqrt(beta_prod_t) * sample

        # corresponds to (α_(t−δ) - α_t) divided by
        # denominator of x_t in formula (9) and plus 1
        # Note: (α_(t−δ) - α_t) / (sqrt(α_t) * (sqrt(α_(t−δ)) + sqr(α_t))) =
        # sqrt(α_(t−δ)) / sqrt(α_t))
        sample_coeff = _sqrt(alpha_prod_t_prev / alpha_prod_t)

        # corresponds to denominator of e_θ(x_t, t) in formula (9)
        model_output_denom_coeff = _f32(
            alpha_prod_t * _sqrt(beta_prod_t_prev) + _sqrt(_f32(alpha_prod_t * beta_prod_t) * alpha_prod_t_prev)
        )

        # full formula (9)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff


# ----------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------


class DDIMScheduler(_SchedulerBase):
    """Denoising diffusion implicit models (https://arxiv.org/abs/2010.02502).

    ``step`` is the deterministic η = 0 update by default; η > 0 needs ``variance_noise`` (this
    port has no random generator of its own).
    """

    config_class = DDIMSchedulerConfig
    _prediction_types = ("epsilon", "sample", "v_prediction")

    def __init__(self, config: Optional[DDIMSchedulerConfig] = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        if cfg.thresholding:
            self._not_ported("thresholding", cfg.thresholding)
        self.betas = _make_betas(cfg)
        # Rescale for zero SNR
        if cfg.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = _f32(1.0) - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        # At every step in ddim, we are looking into the previous alphas_cumprod
        # For the final step, there is no previous alphas_cumprod because we are already at 0
        # `set_alpha_to_one` decides whether we set this parameter simply to one or
        # whether we use the final alpha of the "non-previous" one.
        self.final_alpha_cumprod = _f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0
        # setable values
        self.num_inference_steps: Optional[int] = None
        self.timesteps = np.arange(0, cfg.num_train_timesteps)[::-1].copy().astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the timesteps of the sampling loop."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
        self.timesteps = _leading_or_trailing_timesteps(self.config, num_inference_steps)

    def _get_variance(self, timestep: int, prev_timestep: int) -> np.float32:
        alpha_prod_t = self._alpha_cumprod_at(timestep)
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep) if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = _f32(1) - alpha_prod_t
        beta_prod_t_prev = _f32(1) - alpha_prod_t_prev
        return _f32((beta_prod_t_prev / beta_prod_t) * _f32(_f32(1) - alpha_prod_t / alpha_prod_t_prev))

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        variance_noise: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """One DDIM step x_t -> x_(t-1) (formula (12)); returns it with the dtype of ``sample``."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        timestep = int(timestep)
        out_like = sample
        model_output = self._work(model_output)
        sample = self._work(sample)

        # See formulas (12) and (16) of DDIM paper https://arxiv.org/pdf/2010.02502.pdf
        # Notation (<variable name> -> <name in paper>
        # - pred_noise_t -> e_theta(x_t, t)
        # - pred_original_sample -> f_theta(x_t, t) or x_0
        # - std_dev_t -> sigma_t
        # - eta -> η
        # - pred_sample_direction -> "direction pointing to x_t"
        # - pred_prev_sample -> "x_t-1"

        # 1. get previous step value (=t-1)
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps

        # 2. compute alphas, betas
        alpha_prod_t = self._alpha_cumprod_at(timestep)
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep) if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = _f32(1) - alpha_prod_t

        # 3. compute predicted original sample from predicted noise also called
        # "predicted x_0" of formula (12): x_0 = (x_t - sqrt(1 - α_t) e_θ) / sqrt(α_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            if cfg.prediction_type == "epsilon":
                pred_original_sample = (sample - _sqrt(beta_prod_t) * model_output) / _sqrt(alpha_prod_t)
                pred_epsilon = model_output
            elif cfg.prediction_type == "sample":
                pred_original_sample = model_output
                pred_epsilon = (sample - _sqrt(alpha_prod_t) * pred_original_sample) / _sqrt(beta_prod_t)
            else:  # "v_prediction": x_0 = sqrt(α_t) x_t - sqrt(1 - α_t) v,  e = sqrt(α_t) v + sqrt(1 - α_t) x_t
                pred_original_sample = _sqrt(alpha_prod_t) * sample - _sqrt(beta_prod_t) * model_output
                pred_epsilon = _sqrt(alpha_prod_t) * model_output + _sqrt(beta_prod_t) * sample

            # 4. Clip "predicted x_0"
            if cfg.clip_sample:
                limit = _f32(cfg.clip_sample_range)
                pred_original_sample = np.clip(pred_original_sample, -limit, limit)

            # 5. compute variance: "sigma_t(η)" -> see formula (16)
            # σ_t = sqrt((1 − α_t−1)/(1 − α_t)) * sqrt(1 − α_t/α_t−1)
            variance = self._get_variance(timestep, prev_timestep)
            std_dev_t = _f32(_f32(eta) * _sqrt(variance))

            if use_clipped_model_output:
                # the pred_epsilon is always re-derived from the clipped x_0 in Glide
                pred_epsilon = (sample - _sqrt(alpha_prod_t) * pred_original_sample) / _sqrt(beta_prod_t)

            # 6. compute "direction pointing to x_t" of formula (12): sqrt(1 − α_t−1 − σ_t²) e_θ
            pred_sample_direction = _sqrt(_f32(_f32(1) - alpha_prod_t_prev) - _f32(std_dev_t * std_dev_t)) * pred_epsilon

            # 7. compute x_t without "random noise" of formula (12): sqrt(α_t−1) x_0 + direction
            prev_sample = _sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

            # 8. add σ_t z for η > 0
            if eta > 0:
                if variance_noise is None:
                    raise InputError("DDIMScheduler.step with eta > 0 needs variance_noise (the numpy port has no generator)")
                prev_sample = prev_sample + std_dev_t * self._work(variance_noise)

        return self._out(prev_sample, out_like)


# ----------------------------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------------------------


class _StepIndexMixin:
    """What the sigma-based schedulers share: diffusers' ``step_index``/``begin_index``
    bookkeeping and the sigmas at the chosen timesteps."""

    def _train_sigmas(self) -> np.ndarray:
        """sqrt((1 - α̅_t) / α̅_t) for t = 0..T-1, float32 like diffusers."""
        ac = self.alphas_cumprod
        return np.sqrt((_f32(1) - ac) / ac)

    def _sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """σ(t) by linear interpolation of the training sigmas (float64, like diffusers' np.interp),
        followed by the final sigma the config asks for; float32."""
        sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = _sqrt((_f32(1) - ac0) / ac0)
        else:  # "zero"
            sigma_last = 0
        return np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

    _step_index: Optional[int]
    _begin_index: Optional[int]

    @property
    def step_index(self) -> Optional[int]:
        """The index counter for current timestep. It will increase 1 after each scheduler step."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The index for the first timestep (set by a pipeline with :meth:`set_begin_index`)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _init_step_index(self, timestep: Any) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index


class EulerDiscreteScheduler(_StepIndexMixin, _SchedulerBase):
    """Euler sampler of Karras et al. (2022), algorithm 2, with ``s_churn = 0`` (deterministic).

    ``timesteps`` are float32 (like diffusers); ``sigmas`` has ``num_inference_steps + 1``
    entries, the last one 0 (``final_sigmas_type="zero"``) or the smallest training sigma.
    """

    config_class = EulerDiscreteSchedulerConfig
    _prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")

    def __init__(self, config: Optional[EulerDiscreteSchedulerConfig] = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if getattr(cfg, option):
                self._not_ported(option, getattr(cfg, option))
        if cfg.interpolation_type != "linear":
            if cfg.interpolation_type == "log_linear":
                self._not_ported("interpolation_type", cfg.interpolation_type)
            raise InputError(f"EulerDiscreteScheduler: interpolation_type must be 'linear' or 'log_linear', got {cfg.interpolation_type!r}")
        if cfg.timestep_type not in ("discrete", "continuous"):
            raise InputError(f"EulerDiscreteScheduler: timestep_type must be 'discrete' or 'continuous', got {cfg.timestep_type!r}")
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self._not_ported("timestep_type", "continuous (with prediction_type='v_prediction')")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise InputError(f"EulerDiscreteScheduler: final_sigmas_type must be 'zero' or 'sigma_min', got {cfg.final_sigmas_type!r}")

        self.betas = _make_betas(cfg)
        if cfg.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = _f32(1.0) - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        if cfg.rescale_betas_zero_snr:
            # Close to 0 without being 0 so first sigma is not inf
            # FP16 smallest positive subnormal works well here
            self.alphas_cumprod[-1] = 2**-24

        # σ = sqrt((1 - α̅) / α̅), the noise level of each training timestep (descending)
        sigmas = self._train_sigmas()[::-1]
        n_train = cfg.num_train_timesteps
        self.timesteps = np.linspace(0, n_train - 1, n_train, dtype=float)[::-1].copy().astype(np.float32)
        # setable values
        self.num_inference_steps: Optional[int] = None
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: σ_max ("linspace"/"trailing") or sqrt(σ_max² + 1)."""
        max_sigma = _f32(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(_sqrt(_f32(max_sigma * max_sigma) + _f32(1)))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the (float32) timesteps and the matching sigmas; resets the step index."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        n_train = cfg.num_train_timesteps
        self.num_inference_steps = num_inference_steps

        # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            step_ratio = n_train // num_inference_steps
            # creates integer timesteps by multiplying by ratio
            # casting to int to avoid issues when num_inference_step is power of 3
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += cfg.steps_offset
        else:  # "trailing"
            step_ratio = n_train / num_inference_steps
            timesteps = (np.arange(n_train, 0, -step_ratio)).round().copy().astype(np.float32)
            timesteps -= 1

        self.sigmas = self._sigmas_at(timesteps)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Optional[np.ndarray] = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = np.nonzero(schedule_timesteps == timestep)[0]
        # The sigma index that is taken for the **very** first `step`
        # is always the second index (or the last index if there is only 1)
        # This way we can ensure we don't accidentally skip a sigma in
        # case we start in the middle of the denoising schedule (e.g. for image-to-image)
        pos = 1 if len(indices) > 1 else 0
        if len(indices) == 0:
            raise IndexError(f"timestep {timestep!r} is not one of EulerDiscreteScheduler.timesteps")
        return int(indices[pos])

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Scale the denoising model input by 1 / sqrt(σ² + 1)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        scaled = self._work(sample) / _sqrt(_f32(sigma * sigma) + _f32(1))
        self.is_scale_input_called = True
        return self._out(scaled, sample)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One Euler step x_σ -> x_σ' (s_churn = 0); returns it with the dtype of ``sample``."""
        if isinstance(timestep, (numbers.Integral, np.integer)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                "`scheduler.timesteps` as a timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        out_like = sample
        model_output = self._work(model_output)
        sample = self._work(sample)

        # s_churn = 0: γ = 0 and σ̂ = σ (no noise is added back)
        sigma = self.sigmas[self.step_index]
        sigma_hat = sigma

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.config.prediction_type in ("original_sample", "sample"):
                pred_original_sample = model_output
            elif self.config.prediction_type == "epsilon":
                # x_0 = x - σ̂ ε
                pred_original_sample = sample - sigma_hat * model_output
            else:  # "v_prediction": denoised = model_output * c_out + input * c_skip
                # x_0 = v · (-σ / sqrt(σ² + 1)) + x / (σ² + 1)
                sigma_sq_plus_1 = _f32(_f32(sigma * sigma) + _f32(1))
                pred_original_sample = model_output * _f32(-sigma / _sqrt(sigma_sq_plus_1)) + (sample / sigma_sq_plus_1)

            # 2. Convert to an ODE derivative: d = (x - x_0) / σ̂
            derivative = (sample - pred_original_sample) / sigma_hat
            # 3. Euler step: x' = x + d (σ_next - σ̂)
            dt = _f32(self.sigmas[self.step_index + 1] - sigma_hat)
            prev_sample = sample + derivative * dt

        # upon completion increase step index by one
        self._step_index += 1
        return self._out(prev_sample, out_like)


# ----------------------------------------------------------------------------------------------
# DPM-Solver (multistep)
# ----------------------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(_StepIndexMixin, _SchedulerBase):
    """Multistep DPM-Solver (https://arxiv.org/abs/2206.00927) and DPM-Solver++
    (https://arxiv.org/abs/2211.01095); the defaults are "DPM++ 2M".

    Ported: ``algorithm_type`` "dpmsolver++" and "dpmsolver" (plus diffusers' "deis" alias),
    ``solver_order`` 1/2/3, ``solver_type`` "midpoint"/"heun", ``lower_order_final``,
    ``euler_at_final``, ``final_sigmas_type``, ``lambda_min_clipped``, ``variance_type``,
    ``rescale_betas_zero_snr``. Not ported (InputError): SDE variants, thresholding,
    Karras/exponential/beta/Lu/flow sigmas.
    """

    config_class = DPMSolverMultistepSchedulerConfig
    _prediction_types = ("epsilon", "sample", "v_prediction")

    def __init__(self, config: Optional[DPMSolverMultistepSchedulerConfig] = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            if getattr(cfg, option):
                self._not_ported(option, getattr(cfg, option))
        if cfg.thresholding:
            self._not_ported("thresholding", cfg.thresholding)
        # settings for DPM-Solver (diffusers maps the other multistep solvers' names onto these,
        # but checks final_sigmas_type against the name it was given: "deis" needs "sigma_min")
        given_algorithm_type = cfg.algorithm_type
        if cfg.algorithm_type == "deis":
            cfg = self.config = dataclasses.replace(cfg, algorithm_type="dpmsolver++")
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            self._not_ported("algorithm_type", cfg.algorithm_type)
        if cfg.algorithm_type not in ("dpmsolver", "dpmsolver++"):
            raise InputError(
                f"DPMSolverMultistepScheduler: algorithm_type must be one of dpmsolver++, dpmsolver, "
                f"sde-dpmsolver++, sde-dpmsolver, got {cfg.algorithm_type!r}"
            )
        if cfg.solver_type in ("logrho", "bh1", "bh2"):
            cfg = self.config = dataclasses.replace(cfg, solver_type="midpoint")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise InputError(f"DPMSolverMultistepScheduler: solver_type must be 'midpoint' or 'heun', got {cfg.solver_type!r}")
        if cfg.solver_order not in (1, 2, 3):
            raise InputError(f"DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {cfg.solver_order!r}")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise InputError(f"DPMSolverMultistepScheduler: final_sigmas_type must be 'zero' or 'sigma_min', got {cfg.final_sigmas_type!r}")
        if given_algorithm_type != "dpmsolver++" and cfg.final_sigmas_type == "zero":
            raise InputError(
                f"DPMSolverMultistepScheduler: final_sigmas_type 'zero' is not supported for algorithm_type "
                f"{given_algorithm_type!r}; choose 'sigma_min' instead"
            )

        self.betas = _make_betas(cfg)
        if cfg.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = _f32(1.0) - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        if cfg.rescale_betas_zero_snr:
            # Close to 0 without being 0 so first sigma is not inf
            # FP16 smallest positive subnormal works well here
            self.alphas_cumprod[-1] = 2**-24

        # Currently we only support VP-type noise schedule: α_t = sqrt(α̅_t), σ_t = sqrt(1 - α̅_t), λ_t = log(α_t / σ_t)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(_f32(1) - self.alphas_cumprod)
        with np.errstate(divide="ignore"):
            self.lambda_t = (
                np.log(self.alpha_t.astype(np.float64)).astype(np.float32)
                - np.log(self.sigma_t.astype(np.float64)).astype(np.float32)
            )
        self.sigmas = self._train_sigmas()
        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0

        # setable values
        self.num_inference_steps: Optional[int] = None
        n_train = cfg.num_train_timesteps
        self.timesteps = np.linspace(0, n_train - 1, n_train, dtype=np.float32)[::-1].copy()
        self.model_outputs: List[Optional[np.ndarray]] = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the integer timesteps and the matching sigmas; resets the multistep state."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        n_train = cfg.num_train_timesteps

        # Clipping the minimum of all lambda(t) for numerical stability.
        # This is critical for cosine (squaredcos_cap_v2) noise schedule.
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], _f32(cfg.lambda_min_clipped), side="left"))
        last_timestep = n_train - clipped_idx

        # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, num_inference_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            step_ratio = last_timestep // (num_inference_steps + 1)
            # creates integer timesteps by multiplying by ratio
            # casting to int to avoid issues when num_inference_step is power of 3
            timesteps = (np.arange(0, num_inference_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += cfg.steps_offset
        else:  # "trailing"
            step_ratio = n_train / num_inference_steps
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1

        self.sigmas = self._sigmas_at(timesteps)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        # add an index counter for schedulers that allow duplicated timesteps
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _sigma_to_alpha_sigma_t(sigma: np.float32) -> Tuple[np.float32, np.float32]:
        # α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t
        alpha_t = _f32(_f32(1) / _sqrt(_f32(sigma * sigma) + _f32(1)))
        sigma_t = _f32(sigma * alpha_t)
        return alpha_t, sigma_t

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        # λ = log(α) - log(σ)  (half log-SNR)
        return _f32(_log(alpha) - _log(sigma))

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Optional[np.ndarray] = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        index_candidates = np.nonzero(schedule_timesteps == timestep)[0]
        if len(index_candidates) == 0:
            return len(self.timesteps) - 1
        # The sigma index that is taken for the **very** first `step`
        # is always the second index (or the last index if there is only 1)
        # This way we can ensure we don't accidentally skip a sigma in
        # case we start in the middle of the denoising schedule (e.g. for image-to-image)
        if len(index_candidates) > 1:
            return int(index_candidates[1])
        return int(index_candidates[0])

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++ integrates the data prediction x_0, DPM-Solver the noise prediction ε."""
        cfg = self.config
        sigma = self.sigmas[self.step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        if cfg.algorithm_type == "dpmsolver++":
            if cfg.prediction_type == "epsilon":
                # DPM-Solver and DPM-Solver++ only need the "mean" output.
                if cfg.variance_type in ("learned", "learned_range"):
                    model_output = model_output[:, :3]
                # x_0 = (x_t - σ_t ε) / α_t
                return (sample - sigma_t * model_output) / alpha_t
            if cfg.prediction_type == "sample":
                return model_output
            # "v_prediction": x_0 = α_t x_t - σ_t v
            return alpha_t * sample - sigma_t * model_output
        # "dpmsolver"
        if cfg.prediction_type == "epsilon":
            if cfg.variance_type in ("learned", "learned_range"):
                return model_output[:, :3]
            return model_output
        if cfg.prediction_type == "sample":
            # ε = (x_t - α_t x_0) / σ_t
            return (sample - alpha_t * model_output) / sigma_t
        # "v_prediction": ε = α_t v + σ_t x_t
        return alpha_t * model_output + sigma_t * sample

    def dpm_solver_first_order_update(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """One first-order step (equivalent to DDIM)."""
        sigma_t, sigma_s = self.sigmas[self.step_index + 1], self.sigmas[self.step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
        alpha_s, sigma_s = self._sigma_to_alpha_sigma_t(sigma_s)
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s = self._lambda(alpha_s, sigma_s)
        h = _f32(lambda_t - lambda_s)
        if self.config.algorithm_type == "dpmsolver++":
            # x_t = (σ_t / σ_s) x_s - α_t (e^(-h) - 1) x_0
            return _f32(sigma_t / sigma_s) * sample - _f32(alpha_t * _f32(_exp(-h) - _f32(1))) * model_output
        # "dpmsolver": x_t = (α_t / α_s) x_s - σ_t (e^h - 1) ε
        return _f32(alpha_t / alpha_s) * sample - _f32(sigma_t * _f32(_exp(h) - _f32(1))) * model_output

    def multistep_dpm_solver_second_order_update(self, model_output_list: List[np.ndarray], sample: np.ndarray) -> np.ndarray:
        """One second-order multistep step from the last two converted model outputs."""
        sigma_t, sigma_s0, sigma_s1 = (
            self.sigmas[self.step_index + 1],
            self.sigmas[self.step_index],
            self.sigmas[self.step_index - 1],
        )
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigma_s0)
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(sigma_s1)
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)

        m0, m1 = model_output_list[-1], model_output_list[-2]
        # h = λ_t - λ_s0, r0 = h_0 / h; D0 = m0, D1 = (m0 - m1) / r0
        h, h_0 = _f32(lambda_t - lambda_s0), _f32(lambda_s0 - lambda_s1)
        r0 = _f32(h_0 / h)
        D0, D1 = m0, _f32(_f32(1) / r0) * (m0 - m1)
        half = _f32(0.5)
        one = _f32(1)
        if self.config.algorithm_type == "dpmsolver++":
            # See https://arxiv.org/abs/2211.01095 for detailed derivations
            em1 = _f32(_exp(-h) - one)
            if self.config.solver_type == "midpoint":
                # x_t = (σ_t/σ_s0) x - α_t (e^-h - 1) D0 - ½ α_t (e^-h - 1) D1
                return (
                    _f32(sigma_t / sigma_s0) * sample
                    - _f32(alpha_t * em1) * D0
                    - _f32(half * _f32(alpha_t * em1)) * D1
                )
            # "heun": x_t = (σ_t/σ_s0) x - α_t (e^-h - 1) D0 + α_t ((e^-h - 1)/h + 1) D1
            return (
                _f32(sigma_t / sigma_s0) * sample
                - _f32(alpha_t * em1) * D0
                + _f32(alpha_t * _f32(_f32(em1 / h) + one)) * D1
            )
        # "dpmsolver": see https://arxiv.org/abs/2206.00927 for detailed derivations
        ep1 = _f32(_exp(h) - one)
        if self.config.solver_type == "midpoint":
            return (
                _f32(alpha_t / alpha_s0) * sample
                - _f32(sigma_t * ep1) * D0
                - _f32(half * _f32(sigma_t * ep1)) * D1
            )
        return (
            _f32(alpha_t / alpha_s0) * sample
            - _f32(sigma_t * ep1) * D0
            - _f32(sigma_t * _f32(_f32(ep1 / h) - one)) * D1
        )

    def multistep_dpm_solver_third_order_update(self, model_output_list: List[np.ndarray], sample: np.ndarray) -> np.ndarray:
        """One third-order multistep step from the last three converted model outputs."""
        sigma_t, sigma_s0, sigma_s1, sigma_s2 = (
            self.sigmas[self.step_index + 1],
            self.sigmas[self.step_index],
            self.sigmas[self.step_index - 1],
            self.sigmas[self.step_index - 2],
        )
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigma_s0)
        alpha_s1, sigma_s1 = self._sigma_to_alpha_sigma_t(sigma_s1)
        alpha_s2, sigma_s2 = self._sigma_to_alpha_sigma_t(sigma_s2)
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)
        lambda_s2 = self._lambda(alpha_s2, sigma_s2)

        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = _f32(lambda_t - lambda_s0), _f32(lambda_s0 - lambda_s1), _f32(lambda_s1 - lambda_s2)
        r0, r1 = _f32(h_0 / h), _f32(h_1 / h)
        one, half = _f32(1), _f32(0.5)
        D0 = m0
        D1_0, D1_1 = _f32(one / r0) * (m0 - m1), _f32(one / r1) * (m1 - m2)
        D1 = D1_0 + _f32(r0 / _f32(r0 + r1)) * (D1_0 - D1_1)
        D2 = _f32(one / _f32(r0 + r1)) * (D1_0 - D1_1)
        if self.config.algorithm_type == "dpmsolver++":
            # See https://arxiv.org/abs/2206.00927 for detailed derivations
            em1 = _f32(_exp(-h) - one)
            return (
                _f32(sigma_t / sigma_s0) * sample
                - _f32(alpha_t * em1) * D0
                + _f32(alpha_t * _f32(_f32(em1 / h) + one)) * D1
                - _f32(alpha_t * _f32(_f32(_f32(em1 + h) / _f32(h * h)) - half)) * D2
            )
        ep1 = _f32(_exp(h) - one)
        return (
            _f32(alpha_t / alpha_s0) * sample
            - _f32(sigma_t * ep1) * D0
            - _f32(sigma_t * _f32(_f32(ep1 / h) - one)) * D1
            - _f32(sigma_t * _f32(_f32(_f32(ep1 - h) / _f32(h * h)) - half)) * D2
        )

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One multistep DPM-Solver step; returns the previous sample with the dtype of ``sample``."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        out_like = sample
        model_output = self._work(model_output)
        sample = self._work(sample)

        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # 1. Improve numerical stability for small number of steps: lower the order at the end
            lower_order_final = (self.step_index == len(self.timesteps) - 1) and (
                cfg.euler_at_final or (cfg.lower_order_final and len(self.timesteps) < 15) or cfg.final_sigmas_type == "zero"
            )
            lower_order_second = (
                (self.step_index == len(self.timesteps) - 2) and cfg.lower_order_final and len(self.timesteps) < 15
            )

            # 2. convert the model output (x_0 for DPM-Solver++, ε for DPM-Solver) and push it on the history
            model_output = self.convert_model_output(model_output, sample=sample)
            for i in range(cfg.solver_order - 1):
                self.model_outputs[i] = self.model_outputs[i + 1]
            self.model_outputs[-1] = model_output

            # 3. multistep update of the order the history allows
            if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample)
            elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample)
            else:
                prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample)

        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        # upon completion increase step index by one
        self._step_index += 1
        return self._out(prev_sample, out_like)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

SCHEDULERS: Dict[str, Type[_SchedulerBase]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}

# What each name forces on top of the checkpoint's scheduler config.
_FORCED: Dict[str, Dict[str, Any]] = {
    "dpmpp-2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}


# The names a generation accepts (``scheduler=``, ``--scheduler``); each class is named as the
# diffusers scheduler it ports.
SCHEDULER_NAMES: Tuple[str, ...] = tuple(SCHEDULERS)


def check_scheduler_name(name: Any) -> str:
    """``name`` when it is one of :data:`SCHEDULER_NAMES`, else a one-line :class:`InputError`."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULER_NAMES)}", field="scheduler")
    return name


def scheduler_from_config(name: str, config: Union[Mapping[str, Any], None]) -> _SchedulerBase:
    """Build scheduler ``name`` from a checkpoint's ``scheduler_config.json`` dict, like
    ``Cls.from_config(config)`` in diffusers ("dpmpp-2m" forces DPM-Solver++ of order 2)."""
    cls = SCHEDULERS[check_scheduler_name(name)]
    return cls.from_config(config or {}, **_FORCED.get(name, {}))
