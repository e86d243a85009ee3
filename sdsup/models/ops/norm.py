"""GroupNorm (optionally fused with the SiLU that follows it) and LayerNorm; statistics in float32.

GroupNorm has a hand-written backward pass with the SiLU that follows it in
every ResnetBlock fused in: the statistics are per-channel column sums over
pixels (contiguous, vectorised) combined into groups afterwards, and both
directions are one reduction pass plus one elementwise pass. Measured
fwd+bwd with SiLU at [8, 32, 32, 64] on CPU: 2.4 ms, against 9.5 ms for
autodiff of the textbook formulation (mean/var over a [B, HW, G, C/G] view).
That backward pass runs on CPU, where it was measured; on GPU and TPU
autodiff differentiates the same forward (`sdsup.models.ops.dispatch`).
"""

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from sdsup.models.ops import dispatch

Array = jax.Array
Dtype = Any


def _group_stats(x32: Array, num_groups: int, epsilon: float) -> Tuple[Array, Array]:
    """Per-(batch, group) mean and 1/std of a [B, N, C] float32 array.

    One pass over x: per-channel sums of (x - s) and (x - s)^2 with s the
    channel's first value, which keeps E[x^2] - E[x]^2 from cancelling when a
    channel's mean is large against its spread. Channels then combine into
    groups exactly (group variance = mean channel variance + variance of the
    channel means), on [B, C] arrays that cost nothing.
    """
    b, n, c = x32.shape
    per_group = c // num_groups
    shift = jax.lax.stop_gradient(x32[:, :1, :])
    d = x32 - shift
    s1 = jnp.sum(d, axis=1)
    s2 = jnp.sum(d * d, axis=1)
    mean_c = s1 / n
    var_c = jnp.maximum(s2 / n - mean_c * mean_c, 0.0)
    mean_c = (mean_c + shift[:, 0, :]).reshape(b, num_groups, per_group)
    var_c = var_c.reshape(b, num_groups, per_group)
    mean = jnp.mean(mean_c, axis=-1)
    var = jnp.mean(var_c, axis=-1) + jnp.mean(jnp.square(mean_c - mean[..., None]), axis=-1)
    return mean, jax.lax.rsqrt(var + epsilon)


def _per_channel(stat: Array, channels: int) -> Array:
    """[B, G] -> [B, 1, C], each group's value repeated over its channels."""
    b, g = stat.shape
    return jnp.repeat(stat, channels // g, axis=1).reshape(b, 1, channels)


def _group_norm_nc_forward(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float, silu: bool):
    """(GroupNorm (+ SiLU) of x [B, N, C] in x's dtype, per-group mean, per-group 1/std); statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean, rstd = _group_stats(x32, num_groups, epsilon)
    c = x.shape[-1]
    # (x - mean) * (rstd * gamma) + beta: one subtract and one multiply-add
    # per element. Folding the mean into the offset as well (x * a + b, as
    # PyTorch does) would cancel digits when |mean| >> std.
    a = _per_channel(rstd, c) * scale.astype(jnp.float32)
    z = (x32 - _per_channel(mean, c)) * a + bias.astype(jnp.float32)
    y = z * jax.nn.sigmoid(z) if silu else z
    return y.astype(x.dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_nc_cpu(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float, silu: bool) -> Array:
    """`_group_norm_nc_forward` with the hand-written backward pass (module docstring)."""
    return _group_norm_nc_forward(x, scale, bias, num_groups, epsilon, silu)[0]


def _group_norm_nc_cpu_fwd(x, scale, bias, num_groups, epsilon, silu):
    y, mean, rstd = _group_norm_nc_forward(x, scale, bias, num_groups, epsilon, silu)
    return y, (x, scale, bias, mean, rstd)


def _group_norm_nc_cpu_bwd(num_groups, epsilon, silu, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    bsz, n, c = x.shape
    per_group = c // num_groups
    x32 = x.astype(jnp.float32)
    gamma = scale.astype(jnp.float32)
    mean_c = _per_channel(mean, c)
    rstd_c = _per_channel(rstd, c)
    xhat = (x32 - mean_c) * rstd_c
    dz = dy.astype(jnp.float32)
    if silu:
        z = xhat * gamma + bias.astype(jnp.float32)
        sig = jax.nn.sigmoid(z)
        dz = dz * (sig * (1.0 + z * (1.0 - sig)))
    # Per-(batch, channel) sums; everything after them is tiny.
    sum_dz = jnp.sum(dz, axis=1)  # [B, C]
    sum_dz_xhat = jnp.sum(dz * xhat, axis=1)  # [B, C]
    dbias = jnp.sum(sum_dz, axis=0)
    dscale = jnp.sum(sum_dz_xhat, axis=0)
    count = n * per_group
    # dxhat = dz * gamma; per group: mean(dxhat) and mean(dxhat * xhat).
    g1 = (sum_dz * gamma).reshape(bsz, num_groups, per_group).sum(-1) / count
    g2 = (sum_dz_xhat * gamma).reshape(bsz, num_groups, per_group).sum(-1) / count
    # dx = rstd * (dz * gamma - g1 - xhat * g2): one fused elementwise pass.
    dx = dz * (rstd_c * gamma) - xhat * _per_channel(rstd * g2, c) - _per_channel(rstd * g1, c)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_group_norm_nc_cpu.defvjp(_group_norm_nc_cpu_fwd, _group_norm_nc_cpu_bwd)


def group_norm(
    x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float = 1e-5, silu: bool = False
) -> Array:
    """GroupNorm over the channel (last) axis of x [B, ..., C], like torch.nn.GroupNorm.

    With `silu=True` the activation is fused in (forward and backward), which
    saves one full read and write of the activation in both directions.
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not divide into {num_groups} groups")
    shape = x.shape
    x_nc = x.reshape(shape[0], -1, c)
    if dispatch.use_cpu_kernels():
        y = _group_norm_nc_cpu(x_nc, scale, bias, num_groups, float(epsilon), bool(silu))
    else:
        y = _group_norm_nc_forward(x_nc, scale, bias, num_groups, float(epsilon), bool(silu))[0]
    return y.reshape(shape)


def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Optional[Dtype] = None) -> Array:
    """torch.nn.LayerNorm over the last axis of x; statistics in float32, the result in `dtype` (default x's)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype if dtype is None else dtype)
