"""ALDM: adversarial supervision of a layout conditioner by a segmenter, as ONE jitted, sharded step.

Li, Keuper, Zhang, Khoreva, "Adversarial Supervision Makes Layout-to-Image
Diffusion Models Thrive", ICLR 2024. The UNet, the VAE and the text encoder
are frozen; the conditioner (a ControlNet; optionally UNet parts, see
`Setup.trainable_unet_names`) is the generator, and a UperNet segmenter with
N+1 classes (the last = "fake") is the discriminator. Read top to bottom:

  1. `Settings`             the method's numbers (lambda_adv comes in as an input, see below).
  2. `ramp`                 r(step): the adversarial weight ramps 0 -> 1 between two steps.
  3. `Objective`            the losses:
       noise loss           || UNet(z_t, t, text, conditioner(layout)) - target ||^2 at uniform t;
       generator loss       lazy steps: each example draws k ~ U{K..G-1} on the G-step DDIM grid;
                            ONE prediction at t_k with gradient gives both the noise loss and x0_hat
                            (as ALDM's code); x0_hat is decoded by the frozen VAE decoder (gradient
                            through it, rematerialised), K more DDIM steps are unrolled without
                            gradient (`samplers.ddim_unroll`, `unroll_stride` grid steps each), and
                            every decoded x0 is scored by the segmenter:
                              l_i(p) = class-balanced CE(D(decode(x0_i)), y)(p)
                              L_adv  = mean_p l_0(p) * sg(mean_i l_i(p) / l_0(p))
                            (its value averages the K+1 steps, its gradient flows through step 0);
                              L_G = L_noise + lambda_adv * r(step) * L_adv
       discriminator loss   L_D = balanced CE(D(x_real), y) + lambda_fake * CE(D(sg(x_fake)), fake),
                            x_real the VAE reconstruction of the real image (what the generator's
                            images are compared with).
       class balancing      per-pixel weights from the whole batch's class frequencies (OASIS), as
                            ALDM computes them per batch (`segmentation.class_balance_weights`).
  4. `make_step`            every `n_lazy`-th step takes the adversarial branch (generator + segmenter
                            update) and the others the plain branch (noise loss only), chosen by
                            `lax.cond` so both live in one compiled program; both accumulate over
                            `micro_batches` (the segmenter's BatchNorm statistics run through them
                            in order). The segmenter updates from `seg_start` on.
  5. `Setup`                the networks, optimisers, the boxed train state and the frozen inputs.

lambda_adv is a step input, not a constant: the plain-conditioner baseline
(0) and ALDM run one program (the lazy branch then still updates the
segmenter, which only monitors). On lazy steps `loss/noise` is measured at
t_k (the noisier part of the grid), on plain steps at uniform t;
`adv/lazy_step` tells them apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup import conditioning, model_configs, parallel, segmentation
from sdsup.data import latent_cache, pipeline, registry
from sdsup.diffusion import samplers
from sdsup.diffusion import schedule as schedule_lib
from sdsup.errors import ConfigError
from sdsup.models import controlnet as controlnet_lib
from sdsup.models import io as model_io
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.controlnet import ControlNetModel
from sdsup.models.unet import UNet2DConditionModel
from sdsup.models.vae import AutoencoderKL
from sdsup.trainer import sharding, update

ADV_METRICS = ("loss/adv", "loss/adv_step0", "loss/seg_real", "loss/seg_fake", "seg/acc_real", "seg/acc_fake")


# ---------------------------------------------------------------------------------------- 1. settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """ALDM's numbers, from `config.control` (lambda_adv is a step input: see the module docstring)."""

    n_lazy: int  # an adversarial step every n_lazy-th step
    grid_steps: int  # G: the DDIM grid the look-ahead runs on
    unroll_steps: int  # K: unrolled DDIM steps after the first prediction
    unroll_stride: int  # grid steps per unrolled step (ALDM: 1)
    lambda_fake: float
    ramp_start: int  # the adversarial weight ramps 0 -> 1 from ramp_start to ramp_end
    ramp_end: int
    seg_start: int  # the segmenter's updates apply from this step on
    caption_dropout: float
    conditioning_scale: float
    ema_decay: float
    micro_batches: int

    @classmethod
    def from_config(cls, control) -> "Settings":
        s = cls(n_lazy=int(control.n_lazy), grid_steps=int(control.grid_steps), unroll_steps=int(control.unroll_steps),
                unroll_stride=int(control.get("unroll_stride", 1)), lambda_fake=float(control.lambda_fake),
                ramp_start=int(control.ramp_start), ramp_end=int(control.ramp_end), seg_start=int(control.seg_start),
                caption_dropout=float(control.caption_dropout),
                conditioning_scale=float(control.conditioning_scale), ema_decay=float(control.ema_decay),
                micro_batches=int(control.micro_batches))
        if not 0 <= s.unroll_steps < s.grid_steps:
            raise ConfigError(f"control.unroll_steps={s.unroll_steps} must be in [0, grid_steps={s.grid_steps})")
        return s


# ---------------------------------------------------------------------------------------- 2. the ramp
def ramp(step, start: int, end: int):
    """r(step): 0 before `start`, linear to 1 at `end`, then 1."""
    if end <= start:
        return jnp.where(step >= start, 1.0, 0.0)
    return jnp.clip((step - start) / (end - start), 0.0, 1.0)


# ---------------------------------------------------------------------------------------- 3. the losses
@dataclasses.dataclass(frozen=True)
class Objective:
    """The generator's and the discriminator's losses, for fixed networks and settings."""

    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL
    seg: Any  # UperNetSegmenter with N+1 outputs
    schedule: schedule_lib.NoiseSchedule
    settings: Settings
    num_classes: int
    ignore_id: int
    on_batch_axes: Callable = lambda tree: tree  # keeps activations split over the batch (batch_axes_constraint)

    @property
    def fake(self) -> int:
        return self.num_classes

    def grid(self) -> jax.Array:
        """The look-ahead's DDIM grid, in sampling order (descending timesteps)."""
        return samplers.ddim_grid(self.schedule.num_train_timesteps, self.settings.grid_steps)

    def predict(self, gen_params, frozen, z, t, context, hint):
        """The conditioned UNet's output; the generator's trainable UNet parts replace their frozen copies."""
        down, mid = self.controlnet.apply({"params": gen_params["controlnet"]}, z, t, context, hint,
                                          conditioning_scale=self.settings.conditioning_scale)
        unet_params = dict(frozen["unet"], **gen_params["unet"])
        return self.unet.apply({"params": unet_params}, z, t, context, down, mid).astype(jnp.float32)

    def decode(self, vae_params, z):
        """Latents -> images in [-1, 1]; rematerialised: only the latents are kept for the backward pass."""
        vae = self.vae

        @jax.checkpoint
        def run(vae_params, z):
            return jnp.clip(vae.decode_latents(vae_params, z).astype(jnp.float32), -1.0, 1.0)

        return run(vae_params, z)

    def seg_apply(self, seg_vars, x):
        logits, updates = self.seg.apply(seg_vars, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def noise_loss_and_grad(self, gen_params, micro, rng, frozen):
        """Plain steps: the noise loss at uniform timesteps, and its gradient."""
        rng_t, rng_n = jax.random.split(rng)
        z0, context, hint = micro["z0"], micro["context"], micro["hint"]
        t = jax.random.randint(rng_t, (z0.shape[0],), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)

        def loss_fn(p):
            pred = self.predict(p, frozen, schedule_lib.add_noise(self.schedule, z0, noise, t), t, context, hint)
            return jnp.mean(jnp.square(pred - schedule_lib.training_target(self.schedule, z0, noise, t)))

        loss, grads = jax.value_and_grad(loss_fn)(gen_params)
        return {"loss/noise": loss}, grads

    def generator_loss(self, gen_params, seg_vars, frozen, mb, adv_weight, rng):
        """Lazy steps: L_noise + adv_weight * L_adv from ONE prediction at t_k.

        Returns (loss, (x0_hat images without gradient, metrics)).
        """
        s, schedule = self.settings, self.schedule
        z0, context, hint, labels, weights = mb["z0"], mb["context"], mb["hint"], mb["labels"], mb["weights"]
        rng_k, rng_n = jax.random.split(rng)
        # k counts grid steps from the end (the least noisy point): k >= K leaves room for K steps.
        k = jax.random.randint(rng_k, (z0.shape[0],), s.unroll_steps, s.grid_steps)
        start = s.grid_steps - 1 - k  # the same point as an index into the grid in sampling order
        grid = self.grid()
        t_k = grid[start]
        noise = jax.random.normal(rng_n, z0.shape, z0.dtype)
        z_t = schedule_lib.add_noise(schedule, z0, noise, t_k)

        def pixel_loss(img):
            logits, _ = self.seg_apply(seg_vars, img)
            ce, _ = segmentation.pixel_cross_entropy(logits, labels, self.ignore_id)
            return weights * ce

        def image(x0_latent):
            return self.on_batch_axes(self.decode(frozen["vae"], x0_latent))

        out0 = self.predict(gen_params, frozen, z_t, t_k, context, hint)
        noise_loss = jnp.mean(jnp.square(out0 - schedule_lib.training_target(schedule, z0, noise, t_k)))
        img0 = image(schedule_lib.x0_from_prediction(schedule, z_t, out0, t_k))
        l0 = pixel_loss(img0)
        if s.unroll_steps:
            # The look-ahead only weighs step 0's gradient: no gradient flows through it.
            frozen_gen = jax.lax.stop_gradient(gen_params)
            z_in, out_in = jax.lax.stop_gradient((z_t, out0))
            _, _, ls = samplers.ddim_unroll(
                lambda z, t: self.predict(frozen_gen, frozen, z, t, context, hint), schedule, z_in, out_in, grid,
                start, s.unroll_steps, stride=s.unroll_stride, readout=lambda x0: pixel_loss(image(x0)))
            l_mean = (jax.lax.stop_gradient(l0) + jnp.sum(ls, 0)) / (s.unroll_steps + 1)
        else:
            l_mean = jax.lax.stop_gradient(l0)
        # Value = the mean over the K+1 steps; gradient = that of step 0, rescaled.
        ratio = jax.lax.stop_gradient(l_mean / jnp.maximum(l0, 1e-8))
        adv = jnp.mean(l0 * ratio)
        metrics = {"loss/noise": noise_loss, "loss/adv": adv, "loss/adv_step0": jnp.mean(l0)}
        return noise_loss + adv_weight * adv, (jax.lax.stop_gradient(img0), metrics)

    def discriminator_loss(self, seg_params, batch_stats, x_real, x_fake, labels, weights):
        """Balanced CE on real images + lambda_fake * CE towards "fake" on generated ones."""
        logits_real, stats = self.seg_apply({"params": seg_params, "batch_stats": batch_stats}, x_real)
        ce_real, valid = segmentation.pixel_cross_entropy(logits_real, labels, self.ignore_id)
        loss_real = jnp.mean(weights * ce_real)
        logits_fake, stats = self.seg_apply({"params": seg_params, "batch_stats": stats}, x_fake)
        ce_fake, _ = segmentation.pixel_cross_entropy(logits_fake, jnp.full(labels.shape, self.fake, jnp.int32), -1)
        loss_fake = jnp.mean(ce_fake)
        loss = loss_real + self.settings.lambda_fake * loss_fake
        acc_real = segmentation.masked_mean((jnp.argmax(logits_real, -1) == labels).astype(jnp.float32), valid)
        acc_fake = jnp.mean((jnp.argmax(logits_fake, -1) == self.fake).astype(jnp.float32))
        return loss, (stats, {"loss/seg_real": loss_real, "loss/seg_fake": loss_fake,
                              "seg/acc_real": acc_real, "seg/acc_fake": acc_fake})


# ---------------------------------------------------------------------------------------- 4. the step
def batch_axes_constraint(mesh) -> Callable:
    """A function pinning a tree's activations to the batch axes, for inside micro-batches and the look-ahead.

    With FSDP-sharded weights and nothing said about activations, the SPMD
    partitioner is free to replicate a micro-batch's 512x512 decoder and
    segmenter activations on every fsdp device instead of gathering weights;
    this pins them to the batch axes (bench/bench_scale.py measures the
    memory). Arrays whose batch does not divide over the axes are left to
    the partitioner.
    """
    if mesh is None:
        return lambda tree: tree
    divisor = parallel.batch_divisor(mesh)

    def one(x):
        if x.ndim == 0 or x.shape[0] % divisor:
            return x
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh, x.ndim))
    return lambda tree: jax.tree.map(one, tree)


def make_step(objective: Objective, text_model: CLIPTextTransformer, gen_tx, seg_tx, hint_fn: Callable,
              prompting: conditioning.Prompting, shardings, mesh=None) -> Callable:
    """The jitted step `(state, batch, rng, frozen) -> (state, metrics)` (state donated).

    `frozen` holds the frozen weights ("unet", "vae", "text_encoder"), the
    class table and lambda_adv (`Setup.frozen`); `hint_fn(labels, frozen)`
    encodes the layouts for the conditioner.
    """
    s, vae = objective.settings, objective.vae
    num_classes, ignore = objective.num_classes, objective.ignore_id
    on_batch_axes = objective.on_batch_axes
    empty = jnp.asarray(prompting.empty)

    def step(state, batch, rng, frozen):
        # The VAE runs at image resolution: gather its weights (83M) rather than its activations.
        frozen = dict(frozen, vae=sharding.gathered(frozen["vae"], mesh))
        rng_z, rng_drop, rng_noise, rng_adv = jax.random.split(rng, 4)
        step_no = state["step"]
        labels = batch["label"].astype(jnp.int32)
        drop = jax.random.uniform(rng_drop, (labels.shape[0], 1)) < s.caption_dropout
        if "latent_mean" in batch:
            # The latent cache (sdsup.data.latent_cache): the frozen encoders' outputs come with the batch.
            mean = batch["latent_mean"].astype(jnp.float32)
            noise = jax.random.normal(rng_z, mean.shape, jnp.float32)
            z0 = vae.scale_latents(mean + jnp.exp(0.5 * batch["latent_logvar"].astype(jnp.float32)) * noise)
            real = {"x_real": conditioning.images_to_float(batch["reconstruction"])}
            empty_context = conditioning.encode_text(text_model, frozen["text_encoder"], empty[None, :],
                                                     prompting.pad_id)
            context = jnp.where(drop[:, :, None], empty_context, batch["context"].astype(jnp.float32))
        else:
            x = conditioning.images_to_float(batch["image"])
            posterior = vae.apply({"params": frozen["vae"]}, x, method=vae.encode)
            z0 = vae.scale_latents(posterior.sample(rng_z))
            real = {"z_real": vae.scale_latents(posterior.mode())}
            tokens = jnp.where(drop, empty[None, :], batch["tokens"])
            context = conditioning.encode_text(text_model, frozen["text_encoder"], tokens, prompting.pad_id)
        z0, context = jax.lax.stop_gradient((z0, context))
        hint = hint_fn(labels, frozen)
        gen_params = state["gen"]["params"]
        adv_weight = frozen["lambda_adv"] * ramp(step_no, s.ramp_start, s.ramp_end)
        seg_state = state["seg"]

        def lazy_branch(_):
            # Like the VAE, the segmenter runs at image resolution: its weights are used gathered
            # (here, inside the lazy branch, so that plain steps do not gather them).
            seg_params = sharding.gathered(seg_state["params"], mesh)

            def lazy_micro(batch_stats, mb, rng):
                """Generator gradients, segmenter gradients and metrics of one micro-batch."""
                mb = on_batch_axes(mb)
                seg_vars = {"params": seg_params, "batch_stats": batch_stats}
                (_, (x_fake, gen_metrics)), gen_grads = jax.value_and_grad(objective.generator_loss, has_aux=True)(
                    gen_params, seg_vars, frozen, mb, adv_weight, rng)
                x_fake = on_batch_axes(x_fake)
                x_real = on_batch_axes(mb["x_real"] if "x_real" in mb else objective.decode(frozen["vae"], mb["z_real"]))
                (_, (stats, seg_metrics)), seg_grads = jax.value_and_grad(objective.discriminator_loss,
                                                                          has_aux=True)(
                    seg_params, batch_stats, x_real, x_fake, mb["labels"], mb["weights"])
                return stats, (dict(gen_metrics, **seg_metrics), gen_grads, seg_grads)

            # Class balancing from the whole batch's frequencies, as ALDM does per batch.
            weights = segmentation.class_balance_weights(labels, num_classes, ignore, num_classes + 1)
            lazy_batch = dict(real, z0=z0, context=context, hint=hint, labels=labels, weights=weights)
            stats, (metrics, gen_grads, seg_grads) = update.scan_micro_batches(
                lazy_micro, seg_state["batch_stats"], lazy_batch, rng_adv, s.micro_batches)
            updated, opt, _ = update.apply_gradients(seg_tx, seg_state["params"], seg_state["opt"], seg_grads)
            new_seg = {"params": updated, "batch_stats": stats, "opt": opt}
            # Before seg_start the segmenter's update is computed but not applied.
            active = step_no >= s.seg_start
            new_seg = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_seg, seg_state)
            return gen_grads, new_seg, metrics["loss/noise"], {k: metrics[k] for k in ADV_METRICS}

        def plain_branch(_):
            metrics, grads = update.accumulate_gradients(
                lambda p, mb, r: objective.noise_loss_and_grad(p, mb, r, frozen), gen_params,
                {"z0": z0, "context": context, "hint": hint}, rng_noise, s.micro_batches)
            return grads, seg_state, metrics["loss/noise"], state["adv_metrics"]

        lazy = (step_no % s.n_lazy) == 0
        grads, new_seg, noise_loss, adv_metrics = jax.lax.cond(lazy, lazy_branch, plain_branch, None)
        new_params, gen_opt, grad_norm = update.apply_gradients(gen_tx, gen_params, state["gen"]["opt"], grads)
        ema = update.ema_update(state["gen"]["ema"], new_params, s.ema_decay, step_no + 1)
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


# ---------------------------------------------------------------------------------------- 5. setup
def frozen_model_inits(config, unet_config, vae_config, text_config) -> dict:
    """{"unet", "vae", "text_encoder"}: functions returning each model's boxed params (for eval_shape)."""
    size, length, dim = int(config.data.image_size), config.text.max_length, text_config.hidden_size
    latent = size // vae_config.downsample_factor
    return {
        "unet": lambda: UNet2DConditionModel(unet_config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, latent, latent, unet_config.in_channels)),
            jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, dim)))["params"],
        "vae": lambda: AutoencoderKL(vae_config).init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"],
        "text_encoder": lambda: CLIPTextTransformer(text_config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"],
    }


class Setup:
    """Everything the step needs, from the run's config, model configs and the class table (no workdir).

    The control stage builds it from the finished vae/ldm stages' configs;
    benchmarks and tests from random weights of the configured sizes.
    """

    def __init__(self, config, spec, tokenizer, unet_config, vae_config, text_config, table: np.ndarray, mesh=None):
        cfg = config.control
        self.config, self.cfg, self.spec, self.tok = config, cfg, spec, tokenizer
        self.table = np.asarray(table, np.float32)
        self.mesh = mesh
        self.settings = Settings.from_config(cfg)
        self.size = int(config.data.image_size)
        self.latent = self.size // vae_config.downsample_factor
        self.schedule = model_configs.noise_schedule(config)
        self.unet, self.unet_config = UNet2DConditionModel(unet_config), unet_config
        self.vae = AutoencoderKL(vae_config)
        self.text_model, self.text_config = CLIPTextTransformer(text_config), text_config
        self.cn_config = model_configs.controlnet(config, unet_config, self.table.shape[1], vae_config)
        self.controlnet = ControlNetModel(self.cn_config)
        self.seg_config = model_configs.discriminator(config, spec.num_classes)
        self.seg = model_configs.discriminator_network(config, self.seg_config)
        self.prompting = conditioning.Prompting.from_tokenizer(tokenizer)
        self.layout_encoding = conditioning.LayoutEncoding.from_spec(spec)
        self.gen_tx, self.gen_schedule = update.optimizer(cfg.optimizer, cfg.num_steps)
        # The segmenter updates on lazy steps from seg_start on: its schedule
        # (e.g. ALDM's one-cycle) spans that many updates, not num_steps.
        self.seg_tx, self.seg_schedule = update.optimizer(cfg.seg_optimizer, self.segmenter_updates(cfg.num_steps))

    def segmenter_updates(self, num_steps: int) -> int:
        """How many segmenter updates the first `num_steps` steps make."""
        n, first = self.settings.n_lazy, -(-self.settings.seg_start // self.settings.n_lazy)
        return max(0, -(-num_steps // n) - first)

    def learning_rates(self) -> dict:
        """Metric name -> (step index -> the learning rate its optimiser last used)."""
        n = self.settings.n_lazy
        return {"lr": self.gen_schedule,
                "lr/seg": lambda step: self.seg_schedule(max(0, self.segmenter_updates(step // n * n + 1) - 1))}

    def hint_fn(self, labels, frozen):
        return self.layout_encoding.hint(labels, self.cn_config, frozen["class_table"])

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
        return frozen_model_inits(self.config, self.unet_config, self.vae.config, self.text_config)

    def create_state(self, mesh, unet_params, rng, discriminator=None, background: bool = False):
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

        pending, shardings = sharding.create_sharded_in_background(self.init, mesh, rng, finish=finish)
        if discriminator is not None:
            for key in ("params", "batch_stats"):
                _check_same_shapes(pending.abstract["seg"][key], discriminator[key], f"discriminator {key}")
        return (pending if background else pending.result()), shardings

    def step_constants(self) -> dict:
        """The step's non-trained inputs that are not weights: the class table and lambda_adv (host arrays)."""
        return {"class_table": self.table, "lambda_adv": np.float32(self.cfg.lambda_adv)}

    def frozen(self, mesh, unet_params, vae_params, text_params):
        """The step's non-trained inputs on `mesh`: frozen weights and `step_constants`."""
        inits = self.frozen_inits()
        frozen = {
            "unet": sharding.place(inits["unet"], unet_params, mesh),
            "vae": sharding.place(inits["vae"], vae_params, mesh),
            "text_encoder": sharding.place(inits["text_encoder"], text_params, mesh),
        }
        for name, value in self.step_constants().items():
            frozen[name] = jax.device_put(jnp.asarray(value), sharding.replicated(mesh))
        return frozen

    def abstract_frozen(self, mesh):
        """`frozen`'s shapes, dtypes and shardings, with no weights: lowering the step at any scale."""
        abstract = {name: sharding.sharded_abstract(jax.eval_shape(init), mesh)
                    for name, init in self.frozen_inits().items()}
        replicated = sharding.replicated(mesh)
        abstract["class_table"] = jax.ShapeDtypeStruct(self.table.shape, jnp.float32, sharding=replicated)
        abstract["lambda_adv"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        return abstract

    def objective(self, settings: Optional[Settings] = None) -> Objective:
        return Objective(unet=self.unet, controlnet=self.controlnet, vae=self.vae, seg=self.seg,
                         schedule=self.schedule, settings=settings or self.settings,
                         num_classes=self.spec.num_classes, ignore_id=self.spec.ignore_id,
                         on_batch_axes=batch_axes_constraint(self.mesh))

    def step(self, shardings, settings: Optional[Settings] = None):
        """The jitted (not yet compiled) step; `settings` replace config.control's (benchmarks)."""
        return make_step(self.objective(settings), self.text_model, self.gen_tx, self.seg_tx, self.hint_fn,
                         self.prompting, shardings, self.mesh)

    def batch_shapes(self, batch_size: int, cached: bool = False) -> dict:
        """{name: (shape, dtype)} of a training batch; with `cached`, the latent cache's fields replace the image."""
        size, length = self.size, self.config.text.max_length
        shapes = {"label": ((batch_size, size, size), jnp.uint8), "tokens": ((batch_size, length), jnp.int32)}
        if not cached:
            return dict(shapes, image=((batch_size, size, size, 3), jnp.uint8))
        latent = (batch_size, self.latent, self.latent, self.vae.config.latent_channels)
        return dict(shapes, latent_mean=(latent, jnp.float16), latent_logvar=(latent, jnp.float16),
                    reconstruction=((batch_size, size, size, 3), jnp.uint8),
                    context=((batch_size, length, self.text_config.hidden_size), jnp.float16))

    # ------------------------------------------------------------------ the latent cache
    def cache_manifest(self, dataset, vae_params, text_params, shards: int) -> latent_cache.Manifest:
        """What a latent cache for this run's train split must have been computed from."""
        digest = hashlib.sha256()
        for config, params in ((self.vae.config, vae_params), (self.text_config, text_params)):
            digest.update(repr(config).encode())
            for leaf in jax.tree.leaves(params):
                digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return latent_cache.Manifest(
            dataset=str(dataset.builder.data_dir), num_examples=len(dataset.source("train")), image_size=self.size,
            latent_shape=(self.latent, self.latent, self.vae.config.latent_channels),
            context_shape=(int(self.config.text.max_length), int(self.text_config.hidden_size)),
            flipped_captions=dataset.spec.flip_caption is not None, models=digest.hexdigest()[:20], shards=shards)

    def cache_encoders(self, compiler_options=None):
        """Jitted (vae_params, images uint8 [B, H, W, 3]) -> (mean, logvar, reconstruction uint8) and
        (text_params, tokens [N, L]) -> context [N, L, D]: what the step would compute from an example."""
        vae, text_model, pad = self.vae, self.text_model, self.prompting.pad_id

        def images(vae_params, pixels):
            posterior = vae.apply({"params": vae_params}, conditioning.images_to_float(pixels), method=vae.encode)
            decoded = vae.decode_latents(vae_params, vae.scale_latents(posterior.mode()))
            reconstruction = jnp.clip((decoded.astype(jnp.float32) + 1) * 127.5, 0, 255).round().astype(jnp.uint8)
            return posterior.mean, posterior.logvar, reconstruction

        def texts(text_params, tokens):
            return conditioning.encode_text(text_model, text_params, tokens, pad)

        options = dict(compiler_options or {}) or None
        return jax.jit(images, compiler_options=options), jax.jit(texts, compiler_options=options)


def write_latent_cache(setup: Setup, dataset, directory: str, manifest: latent_cache.Manifest, vae_params,
                       text_params, shard: int, batch_size: int = 8, compiler_options=None,
                       log: Callable[[str], None] = lambda message: None) -> None:
    """Writes shard `shard` of the train split's latent cache (see `sdsup.data.latent_cache`): both orientations
    of every image, each caption (and its mirror where the dataset flips captions)."""
    geometry, spec, tok = dataset.geometry, dataset.spec, dataset.tokenizer
    if not geometry.deterministic:
        raise ConfigError("control.latent_cache needs training without random crops (data.resize = () and "
                          "data.resize_mode = 'stretch'): a crop drawn per step has no fixed latents")
    encode_images, encode_texts = setup.cache_encoders(compiler_options)
    vae_params, text_params = jax.device_put((vae_params, text_params))  # once, not with every batch
    source = dataset.source("train")
    start, stop = latent_cache.shard_range(manifest.num_examples, shard, manifest.shards)
    writer = latent_cache.ShardWriter(directory, shard, manifest.shards)
    for first in range(start, stop, batch_size):
        indices = list(range(first, min(first + batch_size, stop)))
        records = [source[i] for i in indices]
        pixels = [geometry.apply(r["image"], r["label"], None)[0] for r in records]
        pixels = np.stack(pixels + [p[:, ::-1] for p in pixels])  # as stored, then mirrored
        pad = batch_size * 2 - len(pixels)  # one compiled shape for the last batch too
        mean, logvar, recon = (np.asarray(a)[:len(pixels)] for a in encode_images(
            vae_params, np.concatenate([pixels, np.repeat(pixels[-1:], pad, 0)]) if pad else pixels))
        n = len(records)
        for j, record in enumerate(records):
            captions = pipeline.record_captions(record, spec.caption_field)
            orientations = [captions] + ([[spec.flip_caption(c) for c in captions]] if manifest.flipped_captions
                                         else [])
            tokens = np.stack([tok.encode(c) for group in orientations for c in group])
            context = np.asarray(encode_texts(text_params, tokens)).reshape(len(orientations), len(captions),
                                                                            *manifest.context_shape)
            writer.write(latent_cache.encode_record(mean[[j, n + j]], logvar[[j, n + j]], recon[[j, n + j]], context))
        if (first - start) // batch_size % 50 == 0:
            log(f"latent cache: {first + n - start} / {stop - start} examples of shard {shard}")
    writer.close()


def _check_same_shapes(expected, given, what: str) -> None:
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), given)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ConfigError(f"{what} do not match config.discriminator.model with N+1 classes "
                          "(a segmenter of another architecture or class count)")


def random_setup(config, tokenizer, mesh=None, seed: int = 0):
    """(Setup, {"unet", "vae", "text_encoder"} random host weights) sized by the config.

    For benchmarks and tests of the step itself: no workdir, no training.
    """
    spec = registry.for_config(config.data)
    unet_config, text_config = model_configs.ldm(config, tokenizer)
    table = np.random.default_rng(seed).normal(size=(spec.num_classes, text_config.hidden_size)).astype(np.float32)
    setup = Setup(config, spec, tokenizer, unet_config, model_configs.vae(config), text_config, table, mesh)
    params = {name: model_io.random_like(nn.meta.unbox(jax.eval_shape(init)), seed + i)
              for i, (name, init) in enumerate(sorted(setup.frozen_inits().items()))}
    return setup, params
