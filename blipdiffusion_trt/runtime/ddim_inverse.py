"""Pure-numpy port of diffusers 0.32.2 ``DDIMInverseScheduler`` (``scheduling_ddim_inverse.py``).

DDIM inversion runs the deterministic DDIM update backwards: from a clean latent x_0 up to the
noise level of the last sampling timestep, so that sampling back with :class:`DDIMScheduler` from
the result reconstructs the image (``BlipDiffusionRuntime.invert``)::

    inverse = DDIMInverseScheduler.from_config(scheduler_config)
    inverse.set_timesteps(50)
    for t in inverse.timesteps:                     # ascending
        noise_pred = unet(latents, t, ...)
        latents = inverse.step(noise_pred, t, latents)

Built from a checkpoint's scheduler config as diffusers' ``DDIMInverseScheduler.from_config``
builds it (foreign keys ignored, missing ones take this class's defaults: ``clip_sample=True``,
``set_alpha_to_one=True``, ...). The betas and cumulative alphas are those of the package's
:class:`~blipdiffusion_trt.runtime.schedulers.DDIMScheduler` built from the same fields, and every
step is float32 arithmetic in diffusers' order, as in the other numpy schedulers.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import InputError
from .schedulers import DDIMScheduler

__all__ = ["DDIMInverseScheduler", "DDIMInverseSchedulerConfig"]

_f32 = np.float32
_TIMESTEP_SPACINGS = ("leading", "trailing")


def _sqrt(x) -> np.float32:
    """``x ** 0.5`` of a float32 scalar, correctly rounded to float32."""
    with np.errstate(invalid="ignore"):
        return _f32(np.sqrt(np.float64(x)))


@dataclass(frozen=True)
class DDIMInverseSchedulerConfig:
    """``DDIMInverseScheduler.__init__`` arguments of diffusers 0.32.2, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, config: Union[Mapping[str, Any], None] = None, **overrides: Any) -> "DDIMInverseSchedulerConfig":
        """diffusers' ``from_config``: keys that are fields are used, others ignored; overrides win."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InputError(f"a scheduler config must be a mapping, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in {**config, **overrides}.items() if k in names}
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in np.asarray(values["trained_betas"]).ravel())
        return cls(**values)


class DDIMInverseScheduler:
    """The inverse of DDIM's deterministic update (η = 0): x_(t-Δ) -> x_t along the same ODE."""

    order = 1

    def __init__(self, config: Optional[DDIMInverseSchedulerConfig] = None, **kwargs: Any):
        config = config or DDIMInverseSchedulerConfig()
        if kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        if config.timestep_spacing not in _TIMESTEP_SPACINGS:
            raise InputError(
                f"DDIMInverseScheduler: timestep_spacing must be one of {', '.join(_TIMESTEP_SPACINGS)}, "
                f"got {config.timestep_spacing!r}"
            )
        # Same betas / alphas_cumprod as DDIM (and its config checks: beta schedule, prediction type).
        forward = DDIMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start, beta_end=config.beta_end,
            beta_schedule=config.beta_schedule, trained_betas=config.trained_betas,
            prediction_type=config.prediction_type, rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        )
        self.betas = forward.betas
        self.alphas = forward.alphas
        self.alphas_cumprod = forward.alphas_cumprod
        # The first step starts from x_0: no alphas_cumprod before timestep 0; set_alpha_to_one
        # decides whether that is 1 or alphas_cumprod[0].
        self.initial_alpha_cumprod = _f32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0
        # setable values
        self.num_inference_steps: Optional[int] = None
        self.timesteps = np.arange(0, config.num_train_timesteps).astype(np.int64)

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], None] = None, **kwargs: Any) -> "DDIMInverseScheduler":
        """Like diffusers' ``DDIMInverseScheduler.from_config``."""
        return cls(DDIMInverseSchedulerConfig.from_dict(config, **kwargs))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Identity: this scheduler does not scale the denoising model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the ascending timesteps of the inversion loop."""
        n_train = self.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, numbers.Integral)
            or not 1 <= num_inference_steps <= n_train
        ):
            raise InputError(f"num_inference_steps must be an integer in [1, {n_train}], got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        # "leading" and "trailing" correspond to annotation of Table 2. of https://arxiv.org/abs/2305.08891
        if self.config.timestep_spacing == "leading":
            step_ratio = n_train // self.num_inference_steps
            timesteps = (np.arange(0, self.num_inference_steps) * step_ratio).round().copy().astype(np.int64)
            timesteps += self.config.steps_offset
        else:  # "trailing"
            step_ratio = n_train / self.num_inference_steps
            timesteps = np.round(np.arange(n_train, 0, -step_ratio)[::-1]).astype(np.int64)
            timesteps -= 1
        self.timesteps = timesteps

    def _alpha_cumprod_at(self, timestep: int) -> np.float32:
        n_train = self.config.num_train_timesteps
        if not 0 <= timestep < n_train:
            raise IndexError(
                f"timestep {timestep} is out of range for num_train_timesteps={n_train} "
                f"(timestep_spacing={self.config.timestep_spacing!r}, steps_offset={self.config.steps_offset})"
            )
        return self.alphas_cumprod[timestep]

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One inverse DDIM step x_(t-Δ) -> x_t (formula (12) solved for the noisier sample).

        ``model_output`` is the model's prediction at ``sample`` and ``timestep``; returns the
        sample at ``timestep`` with the dtype of ``sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        out_dtype = np.asarray(sample).dtype if np.issubdtype(np.asarray(sample).dtype, np.floating) else np.dtype(np.float32)
        model_output = np.array(model_output, dtype=np.float32, copy=True)
        sample = np.array(sample, dtype=np.float32, copy=True)

        # 1. the step goes from the level before t (t - Δ, the current sample) to t
        prev_timestep = int(timestep)
        timestep = min(prev_timestep - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1)

        # 2. compute alphas, betas (ᾱ of the current level, ᾱ of the level reached)
        alpha_prod_t = self._alpha_cumprod_at(timestep) if timestep >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep)
        beta_prod_t = _f32(1) - alpha_prod_t

        with np.errstate(divide="ignore", invalid="ignore"):
            # 3. predicted original sample x_0 and noise e from the model output
            if cfg.prediction_type == "epsilon":
                pred_original_sample = (sample - _sqrt(beta_prod_t) * model_output) / _sqrt(alpha_prod_t)
                pred_epsilon = model_output
            elif cfg.prediction_type == "sample":
                pred_original_sample = model_output
                pred_epsilon = (sample - _sqrt(alpha_prod_t) * pred_original_sample) / _sqrt(beta_prod_t)
            else:  # "v_prediction"
                pred_original_sample = _sqrt(alpha_prod_t) * sample - _sqrt(beta_prod_t) * model_output
                pred_epsilon = _sqrt(alpha_prod_t) * model_output + _sqrt(beta_prod_t) * sample

            # 4. clip "predicted x_0"
            if cfg.clip_sample:
                limit = _f32(cfg.clip_sample_range)
                pred_original_sample = np.clip(pred_original_sample, -limit, limit)

            # 5. "direction pointing to x_t": sqrt(1 - ᾱ_t) e
            pred_sample_direction = _sqrt(_f32(1) - alpha_prod_t_prev) * pred_epsilon

            # 6. x_t = sqrt(ᾱ_t) x_0 + direction
            prev_sample = _sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        return prev_sample.astype(out_dtype, copy=False)
