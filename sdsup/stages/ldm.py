"""Stage `ldm`: the text-conditional latent UNet (and, for the scenes, its text encoder).

On the scenes both are trained here, on the frozen VAE's latents, with the
noise-prediction loss and caption dropout (the empty prompt, for
classifier-free guidance). At scale this stage takes the pretrained SD UNet
and CLIP text encoder instead (`config.ldm.pretrained`, a directory written
by `python -m sdsup.convert import`). Leaves `WORKDIR/ldm/unet/`,
`WORKDIR/ldm/text_encoder/` (EMA weights) and `WORKDIR/ldm/samples.png`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import conditioning, model_configs, pipelines, viz
from sdsup.diffusion import schedule as schedule_lib
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.unet import UNet2DConditionModel
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common
from sdsup.trainer import sharding, update
from sdsup.workdir import load_model_dir

NAME = "ldm"


def loss_fn(unet, text_model, vae, cfg, schedule, prompting: conditioning.Prompting):
    """`(params, batch, rng, vae_params) -> (loss, metrics)`: the noise loss on VAE latents, with caption dropout."""
    num_t = schedule.num_train_timesteps
    empty = jnp.asarray(prompting.empty)

    def loss(params, batch, rng, vae_params):
        rng_z, rng_drop, rng_t, rng_n = jax.random.split(rng, 4)
        x = conditioning.images_to_float(batch["image"])
        z0 = jax.lax.stop_gradient(vae.encode_to_latents(vae_params, x, rng_z))
        drop = jax.random.uniform(rng_drop, (x.shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty[None, :], batch["tokens"])
        context = conditioning.encode_text(text_model, params["text_encoder"], tokens, prompting.pad_id)
        t = jax.random.randint(rng_t, (x.shape[0],), 0, num_t)
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)
        z_t = schedule_lib.add_noise(schedule, z0, noise, t)
        pred = unet.apply({"params": params["unet"]}, z_t, t, context).astype(jnp.float32)
        per_example = jnp.mean(jnp.square(pred - schedule_lib.training_target(schedule, z0, noise, t)), axis=(1, 2, 3))
        total = jnp.mean(per_example * schedule_lib.min_snr_weights(schedule, t, cfg.get("min_snr_gamma", 0.0)))
        return total, {"loss": total, "loss/noise": jnp.mean(per_example)}
    return loss


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.ldm
    if cfg.pretrained:
        for name in ("unet", "text_encoder"):
            config, params = load_model_dir(os.path.join(cfg.pretrained, name), name, what="config.ldm.pretrained")
            ctx.workdir.save_model(NAME, name, name, config, params)
        return {"pretrained": cfg.pretrained}

    ctx.stage_dir(NAME)
    unet_config, text_config = model_configs.ldm(ctx.config, ctx.tokenizer)
    unet, text_model = UNet2DConditionModel(unet_config), CLIPTextTransformer(text_config)
    vae_config, vae_params = ctx.workdir.vae()
    vae = AutoencoderKL(vae_config)
    size = ctx.config.data.image_size
    latent = size // vae_config.downsample_factor
    tx, _ = update.optimizer(cfg.optimizer, cfg.num_steps)
    schedule = model_configs.noise_schedule(ctx.config)

    def init(rng):
        r1, r2 = jax.random.split(rng)
        tokens = jnp.zeros((1, ctx.config.text.max_length), jnp.int32)
        context = jnp.zeros((1, ctx.config.text.max_length, text_config.hidden_size), jnp.float32)
        params = {
            "unet": unet.init(r1, jnp.zeros((1, latent, latent, vae_config.latent_channels)), jnp.zeros((1,), jnp.int32),
                              context)["params"],
            "text_encoder": text_model.init(r2, tokens)["params"],
        }
        return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}

    state, shardings = common.create_state(ctx, NAME, init)
    vae_params = sharding.place(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"],
                                vae_params, ctx.mesh)
    host_vae = (vae_config, sharding.host_copy(vae_params))

    def grid(params):
        models = pipelines.ImageModels((unet_config, params["unet"]), (text_config, params["text_encoder"]), host_vae)
        return sample_grid(ctx, models)

    after_warm_up = common.warm_up("ldm: sampler", lambda: grid(common.zeros_like_abstract(state.abstract["ema"])))
    step = update.make_step(loss_fn(unet, text_model, vae, cfg, schedule, conditioning.Prompting.from_tokenizer(
        ctx.tokenizer)), tx, shardings, micro_batches=cfg.micro_batches, ema_decay=cfg.ema_decay)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, vae_params)

    @after_warm_up
    def pictures(step, state):
        return grid(sharding.host_copy(state["ema"]))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, pictures=pictures)

    ema = sharding.host_copy(state["ema"])
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "unet", "unet", unet_config, ema["unet"])
        ctx.workdir.save_model(NAME, "text_encoder", "text_encoder", text_config, ema["text_encoder"])
        with common.timed("ldm: sample grid"):
            viz.save_png(after_warm_up(grid)(ema), os.path.join(ctx.stage_dir(NAME), "samples.png"))
    return {"steps": cfg.num_steps}


def sample_grid(ctx: common.Context, models: pipelines.ImageModels, num: int = common.GRID_ROWS) -> np.ndarray:
    """Validation captions -> images (DDIM + CFG), next to the real images."""
    spec = ctx.spec
    batch = next(ctx.dataset.eval_batches("validation", num))
    images = pipelines.text_to_image(models, batch["tokens"], jax.random.PRNGKey(0), ctx.sampling())
    rows = [{"caption": c, "panels": [real, gen]} for c, real, gen in zip(batch["caption"], batch["image"], images)]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)
