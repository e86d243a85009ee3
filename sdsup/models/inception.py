"""Inception-v3 feature network for FID, in two variants that share one parameter layout.

`variant="fid"` is the network behind the standard FID: the TF Inception
graph of 2015-12-05 that the original FID code (TTUR, Heusel et al. 2017)
ran, as pytorch-fid ports it (`fid_inception_v3`, weights
`pt_inception-2015-12-05-6726825d.pth`). It differs from torchvision's
`inception_v3` in four places, none visible in the weights:

* 1008 logits (the graph's softmax has 1008 classes; torchvision has 1000);
* the 3x3 average pools in Mixed_5b-d (A blocks), Mixed_6b-e (C blocks) and
  Mixed_7b (first E block) divide by the number of *valid* inputs in the
  window (TF's "SAME" pooling; torch `count_include_pad=False`), where
  torchvision divides by 9 everywhere, padding included;
* Mixed_7c (second E block) pools its branch with a 3x3 *max* pool (stride 1,
  padding 1) instead of an average pool: a quirk of that TF graph, which
  pytorch-fid reproduces because published FIDs were computed with it;
* its inputs are images resized to 299x299 and scaled to [-1, 1] (`preprocess`).

`variant="torchvision"` is torchvision's `inception_v3` with
`aux_logits=False` and `transform_input=False` (plain blocks, average pools
counting padding, 1000 classes by default). It is here because it is the
network a PyTorch reference can be built from offline (with random weights),
which is how the tests prove the shared layers.

Neither variant has the auxiliary classifier: it only exists for training,
and FID never reads it (`sdsup.convert.inception` drops `AuxLogits.*` keys).

Parameters mirror torchvision's module names (`Mixed_6b/branch7x7_2/conv`,
`.../bn`, `fc`), so weights convert one to one (`sdsup/convert/inception.py`):
conv kernels HWIO (torch OIHW, no bias), BatchNorm `scale`/`bias` in
`params` and `mean`/`var` in `batch_stats` (torch running_mean/running_var),
`fc` a Dense (in, out). BatchNorm only runs in inference mode, eps 0.001 (the
TF graph's value, which torchvision's BasicConv2d keeps): this network is a
frozen measuring instrument, never trained here.

`InceptionV3.__call__` takes the network input (NHWC, already in [-1, 1],
at least 75x75) and returns the 2048-d "pool3" features (the global average
of Mixed_7c), optionally with the logits. For FID on uint8 images use
`preprocess` first, or `sdsup.evaluation.fid.inception_extractor`, which does
both. On GPUs XLA may run float32 convolutions in TF32 (so does PyTorch's
cuDNN by default); wrap the call in `jax.default_matmul_precision("highest")`
for numbers closer to a CPU reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.errors import SdsupError
from sdsup.models.layers import Conv, Dense
from sdsup.models.partitioning import NORM_PARAM, with_axes

VARIANTS = ("fid", "torchvision")
# torchvision's BasicConv2d keeps the TF graph's BatchNorm epsilon.
BN_EPS = 1e-3
# Below this the stride-2 stages leave Mixed_7a an empty map (torchvision's `min_size`).
MIN_SIZE = 75
# pytorch-fid resizes every image to the TF graph's input size.
FID_IMAGE_SIZE = 299


class InceptionInputError(SdsupError, ValueError):
    """Images of the wrong rank, channel count, dtype or size."""


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Which Inception-v3 (see module docstring) and its classifier width."""

    variant: str = "fid"
    num_classes: int = 1008
    # `preprocess` resizes images to image_size x image_size.
    image_size: int = FID_IMAGE_SIZE

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.image_size < MIN_SIZE:
            raise ValueError(f"image_size must be >= {MIN_SIZE} (Inception-v3's smallest input), got {self.image_size}")

    @classmethod
    def fid(cls) -> "InceptionConfig":
        """pytorch-fid's FID Inception (the TF graph of 2015-12-05)."""
        return cls(variant="fid", num_classes=1008)

    @classmethod
    def torchvision(cls, num_classes: int = 1000) -> "InceptionConfig":
        """torchvision's inception_v3 (aux_logits=False, transform_input=False)."""
        return cls(variant="torchvision", num_classes=num_classes)


# --------------------------------------------------------------------- layers


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in inference mode over the last axis; statistics in float32."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, NORM_PARAM), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, NORM_PARAM), (c,), self.param_dtype)
        mean = self.variable("batch_stats", "mean", with_axes(jnp.zeros, NORM_PARAM), (c,), jnp.float32).value
        var = self.variable("batch_stats", "var", with_axes(jnp.ones, NORM_PARAM), (c,), jnp.float32).value
        # (x - mean) * a + b rather than torch's folded x * a + (b - mean * a):
        # the folded form cancels digits when |mean| >> std, this one never does.
        a = jax.lax.rsqrt(var + BN_EPS) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean) * a + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    features: int
    kernel: Union[int, Tuple[int, int]]
    stride: int = 1
    padding: Union[int, Tuple[int, int]] = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        kw_ = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, (kh, kw), strides=(self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                 use_bias=False, name="conv", **kw_)(x)
        return nn.relu(FrozenBatchNorm(name="bn", **kw_)(x))


def _avg_pool_3x3(x: jax.Array, count_include_pad: bool) -> jax.Array:
    # Window sums in float32 whatever the compute dtype: up to 9 terms, and the
    # border windows divide by 4 or 6 in the FID variant.
    y = nn.avg_pool(x.astype(jnp.float32), (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                    count_include_pad=count_include_pad)
    return y.astype(x.dtype)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    # Flax pads max pools with -inf, as torch does.
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def _cat(xs) -> jax.Array:
    return jnp.concatenate(xs, axis=-1)


# --------------------------------------------------------------------- blocks
#
# Each block lists its branches in torchvision's concatenation order; the
# channel order of the concatenation is what later kernels were trained on.


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int
    count_include_pad: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b1 = BasicConv(64, 1, name="branch1x1", **kw)(x)
        b5 = BasicConv(48, 1, name="branch5x5_1", **kw)(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2", **kw)(b5)
        b3 = BasicConv(64, 1, name="branch3x3dbl_1", **kw)(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2", **kw)(b3)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3", **kw)(b3)
        bp = BasicConv(self.pool_features, 1, name="branch_pool", **kw)(_avg_pool_3x3(x, self.count_include_pad))
        return _cat([b1, b5, b3, bp])


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b3 = BasicConv(384, 3, stride=2, name="branch3x3", **kw)(x)
        bd = BasicConv(64, 1, name="branch3x3dbl_1", **kw)(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2", **kw)(bd)
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3", **kw)(bd)
        return _cat([b3, bd, _max_pool_3x3(x, 2)])


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    channels_7x7: int
    count_include_pad: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
        b1 = BasicConv(192, 1, name="branch1x1", **kw)(x)
        b7 = BasicConv(c7, 1, name="branch7x7_1", **kw)(x)
        b7 = BasicConv(c7, row[0], padding=row[1], name="branch7x7_2", **kw)(b7)
        b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3", **kw)(b7)
        bd = BasicConv(c7, 1, name="branch7x7dbl_1", **kw)(x)
        bd = BasicConv(c7, col[0], padding=col[1], name="branch7x7dbl_2", **kw)(bd)
        bd = BasicConv(c7, row[0], padding=row[1], name="branch7x7dbl_3", **kw)(bd)
        bd = BasicConv(c7, col[0], padding=col[1], name="branch7x7dbl_4", **kw)(bd)
        bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5", **kw)(bd)
        bp = BasicConv(192, 1, name="branch_pool", **kw)(_avg_pool_3x3(x, self.count_include_pad))
        return _cat([b1, b7, bd, bp])


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b3 = BasicConv(192, 1, name="branch3x3_1", **kw)(x)
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2", **kw)(b3)
        b7 = BasicConv(192, 1, name="branch7x7x3_1", **kw)(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2", **kw)(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3", **kw)(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4", **kw)(b7)
        return _cat([b3, b7, _max_pool_3x3(x, 2)])


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `pool` is "avg", "avg_valid" (count_include_pad=False) or "max"."""

    pool: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b1 = BasicConv(320, 1, name="branch1x1", **kw)(x)
        b3 = BasicConv(384, 1, name="branch3x3_1", **kw)(x)
        b3 = _cat([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a", **kw)(b3),
                   BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b", **kw)(b3)])
        bd = BasicConv(448, 1, name="branch3x3dbl_1", **kw)(x)
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2", **kw)(bd)
        bd = _cat([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a", **kw)(bd),
                   BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b", **kw)(bd)])
        if self.pool == "max":
            pooled = _max_pool_3x3(x, 1, padding=1)
        else:
            pooled = _avg_pool_3x3(x, count_include_pad=self.pool == "avg")
        bp = BasicConv(192, 1, name="branch_pool", **kw)(pooled)
        return _cat([b1, b3, bd, bp])


# --------------------------------------------------------------------- network


class InceptionV3(nn.Module):
    """Inception-v3 up to pool3 (2048-d) and the classifier; see the module docstring.

    `__call__(x, return_logits=False)`: x is NHWC in [-1, 1], H and W >= 75.
    Returns float32 pool3 features [B, 2048], or (features, logits
    [B, num_classes]). Apply with {"params", "batch_stats"}; nothing is mutable.
    """

    config: InceptionConfig = InceptionConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_logits: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise InceptionInputError(f"Inception-v3 takes images [B, H, W, 3], got shape {tuple(x.shape)}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise InceptionInputError(
                f"Inception-v3 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1]}x{x.shape[2]} "
                f"(resize first, e.g. with `preprocess`)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fid = self.config.variant == "fid"
        x = x.astype(self.dtype)
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3", **kw)(x)
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv(80, 1, name="Conv2d_3b_1x1", **kw)(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3", **kw)(x)
        x = _max_pool_3x3(x, 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, count_include_pad=not fid, name=name, **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, count_include_pad=not fid, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE("avg_valid" if fid else "avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max" if fid else "avg", name="Mixed_7c", **kw)(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not return_logits:
            # The classifier's parameters exist either way (init always creates
            # them), so a converted checkpoint keeps its logits.
            if self.is_initializing():
                Dense(self.config.num_classes, name="fc", **kw)(features)
            return features
        # Dropout before fc is the identity at inference.
        logits = Dense(self.config.num_classes, name="fc", **kw)(features)
        return features, logits.astype(jnp.float32)


def _torch_bilinear_taps(in_size: int, out_size: int):
    """Source indices and float32 weights of torch's bilinear resize (align_corners=False, no antialiasing).

    torch computes the source coordinate scale * (dst + 0.5) - 0.5 in float32
    as one fused multiply-add (its compiled kernels contract it, on CPU and in
    CUDA); evaluated in float64 and rounded once to float32, this reproduces
    it bit for bit, where the two-rounding float32 form differs by up to
    ~4e-6 in the weights (measured against torch 2.13 for 17..500 -> 75..299).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def resize_bilinear_like_torch(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
    """NHWC float `x` to spatial `size` as torch's F.interpolate(mode="bilinear", align_corners=False).

    Separable, width first: torch's h0 * (w0 * x00 + w1 * x01) + h1 * (...).
    """
    for axis, out in ((2, size[1]), (1, size[0])):
        n = x.shape[axis]
        if n == out:
            continue  # torch's taps are the identity here too
        i0, i1, w0, w1 = _torch_bilinear_taps(n, out)
        shape = [1] * x.ndim
        shape[axis] = out
        x = (jnp.asarray(w0, x.dtype).reshape(shape) * jnp.take(x, i0, axis=axis)
             + jnp.asarray(w1, x.dtype).reshape(shape) * jnp.take(x, i1, axis=axis))
    return x


_U8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def preprocess(images: jax.Array, size: int = FID_IMAGE_SIZE) -> jax.Array:
    """uint8 images [B, H, W, 3] -> the network's float32 input [B, size, size, 3] in [-1, 1].

    pytorch-fid's order: x / 255 in [0, 1], bilinear resize without
    antialiasing (`resize_bilinear_like_torch`), then 2x - 1. (The TF graph
    itself resized with TF's own bilinear kernel; pytorch-fid's torch resize
    is what published PyTorch FIDs use, and for images already at 299x299
    both are the identity.)
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InceptionInputError(f"expected uint8 images [B, H, W, 3], got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        raise InceptionInputError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    # A table of torch's correctly rounded u8 / 255: XLA may turn the division
    # into a multiplication by 1/255, which is 1 ulp off for some values.
    x = jnp.asarray(_U8_TO_UNIT)[images]
    x = resize_bilinear_like_torch(x, (size, size))
    return 2.0 * x - 1.0


def abstract_variables(config: InceptionConfig, dtype: Any = jnp.float32):
    """The unboxed {params, batch_stats} shapes of `InceptionV3(config)` (no compile, no FLOPs)."""
    model = InceptionV3(config, param_dtype=dtype)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32))
    return nn.meta.unbox(shapes)
