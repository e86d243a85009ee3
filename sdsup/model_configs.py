"""Config sections -> model configs: the one place a `config.<stage>.*` block becomes a model dataclass.

Each function reads the run's `ml_collections` config (and, where a size
comes from elsewhere, the tokenizer or the dataset's class count) and
returns the frozen dataclass the Flax model takes. Lists from JSON-loaded
configs (an old workdir's config.json) become tuples here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple, Type, TypeVar, Union

import jax.numpy as jnp

from sdsup.diffusion import schedule as schedule_lib
from sdsup.models.clip_text import CLIPTextConfig
from sdsup.models.controlnet import ControlNetConfig
from sdsup.models.layout import LayoutConfig
from sdsup.models.planner import PlannerConfig
from sdsup.models.drn import DRNConfig, DRNSegmenter
from sdsup.models.segformer import SegformerConfig, SegformerSegmenter
from sdsup.models.segmenter import SegmenterConfig, UperNetSegmenter
from sdsup.models.unet import UNetConfig
from sdsup.models.vae import VAEConfig

T = TypeVar("T")


def fields(section: Mapping[str, Any]) -> dict:
    """A config section as keyword arguments: lists become tuples (dataclass configs are hashable)."""
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in section.items()}


def dataclass_from(cls: Type[T], section: Mapping[str, Any], **extra: Any) -> T:
    """`cls(**section, **extra)` with lists as tuples; `extra` are the fields the section does not set."""
    known = {f.name for f in dataclasses.fields(cls)}
    merged = dict(fields(section), **extra)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    return cls(**merged)


def vae(config) -> VAEConfig:
    return dataclass_from(VAEConfig, config.vae.model, sample_size=config.data.image_size)


def schedule_args(config) -> tuple:
    """(kind, num_train_timesteps, beta_start, beta_end, prediction_type): `make_schedule`'s arguments, hashable."""
    s = config.diffusion
    return (s.schedule, int(s.num_train_timesteps), float(s.beta_start), float(s.beta_end), s.prediction_type)


def noise_schedule(config) -> schedule_lib.NoiseSchedule:
    return schedule_lib.make_schedule(*schedule_args(config))


def ldm(config, tokenizer) -> Tuple[UNetConfig, CLIPTextConfig]:
    """(UNetConfig, CLIPTextConfig) of the ldm stage, sized from the VAE and the tokenizer."""
    vae_config = vae(config)
    text = dataclass_from(CLIPTextConfig, config.ldm.text_encoder, vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=config.text.max_length, pad_token_id=tokenizer.pad_id,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    unet = dataclass_from(UNetConfig, config.ldm.unet, in_channels=vae_config.latent_channels,
                          out_channels=vae_config.latent_channels, cross_attention_dim=text.hidden_size,
                          sample_size=config.data.image_size // vae_config.downsample_factor)
    return unet, text


def layout(config, num_classes: int, text_dim: int) -> LayoutConfig:
    c = config.layout
    return LayoutConfig.build(num_classes, int(c.resolution), int(c.embed_dim), text_dim,
                              position_embedding=bool(c.get("position_embedding", False)), **fields(c.unet))


def planner(config, num_classes: int, thing_ids: tuple, text_dim: int) -> PlannerConfig:
    """The object planner of `config.planner` over the dataset's thing classes, reading `text_dim`-wide states."""
    c = config.planner
    return PlannerConfig(num_classes=num_classes, thing_ids=tuple(int(i) for i in thing_ids),
                         num_bins=int(c.num_bins), max_per_class=int(c.max_per_class), width=int(c.width),
                         depth=int(c.depth), heads=int(c.heads), cross_attention_dim=text_dim,
                         shape_size=int(c.shape_size), shapes_per_class=int(c.shapes_per_class))


def layout_factor(config) -> int:
    """Image pixels per layout-map pixel along each side."""
    size, res = int(config.data.image_size), int(config.layout.resolution)
    if size % res:
        raise ValueError(f"layout.resolution={res} must divide data.image_size={size}")
    return size // res


def controlnet(config, unet_config: UNetConfig, table_dim: int, vae_config: VAEConfig) -> ControlNetConfig:
    """The conditioner of `config.control` for this UNet and VAE (the VAE's downsampling sets the hint's size:
    `vae_config` is the VAE in use, which is a pretrained one's config, not config.vae.model, when
    vae.pretrained is set)."""
    c = config.control
    hint = tuple(c.hint_channels) if c.hint_channels else None
    dim = table_dim if c.layout_encoding == "class_embedding" else None
    return ControlNetConfig.from_unet(unet_config, c.layout_encoding, dim, hint,
                                      vae_scale_factor=vae_config.downsample_factor)


def segmenter(model_section: Mapping[str, Any], num_classes: int, *, fake_class: bool = False) -> SegmenterConfig:
    """The segmenter of `model_section` over `num_classes`; with `fake_class` the discriminator's N+1 outputs."""
    seg = dataclass_from(SegmenterConfig, model_section, num_classes=num_classes)
    return seg.with_fake_class() if fake_class else seg


def discriminator(config, num_classes: int) -> SegmenterConfig:
    """The adversarial segmenter (config.discriminator.model): N classes + "fake", last."""
    return segmenter(config.discriminator.model, num_classes, fake_class=True)


def evalseg(config, num_classes: int) -> SegmenterConfig:
    return segmenter(config.evalseg.model, num_classes)


def discriminator_network(config, seg_config: SegmenterConfig) -> UperNetSegmenter:
    """The discriminator's module inside the control step: rematerialised and in the compute dtype the config asks.

    Parameters, BatchNorm statistics and the logits stay float32 whatever the compute dtype.
    """
    c = config.control
    return UperNetSegmenter(seg_config, remat=bool(c.get("remat_discriminator", False)),
                            dtype=jnp.dtype(c.get("discriminator_dtype", "float32")))


def segmenter_network(seg_config: Union[SegmenterConfig, DRNConfig, SegformerConfig]
                      ) -> Union[UperNetSegmenter, DRNSegmenter, SegformerSegmenter]:
    """The module of a segmenter's config: sdsup's UperNet (either style), an imported DRN (Cityscapes' evaluator)
    or an imported Segformer. All take [-1, 1] images, return logits at the input size and have `pooled_features`."""
    if isinstance(seg_config, DRNConfig):
        return DRNSegmenter(seg_config)
    if isinstance(seg_config, SegformerConfig):
        return SegformerSegmenter(seg_config)
    return UperNetSegmenter(seg_config)
