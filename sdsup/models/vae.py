"""KL autoencoder of Stable Diffusion (diffusers' AutoencoderKL) in Flax.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels`
channels at 1 / 2**(len(block_out_channels) - 1) of the image size.

Parameter names follow diffusers (`encoder/down_blocks_0/resnets_1/conv1/kernel`
is `encoder.down_blocks.0.resnets.1.conv1.weight`), so `sdsup.convert.vae`
maps weights both ways key by key.

    vae = AutoencoderKL(vae_config_from_diffusers(config_json))   # sdsup.convert.vae
    posterior = vae.apply(variables, images, method=vae.encode)   # DiagonalGaussian
    images = vae.apply(variables, z, method=vae.decode)
    latents = vae.encode_to_latents(variables, images, rng)      # scaled for the UNet
    images = vae.decode_latents(variables, latents)              # inverse of the scaling

With `remat=True` every layer of the encoder/decoder blocks (each resnet,
attention and up/downsampler) is rematerialised in the backward pass: only
layer inputs are kept, which is what makes decoding x0 estimates with
gradients affordable in the trainer. Per layer, not per block: a decoder up
block at 512x512 holds three 128-channel resnets, and rematerialising the
block whole keeps all their internals live at once in its backward (11.7 GiB
of temporaries for SD's decoder at batch 4, 512x512, versus the per-layer
figure in bench/bench_scale.py).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdsup.models.layers import Conv, Dense, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from sdsup.models.ops.attention import attention

Array = jax.Array

# diffusers' epsilon for every GroupNorm of the autoencoder (hard-coded there too).
_EPS = 1e-6


def _tuple_or_none(value):
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters, named and defaulted as in diffusers (SD 1.5 values by default).

    Latent normalisation (used by `encode_to_latents` / `decode_latents`, as
    diffusers pipelines do; the network itself ignores it):
      latents_mean/std given: (z - mean) * scaling_factor / std
      else:                   (z - (shift_factor or 0)) * scaling_factor

    `force_upcast` is kept only so that configs round-trip; it tells PyTorch
    pipelines to run the VAE in float32 and has no effect here (`dtype` rules).

    Flax-only fields: `dtype` (compute), `param_dtype`, `remat`
    (rematerialise each encoder/decoder layer in the backward pass) and
    `attention_impl` (see `sdsup.models.ops.attention.attention`).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, ...]] = 512
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Flax-only.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not isinstance(self.sample_size, int):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for name in ("latents_mean", "latents_std"):
            object.__setattr__(self, name, _tuple_or_none(getattr(self, name)))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be a positive int, got {self.layers_per_block!r}")
        for i, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{i}]={c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(f"{name} has {len(value)} entries; latent_channels is {self.latent_channels}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (self.num_levels - 1)


# A diffusers config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, vae/config.json).
STABLE_DIFFUSION_1_5 = VAEConfig()


# ---------------------------------------------------------------------------
# Posterior.


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' DiagonalGaussianDistribution over NHWC latents (float32).

    `logvar` is clamped to [-30, 20] as in diffusers. A pytree, so it can be
    returned from jit.
    """

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> "DiagonalGaussian":
        """[..., 2C] (mean first, as diffusers' chunk along channels) -> distribution."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: Array) -> Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Array:
        """KL(self || other), other = N(0, 1) by default, summed over all but the batch axis -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=axes,
        )

    def nll(self, sample: Array) -> Array:
        """Negative log-likelihood of `sample`, summed over all but the batch axis -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        log_two_pi = jnp.log(2.0 * jnp.pi)
        return 0.5 * jnp.sum(log_two_pi + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axes)


# ---------------------------------------------------------------------------
# Blocks.


class VAEAttention(nn.Module):
    """diffusers' Attention as the VAE mid block builds it (`_from_deprecated_attn_block`).

    GroupNorm (`group_norm`) -> single-head self-attention over the H*W
    tokens with biased to_q/to_k/to_v and to_out.0 -> + input. All weights are
    direct children, as in diffusers (`attentions.0.to_q`, not nested).
    """

    groups: int
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        residual = x
        y = GroupNorm(self.groups, _EPS, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q = Dense(c, name="to_q", **kw)(y)
        k = Dense(c, name="to_k", **kw)(y)
        v = Dense(c, name="to_v", **kw)(y)
        o = attention(q, k, v, self.attention_impl).reshape(b, h, w, c)
        return Dense(c, name="to_out_0", **kw)(o) + residual.astype(self.dtype)


class _Block(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _layer(self, cls):
        # nn.remat keeps parameter names, so checkpoints are the same either way.
        return nn.remat(cls) if self.remat else cls

    def _resnet(self, i: int) -> ResnetBlock2D:
        return self._layer(ResnetBlock2D)(self.out_channels, groups=self.groups, eps=_EPS, name=f"resnets_{i}",
                                          **self._kw)


class DownEncoderBlock2D(_Block):
    """ResnetBlock2D x num_layers (no time embedding), then a stride-2 conv padded (0, 1, 0, 1)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, h: Array) -> Array:
        for i in range(self.num_layers):
            h = self._resnet(i)(h)
        if self.add_downsample:
            h = self._layer(Downsample2D)(self.out_channels, padding=0, name="downsamplers_0", **self._kw)(h)
        return h


class UpDecoderBlock2D(_Block):
    """ResnetBlock2D x num_layers (no time embedding), then nearest x2 + conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, h: Array) -> Array:
        for i in range(self.num_layers):
            h = self._resnet(i)(h)
        if self.add_upsample:
            h = self._layer(Upsample2D)(self.out_channels, name="upsamplers_0", **self._kw)(h)
        return h


class UNetMidBlock2D(_Block):
    """diffusers' UNetMidBlock2D as the VAE uses it: resnets_0, [attentions_0], resnets_1."""

    add_attention: bool = True
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, h: Array) -> Array:
        h = self._resnet(0)(h)
        for i in range(self.num_layers):
            if self.add_attention:
                h = self._layer(VAEAttention)(self.groups, self.attention_impl, name=f"attentions_{i}", **self._kw)(h)
            h = self._resnet(i + 1)(h)
        return h


def _kw(config: VAEConfig) -> Dict[str, Any]:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class Encoder(nn.Module):
    """conv_in -> DownEncoderBlock2D per level -> mid block -> GroupNorm+SiLU -> conv_out (2 * latent_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = _kw(cfg)
        h = Conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        for i, c in enumerate(cfg.block_out_channels):
            h = DownEncoderBlock2D(
                c, cfg.layers_per_block, cfg.norm_num_groups, cfg.remat, add_downsample=i < cfg.num_levels - 1,
                name=f"down_blocks_{i}", **kw,
            )(h)
        h = UNetMidBlock2D(
            cfg.block_out_channels[-1], 1, cfg.norm_num_groups, cfg.remat, add_attention=cfg.mid_block_add_attention,
            attention_impl=cfg.attention_impl, name="mid_block", **kw,
        )(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, silu=True, name="conv_norm_out", **kw)(h)
        return Conv(2 * cfg.latent_channels, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """conv_in -> mid block -> UpDecoderBlock2D per level (layers_per_block + 1 resnets) -> GroupNorm+SiLU -> conv_out."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        kw = _kw(cfg)
        h = Conv(cfg.block_out_channels[-1], name="conv_in", **kw)(z)
        h = UNetMidBlock2D(
            cfg.block_out_channels[-1], 1, cfg.norm_num_groups, cfg.remat, add_attention=cfg.mid_block_add_attention,
            attention_impl=cfg.attention_impl, name="mid_block", **kw,
        )(h)
        for i, c in enumerate(reversed(cfg.block_out_channels)):
            h = UpDecoderBlock2D(
                c, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.remat, add_upsample=i < cfg.num_levels - 1,
                name=f"up_blocks_{i}", **kw,
            )(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, silu=True, name="conv_norm_out", **kw)(h)
        return Conv(cfg.out_channels, name="conv_out", **kw)(h)


def _variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept either {'params': tree} or the bare parameter tree."""
    return params if set(params) == {"params"} else {"params": params}


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL over NHWC images.

    encode(x [B, H, W, in]) -> DiagonalGaussian over [B, H/f, W/f, latent_channels]
    decode(z) -> [B, H, W, out_channels]
    __call__(x, rng=None, sample_posterior=False) -> decode(sample or mode of encode(x))
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = _kw(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), padding="VALID", **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), padding="VALID", **kw)

    def _check_spatial(self, x: Array, what: str, factor: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be NHWC, got shape {x.shape}")
        if factor > 1 and (x.shape[1] % factor or x.shape[2] % factor):
            raise ValueError(f"{what} of size {x.shape[1:3]} is not divisible by {factor}")

    def encode(self, x: Array) -> DiagonalGaussian:
        cfg = self.config
        self._check_spatial(x, "images", cfg.downsample_factor)
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(f"images have {x.shape[-1]} channels, the VAE expects {cfg.in_channels}")
        h = self.encoder(x.astype(jnp.dtype(cfg.dtype)))
        if cfg.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z: Array) -> Array:
        cfg = self.config
        self._check_spatial(z, "latents", 1)
        if z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latents have {z.shape[-1]} channels, the VAE expects {cfg.latent_channels}")
        z = z.astype(jnp.dtype(cfg.dtype))
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array, rng: Optional[Array] = None, sample_posterior: bool = False) -> Array:
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("sample_posterior=True needs an rng")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z)

    # -- Latent scaling, as diffusers pipelines apply it. ------------------

    @nn.nowrap
    def scale_latents(self, z: Array) -> Array:
        """Raw VAE latents -> the normalised latents the diffusion model sees."""
        cfg = self.config
        if cfg.latents_mean is not None:
            mean = jnp.asarray(cfg.latents_mean, jnp.float32)
            std = jnp.asarray(cfg.latents_std, jnp.float32)
            return ((z - mean) * cfg.scaling_factor / std).astype(z.dtype)
        if cfg.shift_factor is not None:
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor

    @nn.nowrap
    def unscale_latents(self, latents: Array) -> Array:
        """Inverse of `scale_latents`."""
        cfg = self.config
        if cfg.latents_mean is not None:
            mean = jnp.asarray(cfg.latents_mean, jnp.float32)
            std = jnp.asarray(cfg.latents_std, jnp.float32)
            return (latents * std / cfg.scaling_factor + mean).astype(latents.dtype)
        z = latents / cfg.scaling_factor
        if cfg.shift_factor is not None:
            z = z + cfg.shift_factor
        return z

    @nn.nowrap
    def encode_to_latents(self, params: Mapping[str, Any], images: Array, rng: Optional[Array] = None) -> Array:
        """Images [B, H, W, C] in [-1, 1] -> scaled latents (a posterior sample, or its mean when rng is None).

        Call on the unbound module: `vae.encode_to_latents(params, images, rng)`;
        `params` is {'params': tree} or the bare tree.
        """
        posterior = self.apply(_variables(params), images, method=AutoencoderKL.encode)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.scale_latents(z)

    @nn.nowrap
    def decode_latents(self, params: Mapping[str, Any], latents: Array) -> Array:
        """Scaled latents -> images (roughly [-1, 1], not clipped). Differentiable; remat per config."""
        return self.apply(_variables(params), self.unscale_latents(latents), method=AutoencoderKL.decode)
