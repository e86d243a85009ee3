"""x [..., in] @ kernel [in, out]: a plain einsum, with a hand-written weight gradient on CPU.

Autodiff gives the weight gradient as x^T @ dy with both operands contracted
over their leading (batch*pixels) axis, a form XLA on CPU runs through a
slow generic matmul (~60 GFLOP/s against ~150 for the same product with one
operand transposed first). `_dense_cpu` transposes x first. On GPU and TPU
autodiff's form is fine, so `dense` is the einsum alone there (see
`sdsup.models.ops.dispatch`).
"""

import jax
import jax.numpy as jnp

from sdsup.models.ops import dispatch

Array = jax.Array


def _matmul(x: Array, kernel: Array) -> Array:
    return jnp.einsum("...i,io->...o", x, kernel)


@jax.custom_vjp
def _dense_cpu(x: Array, kernel: Array) -> Array:
    return _matmul(x, kernel)


def _dense_cpu_fwd(x, kernel):
    return _dense_cpu(x, kernel), (x, kernel)


def _dense_cpu_bwd(residuals, dy):
    x, kernel = residuals
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = jax.lax.dot_general(dy2, kernel, (((1,), (1,)), ((), ())))
    dkernel = jnp.dot(x2.T, dy2, preferred_element_type=jnp.float32)
    return dx.reshape(x.shape), dkernel.astype(kernel.dtype)


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


def dense(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out]; the same forward on every backend, the CPU weight gradient on CPU."""
    if dispatch.use_cpu_kernels():
        return _dense_cpu(x, kernel)
    return _matmul(x, kernel)
