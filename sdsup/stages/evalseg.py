"""Stage `evalseg`: the evaluation segmenter, trained on real images only.

It scores generated images (image mIoU against the input layout) and is never
the adversarial discriminator: the discriminator saw generated images, so it
would grade its own student. Leaves `WORKDIR/evalseg/model/` (the variables
{params, batch_stats}) and its validation mIoU in DONE.json.
"""

from __future__ import annotations

import jax
from absl import logging

from sdsup import model_configs
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.stages import common, segmenters

NAME = "evalseg"


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.evalseg
    ctx.stage_dir(NAME)
    config = model_configs.evalseg(ctx.config, ctx.dataset.spec.num_classes)
    seg = UperNetSegmenter(config)
    variables = segmenters.train(ctx, NAME, cfg, seg)
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", "segmenter", config, variables)
    with common.timed("evalseg: validation mIoU"):
        result = segmenters.evaluate_real(ctx, seg, variables)
    logging.info("evalseg: validation mIoU on real images %.3f", result["miou"])
    return {"val_miou_real": result["miou"], "val_per_class_iou_real": result["per_class_iou"],
            "steps": cfg.num_steps}
