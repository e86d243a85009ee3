"""sdsup.diffusion against diffusers' PyTorch schedulers (the reference)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdsup.diffusion import samplers, schedule as sched_lib  # noqa: E402
from sdsup.errors import ConfigError  # noqa: E402

KIND_TO_DIFFUSERS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02), "cosine": (0.0001, 0.02)}
SHAPE = (2, 8, 8, 4)  # NHWC latents


def _ddim_ref(kind="scaled_linear", prediction_type="epsilon", spacing="leading"):
    b0, b1 = BETAS[kind]
    return diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=KIND_TO_DIFFUSERS[kind],
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        timestep_spacing=spacing)


def _schedule(kind="scaled_linear", prediction_type="epsilon"):
    b0, b1 = BETAS[kind]
    return sched_lib.make_schedule(kind, 1000, b0, b1, prediction_type)


# The same deterministic "model" in JAX and torch: out = A[t] x + B[t], with
# per-timestep float32 tables. A, B are the exact epsilon (or v) predictor for
# data ~ N(0, 0.5^2) under the given schedule plus a small t-dependent bias,
# so trajectories stay O(1) and an absolute tolerance is meaningful.
def _tables(prediction_type, kind="scaled_linear"):
    ac = np.asarray(_schedule(kind).alphas_cumprod, np.float64)
    s, r = np.sqrt(1 - ac), np.sqrt(ac)
    c = s / (0.25 * ac + 1 - ac)
    b = 0.01 * np.arange(1000) / 1000
    if prediction_type == "v_prediction":
        c, b = r * c - s * (1 - s * c) / r, r * b + s * s * b / r
    return c.astype(np.float32), b.astype(np.float32)


TABLES = {(p, k): _tables(p, k) for p in ("epsilon", "v_prediction") for k in ("scaled_linear", "cosine")}


def _model_jax(x, t, prediction_type="epsilon", kind="scaled_linear"):
    c, b = TABLES[prediction_type, kind]
    t = jnp.asarray(t, jnp.int32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.asarray(c)[t] * x + jnp.asarray(b)[t]


def _model_torch(x, t, prediction_type="epsilon", kind="scaled_linear"):
    c, b = TABLES[prediction_type, kind]
    return float(c[int(t)]) * x + float(b[int(t)])


def _rand(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_schedule_matches_diffusers(kind, prediction_type):
    s = _schedule(kind, prediction_type)
    ref = _ddim_ref(kind, prediction_type).alphas_cumprod.numpy()
    assert s.alphas_cumprod.dtype == jnp.float32 and s.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref, rtol=0, atol=1e-6)
    assert s.prediction_type == prediction_type and s.num_train_timesteps == 1000


def test_sd15_defaults():
    s = sched_lib.make_schedule()
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000) ** 2
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(sched_lib.sd15_schedule().alphas_cumprod), np.asarray(s.alphas_cumprod))


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_add_noise_velocity_and_inversions(kind):
    s = _schedule(kind, "v_prediction")
    ref = _ddim_ref(kind, "v_prediction")
    x0, noise = _rand(0), _rand(1)
    t = np.array([3, 977], np.int32)
    zt = jax.jit(sched_lib.add_noise)(s, x0, noise, t)
    ref_zt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(zt), ref_zt.numpy(), atol=1e-6)
    v = jax.jit(sched_lib.velocity_target)(s, x0, noise, t)
    ref_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(v), ref_v.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sched_lib.training_target(s, x0, noise, t)), np.asarray(v), atol=1e-6)
    # Exact model outputs invert back to x0 and noise, for both prediction types.
    eps_s = _schedule(kind, "epsilon")
    for sch, out in ((s, v), (eps_s, noise)):
        np.testing.assert_allclose(np.asarray(sched_lib.training_target(sch, x0, noise, t)), np.asarray(out), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sched_lib.x0_from_prediction(sch, zt, out, t)), x0, atol=2e-3)
        np.testing.assert_allclose(np.asarray(sched_lib.eps_from_prediction(sch, zt, out, t)), noise, atol=2e-3)
    # Scalar t broadcasts too.
    np.testing.assert_allclose(np.asarray(sched_lib.add_noise(s, x0, noise, 500)),
                               np.asarray(sched_lib.add_noise(s, x0, noise, np.array([500, 500]))), atol=1e-6)
    snr = sched_lib.snr(s, t)
    ac = np.asarray(s.alphas_cumprod)[t]
    np.testing.assert_allclose(np.asarray(snr), ac / (1 - ac), rtol=1e-6)


# ----------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_scripts(prediction_type):
    """The weighting diffusers' text-to-image scripts apply with --snr_gamma."""
    import torch
    from diffusers.training_utils import compute_snr

    gamma, t = 5.0, np.array([0, 3, 50, 200, 500, 999])
    ref_sched = _ddim_ref(prediction_type=prediction_type)
    snr = compute_snr(ref_sched, torch.from_numpy(t))
    ref = torch.minimum(snr, torch.full_like(snr, gamma))
    ref = ref / snr if prediction_type == "epsilon" else ref / (snr + 1)
    s = _schedule(prediction_type=prediction_type)
    got = sched_lib.min_snr_weights(s, jnp.asarray(t), gamma)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5)
    assert float(got[-1]) == pytest.approx(1.0 if prediction_type == "epsilon" else float(ref[-1]), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(sched_lib.min_snr_weights(s, jnp.asarray(t), 0.0)), np.ones(6))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(spacing):
    for n in (1, 3, 10, 25, 50, 999):
        ref = _ddim_ref(spacing=spacing)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(samplers.ddim_timesteps(1000, n, spacing), ref.timesteps.numpy())
    grid = samplers.ddim_grid(1000, 25)
    assert grid.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(grid), np.arange(961, 0, -40))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("num_steps", [10, 25])
def test_ddim_trajectory_matches_diffusers(num_steps, eta, prediction_type):
    s = _schedule("scaled_linear", prediction_type)
    ref = _ddim_ref("scaled_linear", prediction_type)
    ref.set_timesteps(num_steps)
    x_T = _rand(10)
    noises = np.stack([_rand(100 + i) for i in range(num_steps)])

    x = torch.from_numpy(x_T)
    ref_traj = []
    for i, t in enumerate(ref.timesteps):
        kw = {"variance_noise": torch.from_numpy(noises[i])} if eta > 0 else {}
        x = ref.step(_model_torch(x, t, prediction_type), t, x, eta=eta, **kw).prev_sample
        ref_traj.append(x.numpy())
    ref_traj = np.stack(ref_traj)

    @jax.jit
    def run(x_T, noises):
        return samplers.ddim_sample(functools.partial(_model_jax, prediction_type=prediction_type), s, x_T,
                                    num_steps, eta=eta,
                                    noises=noises if eta > 0 else None, return_trajectory=True)

    x0, traj = run(x_T, noises)
    assert traj.shape == (num_steps,) + SHAPE and x0.dtype == jnp.float32
    assert 0.05 < np.abs(ref_traj[-1]).mean() < 5
    np.testing.assert_allclose(np.asarray(traj), ref_traj, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(traj[-1]))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_other_spacings_match_diffusers(spacing):
    s = _schedule()
    ref = _ddim_ref(spacing=spacing)
    ref.set_timesteps(10)
    x_T = _rand(11)
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        x = ref.step(_model_torch(x, t), t, x).prev_sample
    out = jax.jit(lambda x: samplers.ddim_sample(_model_jax, s, x, 10, spacing=spacing))(x_T)
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=0, atol=1e-5)


def test_ddim_step_batched_t_and_final_alpha():
    s = _schedule()
    x, out = _rand(0), _rand(1)
    step = jax.jit(samplers.ddim_step)
    # Per-example timesteps equal per-example single steps.
    both = step(s, x, out, np.array([981, 21]), np.array([961, -19]))
    a = step(s, x[:1], out[:1], 981, 961)
    b = step(s, x[1:], out[1:], 21, -19)
    np.testing.assert_allclose(np.asarray(both), np.concatenate([a, b]), atol=1e-6)
    # t_prev < 0 uses alphas_cumprod[0] by default, 1.0 when asked (set_alpha_to_one=True).
    np.testing.assert_allclose(np.asarray(step(s, x, out, 21, -1)), np.asarray(step(s, x, out, 21, 0)), atol=1e-6)
    x0 = sched_lib.x0_from_prediction(s, x, out, 21)
    np.testing.assert_allclose(np.asarray(samplers.ddim_step(s, x, out, 21, -1, final_alpha_cumprod=1.0)),
                               np.asarray(x0), atol=1e-5)
    # bf16 input keeps its dtype.
    y = samplers.ddim_step(s, x.astype(jnp.bfloat16), out, 981, 961)
    assert y.dtype == jnp.bfloat16


def test_ddim_unroll_strides_per_example_and_stops_at_the_grid_end():
    """ALDM's look-ahead: each example starts at its own grid index and moves `stride` grid points a step."""
    s = _schedule()
    grid = samplers.ddim_grid(1000, 25)
    start = jnp.asarray([22, 19, 0])
    x = jnp.zeros((3, 2))
    # A denoiser whose output is its timestep tells where each step landed.
    timestep = lambda z, t: jnp.broadcast_to(t[:, None].astype(jnp.float32), z.shape)
    landed = lambda stride, n: np.asarray(samplers.ddim_unroll(timestep, s, x, timestep(x, grid[start]), grid, start, n,
                                                               stride=stride)[1][:, 0]).astype(int)
    g = np.asarray(grid)
    np.testing.assert_array_equal(landed(1, 1), g[[23, 20, 1]])  # ALDM: consecutive grid points
    np.testing.assert_array_equal(landed(1, 2), g[[24, 21, 2]])
    np.testing.assert_array_equal(landed(3, 1), g[[24, 22, 3]])
    np.testing.assert_array_equal(landed(3, 2), g[[24, 24, 6]])  # stops at the grid's last point


def test_ddim_sample_rng_and_unroll():
    s = _schedule()
    x_T = jnp.asarray(_rand(3))
    run = jax.jit(functools.partial(samplers.ddim_sample, _model_jax, s, num_steps=10, eta=1.0))
    a, b = run(x_T, rng=jax.random.key(0)), run(x_T, rng=jax.random.key(0))
    c = run(x_T, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c)) and np.all(np.isfinite(np.asarray(a)))

    # ddim_unroll on the 25-step grid continues the deterministic trajectory from a known prediction.
    grid = samplers.ddim_grid(1000, 25)
    _, traj = jax.jit(lambda x: samplers.ddim_sample(_model_jax, s, x, 25, return_trajectory=True))(x_T)
    unroll = jax.jit(lambda x, k: samplers.ddim_unroll(_model_jax, s, x, _model_jax(x, jnp.full((2,), grid[k])), grid,
                                                       k, 3, readout=lambda x0: x0))
    x_after, out_after, x0s = unroll(traj[6], 7)  # traj[6] is z at grid[7]; 3 steps reach grid[10]
    np.testing.assert_allclose(np.asarray(x_after), np.asarray(traj[9]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_after), np.asarray(_model_jax(traj[9], jnp.full((2,), grid[10]))),
                               atol=1e-5)
    for j, i in enumerate((8, 9, 10)):  # each step's x0 estimate, at the point it reached
        out = _model_jax(traj[i - 1], jnp.full((2,), grid[i]))
        np.testing.assert_allclose(np.asarray(x0s[j]),
                                   np.asarray(sched_lib.x0_from_prediction(s, traj[i - 1], out, grid[i])), atol=1e-5)
    # At the grid's last point the steps stay there: from grid[23], 3 steps end at grid[24] (traj[23]).
    x_end, _, _ = unroll(traj[22], 23)
    np.testing.assert_allclose(np.asarray(x_end), np.asarray(traj[23]), atol=1e-5)
    # Differentiable through the unrolled steps.
    g = jax.grad(lambda x: jnp.sum(unroll(x, 5)[2] ** 2))(traj[4])
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def _dpm_ref(prediction_type, kind="scaled_linear"):
    b0, b1 = BETAS[kind]
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=KIND_TO_DIFFUSERS[kind],
        prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace", use_karras_sigmas=False)


@pytest.mark.parametrize("kind,prediction_type,num_steps", [
    ("scaled_linear", "epsilon", 8), ("scaled_linear", "epsilon", 20), ("scaled_linear", "v_prediction", 8),
    ("scaled_linear", "v_prediction", 20), ("cosine", "epsilon", 20), ("scaled_linear", "epsilon", 1),
    ("scaled_linear", "epsilon", 2), ("scaled_linear", "epsilon", 3)])
def test_dpm_solver_pp_2m_matches_diffusers(kind, prediction_type, num_steps):
    s = _schedule(kind, prediction_type)
    ref = _dpm_ref(prediction_type, kind)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(samplers.dpm_solver_pp_2m_timesteps(1000, num_steps), ref.timesteps.numpy())
    x_T = _rand(20)
    x = torch.from_numpy(x_T)
    ref_traj = []
    for t in ref.timesteps:
        x = ref.step(_model_torch(x, t, prediction_type, kind), t, x).prev_sample
        ref_traj.append(x.numpy())
    ref_traj = np.stack(ref_traj)

    model = functools.partial(_model_jax, prediction_type=prediction_type, kind=kind)
    run = jax.jit(lambda x: samplers.dpm_solver_pp_2m_sample(model, s, x, num_steps, return_trajectory=True))
    x0, traj = run(x_T)
    assert traj.shape == (num_steps,) + SHAPE
    assert 0.05 < np.abs(ref_traj[-1]).mean() < 20  # O(1) (cosine's tiny abar_999 amplifies the bias term)
    # Cosine's first step has sigma ~ 2e4 (abar_999 ~ 2e-9): x0 = (x - sigma_vp eps) / alpha multiplies float32
    # ulp differences in the model output (XLA fuses c x + b) by ~2e4, in diffusers and here alike. There the
    # tolerance is 1e-4 relative to the trajectory's scale; scaled_linear gets the plain 1e-4.
    atol = 1e-4 * (np.abs(ref_traj).max() if kind == "cosine" else 1.0)
    np.testing.assert_allclose(np.asarray(traj), ref_traj, rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(traj[-1]))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: samplers.dpm_solver_pp_2m_sample(
        model, s, x, num_steps))(x_T)), np.asarray(x0), atol=1e-6)


# ----------------------------------------------------------------------------- guidance


def _cfg_model(calls):
    """A model whose output depends on x, t, text and layout, recording batch sizes and layouts."""

    def model_fn(x, t, text, layout):
        calls.append((x.shape[0], layout))
        tt = jnp.asarray(t, jnp.float32)[:, None, None, None]
        txt = text["emb"].mean(axis=(1, 2))[:, None, None, None]
        return 0.5 * x + 1e-3 * tt + txt + 2.0 * layout["hint"]

    return model_fn


def test_cfg_scale_one_is_conditional_model():
    calls = []
    model_fn = _cfg_model(calls)
    x, hint = jnp.asarray(_rand(0)), jnp.asarray(_rand(1))
    cond = {"emb": jnp.asarray(_rand(2, (2, 77, 8)))}
    fn = samplers.classifier_free_guidance(model_fn, 1.0, cond, None, {"hint": hint})
    out = jax.jit(fn)(x, jnp.int32(500))
    np.testing.assert_allclose(np.asarray(out), np.asarray(model_fn(x, jnp.full((2,), 500), cond, {"hint": hint})),
                               atol=1e-6)
    assert calls[0][0] == 2  # no unconditional half


@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_cfg_combines_and_layout_reaches_both_branches(scale):
    calls = []
    model_fn = _cfg_model(calls)
    x, hint = jnp.asarray(_rand(0)), jnp.asarray(_rand(1))
    cond = {"emb": jnp.asarray(_rand(2, (2, 77, 8)))}
    null = {"emb": jnp.asarray(_rand(3, (1, 77, 8)))}  # one null-prompt embedding, broadcast
    layout = {"hint": hint}
    t = jnp.array([999, 10], jnp.int32)
    fn = jax.jit(samplers.classifier_free_guidance(model_fn, scale, cond, null, layout))
    out = fn(x, t)
    assert calls[-1][0] == 4  # one batched call on [cond; uncond]
    traced_layout = calls[-1][1]["hint"]
    assert traced_layout.shape == (4,) + SHAPE[1:]
    eps_c = model_fn(x, t, cond, layout)
    eps_u = model_fn(x, t, {"emb": jnp.broadcast_to(null["emb"], (2, 77, 8))}, layout)  # uncond keeps the layout
    np.testing.assert_allclose(np.asarray(out), np.asarray(eps_u + scale * (eps_c - eps_u)), atol=1e-5)
    # If the unconditional branch had dropped the layout, the result would differ.
    eps_u_nolayout = model_fn(x, t, {"emb": jnp.broadcast_to(null["emb"], (2, 77, 8))}, {"hint": 0 * hint})
    assert not np.allclose(np.asarray(out), np.asarray(eps_u_nolayout + scale * (eps_c - eps_u_nolayout)), atol=1e-3)

    # Guided DDIM sampling runs end to end under jit (scalar-free int32 [B] timesteps).
    guided = samplers.classifier_free_guidance(model_fn, scale, cond, null, layout)
    z = jax.jit(lambda z: samplers.ddim_sample(guided, _schedule(), z, 4))(x)
    assert z.shape == SHAPE and np.all(np.isfinite(np.asarray(z)))


def test_cfg_traced_scale():
    calls = []
    model_fn = _cfg_model(calls)
    x, hint = jnp.asarray(_rand(0)), jnp.asarray(_rand(1))
    cond, null = {"emb": jnp.asarray(_rand(2, (2, 77, 8)))}, {"emb": jnp.zeros((1, 77, 8))}

    @jax.jit
    def f(scale):
        return samplers.classifier_free_guidance(model_fn, scale, cond, null, {"hint": hint})(x, 5)

    ref = samplers.classifier_free_guidance(model_fn, 1.0, cond, None, {"hint": hint})(x, 5)
    np.testing.assert_allclose(np.asarray(f(1.0)), np.asarray(ref), atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="quadratic"):
        sched_lib.make_schedule("quadratic")
    with pytest.raises(ValueError, match="sample"):
        sched_lib.make_schedule(prediction_type="sample")
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        sched_lib.make_schedule(num_train_timesteps=0)
    with pytest.raises(ValueError, match="beta_start"):
        sched_lib.make_schedule("linear", beta_start=0.02, beta_end=0.001)
    with pytest.raises(ValueError, match="bogus"):
        samplers.ddim_timesteps(1000, 10, spacing="bogus")
    with pytest.raises(ValueError, match="num_steps"):
        samplers.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="cannot exceed"):
        samplers.ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.dpm_solver_pp_2m_timesteps(1000, 0)
    s = _schedule()
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        samplers.ddim_step(s, x, x, 10, -1, eta=0.5)
    with pytest.raises(ValueError, match="rng"):
        samplers.ddim_sample(_model_jax, s, x, 5, eta=0.5)
    with pytest.raises(ValueError, match="noises"):
        samplers.ddim_sample(_model_jax, s, x, 5, eta=0.5, noises=jnp.zeros((4,) + SHAPE))
    with pytest.raises(ValueError, match="uncond_text"):
        samplers.classifier_free_guidance(lambda *a: a[0], 7.5, {"emb": x})
    with pytest.raises(ValueError, match="structure"):
        samplers.classifier_free_guidance(lambda *a: a[0], 7.5, {"emb": x}, x)
    bad = sched_lib.NoiseSchedule(s.alphas_cumprod, 1000, "sample")
    with pytest.raises(ValueError, match="sample"):
        sched_lib.x0_from_prediction(bad, x, x, 10)
