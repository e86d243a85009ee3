"""Stage `layout`: text -> semantic layout by masked discrete diffusion.

The network (`sdsup.models.layout`) learns p(class | partly masked map, text)
at `layout.resolution` (e.g. 32x32 for 64x64 scenes); the text states come
from the finished `ldm` stage's text encoder, frozen. Training labels are the
dataset's maps reduced to that resolution by a per-block majority vote.
Caption dropout (the empty prompt) trains the unconditional branch that
classifier-free guidance needs.

With `layout.train_text_encoder` the stage fine-tunes its own copy of that
encoder (the ldm stage's was trained for images, not for where things go)
and leaves it in `WORKDIR/layout/text_encoder/`.

Leaves `WORKDIR/layout/model/` (EMA weights), `samples.png` (caption | ground
truth | most probable map | sampled map) and, via `sdsup.layout_eval`, the
evaluation in DONE.json, `WORKDIR/metrics.json` and `WORKDIR/report.md`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import segmentation, stages, viz
from sdsup.data import pipeline, registry
from sdsup.diffusion import masked
from sdsup.models import io as model_io
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.layout import LayoutConfig, LayoutModel
from sdsup.models import layout as layout_lib
from sdsup.stages import common
from sdsup.stages import ldm as ldm_stage
from sdsup.trainer import sharding

NAME = "layout"
MODES = ("map", "sample")


def model_config(ctx: stages.Context, num_classes: int, text_dim: int) -> LayoutConfig:
    c = ctx.config.layout
    unet = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in c.unet.items()}
    return LayoutConfig.build(num_classes, int(c.resolution), int(c.embed_dim), text_dim,
                              position_embedding=bool(c.get("position_embedding", False)), **unet)


def downsample_factor(ctx: stages.Context) -> int:
    size, res = int(ctx.config.data.image_size), int(ctx.config.layout.resolution)
    if size % res:
        raise ValueError(f"layout.resolution={res} must divide data.image_size={size}")
    return size // res


def load(ctx: stages.Context):
    """(LayoutConfig, params) of the finished stage."""
    _, config, params, _ = model_io.load(os.path.join(ctx.workdir, NAME, "model"))
    return config, params


def make_step(model, text_model, tx, cfg, spec, empty_tokens, pad_id, factor: int, shardings):
    num_classes, ignore = spec.num_classes, spec.ignore_id

    exponent = float(cfg.get("class_balance", 0.0))

    def balance(labels):
        """Per-pixel weights (OASIS class balancing of the batch) ** layout.class_balance; None when 0.

        Sky and ground fill most pixels; without it the all-masked pass's argmax
        never picks a thing whose place the caption gives only roughly.
        """
        if exponent == 0.0:
            return None
        return segmentation.class_balance_weights(labels, num_classes, ignore, num_classes) ** exponent

    def loss_fn(params, batch, rng, text_params):
        rng_drop, rng_mask = jax.random.split(rng)
        labels = masked.downsample_labels(batch["label"], factor, num_classes, ignore)
        drop = jax.random.uniform(rng_drop, (labels.shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty_tokens[None, :], batch["tokens"])
        # The text encoder trains with the layout model (layout.train_text_encoder) or stays frozen.
        text = params.get("text_encoder", text_params)
        context = ldm_stage.encode_text(text_model, text, tokens, pad_id)
        ids, is_target, ratio = masked.corrupt(rng_mask, labels, num_classes, ignore,
                                               float(cfg.get("full_mask_fraction", 0.0)))
        logits = model.apply({"params": params["layout"]}, ids, ratio, context)
        loss = masked.masked_cross_entropy(logits, labels, is_target, balance(labels))
        hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        weight = is_target.astype(jnp.float32)
        acc = jnp.sum(hit * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return loss, {"loss": loss, "masked_accuracy": acc, "mask_ratio": jnp.mean(ratio)}

    def step(state, batch, rng, text_params):
        def lg(params, b, r):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b, r, text_params)
            return metrics, grads

        metrics, grads = common.accumulate_gradients(lg, state["params"], batch, rng, cfg.micro_batches)
        params, opt, metrics["grad_norm"] = common.apply_gradients(tx, state["params"], state["opt"], grads)
        ema = common.ema_update(state["ema"], params, cfg.ema_decay, state["step"] + 1)
        return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))


@stages.register(NAME)
def run(ctx: stages.Context) -> dict:
    cfg = ctx.config.layout
    out = ctx.stage_dir(NAME)
    spec, _ = common.dataset(ctx)
    tok = common.tokenizer(ctx)
    text_config, text_params = ldm_stage.load(ctx)["text_encoder"]
    text_model = CLIPTextTransformer(text_config)
    config = model_config(ctx, spec.num_classes, text_config.hidden_size)
    model = LayoutModel(config)
    factor = downsample_factor(ctx)
    tx, _ = common.optimizer(cfg.optimizer, cfg.num_steps)
    length = ctx.config.text.max_length

    train_text = bool(cfg.get("train_text_encoder", False))
    text_init = lambda: text_model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]

    def init(rng):
        params = {"layout": model.init(rng, *layout_lib.dummy_inputs(config, length))["params"]}
        if train_text:
            params["text_encoder"] = text_init()  # replaced by the ldm stage's weights below
        return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}

    def with_ldm_text_encoder(state, shardings):
        """Starts from the ldm stage's encoder (separate buffers: params and EMA are donated)."""
        for key in ("params", "ema"):
            state[key]["text_encoder"] = jax.tree.map(lambda x, sh: jax.device_put(np.array(x), sh), text_params,
                                                      shardings[key]["text_encoder"])
        return state

    state, shardings = sharding.create_sharded_in_background(
        init, ctx.mesh, jax.random.PRNGKey(ctx.config.seed + 50), finish=with_ldm_text_encoder if train_text else None)
    def sampling_models(ema):
        return {"layout": (config, ema["layout"]), "text_encoder": (text_config, ema.get("text_encoder", text_params))}

    # The grid's samplers (most probable and sampled maps) are the evaluation's too.
    after_warm_up = common.warm_up("layout: samplers", lambda: sample_grid(
        ctx, sampling_models(common.zeros_like_abstract(state.abstract["ema"]))))
    frozen_text = common.place(text_init, text_params, ctx.mesh)
    step = make_step(model, text_model, tx, cfg, spec, jnp.asarray(tok.encode("")), ldm_stage.mask_pad_id(tok),
                     factor, shardings)
    compiled = common.compile_step(step, state, ctx, cfg.batch_size, frozen_text)

    @after_warm_up
    def pictures(step, state):
        return sample_grid(ctx, sampling_models(sharding.host_copy(state["ema"])))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, seed_offset=51, pictures=pictures)
    ema = sharding.host_copy(state["ema"])
    models = sampling_models(ema)
    summary = {"steps": cfg.num_steps, "resolution": config.resolution, "train_text_encoder": train_text}
    if jax.process_index() == 0:
        model_io.save(os.path.join(out, "model"), "layout", config, ema["layout"])
        if train_text:  # the layout model's own copy; the image models keep the ldm stage's
            model_io.save(os.path.join(out, "text_encoder"), "text_encoder", text_config, ema["text_encoder"])
        with common.timed("layout: sample grid"):
            viz.save_png(after_warm_up(sample_grid)(ctx, models), os.path.join(out, "samples.png"))
    if cfg.get("evaluate", True):
        from sdsup import layout_eval

        with common.timed("layout: evaluation"):
            summary.update(after_warm_up(layout_eval.evaluate)(ctx, models))
    return summary


def load_models(ctx: stages.Context) -> dict:
    """{"layout": (config, params), "text_encoder": (config, params)} of the finished stages.

    The text encoder is the layout stage's own fine-tuned copy when it trained one
    (layout.train_text_encoder), else the ldm stage's.
    """
    own = os.path.join(ctx.workdir, NAME, "text_encoder")
    if os.path.exists(os.path.join(own, model_io.CONFIG_FILE)):
        _, text_config, text_params, _ = model_io.load(own)
        return {"layout": load(ctx), "text_encoder": (text_config, text_params)}
    return {"layout": load(ctx), "text_encoder": ldm_stage.load(ctx)["text_encoder"]}


def generate(ctx: stages.Context, models: dict, tokens, rng, mode: str = "sample", steps: Optional[int] = None,
             temperature: Optional[float] = None, guidance: Optional[float] = None, full_size: bool = True):
    """Tokens [B, L] -> class ids [B, S, S] (S = image size, or the model's resolution without `full_size`).

    mode "map": the most probable map (per-pixel argmax of the all-masked
    pass); "sample": confidence-ordered unmasking. Steps, temperature and
    guidance default to `config.layout.sampling`. Guidance mixes the logits
    of the prompt and of the empty prompt: u + g (c - u).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    s = ctx.config.layout.sampling
    steps = int(s.steps if steps is None else steps)
    temperature = float(s.temperature if temperature is None else temperature)
    guidance = float(s.guidance if guidance is None else guidance)
    config, params = models["layout"]
    text_config, text_params = models["text_encoder"]
    # The most probable map is upsampled inside the sampler (from its logits); sampled maps repeat pixels.
    factor = downsample_factor(ctx) if full_size else 1
    in_sampler = factor if mode == "map" else 1
    key = ("layout_sampler", config, text_config, mode, steps, temperature, guidance, in_sampler)
    if key not in ctx.cache:
        ctx.cache[key] = common.jit(_sampler(ctx, config, text_config, mode, steps, temperature, guidance,
                                             in_sampler), ctx)
    tok = common.tokenizer(ctx)
    tokens = jnp.asarray(tokens)
    empty = jnp.broadcast_to(jnp.asarray(tok.encode("")), tokens.shape)
    ids = np.asarray(ctx.cache[key](params, text_params, tokens, empty, rng))
    return masked.upsample_labels(ids, factor // in_sampler)


def _sampler(ctx, config: LayoutConfig, text_config, mode: str, steps: int, temperature: float, guidance: float,
             upsample: int = 1):
    model, text_model = LayoutModel(config), CLIPTextTransformer(text_config)
    pad = ldm_stage.mask_pad_id(common.tokenizer(ctx))
    n = config.num_classes

    def run(params, text_params, tokens, empty, rng):
        b = tokens.shape[0]
        cond = ldm_stage.encode_text(text_model, text_params, tokens, pad)
        both = jnp.concatenate([cond, ldm_stage.encode_text(text_model, text_params, empty, pad)])

        def logits_fn(ids, ratio):
            if guidance == 1.0:
                return model.apply({"params": params}, ids, ratio, cond)
            out = model.apply({"params": params}, jnp.concatenate([ids, ids]), jnp.concatenate([ratio, ratio]), both)
            c, u = jnp.split(out, 2)
            return u + guidance * (c - u)

        shape = (b, config.resolution, config.resolution)
        if mode == "map":
            return masked.most_probable_map(logits_fn, shape, n, upsample, ctx.config.layout.get("map_upsample",
                                                                                                  "nearest"))
        return masked.sample_maps(logits_fn, rng, shape, n, steps, temperature)

    return run


def sample_grid(ctx: stages.Context, models: dict, num: int = common.GRID_ROWS) -> np.ndarray:
    """Validation captions: caption | ground truth | most probable map | sampled map."""
    from sdsup import layout_eval  # here: layout_eval imports this module

    spec, builder = common.dataset(ctx)
    tok = common.tokenizer(ctx)
    # Generated at the evaluation's batch size (one compiled sampler for both), shown for `num` rows.
    batch = next(pipeline.eval_batches(registry.data_source(spec, builder, "validation"), tokenizer=tok,
                                       global_batch_size=max(num, layout_eval.eval_batch_size(ctx))))
    best = generate(ctx, models, batch["tokens"], jax.random.PRNGKey(0), mode="map")
    sampled = generate(ctx, models, batch["tokens"], jax.random.PRNGKey(1), mode="sample")
    rows = [{"caption": c, "panels": [gt, m, s]}
            for c, gt, m, s in list(zip(batch["caption"], batch["label"], best, sampled))[:num]]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)
