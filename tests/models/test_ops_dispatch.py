"""sdsup.models.ops.dispatch: CPU kernels on CPU only, plain jnp/lax and autodiff on GPU and TPU.

The GPU/TPU formulation is exercised here on CPU by replacing
`dispatch.backend`. Every function is traced afresh (a new lambda each
time): JAX caches traces per function, and a cached trace would keep the
backend choice it was made with.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup.models.ops import attention as attention_ops
from sdsup.models.ops import conv as conv_ops
from sdsup.models.ops import dense as dense_ops
from sdsup.models.ops import dispatch
from sdsup.models.ops import norm as norm_ops


@pytest.fixture
def accelerator(monkeypatch):
    monkeypatch.setattr(dispatch, "backend", lambda: "tpu")
    assert not dispatch.use_cpu_kernels()


def _primitives(fn, *args):
    """Names of the primitives in fn's jaxpr, nested jaxprs included."""
    names = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _value_and_grads(fn, *args):
    cot = jnp.asarray(np.random.RandomState(7).randn(*jax.eval_shape(fn, *args).shape), jnp.float32)
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot.astype(out.dtype))


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def test_tests_run_the_cpu_kernels():
    assert dispatch.backend() == "cpu" and dispatch.use_cpu_kernels()


# One case per op: (function of arrays, its arguments, whether its forward is the same formula on every backend).
_CASES = {
    "dense": (lambda x, k: dense_ops.dense(x, k), (_rand(2, 5, 8), _rand(8, 6, seed=1)), True),
    "group_norm_silu": (
        lambda x, s, b: norm_ops.group_norm(x, s, b, 4, 1e-5, True),
        (_rand(2, 4, 4, 16) * 3 + 1, _rand(16, seed=1), _rand(16, seed=2)),
        True,
    ),
    # 512 tiles and 32 channels: Winograd on CPU, XLA's convolution elsewhere (rounding differs).
    "convolution": (
        lambda x, k: conv_ops.convolution(x, k, (1, 1), ((1, 1), (1, 1))),
        (_rand(2, 32, 32, 32), _rand(3, 3, 32, 32, seed=1) / 17),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_accelerators_take_autodiff_of_plain_ops(name, accelerator):
    fn, args, same_forward = _CASES[name]
    assert "custom_vjp_call" not in _primitives(lambda *a: fn(*a), *args)
    out, grads = _value_and_grads(lambda *a: fn(*a), *args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "backend", lambda: "cpu")
        assert "custom_vjp_call" in _primitives(lambda *a: fn(*a), *args)
        cpu_out, cpu_grads = _value_and_grads(lambda *a: fn(*a), *args)
    if same_forward:
        np.testing.assert_array_equal(out, cpu_out)
    else:
        np.testing.assert_allclose(out, cpu_out, atol=2e-5, rtol=0)
    for g, cpu_g in zip(grads, cpu_grads):
        np.testing.assert_allclose(g, cpu_g, atol=1e-4 * max(1.0, float(jnp.abs(cpu_g).max())), rtol=0)


def test_auto_attention_is_chunked_on_cpu_only(accelerator):
    # 256 x 256 scores per head: the chunked kernel's threshold on CPU.
    q, k, v = (_rand(1, 256, 2, 8, seed=s) for s in range(3))
    plain = attention_ops.reference_attention(q, k, v)
    np.testing.assert_array_equal(attention_ops.attention(q, k, v, "auto"), plain)
    assert "custom_vjp_call" not in _primitives(lambda *a: attention_ops.attention(*a, "auto"), q, k, v)
    # An explicit choice holds on every backend.
    assert "custom_vjp_call" in _primitives(lambda *a: attention_ops.attention(*a, "chunked"), q, k, v)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "backend", lambda: "cpu")
        assert "custom_vjp_call" in _primitives(lambda *a: attention_ops.attention(*a, "auto"), q, k, v)
