"""DDIM (``scheduling_ddim.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ...errors import InputError
from .base import (
    ConfigMixin,
    SchedulerBase,
    f32,
    leading_or_trailing_timesteps,
    sqrt_f32,
)


@dataclass(frozen=True)
class DDIMSchedulerConfig(ConfigMixin):
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


class DDIMScheduler(SchedulerBase):
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
        self._init_noise_schedule()
        # At every step in ddim, we are looking into the previous alphas_cumprod
        # For the final step, there is no previous alphas_cumprod because we are already at 0
        # `set_alpha_to_one` decides whether we set this parameter simply to one or
        # whether we use the final alpha of the "non-previous" one.
        self.final_alpha_cumprod = f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
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
        self.timesteps = leading_or_trailing_timesteps(self.config, num_inference_steps)

    def _get_variance(self, timestep: int, prev_timestep: int) -> np.float32:
        alpha_prod_t = self._alpha_cumprod_at(timestep)
        alpha_prod_t_prev = self._alpha_cumprod_at(prev_timestep) if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = f32(1) - alpha_prod_t
        beta_prod_t_prev = f32(1) - alpha_prod_t_prev
        return f32((beta_prod_t_prev / beta_prod_t) * f32(f32(1) - alpha_prod_t / alpha_prod_t_prev))

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
        beta_prod_t = f32(1) - alpha_prod_t

        # 3. compute predicted original sample from predicted noise also called
        # "predicted x_0" of formula (12): x_0 = (x_t - sqrt(1 - α_t) e_θ) / sqrt(α_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            if cfg.prediction_type == "epsilon":
                pred_original_sample = (sample - sqrt_f32(beta_prod_t) * model_output) / sqrt_f32(alpha_prod_t)
                pred_epsilon = model_output
            elif cfg.prediction_type == "sample":
                pred_original_sample = model_output
                pred_epsilon = (sample - sqrt_f32(alpha_prod_t) * pred_original_sample) / sqrt_f32(beta_prod_t)
            else:  # "v_prediction": x_0 = sqrt(α_t) x_t - sqrt(1 - α_t) v,  e = sqrt(α_t) v + sqrt(1 - α_t) x_t
                pred_original_sample = sqrt_f32(alpha_prod_t) * sample - sqrt_f32(beta_prod_t) * model_output
                pred_epsilon = sqrt_f32(alpha_prod_t) * model_output + sqrt_f32(beta_prod_t) * sample

            # 4. Clip "predicted x_0"
            if cfg.clip_sample:
                limit = f32(cfg.clip_sample_range)
                pred_original_sample = np.clip(pred_original_sample, -limit, limit)

            # 5. compute variance: "sigma_t(η)" -> see formula (16)
            # σ_t = sqrt((1 − α_t−1)/(1 − α_t)) * sqrt(1 − α_t/α_t−1)
            variance = self._get_variance(timestep, prev_timestep)
            std_dev_t = f32(f32(eta) * sqrt_f32(variance))

            if use_clipped_model_output:
                # the pred_epsilon is always re-derived from the clipped x_0 in Glide
                pred_epsilon = (sample - sqrt_f32(alpha_prod_t) * pred_original_sample) / sqrt_f32(beta_prod_t)

            # 6. compute "direction pointing to x_t" of formula (12): sqrt(1 − α_t−1 − σ_t²) e_θ
            pred_sample_direction = sqrt_f32(f32(f32(1) - alpha_prod_t_prev) - f32(std_dev_t * std_dev_t)) * pred_epsilon

            # 7. compute x_t without "random noise" of formula (12): sqrt(α_t−1) x_0 + direction
            prev_sample = sqrt_f32(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

            # 8. add σ_t z for η > 0
            if eta > 0:
                if variance_noise is None:
                    raise InputError("DDIMScheduler.step with eta > 0 needs variance_noise (the numpy port has no generator)")
                prev_sample = prev_sample + std_dev_t * self._work(variance_noise)

        return self._out(prev_sample, out_like)
