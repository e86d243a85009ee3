"""Conditional UNet of Stable Diffusion 1.x/2.x (diffusers' UNet2DConditionModel) in Flax.

Parameter names follow diffusers (`down_blocks_0/resnets_1/conv1/kernel` is
`down_blocks.0.resnets.1.conv1.weight`), so `sdsup.convert.unet` maps weights
both ways key by key.

Reusing the encoder half (ControlNet)
-------------------------------------
`UNetEncoderMixin` builds conv_in, time_embedding, down_blocks_* and
mid_block with exactly the UNet's submodule names and runs them. A ControlNet
written as

    class ControlNet(UNetEncoderMixin, nn.Module):
        config: UNetConfig

        def setup(self):
            self.setup_encoder()              # conv_in, time_embedding, down_blocks, mid_block
            ...                               # its own cond embedding and zero convs

        def __call__(self, sample, timesteps, context, cond):
            emb = self.embed_time(timesteps, sample.shape[0])
            h = self.conv_in(sample) + cond_embedding(cond)
            h, skips = self.run_down_blocks(h, emb, context)
            h = self.run_mid_block(h, emb, context)
            ...

has parameters `conv_in`, `time_embedding`, `down_blocks_*`, `mid_block`
identical in name and shape to the UNet's, so initialising it from a UNet is

    for name in encoder_param_names(config):
        controlnet_params[name] = unet_params[name]

The skips are what `UNet2DConditionModel` accepts as
`down_block_additional_residuals` (one per skip connection, conv_in's output
first) and the mid block's output matches `mid_block_additional_residual`.
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsup.models.layers import (
    Conv,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)

Array = jax.Array
IntOrTuple = Union[int, Tuple[int, ...]]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters, named and defaulted as diffusers' UNet2DConditionModel.

    `attention_head_dim` keeps diffusers' (mis)naming: it is the number of
    attention HEADS per block (SD-1.5: 8; SD-2.x: (5, 10, 20, 20)); each head
    has block_out_channels[i] // heads channels.

    Flax-only fields: `dtype` (compute), `param_dtype`, `remat` (rematerialise
    each down/mid/up block in the backward pass) and `attention_impl` (see
    `sdsup.models.ops.attention.attention`).
    """

    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # Flax-only.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"need one down and one up block type per entry of block_out_channels {self.block_out_channels}; "
                f"got {self.down_block_types} and {self.up_block_types}"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; supported: {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; supported: {UP_BLOCK_TYPES}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != n:
                raise ValueError(f"{name}={value} must be an int or have one entry per block ({n})")
        for i, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{i}]={c} is not divisible by norm_num_groups={self.norm_num_groups}")
            if c % self.heads(i):
                raise ValueError(f"block_out_channels[{i}]={c} is not divisible by {self.heads(i)} attention heads")

    # Per-block values, with int settings broadcast over the blocks.
    def _per_block(self, value: IntOrTuple, i: int) -> int:
        return value if isinstance(value, int) else value[i]

    def heads(self, i: int) -> int:
        return self._per_block(self.attention_head_dim, i)

    def layers(self, i: int) -> int:
        return self._per_block(self.layers_per_block, i)

    def transformer_layers(self, i: int) -> int:
        return self._per_block(self.transformer_layers_per_block, i)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_skips(self) -> int:
        """Number of skip connections (= down_block_additional_residuals a UNet accepts)."""
        n = len(self.block_out_channels)
        return 1 + sum(self.layers(i) for i in range(n)) + (n - 1)


# A diffusers config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json).
STABLE_DIFFUSION_1_5 = UNetConfig(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# Stable Diffusion 2.1 (768-v): linear projections, per-block head counts, fp32 attention scores.
STABLE_DIFFUSION_2_1 = UNetConfig(
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)


# ---------------------------------------------------------------------------
# Blocks.


class _BlockBase(nn.Module):
    """Fields shared by the down, mid and up blocks.

    Subclasses set the class constant `with_attention`; the attention fields
    are ignored when it is False.
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    with_attention = False

    @property
    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _resnet(self, i: int, **kwargs) -> ResnetBlock2D:
        return ResnetBlock2D(
            self.out_channels, groups=self.groups, eps=self.eps, name=f"resnets_{i}", **kwargs, **self._kw
        )

    def _transformer(self, i: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            self.out_channels // self.heads,
            num_layers=self.transformer_layers,
            norm_num_groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            attention_impl=self.attention_impl,
            name=f"attentions_{i}",
            **self._kw,
        )


class DownBlock2D(_BlockBase):
    """ResnetBlock2D x num_layers, then an optional stride-2 downsampler. Returns (h, skips)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Optional[Array] = None) -> Tuple[Array, Tuple[Array, ...]]:
        skips = ()
        for i in range(self.num_layers):
            h = self._resnet(i)(h, temb)
            if self.with_attention:
                h = self._transformer(i)(h, context)
            skips += (h,)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **self._kw)(h)
            skips += (h,)
        return h, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after every resnet."""

    with_attention = True


class UpBlock2D(_BlockBase):
    """(concat skip -> ResnetBlock2D) x num_layers, then an optional nearest-x2 upsampler + conv.

    `skips` are consumed from the end, as diffusers pops them;
    `upsample_size` (static) is the spatial size to upsample to.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        h: Array,
        skips: Tuple[Array, ...],
        temb: Array,
        context: Optional[Array] = None,
        upsample_size: Optional[Tuple[int, int]] = None,
    ) -> Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"{type(self).__name__} with {self.num_layers} resnets got {len(skips)} skips")
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = self._resnet(i)(h, temb)
            if self.with_attention:
                h = self._transformer(i)(h, context)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw)(h, upsample_size)
        return h


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after every resnet."""

    with_attention = True


class UNetMidBlock2DCrossAttn(_BlockBase):
    """resnets_0, then (Transformer2DModel, ResnetBlock2D) x num_layers."""

    output_scale_factor: float = 1.0
    with_attention = True

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Optional[Array] = None) -> Array:
        h = self._resnet(0, output_scale_factor=self.output_scale_factor)(h, temb)
        for i in range(self.num_layers):
            h = self._transformer(i)(h, context)
            h = self._resnet(i + 1, output_scale_factor=self.output_scale_factor)(h, temb)
        return h


def _maybe_remat(cls, remat: bool, static_argnums=()):
    return nn.remat(cls, static_argnums=static_argnums) if remat else cls


# ---------------------------------------------------------------------------
# Encoder half, shared with the ControlNet.


class UNetEncoderMixin:
    """conv_in, time_embedding, down_blocks_*, mid_block of a diffusers-layout UNet.

    Mix into an nn.Module that has a `config: UNetConfig` field and call
    `setup_encoder()` from its `setup()`. See the module docstring.
    """

    config: UNetConfig

    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.dtype)

    def _kw(self):
        return dict(dtype=jnp.dtype(self.config.dtype), param_dtype=jnp.dtype(self.config.param_dtype))

    def setup_encoder(self) -> None:
        cfg = self.config
        kw = self._kw()
        self.conv_in = Conv(cfg.block_out_channels[0], **kw)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, **kw)
        down_blocks = []
        n = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.down_block_types):
            common = dict(
                out_channels=cfg.block_out_channels[i],
                num_layers=cfg.layers(i),
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                **kw,
            )
            if block_type == "CrossAttnDownBlock2D":
                block = _maybe_remat(CrossAttnDownBlock2D, cfg.remat)(
                    heads=cfg.heads(i),
                    transformer_layers=cfg.transformer_layers(i),
                    use_linear_projection=cfg.use_linear_projection,
                    attention_impl=cfg.attention_impl,
                    **common,
                )
            else:
                block = _maybe_remat(DownBlock2D, cfg.remat)(**common)
            down_blocks.append(block)
        self.down_blocks = down_blocks
        self.mid_block = _maybe_remat(UNetMidBlock2DCrossAttn, cfg.remat)(
            out_channels=cfg.block_out_channels[-1],
            num_layers=1,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            heads=cfg.heads(n - 1),
            transformer_layers=cfg.transformer_layers(n - 1),
            use_linear_projection=cfg.use_linear_projection,
            attention_impl=cfg.attention_impl,
            output_scale_factor=cfg.mid_block_scale_factor,
            **kw,
        )

    def embed_time(self, timesteps: Array, batch_size: int) -> Array:
        """Timestep(s) (scalar, [1] or [B]) -> time embedding [B, time_embed_dim]."""
        cfg = self.config
        t = jnp.asarray(timesteps)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t[None], (batch_size,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(t_emb.astype(self.compute_dtype))

    def run_down_blocks(self, h: Array, emb: Array, context: Array) -> Tuple[Array, Tuple[Array, ...]]:
        """h = conv_in output (plus any conditioning) -> (h, skips), skips[0] being h itself."""
        skips = (h,)
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        return h, skips

    def run_mid_block(self, h: Array, emb: Array, context: Array) -> Array:
        return self.mid_block(h, emb, context)


def encoder_param_names(config: UNetConfig) -> Tuple[str, ...]:
    """Top-level parameter names that the encoder half (UNetEncoderMixin) creates."""
    return ("conv_in", "time_embedding") + tuple(f"down_blocks_{i}" for i in range(len(config.block_out_channels))) + (
        "mid_block",
    )


class UNet2DConditionModel(UNetEncoderMixin, nn.Module):
    """diffusers' UNet2DConditionModel over NHWC latents.

    __call__(sample [B, H, W, C], timesteps [B] or scalar, encoder_hidden_states [B, T, D],
             down_block_additional_residuals=None, mid_block_additional_residual=None) -> [B, H, W, out_channels]

    The additional residuals are ControlNet's: one NHWC array per skip
    connection (`config.num_skips`, conv_in's output first), added to the
    skips before the up path, and one added to the mid block's output. (Given
    down residuals without a mid residual, diffusers instead treats them as
    T2I-Adapter residuals; here they are always added to the skips.)
    """

    config: UNetConfig

    def setup(self):
        cfg = self.config
        kw = self._kw()
        self.setup_encoder()
        n = len(cfg.block_out_channels)
        rev_channels = cfg.block_out_channels[::-1]
        up_blocks = []
        for i, block_type in enumerate(cfg.up_block_types):
            level = n - 1 - i
            common = dict(
                out_channels=rev_channels[i],
                num_layers=cfg.layers(level) + 1,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                add_upsample=i < n - 1,
                **kw,
            )
            # upsample_size (argument 5, counting self) is a static shape.
            if block_type == "CrossAttnUpBlock2D":
                block = _maybe_remat(CrossAttnUpBlock2D, cfg.remat, static_argnums=(5,))(
                    heads=cfg.heads(level),
                    transformer_layers=cfg.transformer_layers(level),
                    use_linear_projection=cfg.use_linear_projection,
                    attention_impl=cfg.attention_impl,
                    **common,
                )
            else:
                block = _maybe_remat(UpBlock2D, cfg.remat, static_argnums=(5,))(**common)
            up_blocks.append(block)
        self.up_blocks = up_blocks
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, silu=True, **kw)
        self.conv_out = Conv(cfg.out_channels, **kw)

    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Array,
        down_block_additional_residuals: Optional[Sequence[Array]] = None,
        mid_block_additional_residual: Optional[Array] = None,
    ) -> Array:
        cfg = self.config
        dtype = self.compute_dtype
        sample = sample.astype(dtype)
        context = encoder_hidden_states.astype(dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed_time(timesteps, sample.shape[0])
        h = self.conv_in(sample)
        h, skips = self.run_down_blocks(h, emb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} arrays; "
                    f"this UNet has {len(skips)} skip connections"
                )
            skips = tuple(s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals))
        h = self.run_mid_block(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(dtype)
        for i, block in enumerate(self.up_blocks):
            n_res = cfg.layers(len(cfg.block_out_channels) - 1 - i) + 1
            block_skips, skips = skips[-n_res:], skips[:-n_res]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, block_skips, emb, context, upsample_size)
        h = self.conv_norm_out(h)
        return self.conv_out(h)
