"""Pure-numpy ports of the diffusers 0.32.2 noise schedulers BLIP-Diffusion can sample with.

No torch, no diffusers: this package only needs numpy and the standard library.

Four schedulers, with diffusers' class names, config field names, defaults and attribute names:

* :class:`PNDMScheduler`           (:mod:`.pndm`, ``scheduling_pndm.py``; BLIP-Diffusion's own, PLMS with ``skip_prk_steps``)
* :class:`DDIMScheduler`           (:mod:`.ddim`, ``scheduling_ddim.py``)
* :class:`EulerDiscreteScheduler`  (:mod:`.euler`, ``scheduling_euler_discrete.py``)
* :class:`DPMSolverMultistepScheduler` (:mod:`.dpm_solver`, ``scheduling_dpmsolver_multistep.py``; "DPM++ 2M" by default)

one module each, over :mod:`.base` (float32 helpers, beta schedules, the base class), and
:class:`DDIMInverseScheduler` (:mod:`.ddim_inverse`, ``scheduling_ddim_inverse.py``: the DDIM
inversion of real images for editing, not a sampler). This module holds the registry: the names
a generation accepts (:data:`SCHEDULER_NAMES`) and :func:`scheduler_from_config`.

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

from typing import Any, Dict, Mapping, Tuple, Type, Union

from ...errors import InputError
from .base import SchedulerBase
from .ddim import DDIMScheduler, DDIMSchedulerConfig
from .ddim_inverse import DDIMInverseScheduler, DDIMInverseSchedulerConfig
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig
from .euler import EulerDiscreteScheduler, EulerDiscreteSchedulerConfig
from .pndm import PNDMScheduler, PNDMSchedulerConfig

__all__ = [
    "PNDMScheduler",
    "PNDMSchedulerConfig",
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "DDIMInverseScheduler",
    "DDIMInverseSchedulerConfig",
    "EulerDiscreteScheduler",
    "EulerDiscreteSchedulerConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepSchedulerConfig",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "check_scheduler_name",
    "scheduler_from_config",
]


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

SCHEDULERS: Dict[str, Type[SchedulerBase]] = {
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


def scheduler_from_config(name: str, config: Union[Mapping[str, Any], None]) -> SchedulerBase:
    """Build scheduler ``name`` from a checkpoint's ``scheduler_config.json`` dict, like
    ``Cls.from_config(config)`` in diffusers ("dpmpp-2m" forces DPM-Solver++ of order 2)."""
    cls = SCHEDULERS[check_scheduler_name(name)]
    return cls.from_config(config or {}, **_FORCED.get(name, {}))
