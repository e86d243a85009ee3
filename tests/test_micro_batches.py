"""Gradient accumulation over micro-batches: the same mean gradient, a carry threaded in order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup.trainer import update


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 2)),
                                                                                    jnp.float32)}

    def loss_and_grad(p, mb, r):
        def loss(p):
            return jnp.mean((mb["x"] @ p["w"] + p["b"] - mb["y"]) ** 2)
        value, grads = jax.value_and_grad(loss)(p)
        return {"loss": value}, grads

    return params, batch, loss_and_grad


@pytest.mark.parametrize("num_micro", [2, 4, 8])
def test_accumulated_gradients_equal_the_full_batch_gradient(num_micro):
    params, batch, loss_and_grad = _problem()
    rng = jax.random.PRNGKey(0)
    full_aux, full = jax.jit(lambda p, b: loss_and_grad(p, b, rng))(params, batch)
    aux, grads = jax.jit(lambda p, b: update.accumulate_gradients(loss_and_grad, p, b, rng, num_micro))(params, batch)
    np.testing.assert_allclose(aux["loss"], full_aux["loss"], rtol=1e-6)
    for k in full:
        np.testing.assert_allclose(grads[k], full[k], rtol=1e-5, atol=1e-7)


def test_the_carry_runs_through_micro_batches_in_order():
    batch = {"x": jnp.arange(8.0)}

    def fn(carry, mb, rng):
        # A running list of micro-batch sums, like BatchNorm statistics updated per micro-batch.
        return carry * 10.0 + jnp.sum(mb["x"]), {"sum": jnp.sum(mb["x"])}

    carry, out = update.scan_micro_batches(fn, jnp.float32(0.0), batch, jax.random.PRNGKey(0), 4)
    # Strided micro-batches {0, 4}, {1, 5}, {2, 6}, {3, 7}: sums 4, 6, 8, 10 in order.
    assert float(carry) == ((4 * 10 + 6) * 10 + 8) * 10 + 10
    assert float(out["sum"]) == pytest.approx(28.0 / 4)  # the mean over micro-batches


def test_every_device_holds_a_share_of_every_micro_batch():
    """With the batch sharded over 8 devices, micro-batches are split over all 8 (no resharding per step)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jnp.arange(32.0).reshape(32, 1), sharded)
    micro = jax.jit(lambda b: update.micro_batches(b, 4))({"x": x})["x"]
    assert micro.shape == (4, 8, 1)
    np.testing.assert_array_equal(np.asarray(micro[1, :, 0]), np.arange(1, 32, 4))
    for shard in micro.addressable_shards:  # one example of each micro-batch per device
        assert shard.data.shape == (4, 1, 1), shard.data.shape


def test_a_batch_that_does_not_split_is_refused():
    params, batch, loss_and_grad = _problem()
    with pytest.raises(ValueError, match="batch of 8 does not split into 3 micro-batches"):
        update.accumulate_gradients(loss_and_grad, params, batch, jax.random.PRNGKey(0), 3)


def test_ema_decay_warms_up_then_holds_the_configured_value():
    ema, params = {"w": jnp.zeros(())}, {"w": jnp.ones(())}
    first = update.ema_update(ema, params, 0.995, jnp.int32(1))
    assert float(first["w"]) == pytest.approx(1 - 2 / 11)  # decay (1 + 1) / (10 + 1)
    late = update.ema_update(ema, params, 0.995, jnp.int32(10_000))
    assert float(late["w"]) == pytest.approx(0.005)  # the configured decay
    assert float(update.ema_update(ema, params, 0.9)["w"]) == pytest.approx(0.1)  # no step: no warm-up
