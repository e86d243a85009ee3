"""Diffusion process: noise schedules, training targets and samplers.

`schedule` holds the forward process (a `NoiseSchedule`, `add_noise`, the
epsilon / v targets and conversions between model outputs); `samplers` holds
DDIM, DPM-Solver++(2M), classifier-free guidance and the DDIM grid used by
ALDM's multistep unrolling. Everything is pure JAX and numerically matches
the diffusers PyTorch schedulers (see tests/test_diffusion.py). `masked` is
the discrete counterpart for label maps (absorbing-state masking, MaskGIT
decoding) used by the text -> layout stage.
"""

from sdsup.diffusion.schedule import (  # noqa: F401
    NoiseSchedule,
    add_noise,
    eps_from_prediction,
    make_schedule,
    snr,
    training_target,
    velocity_target,
    x0_from_prediction,
)
from sdsup.diffusion.samplers import (  # noqa: F401
    classifier_free_guidance,
    ddim_grid,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddim_unroll,
    dpm_solver_pp_2m_sample,
    dpm_solver_pp_2m_timesteps,
)
