"""sdsup's `diffusion` config section <-> diffusers scheduler configs.

`import` reads a pipeline's scheduler_config.json back into sdsup's
settings where it can (`diffusion_from_scheduler`); `export` writes a
DDIMScheduler config that samples exactly as `sdsup.diffusion.samplers.ddim_sample`
(`ddim_scheduler_config`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from sdsup.convert.pipeline_files import PipelineConvertError
from sdsup.convert.versions import diffusers_version

# sdsup schedule kind <-> diffusers beta_schedule.
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def diffusion_from_scheduler(config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """sdsup's `diffusion` config section equivalent to a diffusers scheduler config, if there is one."""
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    kind = inverse.get(config.get("beta_schedule", "linear"))
    if kind is None or config.get("trained_betas") is not None:
        return None
    return {
        "schedule": kind,
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        "beta_start": float(config.get("beta_start", 0.0001)),
        "beta_end": float(config.get("beta_end", 0.02)),
        "prediction_type": config.get("prediction_type", "epsilon"),
    }


def ddim_scheduler_config(diffusion: Mapping[str, Any]) -> Dict[str, Any]:
    """diffusers DDIMScheduler config equal to sdsup's DDIM over the `diffusion` config section.

    Missing keys take Stable Diffusion 1.5's values. Matches
    `sdsup.diffusion.samplers.ddim_sample` (leading spacing, steps_offset 1,
    final alpha = alphas_cumprod[0], no clipping or thresholding).
    """
    kind = diffusion.get("schedule", "scaled_linear")
    if kind not in BETA_SCHEDULES:
        raise PipelineConvertError(f"diffusion.schedule {kind!r} has no diffusers equivalent; known: "
                                   f"{', '.join(BETA_SCHEDULES)}")
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": diffusers_version(),
        "num_train_timesteps": int(diffusion.get("num_train_timesteps", 1000)),
        "beta_start": float(diffusion.get("beta_start", 0.00085)),
        "beta_end": float(diffusion.get("beta_end", 0.012)),
        "beta_schedule": BETA_SCHEDULES[kind],
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": diffusion.get("prediction_type", "epsilon"),
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
