"""Text -> layout network: a cross-attention UNet over partly masked label maps.

The input map [B, h, w] holds class ids in [0, N) and the MASK id N; each id
is embedded (a learned [N + 1, embed_dim] table) plus, optionally, a learned
per-position vector (`position_embedding`), and the UNet of
`sdsup.models.unet` (the same blocks as the latent UNet, cross-attending to
the text encoder's states) reads the embedded map with the mask ratio as its
"timestep" (ratio * 1000, sinusoidal embedding), and returns logits
[B, h, w, N] over the classes. `sdsup.diffusion.masked` trains and samples it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsup.models.partitioning import EMBEDDING, POSITION_EMBEDDING, with_axes
from sdsup.models.unet import UNet2DConditionModel, UNetConfig

# The mask ratio in [0, 1] enters the UNet as a timestep in [0, 1000], the
# range its sinusoidal embedding was designed for.
RATIO_TO_TIMESTEP = 1000.0


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """`num_classes` classes (the MASK id is num_classes), maps of resolution x resolution."""

    num_classes: int
    resolution: int
    embed_dim: int
    unet: UNetConfig
    # A learned [h * w, embed_dim] vector added to every position's embedding. The fully masked
    # map is the same at every pixel, so without it the UNet sees where a pixel lies only through
    # the convolutions' zero padding, and "left of" / "at the top" are slow to learn.
    position_embedding: bool = False

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.unet.in_channels != self.embed_dim or self.unet.out_channels != self.num_classes:
            raise ValueError(
                f"the UNet must read embed_dim={self.embed_dim} channels and write num_classes={self.num_classes}, "
                f"got in_channels={self.unet.in_channels}, out_channels={self.unet.out_channels}")
        levels = len(self.unet.block_out_channels)
        if self.resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {self.resolution} must divide by 2**{levels - 1} for a {levels}-level UNet")

    @property
    def mask_id(self) -> int:
        return self.num_classes

    @classmethod
    def build(cls, num_classes: int, resolution: int, embed_dim: int, cross_attention_dim: int,
              position_embedding: bool = False, **unet_fields: Any) -> "LayoutConfig":
        """A config whose UNet fits the map (in/out channels, sample size, text width)."""
        unet = UNetConfig(**dict(unet_fields, in_channels=embed_dim, out_channels=num_classes,
                                 sample_size=resolution, cross_attention_dim=cross_attention_dim))
        return cls(num_classes=num_classes, resolution=resolution, embed_dim=embed_dim, unet=unet,
                   position_embedding=position_embedding)


class LayoutModel(nn.Module):
    """logits [B, h, w, N] = f(ids [B, h, w], mask ratio [B], text states [B, L, D])."""

    config: LayoutConfig

    @nn.compact
    def __call__(self, ids: jax.Array, ratio: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        if ids.ndim != 3 or ids.shape[1:] != (cfg.resolution, cfg.resolution):
            raise ValueError(f"expected ids [B, {cfg.resolution}, {cfg.resolution}], got {ids.shape}")
        dtype = jnp.dtype(cfg.unet.param_dtype)
        table = self.param("class_embedding", with_axes(nn.initializers.normal(1.0), EMBEDDING),
                           (cfg.num_classes + 1, cfg.embed_dim), dtype)
        x = jnp.take(table, ids, axis=0)
        if cfg.position_embedding:
            r = cfg.resolution
            pos = self.param("position_embedding", with_axes(nn.initializers.normal(1.0), POSITION_EMBEDDING),
                             (r * r, cfg.embed_dim), dtype)
            x = x + pos.reshape(r, r, cfg.embed_dim)
        t = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), (ids.shape[0],)) * RATIO_TO_TIMESTEP
        logits = UNet2DConditionModel(cfg.unet, name="unet")(x, t, context)
        return logits.astype(jnp.float32)


def dummy_inputs(config: LayoutConfig, context_length: int, batch_size: int = 1, context_dim: Optional[int] = None):
    """(ids, ratio, context) zeros for init / eval_shape."""
    r = config.resolution
    return (jnp.full((batch_size, r, r), config.mask_id, jnp.int32), jnp.ones((batch_size,), jnp.float32),
            jnp.zeros((batch_size, context_length, context_dim or config.unet.cross_attention_dim), jnp.float32))
