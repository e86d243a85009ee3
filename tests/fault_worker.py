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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sdsup import cli, parallel  # noqa: E402
from sdsup.trainer import loop, preemption  # noqa: E402
from toy_training import GLOBAL_BATCH, Batches, toy_setup  # noqa: E402

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
                         make_batches=lambda s: Batches(mesh, s, step_seconds=args.step_seconds),
                         rng=jax.random.PRNGKey(1),
                         num_steps=args.steps, log_every=10, checkpoint_every=args.checkpoint_every,
                         config={"toy": True}, batch_size=GLOBAL_BATCH, hooks=[announce], hook_every=1)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state["params"]):
        digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
    print(f"final {digest.hexdigest()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_argparse(lambda argv: train(ARGS), sys.argv[1:]))
