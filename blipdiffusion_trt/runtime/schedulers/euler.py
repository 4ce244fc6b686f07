"""Euler (``scheduling_euler_discrete.py``)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ...errors import InputError
from .base import (
    ConfigMixin,
    SchedulerBase,
    StepIndexMixin,
    f32,
    sqrt_f32,
)


@dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(ConfigMixin):
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


class EulerDiscreteScheduler(StepIndexMixin, SchedulerBase):
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

        self._init_noise_schedule()
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
        max_sigma = f32(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(sqrt_f32(f32(max_sigma * max_sigma) + f32(1)))

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
        scaled = self._work(sample) / sqrt_f32(f32(sigma * sigma) + f32(1))
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
                sigma_sq_plus_1 = f32(f32(sigma * sigma) + f32(1))
                pred_original_sample = model_output * f32(-sigma / sqrt_f32(sigma_sq_plus_1)) + (sample / sigma_sq_plus_1)

            # 2. Convert to an ODE derivative: d = (x - x_0) / σ̂
            derivative = (sample - pred_original_sample) / sigma_hat
            # 3. Euler step: x' = x + d (σ_next - σ̂)
            dt = f32(self.sigmas[self.step_index + 1] - sigma_hat)
            prev_sample = sample + derivative * dt

        # upon completion increase step index by one
        self._step_index += 1
        return self._out(prev_sample, out_like)
