"""Stage `control`: the segmentation conditioner with adversarial supervision (ALDM).

The UNet, VAE and text encoder are frozen; the conditioner (ControlNet) is
the generator and a UperNet segmenter with N+1 classes (the last = "fake")
is the discriminator. Everything happens in ONE jitted, sharded step:

  plain steps       noise loss of the conditioned UNet at uniform timesteps;
  every n_lazy-th   (lax.cond, no recompiles) each example draws k ~ U{K..G-1}
                    on the G-step DDIM grid; ONE prediction at t_k WITH
                    gradient gives both the noise loss and x0_hat (as in
                    ALDM's reference code), x0_hat is decoded with the frozen
                    VAE decoder (gradients flow through it, rematerialised),
                    K more DDIM steps are unrolled WITHOUT gradient (each
                    `unroll_stride` grid steps long, stopping at the grid's
                    last step; ALDM: 1), and every decoded x0 is scored with
                    the segmenter:
                      l_i(p) = class-balanced CE(D(decode(x0_i)), y)(p)
                      L_adv  = mean_p l_0(p) * sg(mean_i l_i(p) / l_0(p))
                    (the value averages the K+1 steps, the gradient flows
                    through step 0 only); and update the segmenter:
                      L_D = balanced CE(D(x_real), y) + lambda_fake CE(D(sg(x_fake)), fake)
                    with x_real the VAE reconstruction of the real image.
  generator loss    L_G = L_noise + lambda_adv * r(step) * L_adv, r ramping 0 -> 1.
  micro-batches     both branches accumulate over config.micro_batches (the
                    segmenter's BatchNorm statistics run through them in order).

On lazy steps `loss/noise` is measured at t_k (the noisier part of the
grid), on plain steps at uniform t; `adv/lazy_step` tells them apart.

With `lambda_adv = 0` this is the plain-conditioner baseline (the lazy
branch still updates the segmenter, which then only serves as a monitor).
Leaves `WORKDIR/control/controlnet/` (EMA weights), `.../discriminator/`,
`.../class_table.npy` (for class-embedding layouts) and `samples.png`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import parallel, segmentation, stages, viz
from sdsup.data import pipeline, registry
from sdsup.errors import ConfigError
from sdsup.diffusion import samplers
from sdsup.diffusion import schedule as schedule_lib
from sdsup.models import controlnet as controlnet_lib
from sdsup.models import io as model_io
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.controlnet import ControlNetConfig, ControlNetModel
from sdsup.models.segmenter import SegmenterConfig, UperNetSegmenter
from sdsup.models.unet import UNet2DConditionModel
from sdsup.models.vae import AutoencoderKL
from sdsup.stages import common
from sdsup.stages import ldm as ldm_stage
from sdsup.stages import vae as vae_stage
from sdsup.trainer import sharding

NAME = "control"
ADV_METRICS = ("loss/adv", "loss/adv_step0", "loss/seg_real", "loss/seg_fake", "seg/acc_real", "seg/acc_fake")


def class_table(ctx, text_model, text_params) -> np.ndarray:
    """[N, D]: the text encoder's pooled embedding of each class name (ALDM's layout encoding).

    With `control.class_table_norm = "standardize"` the vectors are centred
    over the classes and each scaled to norm sqrt(D) (entries of unit mean
    square, every class equally strong). Pooled embeddings of short
    prompts share most of their direction (a small text encoder trained on
    the scenes gives mean pairwise cosine ~0.94), so the raw vectors barely
    tell the classes apart; standardised ones do. "none" keeps ALDM's raw
    vectors. The table written with the conditioner is the one used.
    """
    spec, _ = common.dataset(ctx)
    tok = common.tokenizer(ctx)
    template = ctx.config.control.class_prompt
    tokens = jnp.asarray(tok.encode_batch([template.format(phrase) for phrase in spec.phrases]))
    pad = ldm_stage.mask_pad_id(tok)

    def pooled(params, tokens):
        mask = None if pad is None else tokens != pad
        return text_model.apply({"params": params}, tokens, attention_mask=mask).pooled_output

    table = np.asarray(common.jit(pooled, ctx)(text_params, tokens), np.float32)
    return normalize_table(table, ctx.config.control.get("class_table_norm", "none"))


def normalize_table(table: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return table
    if how == "standardize":
        centred = table - table.mean(0, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return (centred * np.sqrt(table.shape[1]) / np.maximum(norms, 1e-6)).astype(np.float32)
    raise ValueError(f"control.class_table_norm must be 'none' or 'standardize', got {how!r}")


def controlnet_config(ctx, unet_config, table_dim: int) -> ControlNetConfig:
    c = ctx.config.control
    vae_factor = vae_stage.model_config(ctx).downsample_factor
    hint = tuple(c.hint_channels) if c.hint_channels else None
    dim = table_dim if c.layout_encoding == "class_embedding" else None
    return ControlNetConfig.from_unet(unet_config, c.layout_encoding, dim, hint, vae_scale_factor=vae_factor)


def discriminator_config(ctx, num_classes: int) -> SegmenterConfig:
    m = ctx.config.control.discriminator
    return SegmenterConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in m.items()},
                           num_classes=num_classes + 1)


def frozen_model_inits(ctx, unet_config, vae_config, text_config) -> dict:
    """{"unet", "vae", "text_encoder"}: functions returning each model's boxed params (for eval_shape)."""
    size, length, dim = int(ctx.config.data.image_size), ctx.config.text.max_length, text_config.hidden_size
    latent = size // vae_config.downsample_factor
    return {
        "unet": lambda: UNet2DConditionModel(unet_config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, latent, latent, unet_config.in_channels)),
            jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, dim)))["params"],
        "vae": lambda: AutoencoderKL(vae_config).init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"],
        "text_encoder": lambda: CLIPTextTransformer(text_config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"],
    }


def ramp(step, start: int, end: int):
    """r(step): 0 before `start`, linear to 1 at `end`, then 1."""
    if end <= start:
        return jnp.where(step >= start, 1.0, 0.0)
    return jnp.clip((step - start) / (end - start), 0.0, 1.0)


def unrolled_index(k, i, stride: int):
    """Grid index of the (i+1)-th unrolled DDIM step from index k, `stride` grid steps per step.

    k >= K > i, so with stride 1 (ALDM) this never leaves the grid; longer
    strides stop at its last step (index 0), where a further DDIM step changes
    nothing and that estimate counts again.
    """
    return jnp.maximum(k - (i + 1) * stride, 0)


def make_step(*, unet, controlnet, vae, seg, text_model, gen_tx, seg_tx, cfg, schedule, spec, hint_fn,
              empty_tokens, pad_id, shardings, mesh=None):
    num_classes, ignore = spec.num_classes, spec.ignore_id

    def on_batch_axes(tree):
        """Keeps activations split over the batch axes inside micro-batches and the unrolled sampler.

        With FSDP-sharded weights and nothing said about activations, the SPMD
        partitioner is free to replicate a micro-batch's 512x512 decoder and
        segmenter activations on every fsdp device instead of gathering
        weights; this pins them to the batch axes (bench/bench_scale.py
        measures the memory). Arrays whose batch does not divide over the
        axes are left to the partitioner.
        """
        if mesh is None:
            return tree
        divisor = parallel.batch_divisor(mesh)

        def one(x):
            if x.ndim == 0 or x.shape[0] % divisor:
                return x
            return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh, x.ndim))
        return jax.tree.map(one, tree)
    fake = num_classes
    grid = samplers.ddim_grid(schedule.num_train_timesteps, cfg.grid_steps)[::-1]  # ascending
    unroll = int(cfg.unroll_steps)
    if not 0 <= unroll < cfg.grid_steps:
        raise ValueError(f"control.unroll_steps={unroll} must be in [0, grid_steps={cfg.grid_steps})")
    # Grid steps per unrolled step (validated with the config): K steps of stride s look s*K steps
    # ahead at the cost of K.
    stride = int(cfg.get("unroll_stride", 1))

    def predict(gen_params, frozen, z, t, context, hint):
        down, mid = controlnet.apply({"params": gen_params["controlnet"]}, z, t, context, hint,
                                     conditioning_scale=cfg.conditioning_scale)
        # The UNet's trainable parts (control.unet_trainable) replace their frozen copies.
        unet_params = dict(frozen["unet"], **gen_params["unet"])
        return unet.apply({"params": unet_params}, z, t, context, down, mid).astype(jnp.float32)

    @jax.checkpoint  # keep only the latents; the decoder's activations are recomputed in backward
    def decode(vae_params, z):
        x = vae.apply({"params": vae_params}, vae.unscale_latents(z), method=vae.decode)
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def seg_apply(seg_vars, x):
        logits, updates = seg.apply(seg_vars, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def noise_loss_and_grad(gen_params, micro, rng, frozen):
        """Plain steps: the noise loss at uniform timesteps."""
        rng_t, rng_n = jax.random.split(rng)
        z0, context, hint = micro["z0"], micro["context"], micro["hint"]
        t = jax.random.randint(rng_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)

        def loss_fn(p):
            pred = predict(p, frozen, schedule_lib.add_noise(schedule, z0, noise, t), t, context, hint)
            return jnp.mean(jnp.square(pred - schedule_lib.training_target(schedule, z0, noise, t)))

        loss, grads = jax.value_and_grad(loss_fn)(gen_params)
        return {"loss/noise": loss}, grads

    def generator_loss(gen_params, seg_vars, frozen, mb, adv_weight, rng):
        """Lazy steps: L_noise + adv_weight * L_adv from ONE prediction at t_k (as ALDM's code).

        Each example draws its grid index k ~ U{K..G-1}; the noise loss and
        step 0 of the unrolling share that prediction, so a lazy step costs
        one forward/backward of the conditioned UNet plus the K unrolled
        forwards. Returns (loss, (x0_hat images without gradient, metrics)).
        """
        z0, context, hint, labels, weights = mb["z0"], mb["context"], mb["hint"], mb["labels"], mb["weights"]
        rng_k, rng_n = jax.random.split(rng)
        k = jax.random.randint(rng_k, (z0.shape[0],), unroll, cfg.grid_steps)
        t_k = grid[k]
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)
        z_t = schedule_lib.add_noise(schedule, z0, noise, t_k)

        def pixel_loss(img):
            logits, _ = seg_apply(seg_vars, img)
            ce, _ = segmentation.pixel_cross_entropy(logits, labels, ignore)
            return weights * ce

        out0 = predict(gen_params, frozen, z_t, t_k, context, hint)
        noise_loss = jnp.mean(jnp.square(out0 - schedule_lib.training_target(schedule, z0, noise, t_k)))
        img0 = on_batch_axes(decode(frozen["vae"], schedule_lib.x0_from_prediction(schedule, z_t, out0, t_k)))
        l0 = pixel_loss(img0)

        def body(carry, i):
            z, out, t = carry
            t_prev = grid[unrolled_index(k, i, stride)]
            z = samplers.ddim_step(schedule, z, out, t, t_prev)
            out = predict(jax.lax.stop_gradient(gen_params), frozen, z, t_prev, context, hint)
            li = pixel_loss(on_batch_axes(decode(frozen["vae"], schedule_lib.x0_from_prediction(schedule, z, out,
                                                                                              t_prev))))
            return (z, out, t_prev), li

        if unroll:
            _, ls = jax.lax.scan(body, jax.lax.stop_gradient((z_t, out0, t_k)), jnp.arange(unroll))
            l_mean = (jax.lax.stop_gradient(l0) + jnp.sum(ls, 0)) / (unroll + 1)
        else:
            l_mean = jax.lax.stop_gradient(l0)
        # Value = the mean over the K+1 steps; gradient = that of step 0, rescaled.
        ratio = jax.lax.stop_gradient(l_mean / jnp.maximum(l0, 1e-8))
        adv = jnp.mean(l0 * ratio)
        metrics = {"loss/noise": noise_loss, "loss/adv": adv, "loss/adv_step0": jnp.mean(l0)}
        return noise_loss + adv_weight * adv, (jax.lax.stop_gradient(img0), metrics)

    def discriminator_loss(seg_params, batch_stats, x_real, x_fake, labels, weights):
        logits_real, stats = seg_apply({"params": seg_params, "batch_stats": batch_stats}, x_real)
        ce_real, valid = segmentation.pixel_cross_entropy(logits_real, labels, ignore)
        loss_real = jnp.mean(weights * ce_real)
        logits_fake, stats = seg_apply({"params": seg_params, "batch_stats": stats}, x_fake)
        ce_fake, _ = segmentation.pixel_cross_entropy(logits_fake, jnp.full(labels.shape, fake, jnp.int32), -1)
        loss_fake = jnp.mean(ce_fake)
        loss = loss_real + cfg.lambda_fake * loss_fake
        acc_real = segmentation.masked_mean((jnp.argmax(logits_real, -1) == labels).astype(jnp.float32), valid)
        acc_fake = jnp.mean((jnp.argmax(logits_fake, -1) == fake).astype(jnp.float32))
        return loss, (stats, {"loss/seg_real": loss_real, "loss/seg_fake": loss_fake,
                              "seg/acc_real": acc_real, "seg/acc_fake": acc_fake})

    def step(state, batch, rng, frozen):
        # The VAE runs at image resolution: gather its weights (83M) rather than its activations.
        frozen = dict(frozen, vae=sharding.gathered(frozen["vae"], mesh))
        rng_z, rng_drop, rng_noise, rng_adv = jax.random.split(rng, 4)
        step_no = state["step"]
        x = common.images_to_float(batch["image"])
        labels = batch["label"].astype(jnp.int32)
        posterior = vae.apply({"params": frozen["vae"]}, x, method=vae.encode)
        z0 = jax.lax.stop_gradient(vae.scale_latents(posterior.sample(rng_z)))
        drop = jax.random.uniform(rng_drop, (x.shape[0], 1)) < cfg.caption_dropout
        tokens = jnp.where(drop, empty_tokens[None, :], batch["tokens"])
        context = jax.lax.stop_gradient(ldm_stage.encode_text(text_model, frozen["text_encoder"], tokens, pad_id))
        hint = hint_fn(labels, frozen)
        gen_params = state["gen"]["params"]
        # lambda_adv is an input, not a constant: the plain-conditioner baseline (0) and ALDM run one program.
        adv_weight = frozen["lambda_adv"] * ramp(step_no, cfg.ramp_start, cfg.ramp_end)
        seg_state = state["seg"]

        def lazy_branch(_):
            # Like the VAE, the segmenter runs at image resolution: its weights are used gathered
            # (here, inside the lazy branch, so that plain steps do not gather them).
            seg_params = sharding.gathered(seg_state["params"], mesh)

            def lazy_micro(batch_stats, mb, rng):
                """Generator gradients, segmenter gradients and metrics of one micro-batch."""
                mb = on_batch_axes(mb)
                seg_vars = {"params": seg_params, "batch_stats": batch_stats}
                (_, (x_fake, gen_metrics)), gen_grads = jax.value_and_grad(generator_loss, has_aux=True)(
                    gen_params, seg_vars, frozen, mb, adv_weight, rng)
                x_fake = on_batch_axes(x_fake)
                x_real = on_batch_axes(decode(frozen["vae"], mb["z_real"]))
                (_, (stats, seg_metrics)), seg_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
                    seg_params, batch_stats, x_real, x_fake, mb["labels"], mb["weights"])
                return stats, (dict(gen_metrics, **seg_metrics), gen_grads, seg_grads)

            # Class balancing from the whole batch's frequencies, as ALDM does per batch.
            weights = segmentation.class_balance_weights(labels, num_classes, ignore, num_classes + 1)
            lazy_batch = {"z0": z0, "context": context, "hint": hint, "labels": labels, "weights": weights,
                          "z_real": vae.scale_latents(posterior.mode())}
            stats, (metrics, gen_grads, seg_grads) = common.scan_micro_batches(
                lazy_micro, seg_state["batch_stats"], lazy_batch, rng_adv, cfg.micro_batches)
            updated, opt, _ = common.apply_gradients(seg_tx, seg_state["params"], seg_state["opt"], seg_grads)
            new_seg = {"params": updated, "batch_stats": stats, "opt": opt}
            # Before seg_start the segmenter's update is computed but not applied.
            active = step_no >= cfg.seg_start
            new_seg = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_seg, seg_state)
            return gen_grads, new_seg, metrics["loss/noise"], {k: metrics[k] for k in ADV_METRICS}

        def plain_branch(_):
            metrics, grads = common.accumulate_gradients(
                lambda p, mb, r: noise_loss_and_grad(p, mb, r, frozen), gen_params,
                {"z0": z0, "context": context, "hint": hint}, rng_noise, cfg.micro_batches)
            return grads, seg_state, metrics["loss/noise"], state["adv_metrics"]

        lazy = (step_no % cfg.n_lazy) == 0
        grads, new_seg, noise_loss, adv_metrics = jax.lax.cond(lazy, lazy_branch, plain_branch, None)
        new_params, gen_opt, grad_norm = common.apply_gradients(gen_tx, gen_params, state["gen"]["opt"], grads)
        ema = common.ema_update(state["gen"]["ema"], new_params, cfg.ema_decay, step_no + 1)
        metrics = dict(adv_metrics)
        metrics["loss/noise"] = noise_loss
        metrics["loss"] = noise_loss + adv_weight * metrics["loss/adv"]
        metrics["adv/weight"] = adv_weight
        metrics["adv/lazy_step"] = lazy.astype(jnp.float32)
        metrics["grad_norm"] = grad_norm
        new_state = {"gen": {"params": new_params, "opt": gen_opt, "ema": ema}, "seg": new_seg,
                     "adv_metrics": adv_metrics, "step": step_no + 1}
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))


class Setup:
    """Everything the control step needs, from model configs and weights (no workdir).

    The stage builds it from the finished vae/ldm stages; benchmarks and
    tests build it from random weights.
    """

    def __init__(self, ctx: stages.Context, spec, tok, unet_config, vae_config, text_config, table: np.ndarray):
        cfg = ctx.config.control
        self.ctx, self.cfg, self.spec, self.tok, self.table = ctx, cfg, spec, tok, np.asarray(table, np.float32)
        self.size = int(ctx.config.data.image_size)
        self.latent = self.size // vae_config.downsample_factor
        self.schedule = ldm_stage.noise_schedule(ctx)
        self.unet, self.unet_config = UNet2DConditionModel(unet_config), unet_config
        self.vae = AutoencoderKL(vae_config)
        self.text_model, self.text_config = CLIPTextTransformer(text_config), text_config
        self.cn_config = controlnet_config(ctx, unet_config, self.table.shape[1])
        self.controlnet = ControlNetModel(self.cn_config)
        self.seg_config = discriminator_config(ctx, spec.num_classes)
        # Compute dtype only: parameters, BatchNorm statistics and the logits stay float32.
        self.seg = UperNetSegmenter(self.seg_config, remat=bool(cfg.get("remat_discriminator", False)),
                                    dtype=jnp.dtype(cfg.get("discriminator_dtype", "float32")))
        self.gen_tx, self.gen_schedule = common.optimizer(cfg.optimizer, cfg.num_steps)
        # The segmenter updates on lazy steps from seg_start on: its schedule
        # (e.g. ALDM's one-cycle) spans that many updates, not num_steps.
        self.seg_tx, self.seg_schedule = common.optimizer(cfg.seg_optimizer, self.segmenter_updates(cfg.num_steps))

    def segmenter_updates(self, num_steps: int) -> int:
        """How many segmenter updates the first `num_steps` steps make."""
        n, first = self.cfg.n_lazy, -(-self.cfg.seg_start // self.cfg.n_lazy)
        return max(0, -(-num_steps // n) - first)

    def learning_rates(self) -> dict:
        """Metric name -> (step index -> the learning rate its optimiser last used)."""
        n = self.cfg.n_lazy
        return {"lr": self.gen_schedule,
                "lr/seg": lambda step: self.seg_schedule(max(0, self.segmenter_updates(step // n * n + 1) - 1))}

    def hint_fn(self, labels, frozen):
        return controlnet_lib.layout_hint(labels, self.cn_config, palette=jnp.asarray(self.spec.palette_array),
                                          table=frozen["class_table"], ignore_id=self.spec.ignore_id)

    def trainable_unet_names(self) -> tuple:
        """Top-level UNet parameter names the generator trains besides the conditioner.

        control.unet_trainable: "none" (ALDM's default, sd_locked) or "decoder"
        (ControlNet's sd_locked=False: the up blocks and the output layers).
        """
        what = self.cfg.get("unet_trainable", "none")
        if what == "none":
            return ()
        if what == "decoder":
            n = len(self.unet_config.block_out_channels)
            return tuple(f"up_blocks_{i}" for i in range(n)) + ("conv_norm_out", "conv_out")
        raise ValueError(f"control.unet_trainable must be 'none' or 'decoder', got {what!r}")

    def init(self, rng):
        """The boxed train state: generator = conditioner (+ trainable UNet parts), AdamW, EMA; segmenter; counters."""
        r1, r2 = jax.random.split(rng)
        gen = {"controlnet": self.controlnet.init(r1, *controlnet_lib.dummy_inputs(self.cn_config, 1, self.latent))
               ["params"], "unet": {}}
        names = self.trainable_unet_names()
        if names:
            unet = self.frozen_inits()["unet"]()
            gen["unet"] = {k: unet[k] for k in names}
        seg_vars = self.seg.init(r2, jnp.zeros((2, self.size, self.size, 3)), train=False)
        return {"gen": {"params": gen, "opt": self.gen_tx.init(gen), "ema": gen},
                "seg": {"params": seg_vars["params"], "batch_stats": seg_vars["batch_stats"],
                        "opt": self.seg_tx.init(seg_vars["params"])},
                "adv_metrics": {k: jnp.zeros((), jnp.float32) for k in ADV_METRICS},
                "step": jnp.zeros((), jnp.int32)}

    def frozen_inits(self):
        """Boxed-parameter initialisers of the frozen models (for their shardings)."""
        return frozen_model_inits(self.ctx, self.unet_config, self.vae.config, self.text_config)

    def create_state(self, mesh, unet_params, seed: int, discriminator=None, background: bool = False):
        """(state, shardings) on `mesh`, the conditioner's encoder copied from the UNet.

        `discriminator`: pretrained segmenter variables {params, batch_stats}
        to start from (None: the random initialisation). With `background`
        the state is a `sharding.PendingState` (see
        `sharding.create_sharded_in_background`); a discriminator of the wrong
        shape is reported at once either way.
        """

        def finish(state, shardings):
            if discriminator is not None:
                for key in ("params", "batch_stats"):
                    state["seg"][key] = jax.device_put(jax.tree.map(np.array, discriminator[key]),
                                                       shardings["seg"][key])
            gen = {"controlnet": controlnet_lib.controlnet_params_from_unet(
                       unet_params, jax.device_get(state["gen"]["params"]["controlnet"]), self.cn_config),
                   "unet": {k: unet_params[k] for k in self.trainable_unet_names()}}
            # Separate copies: on CPU, device_put may alias host memory, and params
            # and EMA are donated to the step as two different buffers.
            state["gen"]["params"] = jax.device_put(jax.tree.map(np.array, gen), shardings["gen"]["params"])
            state["gen"]["ema"] = jax.device_put(jax.tree.map(np.array, gen), shardings["gen"]["ema"])
            return state

        pending, shardings = sharding.create_sharded_in_background(self.init, mesh, jax.random.PRNGKey(seed),
                                                                   finish=finish)
        if discriminator is not None:
            for key in ("params", "batch_stats"):
                _check_same_shapes(pending.abstract["seg"][key], discriminator[key], f"discriminator {key}")
        return (pending if background else pending.result()), shardings

    def frozen(self, mesh, unet_params, vae_params, text_params):
        """The step's non-trained inputs on `mesh`: frozen weights, the class table, lambda_adv."""
        inits = self.frozen_inits()
        return {
            "unet": common.place(inits["unet"], unet_params, mesh),
            "vae": common.place(inits["vae"], vae_params, mesh),
            "text_encoder": common.place(inits["text_encoder"], text_params, mesh),
            "class_table": jax.device_put(jnp.asarray(self.table), sharding.replicated(mesh)),
            "lambda_adv": jax.device_put(jnp.float32(self.cfg.lambda_adv), sharding.replicated(mesh)),
        }

    def abstract_frozen(self, mesh):
        """`frozen`'s shapes, dtypes and shardings, with no weights: lowering the step at any scale."""
        abstract = {name: sharding.sharded_abstract(jax.eval_shape(init), mesh)
                    for name, init in self.frozen_inits().items()}
        replicated = sharding.replicated(mesh)
        abstract["class_table"] = jax.ShapeDtypeStruct(self.table.shape, jnp.float32, sharding=replicated)
        abstract["lambda_adv"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        return abstract

    def step(self, shardings, cfg=None):
        """The jitted (not yet compiled) step; `cfg` overrides config.control (benchmarks)."""
        return make_step(unet=self.unet, controlnet=self.controlnet, vae=self.vae, seg=self.seg,
                         text_model=self.text_model, gen_tx=self.gen_tx, seg_tx=self.seg_tx, cfg=cfg or self.cfg,
                         schedule=self.schedule, spec=self.spec, hint_fn=self.hint_fn,
                         empty_tokens=jnp.asarray(self.tok.encode("")), pad_id=ldm_stage.mask_pad_id(self.tok),
                         shardings=shardings, mesh=self.ctx.mesh)


def _check_same_shapes(expected, given, what: str) -> None:
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), given)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ConfigError(f"{what} do not match config.control.discriminator with N+1 classes "
                          "(a segmenter of another architecture or class count)")


def initial_discriminator(ctx: stages.Context):
    """The segmenter variables the control stage starts from (control.discriminator_init), or None.

    "scratch": random; "stage": the `discriminator` stage's pretrained
    network (ALDM starts from a trained segmenter); anything else: a
    directory holding an sdsup segmenter (e.g. an imported UperNet) with
    config.control.discriminator's architecture and N+1 outputs.
    """
    how = ctx.config.control.get("discriminator_init", "scratch")
    if how == "scratch":
        return None
    if how == "stage":
        from sdsup.stages import discriminator as discriminator_stage
        return discriminator_stage.load(ctx)[1]
    if not os.path.exists(os.path.join(how, model_io.CONFIG_FILE)):
        raise ConfigError(f"control.discriminator_init={how!r}: not 'scratch', 'stage' or a segmenter "
                          f"directory (no {model_io.CONFIG_FILE} there)")
    return model_io.load(how)[2]


@stages.register(NAME)
def run(ctx: stages.Context) -> dict:
    cfg = ctx.config.control
    out = ctx.stage_dir(NAME)
    spec, _ = common.dataset(ctx)
    tok = common.tokenizer(ctx)
    vae_config, vae_params = vae_stage.load(ctx)
    models = ldm_stage.load(ctx)
    unet_config, unet_params = models["unet"]
    text_config, text_params = models["text_encoder"]
    with common.timed("control: class embedding table"):
        table = class_table(ctx, CLIPTextTransformer(text_config), text_params)
    setup = Setup(ctx, spec, tok, unet_config, vae_config, text_config, table)
    state, shardings = setup.create_state(ctx.mesh, unet_params, ctx.config.seed + 40, initial_discriminator(ctx),
                                          background=True)
    host_models = {"unet": models["unet"], "text_encoder": models["text_encoder"], "vae": (vae_config, vae_params),
                   "table": table}

    def with_generator(ema):
        """The sampling models with the generator's (EMA) weights: the conditioner and any trained UNet parts."""
        unet = (unet_config, dict(unet_params, **ema["unet"]))
        return dict(host_models, unet=unet, controlnet=(setup.cn_config, ema["controlnet"]))

    after_warm_up = common.warm_up("control: sampler", lambda: sample_grid(
        ctx, with_generator(common.zeros_like_abstract(state.abstract["gen"]["ema"]))))
    frozen = setup.frozen(ctx.mesh, unet_params, vae_params, text_params)
    compiled = common.compile_step(setup.step(shardings), state, ctx, cfg.batch_size, frozen)

    @after_warm_up
    def pictures(step, state):
        return sample_grid(ctx, with_generator(sharding.host_copy(state["gen"]["ema"])))

    state = common.train(ctx, NAME, cfg, state, shardings, compiled, seed_offset=41, pictures=pictures,
                         learning_rates=setup.learning_rates())

    ema = sharding.host_copy(state["gen"]["ema"])
    seg_vars = sharding.host_copy({"params": state["seg"]["params"], "batch_stats": state["seg"]["batch_stats"]})
    if jax.process_index() == 0:
        final = with_generator(ema)
        model_io.save(os.path.join(out, "controlnet"), "controlnet", setup.cn_config, ema["controlnet"])
        if ema["unet"]:  # the UNet with its fine-tuned parts; sampling with this conditioner uses it
            model_io.save(os.path.join(out, "unet"), "unet", unet_config, final["unet"][1])
        model_io.save(os.path.join(out, "discriminator"), "segmenter", setup.seg_config, seg_vars)
        np.save(os.path.join(out, "class_table.npy"), table)
        with common.timed("control: sample grid"):
            viz.save_png(after_warm_up(sample_grid)(ctx, final), os.path.join(out, "samples.png"))
    return {"steps": cfg.num_steps, "lambda_adv": cfg.lambda_adv, "layout_encoding": cfg.layout_encoding,
            "discriminator_init": cfg.get("discriminator_init", "scratch"),
            "unet_trainable": list(setup.trainable_unet_names())}


def load(ctx: stages.Context, directory: str = None):
    """(ControlNetConfig, params, class table, UNet (config, params) or None) of a finished control stage.

    The UNet is there when the stage fine-tuned parts of it (control.unet_trainable);
    images with this conditioner must use it instead of the ldm stage's.
    """
    directory = directory or os.path.join(ctx.workdir, NAME)
    _, config, params, _ = model_io.load(os.path.join(directory, "controlnet"))
    unet = None
    if os.path.exists(os.path.join(directory, "unet", model_io.CONFIG_FILE)):
        _, unet_config, unet_params, _ = model_io.load(os.path.join(directory, "unet"))
        unet = (unet_config, unet_params)
    return config, params, np.load(os.path.join(directory, "class_table.npy")), unet


def load_models(ctx, directory: str = None) -> dict:
    """The finished stages' models for sampling: {name: (config, params)} and the class table."""
    vae_config, vae_params = vae_stage.load(ctx)
    cn_config, cn_params, table, unet = load(ctx, directory)
    models = dict(ldm_stage.load(ctx), vae=(vae_config, vae_params), controlnet=(cn_config, cn_params), table=table)
    if unet is not None:
        models["unet"] = unet
    return models


def generate(ctx, tokens, labels, rng, guidance=None, models=None):
    """Tokens [B, L] + label maps [B, H, W] -> uint8 images.

    `models` as `load_models` returns them (in memory, e.g. during training);
    by default the finished stages' weights.
    """
    spec = registry.get(ctx.config.data.name)
    models = models or load_models(ctx)
    (cn_config, cn_params), table = models["controlnet"], models["table"]
    unet = UNet2DConditionModel(models["unet"][0])
    text_model = CLIPTextTransformer(models["text_encoder"][0])
    controlnet = ControlNetModel(cn_config)
    hint = controlnet_lib.layout_hint(jnp.asarray(labels, jnp.int32), cn_config,
                                      palette=jnp.asarray(spec.palette_array), table=jnp.asarray(table),
                                      ignore_id=spec.ignore_id)
    params = {"unet": models["unet"][1], "text_encoder": models["text_encoder"][1]}
    vae_config, vae_params = models["vae"]
    return ldm_stage.generate(ctx, unet, text_model, AutoencoderKL(vae_config), params, vae_params,
                              ldm_stage.noise_schedule(ctx), jnp.asarray(tokens), rng, guidance=guidance,
                              controlnet=controlnet, controlnet_params=cn_params, hint=hint)


def sample_grid(ctx, models=None, num: int = common.GRID_ROWS) -> np.ndarray:
    """Caption | colour-coded layout | generated | real, for validation examples."""
    spec, builder = common.dataset(ctx)
    batch = next(pipeline.eval_batches(registry.data_source(spec, builder, "validation"),
                                       tokenizer=common.tokenizer(ctx), global_batch_size=num))
    images = generate(ctx, batch["tokens"], batch["label"], jax.random.PRNGKey(1), models=models)
    rows = [{"caption": c, "panels": [lab, img, real]}
            for c, lab, img, real in zip(batch["caption"], batch["label"], images, batch["image"])]
    return viz.captioned_grid(rows, spec.class_names, spec.palette, spec.ignore_id)


def random_setup(ctx: stages.Context, seed: int = 0):
    """(Setup, {"unet", "vae", "text_encoder"} random host weights) sized by the config.

    For benchmarks and tests of the step itself: no workdir, no training.
    """
    import flax.linen as nn

    spec = registry.get(ctx.config.data.name)
    tok = common.tokenizer(ctx)
    unet_config, text_config = ldm_stage.model_configs(ctx)
    table = np.random.default_rng(seed).normal(size=(spec.num_classes, text_config.hidden_size)).astype(np.float32)
    setup = Setup(ctx, spec, tok, unet_config, vae_stage.model_config(ctx), text_config, table)
    params = {name: model_io.random_like(nn.meta.unbox(jax.eval_shape(init)), seed + i)
              for i, (name, init) in enumerate(sorted(setup.frozen_inits().items()))}
    return setup, params
