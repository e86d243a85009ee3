"""Stage `control`: the segmentation conditioner, trained with adversarial supervision (ALDM).

The method and its step are `sdsup.aldm`; this stage loads the finished
vae/ldm stages' weights, builds the class-embedding table, starts the
segmenter from the `discriminator` stage (or as config.control.discriminator_init
says), runs the shared train loop and leaves `WORKDIR/control/controlnet/`
(EMA weights), `control/unet/` (when it fine-tuned UNet parts),
`control/discriminator/`, `control/class_table.npy` and `samples.png`.
With `lambda_adv = 0` it trains the plain-conditioner baseline.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sdsup import aldm, conditioning, pipelines, viz
from sdsup.data import latent_cache
from sdsup.errors import ConfigError
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.stages import common
from sdsup.trainer import sharding
from sdsup.workdir import load_model_dir

NAME = "control"


def initial_discriminator(ctx: common.Context):
    """The segmenter variables the control stage starts from (control.discriminator_init), or None.

    "scratch": random; "stage": the `discriminator` stage's pretrained
    network (ALDM starts from a trained segmenter); anything else: a
    directory holding an sdsup segmenter (e.g. an imported UperNet) with
    config.discriminator.model's architecture and N+1 outputs.
    """
    how = ctx.config.control.get("discriminator_init", "scratch")
    if how == "scratch":
        return None
    if how == "stage":
        if not ctx.workdir.has_model("discriminator", "model"):
            raise ConfigError(f"control.discriminator_init='stage' needs the finished `discriminator` stage "
                              f"({ctx.workdir.model_dir('discriminator', 'model')} is missing): add 'discriminator' "
                              "to config.stages before 'control', or set control.discriminator_init to 'scratch' "
                              "or a segmenter directory")
        return ctx.workdir.segmenter("discriminator")[1]
    if not os.path.isdir(how):
        raise ConfigError(f"control.discriminator_init={how!r}: not 'scratch', 'stage' or a segmenter directory")
    return load_model_dir(how, "segmenter", what="control.discriminator_init")[1]


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.control
    out = ctx.stage_dir(NAME)
    spec = ctx.dataset.spec
    vae_config, vae_params = ctx.workdir.vae()
    ldm = ctx.workdir.ldm()
    unet_config, unet_params = ldm["unet"]
    text_config, text_params = ldm["text_encoder"]
    with common.timed("control: class embedding table"):
        table = conditioning.class_table(CLIPTextTransformer(text_config), text_params, ctx.tokenizer, spec.phrases,
                                         cfg.class_prompt, cfg.get("class_table_norm", "none"),
                                         jit=lambda f: common.jit(f, ctx))
    setup = aldm.Setup(ctx.config, spec, ctx.tokenizer, unet_config, vae_config, text_config, table, ctx.mesh)
    state, shardings = setup.create_state(ctx.mesh, unet_params, common.init_rng(ctx, NAME),
                                          initial_discriminator(ctx), background=True)
    base = pipelines.ImageModels(ldm["unet"], ldm["text_encoder"], (vae_config, vae_params))

    def with_generator(ema) -> pipelines.ImageModels:
        """The sampling models with the generator's (EMA) weights: the conditioner and any trained UNet parts."""
        unet = (unet_config, dict(unet_params, **ema["unet"])) if ema["unet"] else None
        return base.with_conditioner((setup.cn_config, ema["controlnet"]), table, unet)

    after_warm_up = common.warm_up("control: sampler", lambda: sample_grid(
        ctx, with_generator(common.zeros_like_abstract(state.abstract["gen"]["ema"]))))
    source = latent_cache_source(ctx, setup, vae_params, text_params) if cfg.get("latent_cache", False) else None
    frozen = setup.frozen(ctx.mesh, unet_params, vae_params, text_params)
    compiled = common.compile_step(setup.step(shardings), state, ctx, cfg.batch_size, frozen,
                                   batch_shapes=setup.batch_shapes(cfg.batch_size, cached=source is not None))

    @after_warm_up
    def pictures(step, state):
        return sample_grid(ctx, with_generator(sharding.host_copy(state["gen"]["ema"])))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, learning_rates=setup.learning_rates(),
                         pictures=pictures, source=source)

    ema = sharding.host_copy(state["gen"]["ema"])
    seg_vars = sharding.host_copy({"params": state["seg"]["params"], "batch_stats": state["seg"]["batch_stats"]})
    if jax.process_index() == 0:
        final = with_generator(ema)
        ctx.workdir.save_conditioner(setup.cn_config, ema["controlnet"], table, final.conditioned_unet)
        ctx.workdir.save_model(NAME, "discriminator", "segmenter", setup.seg_config, seg_vars)
        with common.timed("control: sample grid"):
            viz.save_png(after_warm_up(sample_grid)(ctx, final), os.path.join(out, "samples.png"))
    return {"steps": cfg.num_steps, "lambda_adv": cfg.lambda_adv, "layout_encoding": cfg.layout_encoding,
            "latent_cache": source is not None,
            "discriminator_init": cfg.get("discriminator_init", "scratch"),
            "unet_trainable": list(setup.trainable_unet_names())}


def latent_cache_source(ctx: common.Context, setup: aldm.Setup, vae_params, text_params):
    """The train split with its latent cache (`control.latent_cache`), computed first if this run has none.

    The cache lives in WORKDIR/control/latent_cache/<fingerprint of the dataset, the VAE and the text encoder>;
    each process writes its shard (the workdir is on a filesystem every process sees), process 0 then the
    manifest. A cache of other models or data is never reused, and never deleted.
    """
    manifest = setup.cache_manifest(ctx.dataset, vae_params, text_params, shards=jax.process_count())
    # Named by everything it was computed from: another dataset or other models get a directory of their own.
    name = hashlib.sha256(manifest.to_json().encode()).hexdigest()[:16]
    directory = os.path.join(ctx.stage_dir(NAME), "latent_cache", name)
    if latent_cache.read_manifest(directory) != manifest:
        with common.timed(f"control: latent cache of {manifest.num_examples} examples"):
            aldm.write_latent_cache(setup, ctx.dataset, directory, manifest, vae_params, text_params,
                                    shard=jax.process_index(), compiler_options=common.compiler_options(ctx),
                                    log=logging.info)
        multihost_utils.sync_global_devices("latent cache shards written")
        if jax.process_index() == 0:
            latent_cache.write_manifest(directory, manifest)
        multihost_utils.sync_global_devices("latent cache complete")
    return latent_cache.CachedSource(ctx.dataset.source("train"), directory, manifest)


def sample_grid(ctx: common.Context, models: pipelines.ImageModels, num: int = common.GRID_ROWS) -> np.ndarray:
    """Caption | colour-coded layout | generated | real, for validation examples."""
    spec = ctx.spec
    batch = next(ctx.dataset.eval_batches("validation", num))
    images = pipelines.layout_to_image(models, batch["tokens"], batch["label"], jax.random.PRNGKey(1), ctx.sampling())
    rows = [{"caption": c, "panels": [lab, img, real]}
            for c, lab, img, real in zip(batch["caption"], batch["label"], images, batch["image"])]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)
