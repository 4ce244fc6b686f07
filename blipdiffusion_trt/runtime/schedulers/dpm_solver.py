"""DPM-Solver multistep (``scheduling_dpmsolver_multistep.py``; "DPM++ 2M" by default)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from ...errors import InputError
from .base import (
    ConfigMixin,
    SchedulerBase,
    StepIndexMixin,
    exp_f32,
    f32,
    log_f32,
    sqrt_f32,
)


@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(ConfigMixin):
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


class DPMSolverMultistepScheduler(StepIndexMixin, SchedulerBase):
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

        self._init_noise_schedule()
        if cfg.rescale_betas_zero_snr:
            # Close to 0 without being 0 so first sigma is not inf
            # FP16 smallest positive subnormal works well here
            self.alphas_cumprod[-1] = 2**-24

        # Currently we only support VP-type noise schedule: α_t = sqrt(α̅_t), σ_t = sqrt(1 - α̅_t), λ_t = log(α_t / σ_t)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(f32(1) - self.alphas_cumprod)
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
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], f32(cfg.lambda_min_clipped), side="left"))
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
        alpha_t = f32(f32(1) / sqrt_f32(f32(sigma * sigma) + f32(1)))
        sigma_t = f32(sigma * alpha_t)
        return alpha_t, sigma_t

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        # λ = log(α) - log(σ)  (half log-SNR)
        return f32(log_f32(alpha) - log_f32(sigma))

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
        h = f32(lambda_t - lambda_s)
        if self.config.algorithm_type == "dpmsolver++":
            # x_t = (σ_t / σ_s) x_s - α_t (e^(-h) - 1) x_0
            return f32(sigma_t / sigma_s) * sample - f32(alpha_t * f32(exp_f32(-h) - f32(1))) * model_output
        # "dpmsolver": x_t = (α_t / α_s) x_s - σ_t (e^h - 1) ε
        return f32(alpha_t / alpha_s) * sample - f32(sigma_t * f32(exp_f32(h) - f32(1))) * model_output

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
        h, h_0 = f32(lambda_t - lambda_s0), f32(lambda_s0 - lambda_s1)
        r0 = f32(h_0 / h)
        D0, D1 = m0, f32(f32(1) / r0) * (m0 - m1)
        half = f32(0.5)
        one = f32(1)
        if self.config.algorithm_type == "dpmsolver++":
            # See https://arxiv.org/abs/2211.01095 for detailed derivations
            em1 = f32(exp_f32(-h) - one)
            if self.config.solver_type == "midpoint":
                # x_t = (σ_t/σ_s0) x - α_t (e^-h - 1) D0 - ½ α_t (e^-h - 1) D1
                return (
                    f32(sigma_t / sigma_s0) * sample
                    - f32(alpha_t * em1) * D0
                    - f32(half * f32(alpha_t * em1)) * D1
                )
            # "heun": x_t = (σ_t/σ_s0) x - α_t (e^-h - 1) D0 + α_t ((e^-h - 1)/h + 1) D1
            return (
                f32(sigma_t / sigma_s0) * sample
                - f32(alpha_t * em1) * D0
                + f32(alpha_t * f32(f32(em1 / h) + one)) * D1
            )
        # "dpmsolver": see https://arxiv.org/abs/2206.00927 for detailed derivations
        ep1 = f32(exp_f32(h) - one)
        if self.config.solver_type == "midpoint":
            return (
                f32(alpha_t / alpha_s0) * sample
                - f32(sigma_t * ep1) * D0
                - f32(half * f32(sigma_t * ep1)) * D1
            )
        return (
            f32(alpha_t / alpha_s0) * sample
            - f32(sigma_t * ep1) * D0
            - f32(sigma_t * f32(f32(ep1 / h) - one)) * D1
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
        h, h_0, h_1 = f32(lambda_t - lambda_s0), f32(lambda_s0 - lambda_s1), f32(lambda_s1 - lambda_s2)
        r0, r1 = f32(h_0 / h), f32(h_1 / h)
        one, half = f32(1), f32(0.5)
        D0 = m0
        D1_0, D1_1 = f32(one / r0) * (m0 - m1), f32(one / r1) * (m1 - m2)
        D1 = D1_0 + f32(r0 / f32(r0 + r1)) * (D1_0 - D1_1)
        D2 = f32(one / f32(r0 + r1)) * (D1_0 - D1_1)
        if self.config.algorithm_type == "dpmsolver++":
            # See https://arxiv.org/abs/2206.00927 for detailed derivations
            em1 = f32(exp_f32(-h) - one)
            return (
                f32(sigma_t / sigma_s0) * sample
                - f32(alpha_t * em1) * D0
                + f32(alpha_t * f32(f32(em1 / h) + one)) * D1
                - f32(alpha_t * f32(f32(f32(em1 + h) / f32(h * h)) - half)) * D2
            )
        ep1 = f32(exp_f32(h) - one)
        return (
            f32(alpha_t / alpha_s0) * sample
            - f32(sigma_t * ep1) * D0
            - f32(sigma_t * f32(f32(ep1 / h) - one)) * D1
            - f32(sigma_t * f32(f32(f32(ep1 - h) / f32(h * h)) - half)) * D2
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
