"""Building blocks shared by the UNet, the ControlNet and the VAE.

Every module here mirrors a diffusers module closely enough that its
parameters convert one to one (see `sdsup.convert.torch_layout`):

  Flax                           diffusers
  Conv      kernel HWIO, bias    nn.Conv2d weight OIHW, bias
  Dense     kernel (in, out)     nn.Linear weight (out, in)
  GroupNorm / LayerNorm scale    weight

Submodule names follow diffusers' attribute names, with a list index written
`name_N` (diffusers `name.N`). Images are NHWC throughout.

Numerics: normalisation statistics are always taken in float32 whatever the
compute dtype, and the attention softmax runs in float32.

The modules hold parameters and call the kernels of `sdsup.models.ops` for
the arithmetic. Speed (CPU, measured against PyTorch in
bench/bench_unet.py): GroupNorm, convolution and dense layers have
hand-written backward passes, large 3x3 convolutions use Winograd's
algorithm, the long-sequence attention is computed in cache-sized blocks
(all on CPU only, see `sdsup.models.ops.dispatch`), and the upsampler's
convolution runs on the low-resolution grid; each ops module says why and
what it measured.
"""

import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.models.ops.attention import attention
from sdsup.models.ops.conv import convolution
from sdsup.models.ops.dense import dense
from sdsup.models.ops.norm import group_norm, layer_norm
from sdsup.models.ops.upsample import upsample2x_conv3x3, upsample_nearest
from sdsup.models.partitioning import BIAS, CONV_KERNEL, DENSE_KERNEL, NORM_PARAM, with_axes

Dtype = Any
Array = jax.Array

# PyTorch's default for Conv2d and Linear (kaiming_uniform with a=sqrt(5)):
# uniform in +-1/sqrt(fan_in), which is variance_scaling(1/3, fan_in, uniform).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ---------------------------------------------------------------------------
# Convolution and dense layers carrying logical axes (arithmetic: ops.conv, ops.dense).

def _kernel_and_bias(module: nn.Module, shape: Tuple[int, ...], axes, use_bias: bool, param_dtype, kernel_init):
    """Create (kernel of `shape` with logical `axes`, bias [shape[-1]] or None) in `module`'s scope."""
    kernel = module.param("kernel", with_axes(kernel_init, axes), shape, param_dtype)
    bias = None
    if use_bias:
        bias = module.param("bias", with_axes(nn.initializers.zeros, BIAS), (shape[-1],), param_dtype)
    return kernel, bias


def _conv_params(module: nn.Module, kernel_size, in_features: int, features: int, use_bias: bool, param_dtype, kernel_init):
    """(kernel [kh, kw, in, out], bias [out] or None)."""
    shape = (*kernel_size, in_features, features)
    return _kernel_and_bias(module, shape, CONV_KERNEL, use_bias, param_dtype, kernel_init)


class ConvParams(nn.Module):
    """A Conv layer's parameters, returned unapplied (for layers that compute the convolution differently)."""

    features: int
    kernel_size: Tuple[int, int] = (3, 3)
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = torch_default_kernel_init

    @nn.compact
    def __call__(self, in_features: int) -> Tuple[Array, Optional[Array]]:
        return _conv_params(
            self, self.kernel_size, in_features, self.features, self.use_bias, self.param_dtype, self.kernel_init
        )


class Conv(nn.Module):
    """2-D convolution over NHWC with an HWIO kernel.

    `padding` is ((top, bottom), (left, right)) or "SAME"/"VALID". A 1x1
    stride-1 convolution is computed as a matmul over channels (identical
    numbers, cheaper).
    """

    features: int
    kernel_size: Tuple[int, int] = (3, 3)
    strides: Tuple[int, int] = (1, 1)
    padding: Any = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = torch_default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        kernel, bias = _conv_params(
            self, self.kernel_size, x.shape[-1], self.features, self.use_bias, self.param_dtype, self.kernel_init
        )
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        strides = tuple(self.strides)
        if isinstance(self.padding, str):
            padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, self.padding))
        else:
            padding = tuple(tuple(p) for p in self.padding)
        if (kh, kw) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
            y = dense(x, kernel[0, 0])
        else:
            y = convolution(x, kernel, strides, padding)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


def _dense_params(module: nn.Module, in_features: int, features: int, use_bias: bool, param_dtype, kernel_init):
    """(kernel [in, out], bias [out] or None)."""
    return _kernel_and_bias(module, (in_features, features), DENSE_KERNEL, use_bias, param_dtype, kernel_init)


class Dense(nn.Module):
    """Linear layer over the last axis with an (in, out) kernel."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = torch_default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, bias = _dense_params(self, x.shape[-1], self.features, self.use_bias, self.param_dtype, self.kernel_init)
        y = dense(x.astype(self.dtype), kernel.astype(self.dtype))
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


class DenseParams(nn.Module):
    """A Dense layer's parameters, returned unapplied, so that several layers can run as one matmul."""

    features: int
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = torch_default_kernel_init

    @nn.compact
    def __call__(self, in_features: int) -> Tuple[Array, Optional[Array]]:
        return _dense_params(self, in_features, self.features, self.use_bias, self.param_dtype, self.kernel_init)


def _fused_dense(x: Array, params: Sequence[Tuple[Array, Optional[Array]]], dtype) -> Tuple[Array, ...]:
    """x @ [W1 | W2 | ...] as one matmul (one pass over x, one bigger, faster
    product), split back into the layers' outputs."""
    kernel = jnp.concatenate([k for k, _ in params], axis=1).astype(dtype)
    y = dense(x.astype(dtype), kernel)
    if params[0][1] is not None:
        y = y + jnp.concatenate([b for _, b in params]).astype(dtype)
    sizes = np.cumsum([k.shape[1] for k, _ in params])[:-1]
    return tuple(jnp.split(y, sizes, axis=-1))


# ---------------------------------------------------------------------------
# Normalisation (arithmetic: ops.norm).


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(num_groups, C, eps, affine=True) over NHWC, optionally fused with SiLU."""

    num_groups: int = 32
    epsilon: float = 1e-5
    silu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, NORM_PARAM), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, NORM_PARAM), (c,), self.param_dtype)
        return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon, self.silu)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm(C, eps) over the last axis; statistics in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, NORM_PARAM), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, NORM_PARAM), (c,), self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon, dtype=self.dtype)


# ---------------------------------------------------------------------------
# Timestep embedding.


def normalize_images(images: Array, mean, std, dtype) -> Array:
    """Pixels in [-1, 1] -> [0, 1] -> (x - mean) / std per channel: what PyTorch segmenters take as input."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def timestep_embedding(
    timesteps: Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> Array:
    """Sinusoidal embedding [N, embedding_dim] of N timesteps, as diffusers' `get_timestep_embedding`.

    Frequencies exp(-log(max_period) * i / (half - downscale_freq_shift)),
    i < half; the output is [sin, cos] ([cos, sin] with flip_sin_to_cos),
    zero-padded by one column when embedding_dim is odd. Always float32.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    time_embed_dim: int
    out_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


# ---------------------------------------------------------------------------
# Attention (arithmetic: ops.attention).


class Attention(nn.Module):
    """diffusers' Attention (to_q, to_k, to_v, to_out.0) without norms or residual.

    Self-attention when `context` is None; cross-attention otherwise. The
    UNet's transformer blocks use qkv_bias=False; the VAE mid-block uses True.
    """

    heads: int
    dim_head: int
    out_features: Optional[int] = None
    qkv_bias: bool = False
    out_bias: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
        inner = self.heads * self.dim_head
        params = functools.partial(DenseParams, inner, use_bias=self.qkv_bias, param_dtype=self.param_dtype)
        b, lq, _ = x.shape
        wq = params(name="to_q")(x.shape[-1])
        kv_in = x if context is None else context
        wk = params(name="to_k")(kv_in.shape[-1])
        wv = params(name="to_v")(kv_in.shape[-1])
        if context is None:
            q, k, v = _fused_dense(x, (wq, wk, wv), self.dtype)
        else:
            (q,) = _fused_dense(x, (wq,), self.dtype)
            k, v = _fused_dense(context, (wk, wv), self.dtype)
        lk = kv_in.shape[1]
        q = q.reshape(b, lq, self.heads, self.dim_head)
        k = k.reshape(b, lk, self.heads, self.dim_head)
        v = v.reshape(b, lk, self.heads, self.dim_head)
        o = attention(q, k, v, self.attention_impl).reshape(b, lq, inner)
        return Dense(
            self.out_features or x.shape[-1],
            use_bias=self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="to_out_0",
        )(o)


class GEGLU(nn.Module):
    """diffusers' GEGLU: proj to 2*dim_out, value * gelu(gate) with exact (erf) GELU."""

    dim_out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net.0 (GEGLU), net.1 (dropout 0), net.2 (Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        inner = self.dim * self.mult
        h = GEGLU(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer_norm type): self-attn, cross-attn, GEGLU FF, pre-norm residuals."""

    dim: int
    heads: int
    dim_head: int
    norm_eps: float = 1e-5
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array]) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = functools.partial(Attention, self.heads, self.dim_head, attention_impl=self.attention_impl, **kw)
        h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        x = attn(name="attn1")(h, context if self.only_cross_attention else None) + x
        if context is not None:
            h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
            x = attn(name="attn2")(h, context) + x
        h = LayerNorm(self.norm_eps, name="norm3", **kw)(x)
        return FeedForward(self.dim, name="ff", **kw)(h) + x


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel on continuous NHWC input.

    GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Linear with
    use_linear_projection) -> BasicTransformerBlocks over the H*W tokens ->
    proj_out -> + input.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array]) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wdt, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wdt, c))
        else:
            h = Conv(inner, (1, 1), padding="VALID", name="proj_in", **kw)(h).reshape(b, hgt * wdt, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                only_cross_attention=self.only_cross_attention,
                attention_impl=self.attention_impl,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        if self.use_linear_projection:
            h = Dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wdt, c)
        else:
            h = Conv(c, (1, 1), padding="VALID", name="proj_out", **kw)(h.reshape(b, hgt, wdt, inner))
        return h + residual


# ---------------------------------------------------------------------------
# Convolutional blocks.


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding norm, SiLU).

    norm1+SiLU -> conv1 -> (+ time_emb_proj(SiLU(temb))) -> norm2+SiLU ->
    conv2, plus the input (through a 1x1 conv_shortcut when the channel count
    changes or `use_in_shortcut`), divided by output_scale_factor. With temb
    None (the VAE) there is no time_emb_proj parameter.
    """

    out_channels: Optional[int] = None
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    use_in_shortcut: Optional[bool] = None
    conv_shortcut_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_channels = self.out_channels or x.shape[-1]
        h = GroupNorm(self.groups, self.eps, silu=True, name="norm1", **kw)(x)
        h = Conv(out_channels, name="conv1", **kw)(h)
        if temb is not None:
            t = Dense(out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups_out or self.groups, self.eps, silu=True, name="norm2", **kw)(h)
        h = Conv(out_channels, name="conv2", **kw)(h)
        use_shortcut = x.shape[-1] != out_channels if self.use_in_shortcut is None else self.use_in_shortcut
        if use_shortcut:
            x = Conv(
                out_channels, (1, 1), padding="VALID", use_bias=self.conv_shortcut_bias, name="conv_shortcut", **kw
            )(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """diffusers' Downsample2D with use_conv: a stride-2 3x3 conv named `conv`.

    padding=1 pads one pixel on every side; padding=0 (the VAE) pads only the
    bottom and right, as diffusers does with F.pad(0, 1, 0, 1).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return Conv(
            self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(x)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D with use_conv: nearest x2 (or to output_size) then a 3x3 conv named `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, output_size: Optional[Tuple[int, int]] = None) -> Array:
        b, h, w, c = x.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            x = upsample_nearest(x, output_size)
            return Conv(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        kernel, bias = ConvParams(self.out_channels, param_dtype=self.param_dtype, name="conv")(c)
        y = upsample2x_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)
