"""DDIM inversion (``scheduling_ddim_inverse.py``).

DDIM inversion runs the deterministic DDIM update backwards: from a clean latent x_0 up to the
noise level of the last sampling timestep, so that sampling back with :class:`~.ddim.DDIMScheduler`
from the result reconstructs the image (``BlipDiffusionRuntime.invert``)::

    inverse = DDIMInverseScheduler.from_config(scheduler_config)
    inverse.set_timesteps(50)
    for t in inverse.timesteps:                     # ascending
        noise_pred = unet(latents, t, ...)
        latents = inverse.step(noise_pred, t, latents)

Built from a checkpoint's scheduler config as diffusers' ``DDIMInverseScheduler.from_config``
builds it (foreign keys ignored, missing ones take this class's defaults: ``clip_sample=True``,
``set_alpha_to_one=True``, ...). Not a sampling scheduler, so not one of ``SCHEDULER_NAMES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ...errors import InputError
from .base import ConfigMixin, SchedulerBase, f32, sqrt_f32

INVERSE_TIMESTEP_SPACINGS = ("leading", "trailing")


@dataclass(frozen=True)
class DDIMInverseSchedulerConfig(ConfigMixin):
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


class DDIMInverseScheduler(SchedulerBase):
    """The inverse of DDIM's deterministic update (η = 0): x_(t-Δ) -> x_t along the same ODE."""

    config_class = DDIMInverseSchedulerConfig
    _prediction_types = ("epsilon", "sample", "v_prediction")

    def __init__(self, config: Optional[DDIMInverseSchedulerConfig] = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        if cfg.timestep_spacing not in INVERSE_TIMESTEP_SPACINGS:
            raise InputError(f"DDIMInverseScheduler: timestep_spacing must be one of "
                             f"{', '.join(INVERSE_TIMESTEP_SPACINGS)}, got {cfg.timestep_spacing!r}")
        self._init_noise_schedule()
        # The first step starts from x_0: there is no alphas_cumprod before timestep 0;
        # `set_alpha_to_one` decides whether that is 1 or alphas_cumprod[0].
        self.initial_alpha_cumprod = f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0
        # setable values
        self.num_inference_steps: Optional[int] = None
        self.timesteps = np.arange(0, cfg.num_train_timesteps).astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the ascending timesteps of the inversion loop."""
        n_train = self.config.num_train_timesteps
        self.num_inference_steps = self._check_num_inference_steps(num_inference_steps)
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
        if timestep < 0:  # negative indices would wrap around: the caller asks for the level before 0
            raise IndexError(f"timestep {timestep} is out of range for num_train_timesteps="
                             f"{self.config.num_train_timesteps}")
        return super()._alpha_cumprod_at(timestep)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One inverse DDIM step x_(t-Δ) -> x_t (formula (12) solved for the noisier sample).

        ``model_output`` is the model's prediction at ``sample`` and ``timestep``; returns the
        sample at ``timestep`` with the dtype of ``sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        out_like = sample
        model_output = self._work(model_output)
        sample = self._work(sample)

        # 1. the step goes from the level before t (t - Δ, the current sample) to t
        prev_timestep = int(timestep)
        timestep = min(prev_timestep - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1)

        # 2. compute alphas, betas (ᾱ of the current level, ᾱ of the level reached)
        alpha_prod_t = self._alpha_cumprod_at(timestep) if timestep >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep)
        beta_prod_t = f32(1) - alpha_prod_t

        with np.errstate(divide="ignore", invalid="ignore"):
            # 3. predicted original sample x_0 and noise e from the model output
            if cfg.prediction_type == "epsilon":
                pred_original_sample = (sample - sqrt_f32(beta_prod_t) * model_output) / sqrt_f32(alpha_prod_t)
                pred_epsilon = model_output
            elif cfg.prediction_type == "sample":
                pred_original_sample = model_output
                pred_epsilon = (sample - sqrt_f32(alpha_prod_t) * pred_original_sample) / sqrt_f32(beta_prod_t)
            else:  # "v_prediction"
                pred_original_sample = sqrt_f32(alpha_prod_t) * sample - sqrt_f32(beta_prod_t) * model_output
                pred_epsilon = sqrt_f32(alpha_prod_t) * model_output + sqrt_f32(beta_prod_t) * sample

            # 4. clip "predicted x_0"
            if cfg.clip_sample:
                limit = f32(cfg.clip_sample_range)
                pred_original_sample = np.clip(pred_original_sample, -limit, limit)

            # 5. "direction pointing to x_t": sqrt(1 - ᾱ_t) e
            pred_sample_direction = sqrt_f32(f32(1) - alpha_prod_t_prev) * pred_epsilon

            # 6. x_t = sqrt(ᾱ_t) x_0 + direction
            prev_sample = sqrt_f32(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        return self._out(prev_sample, out_like)
