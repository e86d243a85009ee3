"""DRN-D semantic segmenter (fyu/drn `DRNSeg`): the Cityscapes mIoU evaluator of SPADE, OASIS and ALDM.

The scores those papers report come from fyu/drn's `drn-d-105_ms_cityscapes.pth`:
`DRNSeg("drn_d_105", 19)`, a dilated residual network (arch "D") with a 1x1
classifier and a fixed bilinear x8 transposed-conv upsampler. This module
re-states it operation for operation (weights: `sdsup/convert/drn.py`).

Architecture (fyu/drn `drn.py`, `DRN(..., arch="D")`; `segment.py`, `DRNSeg`):

* layer0: 7x7 conv (stride 1, padding 3, no bias) 3 -> channels[0], BN, ReLU.
* layer1, layer2 (`_make_conv_layers`): depths[i] x (3x3 conv, BN, ReLU);
  layer2's first conv has stride 2.
* layer3 .. layer6 (`_make_layer`): residual blocks, Bottleneck (expansion 4;
  drn_d_54/105) or BasicBlock (expansion 1; drn_d_22/38). The first block of
  layer3 and layer4 has stride 2 (Bottleneck: in its 3x3 conv2); layer5 and
  layer6 have stride 1 and dilation 2 and 4 in every block's 3x3 conv(s)
  (padding = dilation). The first block of a layer gets a 1x1 conv (stride)
  + BN projection shortcut when the stride is not 1 or the width changes;
  otherwise the shortcut is the identity. Block output: ReLU(branch + shortcut).
* layer7, layer8 (`_make_conv_layers`): depths[i] x (3x3 conv, BN, ReLU) with
  dilation (and padding) 2, then 1. No residual connection (arch D).
* Output stride 8. `seg`: 1x1 conv channels[7] -> classes, with bias.
* `up`: ConvTranspose2d(classes, classes, 16, stride=8, padding=4,
  groups=classes, bias=False), its weight the fixed bilinear kernel of
  `fill_up_weights` (the same 16x16 kernel for every class, never trained):
  output H * 8 x W * 8. DRNSeg then applies LogSoftmax; this module returns
  the logits before it (argmax and mIoU are the same).

BatchNorm is torch's BatchNorm2d (eps 1e-5, momentum 0.1), the same
`sdsup.models.segmenter.BatchNorm` as the UperNet segmenter (scale/bias in
`params`, mean/var/num_batches_tracked in `batch_stats`).

Inputs are images in [-1, 1], NHWC (sdsup's convention). The model maps them
to [0, 1] and normalises with the Cityscapes statistics fyu/drn trained with
(`datasets/cityscapes/info.json`), so the PyTorch network sees exactly
`((images + 1) / 2 - mean) / std`. Height and width must be multiples of 8
(the upsampler then returns the input size, as in PyTorch). The upsampler's
kernel is a constant here, not a variable: the converter checks that a
checkpoint's `up.weight` is the bilinear fill and stores nothing for it.

Variable paths mirror the PyTorch modules: `base/layer0/{conv,bn}`,
`base/layer{1,2,7,8}_{j}/{conv,bn}` (torch `base.{i}.{3j}`, `base.{i}.{3j+1}`),
`base/layer{3..6}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3]}` and
`.../downsample/{conv,bn}` (torch `base.{i}.{j}.conv1`, `.downsample.0/.1`),
`seg/{kernel,bias}`.
"""

import dataclasses
import math
from typing import Any, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.models.layers import normalize_images
from sdsup.models.partitioning import BIAS, CONV_KERNEL, with_axes
from sdsup.models.segmenter import BatchNorm

# fyu/drn datasets/cityscapes/info.json: statistics of the Cityscapes training images in [0, 1], RGB.
CITYSCAPES_MEAN = (0.29010095242892997, 0.32808144844279574, 0.28696394422942517)
CITYSCAPES_STD = (0.1829540508368939, 0.18656561047509476, 0.18447508988480435)
# drn_d_105: DRN(Bottleneck, [1, 1, 3, 4, 23, 3, 1, 1], arch="D") with DRN's default channels.
DRN_D_105_DEPTHS = (1, 1, 3, 4, 23, 3, 1, 1)
DRN_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
BLOCKS = ("bottleneck", "basic")
EXPANSION = {"bottleneck": 4, "basic": 1}
# Per layer (0-based index 0..7): stride of its first conv / block, and its dilation.
LAYER_STRIDES = (1, 2, 2, 2, 1, 1, 1, 1)
LAYER_DILATIONS = (1, 1, 1, 1, 2, 4, 2, 1)
CONV_LAYERS = (0, 1, 6, 7)  # plain conv-BN-ReLU stacks (layer0 is one 7x7 conv, not counted by depths)
BLOCK_LAYERS = (2, 3, 4, 5)  # residual layers layer3 .. layer6
# DRNSeg's upsampler: ConvTranspose2d(kernel 16, stride 8, padding 4), depthwise.
UP_KERNEL, UP_STRIDE, UP_PADDING = 16, 8, 4
OUTPUT_STRIDE = 8


def _tuple(x):
    return tuple(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class DRNConfig:
    """fyu/drn DRNSeg with an arch "D" DRN base. Defaults: drn_d_105 on Cityscapes (19 trainId classes).

    `depths` are the 8 `layers` of `DRN(...)` (conv counts for layer1/2/7/8,
    block counts for layer3..6; every one >= 1); `channels` its 8 widths
    (the residual layers' outputs are channels[i] * expansion). `block`:
    "bottleneck" (drn_d_54/105) or "basic" (drn_d_22/38).
    """

    num_classes: int = 19
    arch: str = "D"
    block: str = "bottleneck"
    depths: Tuple[int, ...] = DRN_D_105_DEPTHS
    channels: Tuple[int, ...] = DRN_CHANNELS
    # Normalisation applied to [0, 1] pixels inside the model.
    image_mean: Tuple[float, ...] = CITYSCAPES_MEAN
    image_std: Tuple[float, ...] = CITYSCAPES_STD
    # Compute dtype (parameters and BatchNorm statistics stay float32).
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("depths", "channels", "image_mean", "image_std"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.arch != "D":
            raise ValueError(f"only DRN arch 'D' is supported, got arch={self.arch!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if len(self.depths) != 8 or len(self.channels) != 8:
            raise ValueError(f"depths and channels need 8 entries each (layer1..layer8), got {self.depths} "
                             f"and {self.channels}")
        if min(self.depths) < 1:
            # fyu/drn drops layer6..8 for a 0 and renumbers DRNSeg's `base` children; not supported.
            raise ValueError(f"every depth must be >= 1, got {self.depths}")
        if min(self.channels) < 1 or self.num_classes < 1:
            raise ValueError("channels and num_classes must be positive")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need one value per RGB channel (std > 0)")
        jnp.dtype(self.dtype)  # raises for an unknown name

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def layer_channels(self) -> Tuple[int, ...]:
        """Output channels of layer1 .. layer8 (residual layers: channels * expansion)."""
        return tuple(c * self.expansion if i in BLOCK_LAYERS else c for i, c in enumerate(self.channels))

    @property
    def out_dim(self) -> int:
        """Channels of layer8's output (DRN's `out_dim`): what `seg` reads and `pooled_features` returns."""
        return self.layer_channels[-1]


def bilinear_up_kernel(num_classes: int, size: int = UP_KERNEL) -> np.ndarray:
    """fyu/drn's `fill_up_weights` for ConvTranspose2d weight [classes, 1, size, size] (float32).

    Computed in float64 as the Python original, then rounded to float32 as
    its assignment into a float32 tensor does.
    """
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    one = 1 - np.abs(np.arange(size, dtype=np.float64) / f - c)
    w = np.outer(one, one).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(w, (num_classes, 1, size, size)))


def upsample(logits: jax.Array) -> jax.Array:
    """DRNSeg's `up`: depthwise ConvTranspose2d(16, stride 8, padding 4) with the bilinear kernel, NHWC, float32.

    A transposed conv is a conv over the input dilated by the stride, padded
    by kernel - 1 - padding, with the kernel flipped; output size 8 * input.
    """
    c = logits.shape[-1]
    w = bilinear_up_kernel(c)  # [C, 1, k, k], torch ConvTranspose2d layout (in, out / groups, kh, kw)
    rhs = jnp.asarray(np.ascontiguousarray(w[:, 0, ::-1, ::-1].transpose(1, 2, 0)[:, :, None, :]))  # [k, k, 1, C]
    pad = UP_KERNEL - 1 - UP_PADDING
    return jax.lax.conv_general_dilated(
        logits.astype(jnp.float32), rhs, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(UP_STRIDE, UP_STRIDE), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, use_bias: bool = False, name=None,
          dtype: Any = jnp.float32) -> nn.Conv:
    # torch Conv2d with padding = dilation * (kernel // 2) (fyu/drn: padding 3 for the 7x7, dilation for 3x3s).
    p = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   kernel_dilation=(dilation, dilation), use_bias=use_bias,
                   kernel_init=with_axes(nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_KERNEL),
                   bias_init=with_axes(nn.initializers.zeros, BIAS), dtype=dtype, param_dtype=jnp.float32,
                   name=name)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU; children `conv`, `bn`."""

    features: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, self.kernel, self.stride, self.dilation, name="conv", dtype=self.dtype)(x)
        x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
        return nn.relu(x) if self.relu else x


class Block(nn.Module):
    """fyu/drn Bottleneck (1x1, 3x3 dilated with the stride, 1x1 to planes * 4) or BasicBlock (two 3x3 dilated)."""

    planes: int
    stride: int
    dilation: int
    bottleneck: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d, dt = self.dilation, self.dtype
        out_ch = self.planes * (4 if self.bottleneck else 1)
        if self.bottleneck:
            h = nn.relu(BatchNorm(dtype=dt, name="bn1")(_conv(self.planes, 1, name="conv1", dtype=dt)(x), train))
            h = _conv(self.planes, 3, self.stride, d, name="conv2", dtype=dt)(h)
            h = nn.relu(BatchNorm(dtype=dt, name="bn2")(h, train))
            h = BatchNorm(dtype=dt, name="bn3")(_conv(out_ch, 1, name="conv3", dtype=dt)(h), train)
        else:
            h = _conv(self.planes, 3, self.stride, d, name="conv1", dtype=dt)(x)
            h = nn.relu(BatchNorm(dtype=dt, name="bn1")(h, train))
            h = BatchNorm(dtype=dt, name="bn2")(_conv(self.planes, 3, 1, d, name="conv2", dtype=dt)(h), train)
        residual = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            residual = ConvBN(out_ch, 1, self.stride, relu=False, name="downsample", dtype=dt)(x, train)
        return nn.relu(h + residual)


class DRNBase(nn.Module):
    """DRN-D without its classifier (DRNSeg's `base`): the outputs of layer1 .. layer8 (DRN's `out_middle` list)."""

    config: DRNConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> List[jax.Array]:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        x = ConvBN(cfg.channels[0], 7, name="layer0", dtype=dt)(x, train)
        outs = []
        for i, (depth, ch) in enumerate(zip(cfg.depths, cfg.channels)):
            stride, dil = LAYER_STRIDES[i], LAYER_DILATIONS[i]
            for j in range(depth):
                s = stride if j == 0 else 1
                if i in BLOCK_LAYERS:
                    x = Block(ch, s, dil, cfg.block == "bottleneck", name=f"layer{i + 1}_{j}", dtype=dt)(x, train)
                else:
                    x = ConvBN(ch, 3, s, dil, name=f"layer{i + 1}_{j}", dtype=dt)(x, train)
            outs.append(x)
        return outs


class DRNSegmenter(nn.Module):
    """fyu/drn DRNSeg on images in [-1, 1] NHWC: float32 logits [B, H, W, num_classes] (before its LogSoftmax).

    `train=False` (evaluation) normalises with the BatchNorm running
    statistics; `train=True` uses batch statistics and updates them (apply
    with `mutable=["batch_stats"]`), as torch's BatchNorm2d would. Pure: the
    logits are differentiable in the images and the weights.
    """

    config: DRNConfig

    def setup(self):
        self.base = DRNBase(self.config)
        self.seg = _conv(self.config.num_classes, 1, use_bias=True, dtype=jnp.dtype(self.config.dtype))

    def normalize(self, images: jax.Array) -> jax.Array:
        """[-1, 1] -> [0, 1] -> (x - mean) / std: the input the PyTorch DRNSeg expects."""
        return normalize_images(images, self.config.image_mean, self.config.image_std, jnp.dtype(self.config.dtype))

    def features(self, images: jax.Array, train: bool = False) -> List[jax.Array]:
        """The outputs of layer1 .. layer8 (strides 1, 2, 4, 8, 8, 8, 8, 8)."""
        return self.base(self.normalize(images), train)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        h, w = images.shape[1:3]
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE:
            # DRNSeg's upsampler returns 8 * ceil-ish(size / 8), not the input size, for other sizes.
            raise ValueError(f"DRN segmenter input height and width must be multiples of {OUTPUT_STRIDE}, "
                             f"got {h}x{w}")
        x = self.features(images, train)[-1]
        return upsample(self.seg(x).astype(jnp.float32))

    def pooled_features(self, images: jax.Array, train: bool = False, all_stages: bool = False) -> jax.Array:
        """Global-average-pooled base features, float32: layer8's [B, out_dim].

        With `all_stages`, the pools of layer3 .. layer8 concatenated
        [B, sum(layer_channels[2:])] (textures as well as content), as
        `UperNetSegmenter.pooled_features`. Apply with
        `method=DRNSegmenter.pooled_features`.
        """
        outs = self.features(images, train)
        pool = lambda h: jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # noqa: E731
        if all_stages:
            return jnp.concatenate([pool(h) for h in outs[2:]], -1)
        return pool(outs[-1])


def abstract_variables(config: DRNConfig, height: int = 64, width: int = 64):
    """The (boxed) variable shapes of DRNSegmenter(config), without computing anything."""
    model = DRNSegmenter(config)
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images.shape, images.dtype)))
