"""Samplers: DDIM, DPM-Solver++(2M), classifier-free guidance, ALDM's DDIM grid.

Every sampler takes a `denoise_fn(x, t) -> model_output`, where `x` has the
sample's shape [B, ...] and `t` is an int32 array [B] (all entries equal);
the output is interpreted through `schedule.prediction_type` ("epsilon" or
"v_prediction"). The loops are `jax.lax.scan`s over a static timestep grid,
so a sampler is a single traced computation under `jax.jit`; the number of
steps, the spacing and the solver structure are static (Python) values.

Numerics follow diffusers' PyTorch schedulers step for step:

* `ddim_step` / `ddim_sample` = `DDIMScheduler(set_alpha_to_one=False,
  clip_sample=False, thresholding=False)` `.step(..., use_clipped_model_output=False)`.
  As in diffusers, the previous timestep is `t - num_train_timesteps //
  num_steps` for every spacing (for "leading" that is the next grid point);
  a negative previous timestep uses the final alpha (alphas_cumprod[0]).
* `dpm_solver_pp_2m_sample` = `DPMSolverMultistepScheduler(algorithm_type=
  "dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
  final_sigmas_type="zero", timestep_spacing="linspace", use_karras_sigmas=False)`.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdsup.diffusion.schedule import NoiseSchedule, broadcast_to_rank, check_prediction_type, x0_from_prediction
from sdsup.errors import ConfigError

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

DDIM_SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------- grids


def _check_steps(num_train_timesteps: int, num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ConfigError(f"num_steps {num_steps} cannot exceed num_train_timesteps {num_train_timesteps}")


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 1
) -> np.ndarray:
    """Descending int64 timesteps [num_steps], as DDIMScheduler.set_timesteps.

    "leading": arange(num_steps) * (T // num_steps) + steps_offset (SD 1.5:
    981, 961, ..., 1 for 50 steps). "trailing": round(arange(T, 0, -T/n)) - 1.
    "linspace": round(linspace(0, T - 1, n)). steps_offset only applies to
    "leading", as in diffusers.
    """
    _check_steps(num_train_timesteps, num_steps)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ConfigError(f"timestep spacing {spacing!r} is not supported; choose one of {', '.join(DDIM_SPACINGS)}")
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise ConfigError(f"steps_offset {steps_offset} puts DDIM timesteps outside [0, {num_train_timesteps})")
    return ts.copy()


def ddim_grid(num_train_timesteps: int, num_steps: int = 25, steps_offset: int = 1) -> jax.Array:
    """The "leading" DDIM grid as a descending int32 array [num_steps].

    ALDM's multistep unrolling picks an index k into this grid (z_t at
    t = grid[k]) and unrolls K further DDIM steps (see `ddim_unroll`).
    """
    return jnp.asarray(ddim_timesteps(num_train_timesteps, num_steps, "leading", steps_offset), dtype=jnp.int32)


def dpm_solver_pp_2m_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """Descending int64 timesteps [num_steps] of DPMSolverMultistepScheduler ("linspace").

    round(linspace(0, T - 1, num_steps + 1))[::-1][:-1]: the grid has
    num_steps + 1 points and the last (t = 0) is replaced by sigma = 0.
    """
    _check_steps(num_train_timesteps, num_steps)
    return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64).copy()


# ----------------------------------------------------------------------------- DDIM


def _is_static_zero(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool) and value == 0


def _pred_x0_eps(prediction_type: str, x: jax.Array, out: jax.Array, abar: jax.Array):
    a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    return a * x - s * out, a * out + s * x


def ddim_step(
    schedule: NoiseSchedule,
    x_t: jax.Array,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
    final_alpha_cumprod: float | jax.Array | None = None,
    *,
    return_x0: bool = False,
):
    """One DDIM update x_t -> x_{t_prev} (DDIMScheduler.step).

    t, t_prev: int arrays [] or [B]; t_prev < 0 uses `final_alpha_cumprod`
    (default alphas_cumprod[0], i.e. set_alpha_to_one=False). With eta > 0 the
    update adds std_dev_t * noise, std_dev_t = eta * sqrt((1 - abar_prev) /
    (1 - abar_t) * (1 - abar_t / abar_prev)); `noise` (shape of x_t) is then
    required. Arithmetic is float32; the result has x_t's dtype. With
    return_x0, returns (x_prev, x0_hat).
    """
    check_prediction_type(schedule.prediction_type)
    if noise is None and not _is_static_zero(eta):
        raise ValueError("ddim_step with eta != 0 needs `noise` (standard normal, shape of x_t)")
    ac = schedule.alphas_cumprod
    final = ac[0] if final_alpha_cumprod is None else jnp.asarray(final_alpha_cumprod, jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    abar_t = broadcast_to_rank(ac[t], x_t)
    abar_prev = broadcast_to_rank(jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], final), x_t)

    x = x_t.astype(jnp.float32)
    x0, eps = _pred_x0_eps(schedule.prediction_type, x, model_output.astype(jnp.float32), abar_t)
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - std * std, 0.0)) * eps
    x_prev = jnp.sqrt(abar_prev) * x0 + direction
    if noise is not None:
        x_prev = x_prev + std * noise.astype(jnp.float32)
    x_prev = x_prev.astype(x_t.dtype)
    return (x_prev, x0) if return_x0 else x_prev


def _full_t(t: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), t, dtype=jnp.int32)


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    rng: jax.Array | None = None,
    *,
    spacing: str = "leading",
    steps_offset: int = 1,
    final_alpha_cumprod: float | None = None,
    noises: jax.Array | None = None,
    return_trajectory: bool = False,
):
    """DDIM sampling from x_T over `num_steps` steps (a lax.scan).

    eta = 0 (a Python zero) is deterministic. Otherwise the per-step noise
    comes from `noises` ([num_steps, *x_T.shape], step i uses noises[i]) or,
    if not given, from jax.random.normal(jax.random.fold_in(rng, i)).
    Returns x_0, or (x_0, trajectory [num_steps, *x_T.shape]) where
    trajectory[i] is the sample after step i.
    """
    T = schedule.num_train_timesteps
    ts = ddim_timesteps(T, num_steps, spacing, steps_offset)
    prev = ts - T // num_steps
    stochastic = not _is_static_zero(eta)
    if stochastic and noises is None and rng is None:
        raise ValueError("ddim_sample with eta != 0 needs `rng` or `noises`")
    if noises is not None and noises.shape != (num_steps,) + tuple(x_T.shape):
        raise ValueError(f"noises must have shape {(num_steps,) + tuple(x_T.shape)}, got {noises.shape}")
    batch = x_T.shape[0]

    def body(x, inputs):
        i, t, tp = inputs
        out = denoise_fn(x, _full_t(t, batch))
        noise = None
        if stochastic:
            if noises is not None:
                noise = noises[i]
            else:
                noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        x = ddim_step(schedule, x, out, t, tp, eta, noise, final_alpha_cumprod)
        return x, (x if return_trajectory else None)

    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32))
    x0, traj = jax.lax.scan(body, x_T, xs)
    return (x0, traj) if return_trajectory else x0


def ddim_unroll(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x: jax.Array,
    model_output: jax.Array,
    grid: jax.Array,
    start_index: jax.Array,
    num_unroll: int,
    *,
    stride: int = 1,
    readout: Callable[[jax.Array], Any] | None = None,
):
    """ALDM's look-ahead: K = num_unroll deterministic DDIM steps from a point whose prediction is known.

    `grid` holds the timesteps in sampling order (descending, `ddim_grid`);
    x is z at t = grid[start_index] and `model_output` the denoiser's output
    there (ALDM shares it with the noise loss, so the first step costs no
    call). `start_index` may be traced and per example ([B]). Step j goes
    from grid[i_j] to grid[i_{j+1}], i_j = min(start + j * stride, n - 1):
    `stride` grid steps at a time, stopping at the grid's last timestep,
    where a further step from t to t leaves x as it is and its estimate
    counts again. After each step the denoiser predicts again, and
    `readout(x0_hat)` (e.g. a decoder and a segmenter's loss) is taken of
    that step's x0 estimate. Differentiable (lax.scan).

    Returns (x after the K steps, the model output there, the readouts
    stacked over the K steps, or None without `readout`).
    """
    n = grid.shape[0]
    start_index = jnp.asarray(start_index, jnp.int32)
    t0 = grid[jnp.minimum(start_index, n - 1)]

    def body(carry, j):
        x, out, t = carry
        t_next = grid[jnp.minimum(start_index + (j + 1) * stride, n - 1)]
        x = ddim_step(schedule, x, out, t, t_next)
        out = denoise_fn(x, jnp.broadcast_to(t_next, (x.shape[0],)))
        read = readout(x0_from_prediction(schedule, x, out, t_next)) if readout is not None else None
        return (x, out, t_next), read

    (x, out, _), reads = jax.lax.scan(body, (x, model_output, t0), jnp.arange(num_unroll, dtype=jnp.int32))
    return x, out, reads


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def dpm_solver_pp_2m_sample(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    num_steps: int,
    *,
    return_trajectory: bool = False,
):
    """Multistep DPM-Solver++ of order 2 (midpoint), diffusers' defaults.

    In sigma = sqrt((1 - abar) / abar) space with the grid
    `dpm_solver_pp_2m_timesteps` plus a final sigma = 0: alpha = 1 /
    sqrt(1 + sigma^2), sigma_vp = sigma * alpha, lambda = log(alpha /
    sigma_vp). Step 0 is first order (no history); steps 1 .. n-2 are
    second order, x <- (sigma_vp' / sigma_vp) x - alpha' (e^{-h} - 1)
    (D0 + D1 / 2), D0 = x0_i, D1 = (h / h_0)(x0_i - x0_{i-1}); the last step
    is first order (final_sigmas_type="zero" forces it) and, because its
    sigma is 0, returns exactly the model's x0 prediction.
    Returns x_0, or (x_0, trajectory [num_steps, ...]).
    """
    check_prediction_type(schedule.prediction_type)
    T = schedule.num_train_timesteps
    ts_np = dpm_solver_pp_2m_timesteps(T, num_steps)
    ts = jnp.asarray(ts_np, jnp.int32)
    ac = schedule.alphas_cumprod.astype(jnp.float32)
    sig = jnp.sqrt((1.0 - ac[ts]) / ac[ts])  # VE sigmas of the grid, [n]
    alpha = 1.0 / jnp.sqrt(sig * sig + 1.0)
    sigma = sig * alpha
    lam = jnp.log(alpha) - jnp.log(sigma)
    batch = x_T.shape[0]
    out_dtype = x_T.dtype

    def to_x0(x, out, i):
        out = out.astype(jnp.float32)
        if schedule.prediction_type == "epsilon":
            return (x - sigma[i] * out) / alpha[i]
        return alpha[i] * x - sigma[i] * out

    def model_x0(x, i):
        return to_x0(x.astype(jnp.float32), denoise_fn(x, _full_t(ts[i], batch)), i)

    traj = []
    x = x_T
    if num_steps == 1:
        x0 = model_x0(x, 0).astype(out_dtype)
        return (x0, x0[None]) if return_trajectory else x0

    # Step 0: first order, from grid point 0 to grid point 1.
    x0_0 = model_x0(x, 0)
    h = lam[1] - lam[0]
    x = ((sigma[1] / sigma[0]) * x.astype(jnp.float32) - (alpha[1] * (jnp.exp(-h) - 1.0)) * x0_0).astype(out_dtype)
    traj.append(x)

    # Steps 1 .. n-2: second-order multistep updates.
    def body(carry, i):
        x, x0_prev = carry
        x0_i = model_x0(x, i)
        h = lam[i + 1] - lam[i]
        h_0 = lam[i] - lam[i - 1]
        d1 = (h / h_0) * (x0_i - x0_prev)
        coef = alpha[i + 1] * (jnp.exp(-h) - 1.0)
        x_new = (sigma[i + 1] / sigma[i]) * x.astype(jnp.float32) - coef * x0_i - 0.5 * coef * d1
        x_new = x_new.astype(out_dtype)
        return (x_new, x0_i), (x_new if return_trajectory else None)

    if num_steps > 2:
        (x, _), mid = jax.lax.scan(body, (x, x0_0), jnp.arange(1, num_steps - 1, dtype=jnp.int32))
        if return_trajectory:
            traj.append(mid)

    # Last step: first order to sigma = 0, i.e. the x0 prediction itself.
    x = model_x0(x, num_steps - 1).astype(out_dtype)
    traj.append(x)
    if not return_trajectory:
        return x
    return x, jnp.concatenate([traj[0][None]] + traj[1:-1] + [traj[-1][None]], axis=0)


# ----------------------------------------------------------------------------- guidance


def _batch_t(t: Any, batch: int) -> jax.Array:
    """t as an array [batch]: integer timesteps as int32; a float "time" (masked diffusion's mask ratio) kept."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.int32)
    return jnp.broadcast_to(t, (batch,))


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any, Any], jax.Array],
    guidance_scale: float | jax.Array,
    cond_text: Any,
    uncond_text: Any = None,
    layout: Any = None,
) -> DenoiseFn:
    """A guided denoise_fn(x, t) for the samplers above.

    model_fn(x, t, text, layout) -> model_output is the (ControlNet-conditioned)
    UNet: x [N, ...], t int32 [N] (or, for masked diffusion over label maps,
    the float mask ratio [N] with x the partly masked ids), text a pytree of [N, ...] arrays (e.g. CLIP
    hidden states [N, 77, 768]), layout a pytree of [N, ...] arrays or None
    (the ControlNet hint / semantic layout).

    cond_text / uncond_text: conditional and unconditional (null-prompt) text
    conditioning, pytrees of the same structure; each uncond leaf is
    broadcast to its cond leaf's shape, so a single [1, 77, 768] null
    embedding serves the whole batch. `layout` is shared by BOTH branches:
    as in ALDM's inference, the unconditional branch drops the text but keeps
    the layout condition, so guidance amplifies the text only.

    The guided output is out_u + s * (out_c - out_u), computed from ONE model
    call on the concatenated batch [cond; uncond] (2B). Guidance acts on the
    raw model output (epsilon or v; both are affine in each other for fixed
    x, t, so this is the usual rule). A guidance_scale that is the Python
    number 1 skips the unconditional branch (uncond_text may then be None);
    a traced scale always runs both branches.
    """
    if isinstance(guidance_scale, numbers.Number) and guidance_scale == 1:
        def conditional(x: jax.Array, t: jax.Array) -> jax.Array:
            return model_fn(x, _batch_t(t, x.shape[0]), cond_text, layout)

        return conditional
    if uncond_text is None:
        raise ValueError("classifier_free_guidance with guidance_scale != 1 needs `uncond_text`")
    if jax.tree.structure(cond_text) != jax.tree.structure(uncond_text):
        raise ValueError("cond_text and uncond_text must be pytrees of the same structure")

    def pair(c, u):
        c = jnp.asarray(c)
        return jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(u), c.shape).astype(c.dtype)], axis=0)

    text2 = jax.tree.map(pair, cond_text, uncond_text)
    layout2 = jax.tree.map(lambda l: jnp.concatenate([l, l], axis=0), layout)

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        t = _batch_t(t, b)
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), text2, layout2)
        out_c, out_u = out[:b], out[b:]
        scale = jnp.asarray(guidance_scale, jnp.float32)
        return (out_u + scale * (out_c - out_u)).astype(out.dtype)

    return guided
