"""Stage `discriminator`: pretrains the adversarial segmenter before `control` uses it.

ALDM's discriminator starts as a segmenter already trained on the dataset
(UperNet on ADE20K) and is then fine-tuned inside the adversarial loop. The
scenes have no such network, and one trained from scratch inside the control
stage gets one update per lazy step: 25 in a 200-step stage with a lazy step
every 8th. There it segmented real images with 22-28% pixel accuracy when the
generator's adversarial term ramped up (loss/adv stayed ~0.16 for lambda_adv
0.5 and 20), so the term pushed the generator towards nothing in particular
and image mIoU did not move (docs/ablation/report.md).

This stage trains the discriminator's network (config.discriminator.model,
N+1 outputs; the last, "fake", is never a target here) with class-balanced
cross-entropy on `discriminator.input`: "image", the training images (as
ALDM's is trained on ADE20K images), or "reconstruction", their VAE
reconstructions (the encoder's mode, decoded: what the control stage calls
real; 3x slower here). Its own random streams keep it distinct from the
evaluation segmenter. The control stage starts its segmenter from
`WORKDIR/discriminator/model/` when config.control.discriminator_init is
"stage".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from sdsup import model_configs
from sdsup.conditioning import images_to_float
from sdsup.errors import ConfigError
from sdsup.models.segmenter import UperNetSegmenter
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common, segmenters
from sdsup.trainer import sharding

NAME = "discriminator"


def reconstruct(vae: AutoencoderKL, vae_params, images):
    """uint8 images -> the VAE's reconstruction in [-1, 1] (posterior mode), as the control stage's x_real."""
    x = images_to_float(images)
    z = vae.apply({"params": vae_params}, x, method=vae.encode).mode()
    return jnp.clip(vae.apply({"params": vae_params}, z, method=vae.decode).astype(jnp.float32), -1.0, 1.0)


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.discriminator
    ctx.stage_dir(NAME)
    config = model_configs.discriminator(ctx.config, ctx.dataset.spec.num_classes)
    seg = UperNetSegmenter(config)
    if cfg.input == "reconstruction":
        vae_config, vae_params = ctx.workdir.vae()
        vae = AutoencoderKL(vae_config)
        size = int(ctx.config.data.image_size)
        frozen_vae = sharding.place(
            lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"], vae_params, ctx.mesh)
        variables = segmenters.train(
            ctx, NAME, cfg, seg, images=lambda batch, vae_params: reconstruct(vae, vae_params, batch["image"]),
            frozen=(frozen_vae,))
    elif cfg.input == "image":
        variables = segmenters.train(ctx, NAME, cfg, seg)
    else:
        raise ConfigError(f"discriminator.input must be 'image' or 'reconstruction', got {cfg.input!r}")
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", "segmenter", config, variables)
    with common.timed("discriminator: validation mIoU"):
        # On real images, over the N real classes.
        result = segmenters.evaluate_real(ctx, seg, variables)
    logging.info("discriminator: validation mIoU on real images %.3f", result["miou"])
    return {"val_miou_real": result["miou"], "steps": cfg.num_steps}
