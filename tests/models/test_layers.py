"""The CPU convolution paths of sdsup.models.ops.conv against XLA's own convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup.models.ops import conv as conv_ops

SAME = ((1, 1), (1, 1))


def _reference(x, kernel, strides=(1, 1), padding=SAME):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _case(shape, co, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(*shape).astype(np.float32)
    kernel = (rs.randn(3, 3, shape[-1], co) / np.sqrt(9 * shape[-1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kernel)


@pytest.mark.parametrize("shape, co", [((2, 8, 8, 3), 5), ((1, 6, 10, 17), 16), ((3, 4, 2, 32), 7)])
def test_winograd_matches_direct_convolution(shape, co):
    x, kernel = _case(shape, co)
    np.testing.assert_allclose(conv_ops.winograd_conv3x3(x, kernel), _reference(x, kernel), atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 7, 8, 4), (1, 8, 5, 4)])
def test_winograd_refuses_odd_sizes(shape):
    x, kernel = _case(shape, 4)
    with pytest.raises(ValueError, match="even H, W"):
        conv_ops.winograd_conv3x3(x, kernel)


@pytest.mark.parametrize(
    "shape, co, strides, padding, winograd",
    [
        ((2, 32, 32, 32), 40, (1, 1), SAME, True),  # 512 tiles: Winograd forward and input gradient
        ((1, 16, 16, 32), 32, (1, 1), SAME, False),  # too few tiles: XLA's convolution
        ((2, 32, 32, 16), 32, (1, 1), SAME, False),  # too few channels
        ((2, 32, 32, 16), 16, (2, 2), SAME, False),  # strided
        ((2, 32, 32, 16), 16, (1, 1), ((0, 1), (0, 1)), False),  # asymmetric padding
    ],
)
def test_conv2d_cpu_values_and_gradients(shape, co, strides, padding, winograd):
    """conv2d_cpu (custom VJP, Winograd where it applies) against autodiff through XLA's convolution."""
    assert conv_ops.use_winograd(shape, (3, 3, shape[-1], co), jnp.float32, strides, padding) == winograd
    x, kernel = _case(shape, co)
    cotangent = jnp.asarray(np.random.RandomState(1).randn(*_reference(x, kernel, strides, padding).shape), jnp.float32)

    def grads(conv):
        return jax.grad(lambda x_, k_: jnp.sum(conv(x_, k_) * cotangent), argnums=(0, 1))(x, kernel)

    ours = conv_ops.conv2d_cpu(x, kernel, strides, padding)
    np.testing.assert_allclose(ours, _reference(x, kernel, strides, padding), atol=2e-5, rtol=0)
    dx, dk = grads(lambda x_, k_: conv_ops.conv2d_cpu(x_, k_, strides, padding))
    dx_ref, dk_ref = grads(lambda x_, k_: _reference(x_, k_, strides, padding))
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(dk, dk_ref, atol=2e-4 * float(jnp.abs(dk_ref).max()), rtol=0)


def test_winograd_is_float32_only():
    assert not conv_ops.use_winograd((2, 32, 32, 32), (3, 3, 32, 32), jnp.bfloat16, (1, 1), SAME)
