"""Generation from trained weights: text -> image, text + layout -> image, text -> layout.

Pure functions of (models, inputs, settings): the weights are arguments of
the jitted samplers, never baked-in constants, so sample grids during
training, `sdsup.sample`, the evaluation, the ablation, export checks and
benchmarks all share one cache of compiled samplers (keyed by the model
configs and the sampling settings) and compile each sampler once per
process.

  text_to_image    DDIM (or DPM-Solver++(2M), `sampling.solver`) with classifier-free guidance on the
                   text-conditional UNet;
  layout_to_image  the same with the segmentation conditioner's residuals from a
                   class map (the layout stays in the unconditional branch, as in ALDM);
  text_to_layout   masked discrete diffusion over class maps: the most probable map
                   (one all-masked pass) or confidence-ordered unmasking; with an object
                   planner (`sdsup.planning`), the plan's things drawn first and the map's
                   stuff filled around them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import conditioning, model_configs, planning
from sdsup.diffusion import masked, samplers
from sdsup.diffusion import schedule as schedule_lib
from sdsup.models.clip_text import CLIPTextTransformer
from sdsup.models.controlnet import ControlNetModel
from sdsup.models.layout import LayoutModel
from sdsup.models.planner import PlannerModel
from sdsup.models.unet import UNet2DConditionModel
from sdsup.models.vae import AutoencoderKL
from sdsup.trainer import sharding

LAYOUT_MODES = ("map", "sample")
# Compiled samplers kept per process (model configs x settings); sample grids, evaluation and the
# ablation use a handful.
_CACHE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class LayoutSampling:
    """How text -> layout samples: the most probable map or sampled maps, and the sampler's knobs."""

    mode: str = "sample"
    steps: int = 8  # unmasking passes
    temperature: float = 1.0
    guidance: float = 1.0  # classifier-free guidance on the logits: u + g (c - u)
    # Gumbel noise on the confidences that choose which draws to keep (MaskGIT's 4.5): high values keep
    # random pixels early, which scatters specks over the map.
    choice_temperature: float = 4.5
    map_upsample: str = "nearest"  # `jax.image.resize` method for the most probable map's logits
    # The object planner's draws (when the models include one): temperature (the most probable map takes
    # the most probable plan) and classifier-free guidance on its logits.
    plan_temperature: float = 1.0
    plan_guidance: float = 1.0

    def __post_init__(self):
        if self.mode not in LAYOUT_MODES:
            raise ValueError(f"mode must be one of {LAYOUT_MODES}, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything about generation that is neither weights nor inputs, from the run's config.

    Override a field for one call with `dataclasses.replace(settings, steps=50)`.
    """

    image_size: int
    schedule_args: tuple  # `model_configs.schedule_args`: hashable, unlike the schedule's array
    prompting: conditioning.Prompting
    layout_encoding: conditioning.LayoutEncoding
    solver: str = "ddim"  # or "dpm_solver_pp_2m"
    steps: int = 25
    guidance: float = 3.0
    eta: float = 0.0
    conditioning_scale: float = 1.0
    layout: LayoutSampling = LayoutSampling()
    layout_factor: int = 1  # image pixels per layout-map pixel
    compiler_options: Tuple[Tuple[str, object], ...] = ()

    @classmethod
    def from_config(cls, config, tokenizer, spec) -> "Settings":
        s = config.sampling
        layout = LayoutSampling()
        factor = 1
        if "layout" in config:
            ls = config.layout.sampling
            layout = LayoutSampling(
                mode="sample", steps=int(ls.steps), temperature=float(ls.temperature), guidance=float(ls.guidance),
                map_upsample=config.layout.get("map_upsample", "nearest"),
                choice_temperature=float(ls.get("choice_temperature", LayoutSampling.choice_temperature)))
            if "planner" in config:
                ps = config.planner.sampling
                layout = dataclasses.replace(layout, plan_temperature=float(ps.temperature),
                                             plan_guidance=float(ps.guidance))
            factor = model_configs.layout_factor(config)
        return cls(image_size=int(config.data.image_size), schedule_args=model_configs.schedule_args(config),
                   prompting=conditioning.Prompting.from_tokenizer(tokenizer),
                   layout_encoding=conditioning.LayoutEncoding.from_spec(spec), solver=s.get("solver", "ddim"),
                   steps=int(s.steps),
                   guidance=float(s.guidance), eta=float(s.eta),
                   conditioning_scale=float(config.control.conditioning_scale) if "control" in config else 1.0,
                   layout=layout, layout_factor=factor,
                   compiler_options=tuple(sorted(sharding.compiler_options(config).items())))

    @property
    def schedule(self) -> schedule_lib.NoiseSchedule:
        return schedule_lib.make_schedule(*self.schedule_args)

    def with_overrides(self, steps: Optional[int] = None, guidance: Optional[float] = None,
                       solver: Optional[str] = None) -> "Settings":
        """These settings with the image sampler's steps, guidance or solver replaced where given."""
        return dataclasses.replace(self, steps=self.steps if steps is None else int(steps),
                                   guidance=self.guidance if guidance is None else float(guidance),
                                   solver=self.solver if solver is None else solver)

    def layout_sampling(self, mode: Optional[str] = None, steps: Optional[int] = None,
                        temperature: Optional[float] = None, guidance: Optional[float] = None,
                        choice_temperature: Optional[float] = None) -> LayoutSampling:
        """The configured layout sampling with the given fields replaced."""
        given = dict(mode=mode, steps=None if steps is None else int(steps),
                     temperature=None if temperature is None else float(temperature),
                     guidance=None if guidance is None else float(guidance),
                     choice_temperature=None if choice_temperature is None else float(choice_temperature))
        return dataclasses.replace(self.layout, **{k: v for k, v in given.items() if v is not None})


@dataclasses.dataclass(frozen=True, eq=False)
class ImageModels:
    """The image generator's weights, each entry (config, params).

    `controlnet` (with its `class_table`) is optional; `conditioned_unet` is
    the UNet the conditioner was trained with when it fine-tuned UNet parts
    (control.unet_trainable): images from a layout use it, text-only images
    the plain `unet`.
    """

    unet: tuple
    text_encoder: tuple
    vae: tuple
    controlnet: Optional[tuple] = None
    class_table: Optional[np.ndarray] = None
    conditioned_unet: Optional[tuple] = None

    @property
    def has_conditioner(self) -> bool:
        return self.controlnet is not None

    def without_conditioner(self) -> "ImageModels":
        """The text-only generator."""
        return ImageModels(self.unet, self.text_encoder, self.vae)

    def with_conditioner(self, controlnet: tuple, class_table: np.ndarray,
                         conditioned_unet: Optional[tuple] = None) -> "ImageModels":
        """These models plus a conditioner (and the UNet it fine-tuned, if it did)."""
        return ImageModels(self.unet, self.text_encoder, self.vae, controlnet, np.asarray(class_table, np.float32),
                           conditioned_unet)


def _jit(fn, settings: Settings):
    return jax.jit(fn, compiler_options=dict(settings.compiler_options) or None)


# ---------------------------------------------------------------------------------------- images
def text_to_image(models: ImageModels, tokens, rng, settings: Settings,
                  size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Tokens [B, L] -> uint8 images [B, H, W, 3], text only (any conditioner is not used).

    (H, W) = `size`, default the square of `settings.image_size`; the networks are convolutional, so a
    model trained on square crops also makes whole frames (Cityscapes' 512x1024).
    """
    return _images(models, tokens, rng, settings, None, size)


def layout_to_image(models: ImageModels, tokens, labels, rng, settings: Settings) -> np.ndarray:
    """Tokens [B, L] + class maps [B, H, W] -> uint8 images [B, H, W, 3], through the conditioner."""
    if not models.has_conditioner:
        raise ValueError("layout_to_image needs models with a conditioner (stage control)")
    cn_config, _ = models.controlnet
    hint = settings.layout_encoding.hint(labels, cn_config, models.class_table)
    return _images(models, tokens, rng, settings, hint, tuple(np.shape(labels)[1:3]))


def _images(models: ImageModels, tokens, rng, settings: Settings, hint, size) -> np.ndarray:
    size = (settings.image_size, settings.image_size) if size is None else (int(size[0]), int(size[1]))
    factor = models.vae[0].downsample_factor
    if size[0] % factor or size[1] % factor:
        raise ValueError(f"images of {size[0]}x{size[1]} pixels: both sides must be multiples of the VAE's "
                         f"downsampling factor {factor}")
    cn_config = models.controlnet[0] if hint is not None else None
    unet = models.conditioned_unet if hint is not None and models.conditioned_unet is not None else models.unet
    sampler = _image_sampler(unet[0], models.text_encoder[0], models.vae[0], cn_config, settings, size)
    tokens = jnp.asarray(tokens)
    empty = jnp.broadcast_to(jnp.asarray(settings.prompting.empty), tokens.shape)
    params = {"unet": unet[1], "text_encoder": models.text_encoder[1]}
    cn_params = models.controlnet[1] if hint is not None else None
    return np.asarray(sampler(params, models.vae[1], tokens, empty, rng, cn_params, hint))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _image_sampler(unet_config, text_config, vae_config, cn_config, settings: Settings, size: Tuple[int, int]):
    """The jitted sampler `(params, vae_params, tokens, empty, rng, controlnet_params, hint) -> uint8 images`
    of `size` (H, W) pixels."""
    unet, text_model = UNet2DConditionModel(unet_config), CLIPTextTransformer(text_config)
    vae = AutoencoderKL(vae_config)
    controlnet = ControlNetModel(cn_config) if cn_config is not None else None
    pad = settings.prompting.pad_id
    latent = (size[0] // vae_config.downsample_factor, size[1] // vae_config.downsample_factor)
    schedule = settings.schedule

    def run(params, vae_params, tokens, empty, rng, controlnet_params, hint):
        cond = conditioning.encode_text(text_model, params["text_encoder"], tokens, pad)
        uncond = conditioning.encode_text(text_model, params["text_encoder"], empty, pad)

        def model_fn(z, t, context, layout):
            extra = {}
            if controlnet is not None:
                down, mid = controlnet.apply({"params": controlnet_params}, z, t, context, layout,
                                             conditioning_scale=settings.conditioning_scale)
                extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            return unet.apply({"params": params["unet"]}, z, t, context, **extra)

        denoise = samplers.classifier_free_guidance(model_fn, settings.guidance, cond, uncond, hint)
        z = jax.random.normal(rng, (tokens.shape[0], *latent, vae_config.latent_channels))
        if settings.solver == "dpm_solver_pp_2m":
            z = samplers.dpm_solver_pp_2m_sample(denoise, schedule, z, settings.steps)
        else:
            z = samplers.ddim_sample(denoise, schedule, z, settings.steps, eta=settings.eta,
                                     rng=jax.random.fold_in(rng, 1))
        x = vae.decode_latents(vae_params, z)
        return jnp.clip((x + 1) * 127.5, 0, 255).round().astype(jnp.uint8)

    return _jit(run, settings)


# ---------------------------------------------------------------------------------------- layouts
def text_to_layout(models: dict, tokens, rng, settings: Settings, sampling: Optional[LayoutSampling] = None,
                   full_size: bool = True) -> np.ndarray:
    """Tokens [B, L] -> class ids [B, S, S]: S = the image size, or the model's resolution without `full_size`.

    `models` is {"layout": (config, params), "text_encoder": (config, params)}
    and optionally "planner": (config, {"net", "shapes", "log_aspects"}) with,
    when the planner reads its own, "planner_text_encoder": (config, params). The
    most probable map is upsampled inside the sampler (from its logits,
    `LayoutSampling.map_upsample`); sampled maps repeat pixels. With a planner
    the maps are always full size: its things are drawn at the image's resolution.
    """
    sampling = sampling or settings.layout
    config, params = models["layout"]
    text_config, text_params = models["text_encoder"]
    tokens = jnp.asarray(tokens)
    empty = jnp.broadcast_to(jnp.asarray(settings.prompting.empty), tokens.shape)
    if "planner" in models:
        planner_config, planner_params = models["planner"]
        planner_text = models.get("planner_text_encoder", models["text_encoder"])[1]
        sampler = _planned_layout_sampler(config, text_config, planner_config, sampling, settings)
        return np.asarray(sampler(params, text_params, planner_params, planner_text, tokens, empty, rng))
    factor = settings.layout_factor if full_size else 1
    in_sampler = factor if sampling.mode == "map" else 1
    sampler = _layout_sampler(config, text_config, sampling, in_sampler, settings)
    ids = np.asarray(sampler(params, text_params, tokens, empty, rng))
    return masked.upsample_labels(ids, factor // in_sampler)


def _layout_logits_fn(model, params, sampling: LayoutSampling, cond, uncond):
    def model_fn(ids, ratio, context, _):
        return model.apply({"params": params}, ids, ratio, context)
    return samplers.classifier_free_guidance(model_fn, sampling.guidance, cond, uncond)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _layout_sampler(config, text_config, sampling: LayoutSampling, upsample: int, settings: Settings):
    """The jitted `(params, text_params, tokens, empty, rng) -> class ids` of one sampling mode."""
    model, text_model = LayoutModel(config), CLIPTextTransformer(text_config)
    pad = settings.prompting.pad_id
    n = config.num_classes

    def run(params, text_params, tokens, empty, rng):
        cond = conditioning.encode_text(text_model, text_params, tokens, pad)
        uncond = conditioning.encode_text(text_model, text_params, empty, pad)
        logits_fn = _layout_logits_fn(model, params, sampling, cond, uncond)
        shape = (tokens.shape[0], config.resolution, config.resolution)
        if sampling.mode == "map":
            return masked.most_probable_map(logits_fn, shape, n, upsample, sampling.map_upsample)
        return masked.sample_maps(logits_fn, rng, shape, n, sampling.steps, sampling.temperature,
                                  sampling.choice_temperature)

    return _jit(run, settings)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _planned_layout_sampler(config, text_config, planner_config, sampling: LayoutSampling, settings: Settings):
    """The jitted `(params, text_params, planner_params, planner_text, tokens, empty, rng) -> ids [B, S, S]`.

    1. The planner draws a plan (the most probable one for the most probable map);
    2. its boxes are drawn with the bank's shapes at the image's resolution;
    3. the layout model, given those things (at its resolution, where they cover
       most of a block), fills the rest with stuff classes only, and the stuff
       behind each thing too, so that the full-size things sit on a full map
       (the most probable map: one all-masked pass over stuff classes).
    """
    model, text_model = LayoutModel(config), CLIPTextTransformer(text_config)
    planner = PlannerModel(planner_config)
    pad = settings.prompting.pad_id
    n, size, factor = config.num_classes, settings.image_size, settings.layout_factor
    is_thing = np.zeros(n, bool)
    is_thing[list(planner_config.thing_ids)] = True
    stuff = jnp.asarray(~is_thing)

    def run(params, text_params, planner_params, planner_text, tokens, empty, rng):
        rng_plan, rng_fill = jax.random.split(rng)
        cond = conditioning.encode_text(text_model, text_params, tokens, pad)
        uncond = conditioning.encode_text(text_model, text_params, empty, pad)
        # Every class's sequence reads its example's text (`planning.sample`: class fastest).
        things = planner_config.num_things
        plan_cond = jnp.repeat(conditioning.encode_text(text_model, planner_text, tokens, pad), things, axis=0)
        plan_uncond = jnp.repeat(conditioning.encode_text(text_model, planner_text, empty, pad), things, axis=0)

        def plan_logits(plan):
            apply = lambda context: planner.apply({"params": planner_params["net"]}, plan, context)
            c = apply(plan_cond)
            if sampling.plan_guidance == 1.0:
                return c
            u = apply(plan_uncond)
            return u + sampling.plan_guidance * (c - u)

        plan_temperature = 0.0 if sampling.mode == "map" else sampling.plan_temperature
        plans = planning.sample(plan_logits, rng_plan, tokens.shape[0], planner_config, plan_temperature)
        things = planning.draw(plans, planner_params, planner_config, size, size)
        # At the layout model's resolution a thing is given where it covers most of a block.
        background = jnp.where(things == planning.NO_THING, n, things)
        known = masked.downsample_labels(background, factor, n + 1, n + 1)
        logits_fn = _layout_logits_fn(model, params, sampling, cond, uncond)
        shape = (tokens.shape[0], config.resolution, config.resolution)
        if sampling.mode == "map":  # one all-masked pass: the most probable stuff, with the plan's things on top
            filled = masked.most_probable_map(logits_fn, shape, n, factor, sampling.map_upsample, allowed=stuff)
        else:
            low = masked.sample_maps(logits_fn, rng_fill, shape, n, sampling.steps, sampling.temperature,
                                     sampling.choice_temperature, known, stuff)
            low = masked.redraw(logits_fn, low, known != n, n, stuff)
            filled = masked.upsample_labels(low, factor)
        return jnp.where(things == planning.NO_THING, filled, things)

    return _jit(run, settings)
