"""Training a segmenter on the dataset's labels: the `evalseg` and `discriminator` stages share it."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from sdsup import segmentation
from sdsup.conditioning import images_to_float
from sdsup.evaluation import images as image_evaluation
from sdsup.stages import common
from sdsup.trainer import sharding, update


def loss_fn(seg, num_classes: int, ignore_id: int, class_balance: float = 0.0, images: Optional[Callable] = None):
    """`(params, batch_stats, batch, rng, *frozen) -> (loss, (batch_stats, metrics))`: cross-entropy on the labels.

    `class_balance` > 0 weighs each pixel by its class's OASIS weight in the
    batch to that power (0: all pixels equal). Sky and ground cover most of
    a scene; measured on the default run, a plain-CE segmenter never
    predicted car, cloud, rock or water on real images (IoU 0), so image mIoU
    could not see those classes at all. `images(batch, *frozen)` gives the
    float images the segmenter sees; by default the batch's real images (the
    `discriminator` stage can pass VAE reconstructions).
    """
    def loss(params, batch_stats, batch, rng, *frozen):
        del rng  # deterministic: no dropout, flips come from the input pipeline
        x = images(batch, *frozen) if images else images_to_float(batch["image"])
        logits, updates = seg.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
        loss_px, valid = segmentation.pixel_cross_entropy(logits, batch["label"], ignore_id)
        total = segmentation.balanced_mean(loss_px, batch["label"], num_classes, ignore_id, class_balance)
        acc = segmentation.masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), valid)
        return total, (updates["batch_stats"], {"loss": total, "pixel_accuracy": acc})
    return loss


def train(ctx: common.Context, name: str, cfg, seg, images: Optional[Callable] = None, frozen: tuple = ()) -> dict:
    """Trains `seg` as stage `name` (config block `cfg`); returns its host variables {params, batch_stats}."""
    spec = ctx.dataset.spec
    tx, _ = update.optimizer(cfg.optimizer, cfg.num_steps)
    size = ctx.config.data.image_size

    def init(rng):
        variables = seg.init(rng, jnp.zeros((2, size, size, 3)), train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"],
                "opt": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}

    state, shardings = common.create_state(ctx, name, init)
    loss = loss_fn(seg, spec.num_classes, spec.ignore_id, float(cfg.get("class_balance", 0.0)), images)
    step = update.make_step(loss, tx, shardings, carried="batch_stats")
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, *frozen)
    state = common.train(ctx, name, cfg, state, shardings, compiled)
    return sharding.host_copy({"params": state["params"], "batch_stats": state["batch_stats"]})


def evaluate_real(ctx: common.Context, seg, variables, split: str = "validation") -> dict:
    """mIoU of the segmenter on real images of a split, over the dataset's classes (a discriminator's "fake"
    output is not a real-image answer)."""
    num_classes = ctx.dataset.spec.num_classes
    predict = common.jit(lambda v, x: jnp.argmax(seg.apply(v, x, train=False)[..., :num_classes], -1), ctx)
    return image_evaluation.real_miou(ctx.dataset, lambda images: predict(variables, images_to_float(images)), split)
