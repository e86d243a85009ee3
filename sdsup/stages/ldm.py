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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import stages, viz
from sdsup.data import pipeline, registry
from sdsup.diffusion import samplers
from sdsup.diffusion import schedule as schedule_lib
from sdsup.models import io as model_io
from sdsup.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from sdsup.models.unet import UNet2DConditionModel, UNetConfig
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common
from sdsup.stages import vae as vae_stage
from sdsup.trainer import sharding

NAME = "ldm"


def _tuples(d) -> dict:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}


def model_configs(ctx: stages.Context):
    """(UNetConfig, CLIPTextConfig) for this run, sized from the VAE and tokenizer."""
    c = ctx.config.ldm
    vae_config = vae_stage.model_config(ctx)
    tok = common.tokenizer(ctx)
    text = CLIPTextConfig(**_tuples(c.text_encoder), vocab_size=tok.vocab_size,
                          max_position_embeddings=ctx.config.text.max_length,
                          pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    unet = UNetConfig(**_tuples(c.unet), in_channels=vae_config.latent_channels,
                      out_channels=vae_config.latent_channels, cross_attention_dim=text.hidden_size,
                      sample_size=ctx.config.data.image_size // vae_config.downsample_factor)
    return unet, text


def noise_schedule(ctx: stages.Context) -> schedule_lib.NoiseSchedule:
    s = ctx.config.diffusion
    return schedule_lib.make_schedule(s.schedule, s.num_train_timesteps, s.beta_start, s.beta_end, s.prediction_type)


def load(ctx: stages.Context):
    """{"unet": (config, params), "text_encoder": (config, params)} of the finished stage."""
    out = {}
    for name in ("unet", "text_encoder"):
        _, config, params, _ = model_io.load(os.path.join(ctx.workdir, NAME, name))
        out[name] = (config, params)
    return out


def encode_text(text_model: CLIPTextTransformer, params, tokens, pad_id: Optional[int]):
    """Last hidden states of the text encoder.

    `pad_id` None: no padding mask (Stable Diffusion's convention, for CLIP
    tokenizers whose pad token is <|endoftext|>); otherwise padding is masked
    out of attention (the scenes' word tokenizer).
    """
    mask = None if pad_id is None else tokens != pad_id
    return text_model.apply({"params": params}, tokens, attention_mask=mask).last_hidden_state


def mask_pad_id(tok) -> Optional[int]:
    """The pad id to mask for this tokenizer, or None for no mask."""
    return tok.pad_id if tok.masks_padding else None


def make_step(unet, text_model, vae, tx, cfg, schedule, empty_tokens, pad_id, shardings):
    num_t = schedule.num_train_timesteps

    def loss_fn(params, batch, rng, vae_params):
        rng_z, rng_drop, rng_t, rng_n = jax.random.split(rng, 4)
        x = common.images_to_float(batch["image"])
        posterior = vae.apply({"params": vae_params}, x, method=vae.encode)
        z0 = jax.lax.stop_gradient(vae.scale_latents(posterior.sample(rng_z)))
        drop = jax.random.uniform(rng_drop, (x.shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty_tokens[None, :], batch["tokens"])
        context = encode_text(text_model, params["text_encoder"], tokens, pad_id)
        t = jax.random.randint(rng_t, (x.shape[0],), 0, num_t)
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)
        z_t = schedule_lib.add_noise(schedule, z0, noise, t)
        pred = unet.apply({"params": params["unet"]}, z_t, t, context).astype(jnp.float32)
        per_example = jnp.mean(jnp.square(pred - schedule_lib.training_target(schedule, z0, noise, t)), axis=(1, 2, 3))
        loss = jnp.mean(per_example * schedule_lib.min_snr_weights(schedule, t, cfg.get("min_snr_gamma", 0.0)))
        return loss, {"loss": loss, "loss/noise": jnp.mean(per_example)}

    def step(state, batch, rng, vae_params):
        def lg(params, b, r):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b, r, vae_params)
            return metrics, grads

        metrics, grads = common.accumulate_gradients(lg, state["params"], batch, rng, cfg.micro_batches)
        params, opt, metrics["grad_norm"] = common.apply_gradients(tx, state["params"], state["opt"], grads)
        ema = common.ema_update(state["ema"], params, cfg.ema_decay, state["step"] + 1)
        return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))


@stages.register(NAME)
def run(ctx: stages.Context) -> dict:
    cfg = ctx.config.ldm
    out = ctx.stage_dir(NAME)
    if cfg.pretrained:
        for name, kind in (("unet", "unet"), ("text_encoder", "text_encoder")):
            got, config, params, _ = model_io.load(os.path.join(cfg.pretrained, name))
            if got != kind:
                raise model_io.ModelFileError(f"{cfg.pretrained}/{name} holds a {got}, not a {kind}")
            model_io.save(os.path.join(out, name), kind, config, params)
        return {"pretrained": cfg.pretrained}

    unet_config, text_config = model_configs(ctx)
    unet, text_model = UNet2DConditionModel(unet_config), CLIPTextTransformer(text_config)
    vae_config, vae_params = vae_stage.load(ctx)
    vae = AutoencoderKL(vae_config)
    size = ctx.config.data.image_size
    latent = size // vae_config.downsample_factor
    tok = common.tokenizer(ctx)
    tx, _ = common.optimizer(cfg.optimizer, cfg.num_steps)
    schedule = noise_schedule(ctx)

    def init_params(rng):
        r1, r2 = jax.random.split(rng)
        tokens = jnp.zeros((1, ctx.config.text.max_length), jnp.int32)
        context = jnp.zeros((1, ctx.config.text.max_length, text_config.hidden_size), jnp.float32)
        return {
            "unet": unet.init(r1, jnp.zeros((1, latent, latent, vae_config.latent_channels)), jnp.zeros((1,), jnp.int32),
                              context)["params"],
            "text_encoder": text_model.init(r2, tokens)["params"],
        }

    def init(rng):
        params = init_params(rng)
        return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}

    state, shardings = sharding.create_sharded_in_background(init, ctx.mesh, jax.random.PRNGKey(ctx.config.seed))
    vae_params = common.place(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"],
                              vae_params, ctx.mesh)
    host_vae_params = sharding.host_copy(vae_params)

    def grid(params):
        return sample_grid(ctx, unet, text_model, vae, params, host_vae_params, schedule)

    after_warm_up = common.warm_up("ldm: sampler", lambda: grid(common.zeros_like_abstract(state.abstract["ema"])))
    empty = jnp.asarray(tok.encode(""))
    step = make_step(unet, text_model, vae, tx, cfg, schedule, empty, mask_pad_id(tok), shardings)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, vae_params)

    @after_warm_up
    def pictures(step, state):
        return grid(sharding.host_copy(state["ema"]))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, seed_offset=11, pictures=pictures)

    ema = sharding.host_copy(state["ema"])
    if jax.process_index() == 0:
        model_io.save(os.path.join(out, "unet"), "unet", unet_config, ema["unet"])
        model_io.save(os.path.join(out, "text_encoder"), "text_encoder", text_config, ema["text_encoder"])
        with common.timed("ldm: sample grid"):
            viz.save_png(after_warm_up(grid)(ema), os.path.join(out, "samples.png"))
    return {"steps": cfg.num_steps}


def sample_grid(ctx, unet, text_model, vae, params, vae_params, schedule, num: int = common.GRID_ROWS) -> np.ndarray:
    """Validation captions -> images (DDIM + CFG), next to the real images."""
    spec, builder = common.dataset(ctx)
    tok = common.tokenizer(ctx)
    batch = next(pipeline.eval_batches(registry.data_source(spec, builder, "validation"), tokenizer=tok,
                                       global_batch_size=num))
    images = generate(ctx, unet, text_model, vae, params, vae_params, schedule, jnp.asarray(batch["tokens"]),
                      jax.random.PRNGKey(0))
    rows = [{"caption": c, "panels": [real, gen]} for c, real, gen in zip(batch["caption"], batch["image"], images)]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)


def generate(ctx, unet, text_model, vae, params, vae_params, schedule, tokens, rng, guidance=None, steps=None,
             controlnet=None, controlnet_params=None, hint=None):
    """Tokens [B, L] -> uint8 images [B, H, W, 3] with DDIM and classifier-free guidance.

    With a `controlnet` module, its residuals from `controlnet_params` and
    the `hint` [B, ...] condition the UNet on both CFG branches (the layout
    stays in the unconditional branch, as in ALDM). The jitted sampler is
    cached per model configs and sampling settings, so periodic sample grids
    compile once; weights and hints are arguments, never baked-in constants.
    """
    s = ctx.config.sampling
    guidance = s.guidance if guidance is None else float(guidance)
    steps = s.steps if steps is None else int(steps)
    tok = common.tokenizer(ctx)
    empty = jnp.broadcast_to(jnp.asarray(tok.encode("")), tokens.shape)
    key = ("sampler", unet.config, text_model.config, vae.config, controlnet.config if controlnet else None,
           guidance, steps, float(s.eta), float(ctx.config.control.conditioning_scale) if controlnet else None)
    if key not in ctx.cache:
        ctx.cache[key] = common.jit(_sampler(ctx, unet, text_model, vae, schedule, guidance, steps, controlnet), ctx)
    images = ctx.cache[key](params, vae_params, tokens, empty, rng, controlnet_params, hint)
    return np.asarray(images)


def _sampler(ctx, unet, text_model, vae, schedule, guidance: float, steps: int, controlnet=None):
    """The pure sampling function behind `generate`."""
    eta = ctx.config.sampling.eta
    pad = mask_pad_id(common.tokenizer(ctx))
    latent = ctx.config.data.image_size // vae.config.downsample_factor
    scale = ctx.config.control.conditioning_scale if controlnet is not None else None

    def run(params, vae_params, tokens, empty, rng, controlnet_params, hint):
        cond = encode_text(text_model, params["text_encoder"], tokens, pad)
        uncond = encode_text(text_model, params["text_encoder"], empty, pad)
        both = jnp.concatenate([cond, uncond]) if guidance != 1.0 else cond
        hints = None if hint is None else (jnp.concatenate([hint, hint]) if guidance != 1.0 else hint)

        def eps(z, t):
            zz = jnp.concatenate([z, z]) if guidance != 1.0 else z
            tt = jnp.concatenate([t, t]) if guidance != 1.0 else t
            extra = {}
            if controlnet is not None:
                down, mid = controlnet.apply({"params": controlnet_params}, zz, tt, both, hints,
                                             conditioning_scale=scale)
                extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet.apply({"params": params["unet"]}, zz, tt, both, **extra)
            if guidance == 1.0:
                return out
            c, u = jnp.split(out, 2)
            return u + guidance * (c - u)

        z = jax.random.normal(rng, (tokens.shape[0], latent, latent, vae.config.latent_channels))
        z = samplers.ddim_sample(eps, schedule, z, steps, eta=eta, rng=jax.random.fold_in(rng, 1))
        x = vae.apply({"params": vae_params}, vae.unscale_latents(z), method=vae.decode)
        return jnp.clip((x + 1) * 127.5, 0, 255).round().astype(jnp.uint8)

    return run
