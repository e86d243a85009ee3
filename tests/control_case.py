"""A tiny ALDM control step with random weights, shared by the mesh tests and their worker processes.

Everything is deterministic given the mesh: weights come from fixed keys
(partitionable threefry, so the values do not depend on the sharding), the
batch is made from the scenes generator, and each process feeds the rows of
the global batch that its devices hold.
"""

import os

import jax
import numpy as np

from sdsup import aldm, config_lib, parallel, stages
from sdsup.data import dataset, scenes
from sdsup.stages import common
from sdsup.trainer import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


def config():
    c = config_lib.load(os.path.join(ROOT, "configs", "scenes.py"), "smoke")
    with c.unlocked():
        c.data.image_size = 16
        c.vae.model.update(block_out_channels=(8, 8, 8), norm_num_groups=4)  # 16x16 -> 4x4x4 latents
        c.ldm.unet.update(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2)
        c.ldm.text_encoder.update(hidden_size=16, intermediate_size=32, projection_dim=16)
        c.text.max_length = 16
        c.discriminator.model.update(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), head_channels=8,
                                       pool_scales=(1, 2))
        c.control.update(batch_size=BATCH, n_lazy=2, grid_steps=4, unroll_steps=2, ramp_start=0, ramp_end=0,
                         lambda_adv=0.5, caption_dropout=0.25)
        # Adam's first update is lr * g / (|g| + eps): for a gradient entry of
        # order eps (1e-8 by default) float rounding in a different reduction
        # order changes the update by a good fraction of lr. A larger eps keeps
        # the comparison about the step rather than about Adam's conditioning.
        c.control.optimizer.eps = 1e-6
        c.control.seg_optimizer.eps = 1e-6
    return c


def build(mesh, micro_batches: int = 1):
    """(setup, frozen random weights, state, compiled step) on `mesh`."""
    c = config()
    c.control.micro_batches = micro_batches
    ctx = stages.Context(config=c, workdir=None, mesh=mesh)
    setup, params = aldm.random_setup(c, dataset.text_tokenizer(c), mesh)
    state, shardings = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0))
    frozen = setup.frozen(mesh, params["unet"], params["vae"], params["text_encoder"])
    step = common.compile_step(setup.step(shardings), state, ctx, BATCH, frozen)
    return setup, params, state, step


def batch(setup, mesh, step: int) -> dict:
    """Global batch number `step`, fed by every process from the rows its devices hold."""
    size = setup.size
    examples = [scenes.make_example(0, "train", step * BATCH + i, size) for i in range(BATCH)]
    full = {"image": np.stack([e["image"] for e in examples]), "label": np.stack([e["label"] for e in examples]),
            "tokens": np.asarray(setup.tok.encode_batch([e["caption"] for e in examples]))}
    index_map = parallel.batch_sharding(mesh, 1).addressable_devices_indices_map((BATCH,))
    rows = sorted({r for (rows,) in index_map.values() for r in range(*rows.indices(BATCH))})
    return parallel.global_batch({k: v[rows] for k, v in full.items()}, mesh)


def run(mesh, num_steps: int, micro_batches: int = 1, every_state: bool = True):
    """(metrics of each step, flat state after each step, or after the last only) on the host."""
    setup, _, state, step = build(mesh, micro_batches)
    rng = jax.random.PRNGKey(7)
    history, states = [], []
    for i in range(num_steps):
        state, metrics = step(state, batch(setup, mesh, i), jax.random.fold_in(rng, i))
        history.append({k: float(v) for k, v in sharding.host_copy(metrics).items()})
        if every_state or i == num_steps - 1:
            states.append(flat(sharding.host_copy(state)))
    return history, states


def flat(tree) -> dict:
    """{path: array} of a state tree, for comparisons and npz files."""
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
