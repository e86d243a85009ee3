"""Stage `layout`: text -> semantic layout by masked discrete diffusion.

The network (`sdsup.models.layout`) learns p(class | partly masked map, text)
at `layout.resolution` (e.g. 16x16 for 64x64 scenes); the text states come
from the finished `ldm` stage's text encoder. Training labels are the
dataset's maps reduced to that resolution by a per-block majority vote.
Caption dropout (the empty prompt) trains the unconditional branch that
classifier-free guidance needs.

With `layout.train_text_encoder` the stage fine-tunes its own copy of that
encoder (the ldm stage's was trained for images, not for where things go)
and leaves it in `WORKDIR/layout/text_encoder/`.

Leaves `WORKDIR/layout/model/` (EMA weights), `samples.png` (caption | ground
truth | most probable map | sampled map) and, via `sdsup.evaluation.layout`,
the evaluation in DONE.json, `WORKDIR/metrics.json` and `WORKDIR/report.md`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import conditioning, model_configs, pipelines, segmentation, viz
from sdsup.diffusion import masked
from sdsup.evaluation import layout as layout_evaluation
from sdsup.models import layout as layout_lib
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.layout import LayoutModel
from sdsup.stages import common
from sdsup.trainer import sharding, update

NAME = "layout"


def loss_fn(model, text_model, cfg, spec, prompting: conditioning.Prompting, factor: int):
    """`(params, batch, rng, text_params) -> (loss, metrics)`: masked cross-entropy on the reduced map."""
    num_classes, ignore = spec.num_classes, spec.ignore_id
    exponent = float(cfg.get("class_balance", 0.0))
    empty = jnp.asarray(prompting.empty)

    def balance(labels):
        """Per-pixel weights (OASIS class balancing of the batch) ** layout.class_balance; None when 0.

        Sky and ground fill most pixels; without it the all-masked pass's argmax
        never picks a thing whose place the caption gives only roughly.
        """
        if exponent == 0.0:
            return None
        return segmentation.class_balance_weights(labels, num_classes, ignore, num_classes) ** exponent

    def loss(params, batch, rng, text_params):
        rng_drop, rng_mask = jax.random.split(rng)
        labels = masked.downsample_labels(batch["label"], factor, num_classes, ignore)
        drop = jax.random.uniform(rng_drop, (labels.shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty[None, :], batch["tokens"])
        # The text encoder trains with the layout model (layout.train_text_encoder) or stays frozen.
        text = params.get("text_encoder", text_params)
        context = conditioning.encode_text(text_model, text, tokens, prompting.pad_id)
        ids, is_target, ratio = masked.corrupt(rng_mask, labels, num_classes, ignore,
                                               float(cfg.get("full_mask_fraction", 0.0)))
        logits = model.apply({"params": params["layout"]}, ids, ratio, context)
        total = masked.masked_cross_entropy(logits, labels, is_target, balance(labels))
        hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        weight = is_target.astype(jnp.float32)
        acc = jnp.sum(hit * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return total, {"loss": total, "masked_accuracy": acc, "mask_ratio": jnp.mean(ratio)}
    return loss


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.layout
    out = ctx.stage_dir(NAME)
    spec = ctx.dataset.spec
    text_config, text_params = ctx.workdir.ldm()["text_encoder"]
    text_model = CLIPTextTransformer(text_config)
    config = model_configs.layout(ctx.config, spec.num_classes, text_config.hidden_size)
    model = LayoutModel(config)
    factor = model_configs.layout_factor(ctx.config)
    tx, _ = update.optimizer(cfg.optimizer, cfg.num_steps)
    length = ctx.config.text.max_length

    train_text = bool(cfg.get("train_text_encoder", False))
    text_init = lambda: text_model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]

    def init(rng):
        params = {"layout": model.init(rng, *layout_lib.dummy_inputs(config, length))["params"]}
        if train_text:
            params["text_encoder"] = text_init()  # replaced by the ldm stage's weights below
        return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}

    # The trainable copy starts from the weights of the encoder it copies.
    finish = common.start_from("text_encoder", text_params) if train_text else None
    state, shardings = common.create_state(ctx, NAME, init, finish=finish)

    def sampling_models(ema):
        return {"layout": (config, ema["layout"]), "text_encoder": (text_config, ema.get("text_encoder", text_params))}

    # The grid's samplers (most probable and sampled maps) are the evaluation's too.
    after_warm_up = common.warm_up("layout: samplers", lambda: sample_grid(
        ctx, sampling_models(common.zeros_like_abstract(state.abstract["ema"]))))
    frozen_text = sharding.place(text_init, text_params, ctx.mesh)
    loss = loss_fn(model, text_model, cfg, spec, conditioning.Prompting.from_tokenizer(ctx.tokenizer), factor)
    step = update.make_step(loss, tx, shardings, micro_batches=cfg.micro_batches, ema_decay=cfg.ema_decay)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, frozen_text)

    @after_warm_up
    def pictures(step, state):
        return sample_grid(ctx, sampling_models(sharding.host_copy(state["ema"])))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, pictures=pictures)
    ema = sharding.host_copy(state["ema"])
    models = sampling_models(ema)
    summary = {"steps": cfg.num_steps, "resolution": config.resolution, "train_text_encoder": train_text}
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", "layout", config, ema["layout"])
        if train_text:  # the layout model's own copy; the image models keep the ldm stage's
            ctx.workdir.save_model(NAME, "text_encoder", "text_encoder", text_config, ema["text_encoder"])
        with common.timed("layout: sample grid"):
            viz.save_png(after_warm_up(sample_grid)(ctx, models), os.path.join(out, "samples.png"))
    if cfg.get("evaluate", True):
        with common.timed("layout: evaluation"):
            summary.update(after_warm_up(layout_evaluation.evaluate)(ctx.config, ctx.workdir, ctx.dataset, models,
                                                                      ctx.sampling()))
    return summary


def sample_grid(ctx: common.Context, models: dict, num: int = common.GRID_ROWS) -> np.ndarray:
    """Validation captions: caption | ground truth | most probable map | sampled map."""
    spec, settings = ctx.spec, ctx.sampling()
    # Generated at the evaluation's batch size (one compiled sampler for both), shown for `num` rows.
    batch = next(ctx.dataset.eval_batches("validation", max(num, layout_evaluation.eval_batch_size(ctx.config))))
    best = pipelines.text_to_layout(models, batch["tokens"], jax.random.PRNGKey(0), settings,
                                    settings.layout_sampling(mode="map"))
    sampled = pipelines.text_to_layout(models, batch["tokens"], jax.random.PRNGKey(1), settings)
    rows = [{"caption": c, "panels": [gt, m, s]}
            for c, gt, m, s in list(zip(batch["caption"], batch["label"], best, sampled))[:num]]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)
