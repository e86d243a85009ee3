"""Stage `vae`: the autoencoder, trained on the dataset's images (or taken pretrained).

Loss: L1 + L2 reconstruction + kl_weight * KL (no perceptual loss: no
pretrained feature network exists offline). With `vae.class_balance` > 0 the
reconstruction terms weigh each pixel by its class's OASIS weight (from the
label map) to that power: a plain mean lets the sky and the ground decide, and
things a dozen pixels large were lost in reconstruction, so no later stage
could draw them (docs/faithfulness.md). Ignore pixels then weigh nothing. After training, the latent
scaling factor is set to 1 / std of the latents over training images (the
rule Stable Diffusion's 0.18215 came from), so the diffusion stages see
latents of unit variance. Leaves `WORKDIR/vae/model/` (sdsup model files) and
`WORKDIR/vae/reconstructions.png`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdsup import model_configs, segmentation, viz
from sdsup.conditioning import images_to_float
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common
from sdsup.trainer import update
from sdsup.workdir import load_model_dir

NAME = "vae"


def loss_fn(vae: AutoencoderKL, cfg, num_classes: int, ignore_id: int):
    """`(params, batch, rng) -> (loss, metrics)`: L1 + L2 + KL of a reconstruction from a posterior sample."""
    power = float(cfg.get("class_balance", 0.0))

    def mean(per_pixel, labels):
        if not power:
            return jnp.mean(per_pixel)
        return segmentation.balanced_mean(per_pixel, labels, num_classes, ignore_id, power)

    def loss(params, batch, rng):
        x = images_to_float(batch["image"])
        posterior = vae.apply({"params": params}, x, method=vae.encode)
        rec = vae.apply({"params": params}, posterior.sample(rng), method=vae.decode).astype(jnp.float32)
        l1 = mean(jnp.mean(jnp.abs(rec - x), axis=-1), batch["label"])
        l2 = mean(jnp.mean(jnp.square(rec - x), axis=-1), batch["label"])
        kl = jnp.mean(posterior.kl())
        total = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean(jnp.square(rec - x)), 1e-10))  # images span [-1, 1]
        return total, {"loss": total, "loss/l1": l1, "loss/l2": l2, "loss/kl": kl, "psnr": psnr}
    return loss


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.vae
    out = ctx.stage_dir(NAME)
    if cfg.pretrained:
        config, params = load_model_dir(cfg.pretrained, "vae", what="config.vae.pretrained")
        ctx.workdir.save_model(NAME, "model", "vae", config, params)
        return {"pretrained": cfg.pretrained}

    config = model_configs.vae(ctx.config)
    vae = AutoencoderKL(config)
    tx, _ = update.optimizer(cfg.optimizer, cfg.num_steps)
    size = ctx.config.data.image_size

    def init(rng):
        params = vae.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    state, shardings = common.create_state(ctx, NAME, init)
    spec = ctx.dataset.spec
    step = update.make_step(loss_fn(vae, cfg, spec.num_classes, spec.ignore_id), tx, shardings,
                            micro_batches=cfg.micro_batches)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size)
    state = common.train(ctx, NAME, cfg, state, shardings, compiled)

    params = jax.device_get(state["params"])
    with common.timed("vae: calibration, PSNR and reconstructions"):
        scale, psnr = _calibrate_and_evaluate(ctx, vae, params, out)
    config = dataclasses.replace(config, scaling_factor=scale)
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", "vae", config, params)
    logging.info("vae: scaling factor %.4f, validation PSNR %.2f dB", scale, psnr)
    return {"scaling_factor": scale, "val_psnr": psnr, "steps": cfg.num_steps}


def _calibrate_and_evaluate(ctx, vae, params, out, num_examples: int = 256):
    """Latent scaling factor from training images; PSNR and a picture on validation."""
    spec, dataset = ctx.spec, ctx.dataset
    encode = common.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mode(), ctx)
    decode = common.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), ctx)
    latents = []
    for batch in dataset.eval_batches("train", 32, limit=num_examples):
        latents.append(np.asarray(encode(params, images_to_float(batch["image"]))))
    scale = float(1.0 / (np.concatenate(latents).std() + 1e-8))
    errors, rows = [], []
    for batch in dataset.eval_batches("validation", 32, limit=num_examples):
        x = images_to_float(batch["image"])
        rec = np.clip(np.asarray(decode(params, encode(params, x))), -1, 1)
        errors.append(np.mean((rec - np.asarray(x)) ** 2, axis=(1, 2, 3))[batch["mask"]])
        if not rows:
            for i in range(min(6, len(rec))):
                rec_u8 = ((rec[i] + 1) * 127.5).round().astype(np.uint8)
                rows.append({"caption": batch["caption"][i], "panels": [batch["image"][i], rec_u8]})
    psnr = float(np.mean(10 * np.log10(4.0 / np.maximum(np.concatenate(errors), 1e-10))))
    if jax.process_index() == 0:
        viz.save_png(viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id),
                     os.path.join(out, "reconstructions.png"))
    return scale, psnr
