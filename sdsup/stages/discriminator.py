"""Stage `discriminator`: pretrains the adversarial segmenter before `control` uses it.

ALDM's discriminator starts as a segmenter already trained on the dataset
(UperNet on ADE20K) and is then fine-tuned inside the adversarial loop. The
scenes have no such network, and one trained from scratch inside the control
stage gets one update per lazy step: 25 in the default run's 200 steps. There
it segmented real images with 22-28% pixel accuracy when the generator's
adversarial term ramped up (loss/adv stayed ~0.16 for lambda_adv 0.5 and 20),
so the term pushed the generator towards nothing in particular and image
mIoU did not move (docs/ablation/report.md).

This stage trains the discriminator's network (config.control.discriminator,
N+1 outputs; the last, "fake", is never a target here) with class-balanced
cross-entropy on `discriminator.input`: "image", the training images (as
ALDM's is trained on ADE20K images; 300 steps give validation mIoU 0.787 on
real images), or "reconstruction", their VAE reconstructions (the encoder's
mode, decoded: what the control stage calls real; 3x slower here). Its own
seed keeps it distinct from the evaluation segmenter, which has the same
architecture. The control stage starts its segmenter from
`WORKDIR/discriminator/model/` when config.control.discriminator_init is
"stage". Measured with it (validation): ALDM raises image mIoU from 0.369 to
0.392 at lambda_adv 20 with a lazy step every 2nd step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging

from sdsup import stages
from sdsup.errors import ConfigError
from sdsup.models import io as model_io
from sdsup.models.io import ModelFileError
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common
from sdsup.stages import control as control_stage
from sdsup.stages import evalseg
from sdsup.stages import vae as vae_stage

NAME = "discriminator"


def load(ctx: stages.Context):
    """(SegmenterConfig, variables {params, batch_stats}) of the finished stage."""
    path = os.path.join(ctx.workdir, NAME, "model")
    if not os.path.exists(os.path.join(path, model_io.CONFIG_FILE)):
        raise ModelFileError(f"control.discriminator_init='stage' needs the finished `{NAME}` stage "
                             f"({path} is missing): add {NAME!r} to config.stages before 'control', "
                             "or set control.discriminator_init to 'scratch' or a segmenter directory")
    _, config, variables, _ = model_io.load(path)
    return config, variables


def reconstruct(vae: AutoencoderKL, vae_params, images):
    """uint8 images -> the VAE's reconstruction in [-1, 1] (posterior mode), as the control stage's x_real."""
    x = common.images_to_float(images)
    z = vae.apply({"params": vae_params}, x, method=vae.encode).mode()
    return jnp.clip(vae.apply({"params": vae_params}, z, method=vae.decode).astype(jnp.float32), -1.0, 1.0)


@stages.register(NAME)
def run(ctx: stages.Context) -> dict:
    cfg = ctx.config.discriminator
    out = ctx.stage_dir(NAME)
    spec, _ = common.dataset(ctx)
    config = control_stage.discriminator_config(ctx, spec.num_classes)
    seg = UperNetSegmenter(config)
    if cfg.input == "reconstruction":
        vae_config, vae_params = vae_stage.load(ctx)
        vae = AutoencoderKL(vae_config)
        size = int(ctx.config.data.image_size)
        frozen_vae = common.place(
            lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"], vae_params, ctx.mesh)
        variables = evalseg.train_segmenter(
            ctx, NAME, cfg, seg, seed_offset=50,
            images=lambda batch, vae_params: reconstruct(vae, vae_params, batch["image"]), frozen=(frozen_vae,))
    elif cfg.input == "image":
        variables = evalseg.train_segmenter(ctx, NAME, cfg, seg, seed_offset=50)
    else:
        raise ConfigError(f"discriminator.input must be 'image' or 'reconstruction', got {cfg.input!r}")
    if jax.process_index() == 0:
        model_io.save(os.path.join(out, "model"), "segmenter", config, variables)
    with common.timed("discriminator: validation mIoU"):
        # On real images, over the N real classes (evaluate_real ignores the fake output).
        result = evalseg.evaluate_real(ctx, seg, variables)
    logging.info("discriminator: validation mIoU on real images %.3f", result["miou"])
    return {"val_miou_real": result["miou"], "steps": cfg.num_steps}
