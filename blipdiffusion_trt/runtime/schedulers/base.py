"""What the scheduler ports share: float32 helpers that repeat torch's float32 arithmetic, the
beta schedules, the config mixin, the scheduler base class and the sigma bookkeeping of the
sigma-based schedulers (Euler, DPM-Solver)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

import numpy as np

from ...errors import InputError

f32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ----------------------------------------------------------------------------------------------
# float32 helpers reproducing torch's float32 behaviour
# ----------------------------------------------------------------------------------------------


def sqrt_f32(x) -> np.float32:
    """``x ** 0.5`` of a float32 scalar, correctly rounded to float32."""
    with np.errstate(invalid="ignore"):
        return f32(np.sqrt(np.float64(x)))


def log_f32(x) -> np.float32:
    """``torch.log`` of a float32 scalar (log(0) = -inf, like torch)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return f32(np.log(np.float64(x)))


def exp_f32(x) -> np.float32:
    """``torch.exp`` of a float32 scalar (overflows to inf, like torch)."""
    with np.errstate(over="ignore"):
        return f32(np.exp(np.float64(x)))


def as_f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``step = (end - start) / (steps - 1)`` in float32 and fills the first half as
    ``start + step * i`` and the second half as ``end - step * (steps - 1 - i)``; the multiply-add
    is contracted to one fused (singly rounded) operation in the x86 kernels. float64 evaluates the
    product and the sum exactly for any sane beta range, so one rounding to float32 reproduces it.
    """
    start32, end32 = f32(start), f32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = f32(f32(end32 - start32) / f32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    halfway = steps // 2
    out = np.where(
        idx < halfway,
        np.float64(start32) + np.float64(step) * idx,
        np.float64(end32) - np.float64(step) * (steps - 1 - idx),
    )
    return out.astype(np.float32)


def cumprod_f32(alphas: np.ndarray) -> np.ndarray:
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
    alphas = f32(1.0) - betas
    alphas_cumprod = cumprod_f32(alphas)
    alphas_bar_sqrt = np.sqrt(alphas_cumprod)
    # Store old values.
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0]
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1]
    # Shift so the last timestep is zero.
    alphas_bar_sqrt = alphas_bar_sqrt - alphas_bar_sqrt_T
    # Scale so the first timestep is back to the old value.
    alphas_bar_sqrt = alphas_bar_sqrt * f32(alphas_bar_sqrt_0 / f32(alphas_bar_sqrt_0 - alphas_bar_sqrt_T))
    # Convert alphas_bar_sqrt to betas
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt  # Revert sqrt
    alphas = alphas_bar[1:] / alphas_bar[:-1]  # Revert cumprod
    alphas = np.concatenate([alphas_bar[0:1], alphas])
    return f32(1.0) - alphas


def make_betas(config) -> np.ndarray:
    if config.trained_betas is not None:
        return as_f32(config.trained_betas)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        # this schedule is very specific to the latent diffusion model.
        root = torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        # Glide cosine schedule
        return betas_for_alpha_bar(n)
    raise InputError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {config.beta_schedule!r}")


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# config mixin
# ----------------------------------------------------------------------------------------------


class ConfigMixin:
    """``from_dict`` with diffusers' ``from_config`` semantics for the frozen config dataclasses."""

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, config: Union[Mapping[str, Any], "ConfigMixin", None] = None, **overrides: Any):
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


# ----------------------------------------------------------------------------------------------
# shared scheduler machinery
# ----------------------------------------------------------------------------------------------


class SchedulerBase:
    config_class: ClassVar[Type[ConfigMixin]]
    order: ClassVar[int] = 1
    _prediction_types: ClassVar[Tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init__(self, config: Optional[ConfigMixin] = None, **kwargs: Any):
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
    def from_config(cls, config: Union[Mapping[str, Any], ConfigMixin, None] = None, **kwargs: Any):
        """Like diffusers' ``Cls.from_config``: foreign keys ignored, missing keys get this class's defaults."""
        return cls(cls.config_class.from_dict(config, **kwargs))

    def _init_noise_schedule(self) -> None:
        """``betas`` (rescaled for zero terminal SNR where the config asks), ``alphas`` and
        ``alphas_cumprod``: the diffusers attributes every scheduler here starts from."""
        cfg = self.config
        self.betas = make_betas(cfg)
        if getattr(cfg, "rescale_betas_zero_snr", False):
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = f32(1.0) - self.betas
        self.alphas_cumprod = cumprod_f32(self.alphas)

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
        if cfg.trained_betas is None and cfg.beta_schedule not in BETA_SCHEDULES:
            raise InputError(
                f"{name}: beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {cfg.beta_schedule!r}"
            )
        if cfg.trained_betas is not None and len(cfg.trained_betas) != n:
            raise InputError(f"{name}: trained_betas has {len(cfg.trained_betas)} values, num_train_timesteps is {n}")
        if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
            raise InputError(
                f"{name}: timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {cfg.timestep_spacing!r}"
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

    def check_num_inference_steps(self, num_inference_steps: Any) -> int:
        """``num_inference_steps`` checked against this scheduler's config before any work: an
        integer in [1, num_train_timesteps] whose timesteps this scheduler can step through (with
        "leading" spacing, ``steps_offset`` shifts them up: 1000 steps of 1000 training steps and
        offset 1 reach timestep 1000). One-line :class:`InputError` naming the most steps below
        it that fit."""
        steps = self._check_num_inference_steps(num_inference_steps)
        problem = self._timesteps_problem(steps)
        if problem is None:
            return steps
        fits = next((n for n in range(steps - 1, 0, -1) if self._timesteps_problem(n) is None), 0)
        cfg = self.config
        advice = f"use at most {fits} steps" if fits else "no number of steps fits"
        raise InputError(
            f"num_inference_steps {steps}: {type(self).__name__} with this package's scheduler config "
            f"(num_train_timesteps {cfg.num_train_timesteps}, timestep_spacing {cfg.timestep_spacing!r}, "
            f"steps_offset {cfg.steps_offset}) {problem}; {advice}", field="num_inference_steps")

    def _timesteps_problem(self, num_inference_steps: int) -> str | None:
        """Why ``num_inference_steps`` timesteps of this config cannot be stepped through (None: they can)."""
        probe = type(self)(self.config)  # set_timesteps resets a scheduler's state: never this one's
        probe.set_timesteps(num_inference_steps)
        return probe.timesteps_problem()

    def timesteps_problem(self) -> str | None:
        """Why the set timesteps cannot be stepped through (None: they can): one outside
        ``alphas_cumprod``, which this scheduler indexes."""
        timesteps = np.asarray(self.timesteps)
        outside = timesteps[(timesteps < 0) | (timesteps >= self.config.num_train_timesteps)]
        if outside.size:
            return f"reaches timestep {int(outside[0])}, outside the trained [0, {self.config.num_train_timesteps - 1}]"
        return None

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


def leading_or_trailing_timesteps(config, num_inference_steps: int) -> np.ndarray:
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
# sigma-based schedulers
# ----------------------------------------------------------------------------------------------


class StepIndexMixin:
    """What the sigma-based schedulers share: diffusers' ``step_index``/``begin_index``
    bookkeeping and the sigmas at the chosen timesteps."""

    def _train_sigmas(self) -> np.ndarray:
        """sqrt((1 - α̅_t) / α̅_t) for t = 0..T-1, float32 like diffusers."""
        ac = self.alphas_cumprod
        return np.sqrt((f32(1) - ac) / ac)

    def timesteps_problem(self) -> str | None:
        """A repeated timestep (its step index is ambiguous: DPM-Solver's "leading" spacing at as
        many steps as training timesteps runs past its sigmas); the sigmas are interpolated
        between the training ones and clamped at both ends (as diffusers does), so a timestep
        outside them is fine."""
        timesteps = np.asarray(self.timesteps)
        values, counts = np.unique(timesteps, return_counts=True)
        if (counts > 1).any():
            return f"repeats timestep {int(values[counts > 1][0])} (too many steps for this spacing)"
        return None

    def _sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """σ(t) by linear interpolation of the training sigmas (float64, like diffusers' np.interp),
        followed by the final sigma the config asks for; float32."""
        sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = sqrt_f32((f32(1) - ac0) / ac0)
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
