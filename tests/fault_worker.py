"""A tiny training run in a process of its own, run as `sdsup.train` runs a stage: for tests/test_faults*.py.

  python tests/fault_worker.py STAGE_DIR --steps=N [--step_seconds=S] [--checkpoint_every=K] [--devices=D]
      [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I]

The shared loop (`sdsup.trainer.loop.run`) trains a two-layer toy on
deterministic batches, with `sdsup.train`'s SIGTERM policy and exit statuses:
0 finished (the last line is `final <sha256 of the parameters>`), 75
preempted, 1 an error (one line). Each step prints `step N` (flushed) once
its checkpoint, if any, has been started, so a test can time a signal or a
kill; `--step_seconds` slows the steps down (in the batch iterator).
"""

import argparse
import hashlib
import os
import sys
import time


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("stage_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--step_seconds", type=float, default=0.0)
    parser.add_argument("--checkpoint_every", type=int, default=5)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--heartbeat_timeout_s", type=int, default=None)
    return parser.parse_args(argv)


ARGS = parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    # Before jax is imported: this process's CPU devices.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sdsup import cli, parallel  # noqa: E402
from sdsup.trainer import loop, preemption, sharding  # noqa: E402

GLOBAL_BATCH = 8


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.gelu(nn.Dense(16)(x)))


class Batches:
    """Batch i is the same on every run; each process holds its rows of it."""

    def __init__(self, mesh, state, step_seconds):
        self.i = (state or {}).get("next", 0)
        self.mesh, self.step_seconds = mesh, step_seconds

    def __next__(self):
        time.sleep(self.step_seconds)
        rng = np.random.default_rng(self.i)
        x = rng.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
        y = np.sin(x.sum(1, keepdims=True)).astype(np.float32)
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
            return jnp.mean((pred + 1e-3 * jax.random.normal(rng, pred.shape) - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])  # the mean is a cross-process all-reduce
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    return state, shardings, jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))


def train(args) -> int:
    preemption.exit_on_sigterm()  # as sdsup.train does, before anything else
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                    heartbeat_timeout_s=args.heartbeat_timeout_s)
    mesh = parallel.make_mesh({"data": -1})
    state, shardings, step = toy_setup(mesh)

    def announce(step_number, state):
        print(f"step {step_number}", flush=True)

    with preemption.retry_status_on_preemption():
        state = loop.run(name="toy", stage_dir=args.stage_dir, state=state, shardings=shardings, step_fn=step,
                         make_batches=lambda s: Batches(mesh, s, args.step_seconds), rng=jax.random.PRNGKey(1),
                         num_steps=args.steps, log_every=10, checkpoint_every=args.checkpoint_every,
                         config={"toy": True}, batch_size=GLOBAL_BATCH, hooks=[announce], hook_every=1)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state["params"]):
        digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
    print(f"final {digest.hexdigest()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_argparse(lambda argv: train(ARGS), sys.argv[1:]))
