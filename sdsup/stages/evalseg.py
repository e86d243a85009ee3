"""Stage `evalseg`: the evaluation segmenter, trained on real images only.

It scores generated images (image mIoU against the input layout) and is never
the adversarial discriminator: the discriminator saw generated images, so it
would grade its own student. Leaves `WORKDIR/evalseg/model/` (the variables
{params, batch_stats}) and its validation mIoU in DONE.json.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdsup import segmentation, stages
from sdsup.data import pipeline, registry
from sdsup.models import io as model_io
from sdsup.models.segmenter import SegmenterConfig, UperNetSegmenter
from sdsup.stages import common
from sdsup.trainer import sharding

NAME = "evalseg"


def model_config(ctx: stages.Context, num_classes: int) -> SegmenterConfig:
    m = ctx.config.evalseg.model
    return SegmenterConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in m.items()},
                           num_classes=num_classes)


def load(ctx: stages.Context):
    """(SegmenterConfig, variables {params, batch_stats}) of the finished stage."""
    _, config, variables, _ = model_io.load(os.path.join(ctx.workdir, NAME, "model"))
    return config, variables


def make_step(seg, tx, num_classes: int, ignore_id: int, shardings, class_balance: float = 0.0,
              images: Optional[Callable] = None):
    """The jitted segmenter step `(state, batch, rng, *frozen)`: cross-entropy on the batch's labels.

    `class_balance` > 0 weighs each pixel by its class's OASIS weight in the
    batch to that power (0: all pixels equal). Sky and ground cover most of
    a scene; measured on the default run, a plain-CE segmenter never
    predicted car, cloud, rock or water on real images (IoU 0), so image mIoU
    could not see those classes at all. `images(batch, *frozen)` gives the
    float images the segmenter sees; by default the batch's real images (the
    `discriminator` stage can pass VAE reconstructions).
    """
    def loss_fn(params, batch_stats, batch, frozen):
        x = images(batch, *frozen) if images else common.images_to_float(batch["image"])
        logits, updates = seg.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
        loss_px, valid = segmentation.pixel_cross_entropy(logits, batch["label"], ignore_id)
        loss = segmentation.balanced_mean(loss_px, batch["label"], num_classes, ignore_id, class_balance)
        acc = segmentation.masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), valid)
        return loss, (updates["batch_stats"], {"loss": loss, "pixel_accuracy": acc})

    def step(state, batch, rng, *frozen):
        del rng  # deterministic: no dropout, flips come from the input pipeline
        (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, frozen)
        params, opt, metrics["grad_norm"] = common.apply_gradients(tx, state["params"], state["opt"], grads)
        return {"params": params, "batch_stats": batch_stats, "opt": opt, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))


def evaluate_real(ctx: stages.Context, seg, variables, split: str = "validation", limit=None) -> dict:
    """mIoU of the segmenter on real images of a split (sanity ceiling for image mIoU)."""
    spec, builder = common.dataset(ctx)
    # Over the dataset's classes only: a discriminator's extra "fake" output is not a real-image answer.
    predict = common.jit(lambda v, x: jnp.argmax(seg.apply(v, x, train=False)[..., :spec.num_classes], -1), ctx)
    confusion = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for batch in pipeline.eval_batches(registry.data_source(spec, builder, split), tokenizer=common.tokenizer(ctx),
                                       global_batch_size=common.EVAL_BATCH, limit=limit):
        pred = np.asarray(predict(variables, common.images_to_float(batch["image"])))
        confusion += segmentation.confusion_matrix(pred, batch["label"], spec.num_classes, spec.ignore_id,
                                                   mask=batch["mask"])
    miou, iou = segmentation.iou_from_confusion(confusion)
    return {"miou": miou, "per_class_iou": {n: (None if np.isnan(v) else float(v))
                                            for n, v in zip(spec.class_names, iou)}}


def train_segmenter(ctx: stages.Context, name: str, cfg, seg, seed_offset: int, images: Optional[Callable] = None,
                    frozen: tuple = ()) -> dict:
    """Trains `seg` as stage `name` (config block `cfg`); returns its host variables {params, batch_stats}."""
    spec, _ = common.dataset(ctx)
    tx, _ = common.optimizer(cfg.optimizer, cfg.num_steps)
    size = ctx.config.data.image_size

    def init(rng):
        variables = seg.init(rng, jnp.zeros((2, size, size, 3)), train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"],
                "opt": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}

    state, shardings = sharding.create_sharded_in_background(init, ctx.mesh,
                                                              jax.random.PRNGKey(ctx.config.seed + seed_offset))
    step = make_step(seg, tx, spec.num_classes, spec.ignore_id, shardings, float(cfg.get("class_balance", 0.0)),
                     images)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, *frozen)
    state = common.train(ctx, name, cfg, state, shardings, compiled, seed_offset=seed_offset + 1)
    return sharding.host_copy({"params": state["params"], "batch_stats": state["batch_stats"]})


@stages.register(NAME)
def run(ctx: stages.Context) -> dict:
    cfg = ctx.config.evalseg
    out = ctx.stage_dir(NAME)
    spec, _ = common.dataset(ctx)
    config = model_config(ctx, spec.num_classes)
    seg = UperNetSegmenter(config)
    variables = train_segmenter(ctx, NAME, cfg, seg, seed_offset=30)
    if jax.process_index() == 0:
        model_io.save(os.path.join(out, "model"), "segmenter", config, variables)
    with common.timed("evalseg: validation mIoU"):
        result = evaluate_real(ctx, seg, variables)
    logging.info("evalseg: validation mIoU on real images %.3f", result["miou"])
    return {"val_miou_real": result["miou"], "val_per_class_iou_real": result["per_class_iou"],
            "steps": cfg.num_steps}
