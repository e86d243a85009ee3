"""Discrete-time variance-preserving noise schedules (DDPM / Stable Diffusion).

The forward process is z_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps with
abar_t = alphas_cumprod[t], t in [0, num_train_timesteps). Stable Diffusion
1.5 uses `make_schedule("scaled_linear", 1000, 0.00085, 0.012, "epsilon")`,
which is also the default.

The arrays are built in NumPy float32 the same way diffusers builds them in
PyTorch float32 (`DDPMScheduler`, `DDIMScheduler`, ...), so they agree to a
few float32 ulps. Timesteps `t` are integer arrays of shape [] or [B]; a [B]
coefficient is broadcast over the trailing axes of an NHWC (or any rank)
tensor.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.errors import ConfigError

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@flax.struct.dataclass
class NoiseSchedule:
    """alphas_cumprod (float32 [num_train_timesteps]) plus static settings.

    A pytree: `alphas_cumprod` is a leaf, `num_train_timesteps` and
    `prediction_type` are static (part of the treedef), so a schedule can be
    passed to or closed over by jitted functions.
    """

    alphas_cumprod: jax.Array
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type {prediction_type!r} is not supported; choose one of {', '.join(PREDICTION_TYPES)}"
        )


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide / improved-DDPM cosine schedule (diffusers' "squaredcos_cap_v2")."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def make_betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """float32 betas [num_train_timesteps] for a schedule kind (NumPy, host side)."""
    if kind == "scaled_linear":
        root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64).astype(np.float32)
        return root * root
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
    if kind == "cosine":
        return _cosine_betas(num_train_timesteps)
    raise ConfigError(f"schedule kind {kind!r} is not supported; choose one of {', '.join(SCHEDULE_KINDS)}")


def make_schedule(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
) -> NoiseSchedule:
    """Builds a `NoiseSchedule`.

    kind: "scaled_linear" (betas = linspace(sqrt(beta_start), sqrt(beta_end))^2,
    Stable Diffusion), "linear" (linspace(beta_start, beta_end)) or "cosine"
    (diffusers' "squaredcos_cap_v2", betas capped at 0.999; beta_start and
    beta_end are ignored).
    """
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"schedule kind {kind!r} is not supported; choose one of {', '.join(SCHEDULE_KINDS)}")
    check_prediction_type(prediction_type)
    n = num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ConfigError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    if kind != "cosine" and not (0.0 < beta_start <= beta_end < 1.0):
        raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = make_betas(kind, int(num_train_timesteps), beta_start, beta_end)
    # Sequential float32 cumulative product, as torch.cumprod does on float32.
    alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
    return NoiseSchedule(
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
        num_train_timesteps=int(num_train_timesteps),
        prediction_type=prediction_type,
    )


def sd15_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    """Stable Diffusion 1.5's schedule: scaled_linear, 1000 steps, 0.00085 -> 0.012."""
    return make_schedule("scaled_linear", 1000, 0.00085, 0.012, prediction_type)


def broadcast_to_rank(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a [] or [B] coefficient so it broadcasts over x's trailing axes."""
    coef = jnp.asarray(coef)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _abar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def _coefs(schedule: NoiseSchedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast against x (float32)."""
    abar = broadcast_to_rank(_abar(schedule, t), x)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in x0's dtype."""
    a, s = _coefs(schedule, t, x0)
    return (a * x0 + s * noise).astype(x0.dtype)


def velocity_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' get_velocity)."""
    a, s = _coefs(schedule, t, x0)
    return (a * noise - s * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The regression target for the model: noise ("epsilon") or v ("v_prediction")."""
    check_prediction_type(schedule.prediction_type)
    if schedule.prediction_type == "epsilon":
        return noise
    return velocity_target(schedule, x0, noise, t)


def x0_from_prediction(schedule: NoiseSchedule, x_t: jax.Array, model_output: jax.Array, t: jax.Array) -> jax.Array:
    """Predicted clean sample from the model output at timestep t (float32 or wider)."""
    check_prediction_type(schedule.prediction_type)
    a, s = _coefs(schedule, t, x_t)
    if schedule.prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    return a * x_t - s * model_output


def eps_from_prediction(schedule: NoiseSchedule, x_t: jax.Array, model_output: jax.Array, t: jax.Array) -> jax.Array:
    """Predicted noise from the model output at timestep t."""
    check_prediction_type(schedule.prediction_type)
    if schedule.prediction_type == "epsilon":
        return model_output
    a, s = _coefs(schedule, t, x_t)
    return a * model_output + s * x_t


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t), shape of t (for min-SNR weighting)."""
    abar = _abar(schedule, t)
    return abar / (1.0 - abar)


def min_snr_weights(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Per-timestep loss weights of Min-SNR-gamma (Hang et al. 2023), shape of t.

    The weight that makes the regression loss on this prediction type equal
    min(SNR_t, gamma) times the x0 loss: min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v. Low-noise timesteps, which dominate a
    uniform draw but barely shape the sample, stop crowding out the noisy
    ones that decide the layout. gamma <= 0 gives uniform weights.
    """
    check_prediction_type(schedule.prediction_type)
    if gamma <= 0:
        return jnp.ones(jnp.shape(t), jnp.float32)
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    return clipped / s if schedule.prediction_type == "epsilon" else clipped / (s + 1.0)
