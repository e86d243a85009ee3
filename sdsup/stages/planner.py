"""Stage `planner`: text -> object plan, the layout's things decided before its pixels.

The layout model alone draws every pixel of a thing independently: a house
the caption names is a cloud of pixels whose belief at any one place is low,
so sampled maps scatter specks and the most probable map rarely holds a thing
(docs/faithfulness.md). This stage trains a small transformer
(`sdsup.models.planner`) that writes, class by class, each thing's box one
token at a time, from the text states of the layout stage's encoder (or,
with `planner.train_text_encoder`, its own fine-tuned copy of it); training plans are read off the label maps (`sdsup.planning`). It
collects the shape bank from the training maps and saves it with the network.

With the stage done, every text -> layout in the workdir (`Workdir.layout_models`)
draws the plan's things first and lets the layout model fill the stuff
around them (`pipelines.text_to_layout`).

Leaves `WORKDIR/planner/model/` (EMA weights + shape bank), `planner/text_encoder/`
when it fine-tuned one, `samples.png`
(caption | ground truth | planned most probable map | planned sampled map) and
the layout evaluation of the planned maps (keys `planner/...`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import conditioning, model_configs, pipelines, planning, viz
from sdsup.errors import ConfigError
from sdsup.evaluation import layout as layout_evaluation
from sdsup.models import planner as planner_lib
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.planner import PAD, PlannerModel
from sdsup.stages import common
from sdsup.trainer import sharding, update

NAME = "planner"
# Label maps scanned for the shape bank (it stops earlier once every class has its shapes).
BANK_EXAMPLES = 2048


def thing_ids(spec) -> tuple:
    """The class ids of the dataset's thing classes; a ConfigError when it names none."""
    if not spec.thing_classes:
        raise ConfigError(f"the planner stage needs the dataset's thing classes; {spec.name!r} lists none "
                          "(DatasetSpec.thing_classes); remove 'planner' from config.stages")
    return tuple(spec.class_names.index(c) for c in spec.thing_classes)


def min_pixels(config) -> int:
    """Smallest object a plan lists, in pixels of the image: planner.min_object_area of its area, at least 1."""
    size = int(config.data.image_size)
    return max(1, int(round(float(config.planner.min_object_area) * size * size)))


def loss_fn(model: PlannerModel, text_model: CLIPTextTransformer, cfg, prompting: conditioning.Prompting):
    """`(params, batch, rng, text_params) -> (loss, metrics)`: next-token cross-entropy over the plan."""
    empty = jnp.asarray(prompting.empty)

    def loss(params, batch, rng, text_params):
        drop = jax.random.uniform(rng, (batch["tokens"].shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty[None, :], batch["tokens"])
        # The planner's own fine-tuned copy of the text encoder (planner.train_text_encoder), or the frozen one.
        text = params.get("text_encoder", text_params)
        context = conditioning.encode_text(text_model, text, tokens, prompting.pad_id)
        plan = batch["plan"]  # [B, things, length]: each class's sequence is one row, read with its example's text
        b, things, length = plan.shape
        plan = plan.reshape(b * things, length)
        context = jnp.repeat(context, things, axis=0)
        logits = model.apply({"params": params["planner"]}, plan[:, :-1], context)
        target = plan[:, 1:]
        weight = (target != PAD).astype(jnp.float32)  # EOS is a target: the plan must learn where to stop
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        total = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
        acc = jnp.sum(hit * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        boxes = jnp.sum(target >= model.config.first_bin) / planner_lib.TOKENS_PER_BOX
        return total, {"loss": total, "token_accuracy": acc, "objects_per_picture": boxes / b}
    return loss


def run(ctx: common.Context) -> dict:
    cfg = ctx.config.planner
    ctx.workdir.require("layout")
    out = ctx.stage_dir(NAME)
    spec = ctx.dataset.spec
    layout_models = ctx.workdir.layout_models()
    text_config, text_params = layout_models["text_encoder"]
    text_model = CLIPTextTransformer(text_config)
    config = model_configs.planner(ctx.config, spec.num_classes, thing_ids(spec), text_config.hidden_size)
    model = PlannerModel(config)
    smallest = min_pixels(ctx.config)
    length = ctx.config.text.max_length
    size = int(ctx.config.data.image_size)
    tx, _ = update.optimizer(cfg.optimizer, cfg.num_steps)
    train_text = bool(cfg.get("train_text_encoder", False))
    text_init = lambda: text_model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]

    def init(rng):
        params = {"planner": model.init(rng, *planner_lib.dummy_inputs(config, length))["params"]}
        if train_text:
            params["text_encoder"] = text_init()  # replaced by the layout stage's weights below
        return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}

    # The trainable copy starts from the weights of the encoder it copies.
    finish = common.start_from("text_encoder", text_params) if train_text else None
    state, shardings = common.create_state(ctx, NAME, init, finish=finish)
    with common.timed("planner: shape bank"):
        labels = (label for batch in ctx.dataset.eval_batches("train", 64, limit=BANK_EXAMPLES)
                  for label, keep in zip(batch["label"], batch["mask"]) if keep)
        bank = planning.ShapeBank.build(labels, config, smallest)
    frozen_text = sharding.place(text_init, text_params, ctx.mesh)
    loss = loss_fn(model, text_model, cfg, conditioning.Prompting.from_tokenizer(ctx.tokenizer))
    step = update.make_step(loss, tx, shardings, micro_batches=cfg.micro_batches, ema_decay=cfg.ema_decay)
    b = cfg.batch_size
    shapes = {"image": ((b, size, size, 3), jnp.uint8), "label": ((b, size, size), jnp.uint8),
              "tokens": ((b, length), jnp.int32), "plan": ((b, config.num_things, config.length), jnp.int32)}
    compiled = common.compile_step(step, state, ctx, b, frozen_text, batch_shapes=shapes)
    state = common.train(ctx, NAME, cfg, state, shardings, compiled, derive=planning.PlanTokens(config, smallest))

    ema = sharding.host_copy(state["ema"])
    models = dict(layout_models, planner=(config, {"net": ema["planner"], **bank.as_params()}))
    if train_text:
        models["planner_text_encoder"] = (text_config, ema["text_encoder"])
    summary = {"steps": cfg.num_steps, "min_object_pixels": smallest, "train_text_encoder": train_text,
               "bank_shapes": int(np.isfinite(bank.log_aspects).sum())}
    if jax.process_index() == 0:
        ctx.workdir.save_model(NAME, "model", "planner", config, models["planner"][1])
        if train_text:
            ctx.workdir.save_model(NAME, "text_encoder", "text_encoder", text_config, ema["text_encoder"])
        with common.timed("planner: sample grid"):
            viz.save_png(sample_grid(ctx, models), os.path.join(out, "samples.png"))
    if cfg.get("evaluate", True):
        with common.timed("planner: evaluation"):
            summary.update(layout_evaluation.evaluate(ctx.config, ctx.workdir, ctx.dataset, models, ctx.sampling(),
                                                      stage=NAME))
    return summary


def sample_grid(ctx: common.Context, models: dict, num: int = common.GRID_ROWS) -> np.ndarray:
    """Validation captions: caption | ground truth | planned most probable map | planned sampled map."""
    settings = ctx.sampling()
    batch = next(ctx.dataset.eval_batches("validation", max(num, layout_evaluation.eval_batch_size(ctx.config))))
    best = pipelines.text_to_layout(models, batch["tokens"], jax.random.PRNGKey(0), settings,
                                    settings.layout_sampling(mode="map"))
    sampled = pipelines.text_to_layout(models, batch["tokens"], jax.random.PRNGKey(1), settings)
    rows = [{"caption": c, "panels": [gt, m, s]}
            for c, gt, m, s in list(zip(batch["caption"], batch["label"], best, sampled))[:num]]
    return viz.captioned_grid(rows, ctx.spec.class_names, ctx.spec.palette, ctx.spec.ignore_id)
