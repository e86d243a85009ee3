"""Stage `evalseg`: the evaluation segmenter, trained on real images only.

It scores generated images (image mIoU against the input layout) and is never
the adversarial discriminator: the discriminator saw generated images, so it
would grade its own student. Leaves `WORKDIR/evalseg/model/` (the variables
{params, batch_stats}) and its validation mIoU in DONE.json.

With `evalseg.pretrained` (an sdsup segmenter directory: the paper's
evaluators, the CSAIL UperNet-R101 for ADE20K from `python -m sdsup.convert
csail` or the DRN-D-105 for Cityscapes from `python -m sdsup.convert drn`;
or an alternative, a transformers UperNet or Segformer from `python -m
sdsup.convert upernet` / `segformer`) nothing is trained: that segmenter is
copied in and its validation mIoU on real images measured.
"""

from __future__ import annotations

import jax
from absl import logging

from sdsup import model_configs
from sdsup.errors import ConfigError
from sdsup.models import io as model_io
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.stages import common, segmenters
from sdsup.workdir import SEGMENTER_KINDS, load_model_dir

NAME = "evalseg"


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.evalseg
    ctx.stage_dir(NAME)
    if cfg.get("pretrained"):
        return use_pretrained(ctx, cfg.pretrained)
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


def use_pretrained(ctx: common.Context, directory: str) -> dict:
    config, variables = load_model_dir(directory, SEGMENTER_KINDS, what="config.evalseg.pretrained")
    classes = ctx.dataset.spec.num_classes
    if config.num_classes != classes:
        raise ConfigError(f"config.evalseg.pretrained={directory} predicts {config.num_classes} classes; dataset "
                          f"{ctx.dataset.spec.name} has {classes} (an evaluator has no 'fake' output: convert it "
                          "without --fake_class)")
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", model_io.kind_of(config), config, variables)
    with common.timed("evalseg: validation mIoU of the pretrained segmenter"):
        result = segmenters.evaluate_real(ctx, model_configs.segmenter_network(config), variables)
    logging.info("evalseg: %s, validation mIoU on real images %.3f", directory, result["miou"])
    return {"pretrained": directory, "val_miou_real": result["miou"],
            "val_per_class_iou_real": result["per_class_iou"]}
