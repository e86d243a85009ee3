"""2-D convolution over NHWC with an HWIO kernel: XLA's on GPU/TPU, a faster formulation on CPU.

`convolution` is the entry point (see `sdsup.models.ops.dispatch`). On CPU it
is `conv2d_cpu`, which has a hand-written backward pass for the weight
gradient: autodiff gives it as x^T @ dy with both operands contracted over
their leading (batch*pixels) axis, a form XLA on CPU runs through a slow
generic matmul (~60 GFLOP/s against ~150 for the same product with one
operand transposed first), and for 3x3 convolutions as a convolution over
the batch that is 1.3-3x slower than the one-matmul-per-tap form used here
(and ~50x slower for the upsampler's 2x2 kernel: 1.2 s against 25 ms).
Forward passes and input gradients are XLA's own, except for the Winograd
convolutions below. (Compiling with YNNPACK convolutions disabled,
xla_cpu_experimental_ynn_fusion_type without INDIVIDUAL_CONVOLUTION, makes
isolated convolutions ~2x faster but the whole UNet training step ~10%
slower; measured, not adopted.)
"""

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sdsup.models.ops import dispatch

Array = jax.Array
Padding = Tuple[Tuple[int, int], ...]

_F32 = jnp.float32

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
    """XLA's own convolution (NHWC x HWIO, explicit padding): what autodiff and GPU/TPU use."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2015): a stride-1 3x3 convolution
# computed per 2x2 output tile as 16 elementwise products in a transformed
# domain instead of 36 multiply-adds, i.e. 16 matmuls [tiles, Ci] x [Ci, Co]
# holding 2.25x fewer FLOPs than the direct convolution. The input and kernel
# transforms (coefficients 0, +-1 and +-1/2) are sums of strided slices that
# XLA fuses; the output transform is a small matmul (see there). Used for the
# forward pass and the input gradient; the weight gradient stays per-tap
# (below). Measured on CPU, batch 8, fwd+bwd against the direct convolution:
# 32x32x64 -> 64 15 vs 24 ms (XLA's convolution runs single-threaded with 64
# output channels), 32x32 192 -> 64 45 vs 64, 16x16 384 -> 128 39 vs 45,
# 16x16 128 -> 128 on par, 8x8 (128 tiles) slower; hence the tile threshold.
# Channels: with 16 it is slower (batch 16, 64x64x16 -> 16: 23 vs 16 ms),
# with 32 on par or faster (16x32x32x32: 12 vs 17 ms), hence that threshold.
# UNet training step (bench_unet config), interleaved with the same step
# without Winograd: -4% (1.92 vs 2.00 s; 2.06 vs 2.14 s). Rounding differs
# from the direct sum by a few 1e-6 at unit scale, so float32 only. Tried and
# not adopted: F(4x4, 3x3) (no faster here, 5x the rounding error), the
# weight gradient in the transformed domain (faster at 32x32x192 and
# 16x16x384, slower elsewhere).
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_WINOGRAD_A2 = np.kron(_WINOGRAD_AT, _WINOGRAD_AT)  # [(a, c), (i, j)]
_WINOGRAD_MIN_TILES = 512
_WINOGRAD_MIN_CHANNELS = 32


def _combine(matrix: np.ndarray, parts: Sequence[Array]) -> list:
    """[sum_j matrix[i, j] * parts[j] for each row i], skipping zero coefficients (a small transform, unrolled)."""
    rows = []
    for row in matrix:
        acc = None
        for c, part in zip(row, parts):
            if c == 0:
                continue
            term = part if c == 1 else -part if c == -1 else part * float(c)
            acc = term if acc is None else acc + term
        rows.append(acc)
    return rows


def winograd_conv3x3(x: Array, kernel: Array) -> Array:
    """NHWC x HWIO 3x3 convolution, stride 1, padding 1, by Winograd F(2x2, 3x3); H and W even."""
    b, h, w, ci = x.shape
    co = kernel.shape[-1]
    if kernel.shape[:2] != (3, 3) or h % 2 or w % 2:
        raise ValueError(f"winograd_conv3x3 needs a 3x3 kernel and even H, W; got kernel {kernel.shape}, input {x.shape}")
    th, tw = h // 2, w // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Input tiles are 4x4 at stride 2: B^T d B, rows then columns.
    u = []
    for r in _combine(_WINOGRAD_BT, [xp[:, i : i + 2 * th : 2] for i in range(4)]):
        u += _combine(_WINOGRAD_BT, [r[:, :, j : j + 2 * tw : 2] for j in range(4)])
    u = jnp.stack(u).reshape(16, b * th * tw, ci)
    v = []  # G g G^T
    for r in _combine(_WINOGRAD_G, [kernel[i] for i in range(3)]):
        v += _combine(_WINOGRAD_G, [r[j] for j in range(3)])
    v = jnp.stack(v)
    m = jax.lax.dot_general(u, v, (((2,), (1,)), ((0,), (0,))), preferred_element_type=_F32)
    # Output tiles A^T m A as one matmul with the 4x16 matrix kron(A^T, A^T),
    # then interleaved back to [b, th, 2, tw, 2, co]. Written as slices and
    # sums instead, XLA fused the transform into consumers that read their
    # input twice, recomputing it: GroupNorm's backward passes took 154 ms of
    # a profiled training step against 98 ms with the matmul (XLA drops
    # optimization_barrier before fusion on CPU, so that cannot pin it).
    y = jnp.dot(jnp.asarray(_WINOGRAD_A2), m.astype(x.dtype).reshape(16, -1), preferred_element_type=_F32)
    y = y.astype(x.dtype).reshape(2, 2, b, th, tw, co).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(b, h, w, co)


def use_winograd(x_shape: Tuple[int, ...], kernel_shape: Tuple[int, ...], dtype, strides, padding) -> bool:
    """Whether `conv2d_cpu` takes the Winograd path (float32 only: its rounding was measured there)."""
    b, h, w, ci = x_shape
    return (
        dtype == jnp.float32
        and tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and h % 2 == 0
        and w % 2 == 0
        and min(ci, kernel_shape[-1]) >= _WINOGRAD_MIN_CHANNELS
        and b * h * w // 4 >= _WINOGRAD_MIN_TILES
    )


def _conv_forward_cpu(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
    if use_winograd(x.shape, kernel.shape, x.dtype, strides, padding):
        return winograd_conv3x3(x, kernel)
    return xla_conv(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_cpu(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
    """`convolution` as formulated for CPU: Winograd where `use_winograd` says so, the weight gradient per tap."""
    return _conv_forward_cpu(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _conv_forward_cpu(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    if use_winograd(x.shape, kernel.shape, x.dtype, strides, padding):
        # The input gradient of a stride-1 "same" 3x3 convolution is the same
        # convolution of dy with the kernel rotated by 180 degrees, in and out swapped.
        dx = winograd_conv3x3(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    else:
        _, dx_fn = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, padding), x)
        (dx,) = dx_fn(dy)
    kh, kw, ci, co = kernel.shape
    b, ho, wo, _ = dy.shape
    m = b * ho * wo
    sh, sw = strides
    # dW[i, j] = sum over output pixels of x_pad[pixel shifted by (i, j)] (x) dy[pixel]:
    # one matmul per kernel tap, both operands pixels-minor ([C, M]), which is
    # the layout XLA multiplies fastest. XLA runs the nine matmuls
    # concurrently; at 32x32, 192 -> 64 (batch 8) that takes 46-50 ms against
    # 20 ms with the taps forced in sequence (lax.map: the windows then fit in
    # cache), yet the whole training step measured no faster that way
    # (2026-12-02: 2.44 s sequential for every conv, 2.38 s for the three
    # largest, 2.30 s as here, one process, interleaved), so they stay
    # independent. Also slower: the shift applied to a flattened padded grid
    # (every window a contiguous range; 13-47% slower) and im2col, one
    # [9*Ci, M] x [M, Co] matmul (1.3-3x slower).
    xt = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0)) + tuple(padding))  # [Ci, B, Hp, Wp]
    dyt = dy.transpose(3, 0, 1, 2).reshape(co, m)
    taps = []
    for i in range(kh):
        for j in range(kw):
            window = xt[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw].reshape(ci, m)
            taps.append(jax.lax.dot_general(dyt, window, (((1,), (1,)), ((), ())), preferred_element_type=_F32))
    dkernel = jnp.stack(taps).reshape(kh, kw, co, ci).transpose(0, 1, 3, 2)
    return dx, dkernel.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv2d_fwd, _conv2d_bwd)


def convolution(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
    """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding.

    `conv2d_cpu` on CPU, where its weight gradient was measured faster; XLA's
    own convolution and autodiff elsewhere (cuDNN's weight gradient needs no
    help).
    """
    if dispatch.use_cpu_kernels():
        return conv2d_cpu(x, kernel, strides, padding)
    return xla_conv(x, kernel, strides, padding)
