"""PNDM (``scheduling_pndm.py``): BLIP-Diffusion's own scheduler, PLMS with ``skip_prk_steps``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

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
class PNDMSchedulerConfig(ConfigMixin):
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


class PNDMScheduler(SchedulerBase):
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
        self._init_noise_schedule()
        self.final_alpha_cumprod = f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
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
        self._timesteps = leading_or_trailing_timesteps(cfg, num_inference_steps)[::-1].copy()

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
            self.cur_model_output = self.cur_model_output + f32(1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output = self.cur_model_output + f32(1 / 3) * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output = self.cur_model_output + f32(1 / 3) * model_output
        elif (self.counter - 3) % 4 == 0:
            model_output = self.cur_model_output + f32(1 / 6) * model_output
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
            model_output = (model_output + self.ets[-1]) / f32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            # e' = (3 e_0 - e_-1) / 2
            model_output = (f32(3) * self.ets[-1] - self.ets[-2]) / f32(2)
        elif len(self.ets) == 3:
            # e' = (23 e_0 - 16 e_-1 + 5 e_-2) / 12
            model_output = (f32(23) * self.ets[-1] - f32(16) * self.ets[-2] + f32(5) * self.ets[-3]) / f32(12)
        else:
            # e' = (55 e_0 - 59 e_-1 + 37 e_-2 - 9 e_-3) / 24
            model_output = f32(1 / 24) * (
                f32(55) * self.ets[-1] - f32(59) * self.ets[-2] + f32(37) * self.ets[-3] - f32(9) * self.ets[-4]
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
        beta_prod_t = f32(1) - alpha_prod_t
        beta_prod_t_prev = f32(1) - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            # e = sqrt(α_t) v + sqrt(1 - α_t) x_t
            model_output = sqrt_f32(alpha_prod_t) * model_output + sqrt_f32(beta_prod_t) * sample

        # corresponds to (α_(t−δ) - α_t) divided by
        # denominator of x_t in formula (9) and plus 1
        # Note: (α_(t−δ) - α_t) / (sqrt(α_t) * (sqrt(α_(t−δ)) + sqr(α_t))) =
        # sqrt(α_(t−δ)) / sqrt(α_t))
        sample_coeff = sqrt_f32(alpha_prod_t_prev / alpha_prod_t)

        # corresponds to denominator of e_θ(x_t, t) in formula (9)
        model_output_denom_coeff = f32(
            alpha_prod_t * sqrt_f32(beta_prod_t_prev) + sqrt_f32(f32(alpha_prod_t * beta_prod_t) * alpha_prod_t_prev)
        )

        # full formula (9)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
