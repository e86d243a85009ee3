"""A two-layer toy trained by the shared loop: state, step and resumable batches, for the loop and fault tests.

Imports jax: a process that sets XLA_FLAGS (tests/fault_worker.py) imports this after setting them.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdsup import parallel
from sdsup.models.partitioning import BIAS, DENSE_KERNEL, with_axes
from sdsup.trainer import sharding

GLOBAL_BATCH = 8


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = lambda n: nn.Dense(n, kernel_init=with_axes(nn.initializers.lecun_normal(), DENSE_KERNEL),
                                   bias_init=with_axes(nn.initializers.zeros, BIAS))
        return dense(1)(nn.gelu(dense(16)(x)))


class Batches:
    """Batch i is the same on every run (a minimal resumable iterator); each process holds its rows of it.

    `poison_at`: the targets of that step's batch are NaN; `step_seconds`: each batch waits that long.
    """

    def __init__(self, mesh, state=None, poison_at=None, step_seconds=0.0):
        self.i = (state or {}).get("next", 0)
        self.mesh, self.poison_at, self.step_seconds = mesh, poison_at, step_seconds

    def __next__(self):
        time.sleep(self.step_seconds)
        rng = np.random.default_rng(self.i)
        x = rng.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
        y = np.sin(x.sum(1, keepdims=True)).astype(np.float32)
        if self.poison_at is not None and self.i + 1 == self.poison_at:
            y[:] = np.nan
        rows = GLOBAL_BATCH // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        self.i += 1
        return parallel.global_batch({"x": x[mine], "y": y[mine]}, self.mesh)

    def get_state(self):
        return {"next": self.i}


def toy_setup(mesh):
    """(sharded state, shardings, jitted step) of the toy on `mesh`."""
    model, tx = Toy(), optax.adamw(1e-2)

    def init(rng):
        params = model.init(rng, jnp.zeros((1, 4)))["params"]
        return {"params": params, "opt": tx.init(params)}

    state, shardings = sharding.create_sharded(init, mesh, jax.random.PRNGKey(0))

    def step(state, batch, rng):
        def loss_fn(p):
            pred = model.apply({"params": p}, batch["x"])
            noise = 1e-3 * jax.random.normal(rng, pred.shape)  # uses the step rng
            return jnp.mean((pred + noise - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])  # the mean is a cross-process all-reduce
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    return state, shardings, jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
