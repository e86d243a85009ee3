"""UperNet semantic segmenter with a ResNet or ConvNeXt backbone (ALDM's discriminator and evaluator).

Two roles share this architecture:

* Discriminator (ALDM, Li et al. ICLR 2024): the head predicts N + 1 classes,
  the N semantic classes plus one extra "fake" class, which is always the LAST
  channel (index `num_classes - 1`). Real images are trained towards their
  semantic labels, generated images towards the fake class, and the generator
  is trained to make the segmenter recover the layout it was conditioned on.
  Build its config with `SegmenterConfig.with_fake_class()`.
* Evaluation segmenter: the same network with N classes, trained on real
  images only; its `pooled_features` also feed an FID-like feature metric.

Two architectures (`SegmenterConfig.style`), each reproduced operation for
operation so that weights convert both ways and outputs agree to float32
rounding:

* "transformers": transformers' `UperNetForSemanticSegmentation` with a
  `ResNetBackbone` (`backbone="resnet"`) or a `ConvNextBackbone`
  (`backbone="convnext"`, the openmmlab/upernet-convnext-* ADE20K
  evaluators), converted by `sdsup/convert/segmenter.py`. ConvNeXt: a
  patchify stem (p x p conv, stride p, + LayerNorm), per stage a downsampling
  layer (LayerNorm + 2x2/2 conv; not before the first stage) and blocks
  (7x7 depthwise conv, LayerNorm, Linear to 4x, exact-erf GELU, Linear back,
  per-channel layer scale, residual; drop path is a training-only identity
  here), and one LayerNorm per out_feature on the features the head reads
  (transformers' `hidden_states_norms`). Every LayerNorm has eps 1e-6 and
  normalises over channels, in float32.
* "csail": the CSAIL semantic-segmentation project's (`mit_semseg`) `Resnet`
  encoder + `UPerNet` decoder, the network ALDM's discriminator and ADE20K
  evaluator load from `encoder_epoch_50.pth` / `decoder_epoch_50.pth`
  (`sdsup/convert/csail.py`). It differs in three places: a deep stem (three
  3x3 conv-BN-ReLU, the first with stride 2, then the 3x3/2 max pool), a
  pyramid pooling branch that resizes the pooled map back to the feature size
  BEFORE its 1x1 conv-BN-ReLU (transformers convolves first), and BatchNorm
  momentum 0.001 (mit_semseg's SynchronizedBatchNorm2d default). Bottleneck
  blocks are the same as transformers' (stride in the 3x3, 1x1 projection
  shortcut where the shape changes). The CSAIL head has no auxiliary output;
  its FPN width is `head_channels` (mit_semseg builds "upernet" with 512,
  "upernet_lite" with 256) and its pyramid branches have `ppm_channels` (512).

Shared conventions:

* Inputs are images in [-1, 1] (sdsup's convention for pixels). The model maps
  them to [0, 1] and applies the ImageNet mean/std normalisation itself, so the
  PyTorch model, which takes already-normalised `pixel_values`, sees exactly
  `((images + 1) / 2 - mean) / std`. Keeping this inside the model means that
  generated images (tanh range) can be fed straight in, gradients included.
* BatchNorm follows torch's `BatchNorm2d`: eps 1e-5, running stats updated as
  `(1 - m) * running + m * batch` (m = 0.1, or 0.001 for "csail"), the running
  variance uses the unbiased batch variance while normalisation uses the biased one. Under pjit the batch
  statistics are those of the whole (global) batch, i.e. SyncBatchNorm.
* Resampling is written out (`resize_bilinear`, `adaptive_avg_pool`) to match
  torch's `F.interpolate(mode="bilinear", align_corners=False)` and
  `nn.AdaptiveAvgPool2d` exactly. `jax.image.resize` agrees with torch when
  upsampling but antialiases when downsampling, and the pyramid pooling module
  does downsample (e.g. its 6x6 map to a 2x3 feature), so it cannot be used.
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdsup.models.layers import normalize_images
from sdsup.models.partitioning import BIAS, CONV_KERNEL, DENSE_KERNEL, NORM_PARAM, with_axes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.nn.BatchNorm2d defaults; transformers does not expose them.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
# mit_semseg's SynchronizedBatchNorm2d: eps 1e-5, momentum 0.001 (torch convention).
CSAIL_BN_MOMENTUM = 0.001
STYLES = ("transformers", "csail")
# style="transformers" backbones: transformers' ResNetBackbone / ConvNextBackbone.
BACKBONES = ("resnet", "convnext")
# ConvNeXt's LayerNorms (ConvNextLayerNorm's default; its config's layer_norm_eps is only ConvNextModel's pooler norm).
CONVNEXT_LN_EPS = 1e-6
# ConvNeXt blocks: 7x7 depthwise conv, MLP expanding 4x; downsampling layers: 2x2 conv, stride 2.
CONVNEXT_DW_KERNEL = 7
CONVNEXT_MLP_RATIO = 4
CONVNEXT_DOWNSAMPLE = 2
# transformers' UperNetFCNHead always reads the third backbone feature.
AUX_IN_INDEX = 2
LAYER_TYPES = ("basic", "bottleneck")
# Bottleneck blocks squeeze to out_channels // 4 (transformers' `reduction`).
BOTTLENECK_REDUCTION = 4


def _tuple(x) -> Tuple:
    return tuple(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """Architecture of the UperNet + ResNet segmenter.

    Field names follow transformers where one exists (`UperNetConfig.hidden_size`
    is `head_channels` here, `num_labels` is `num_classes`);
    `sdsup.convert.segmenter` maps transformers' UperNetConfig both ways.

    `style="csail"` is mit_semseg's ResNet + UPerNet (`sdsup.convert.csail`):
    it uses `stem_channels` instead of `embedding_size`, `ppm_channels` for
    the pyramid branches and `head_channels` as the FPN width; the
    transformers-only fields (embedding_size, downsample_*, out_features,
    the auxiliary head) must keep their defaults, and vice versa.

    `backbone="convnext"` (style "transformers" only) is transformers'
    ConvNextBackbone: `hidden_sizes`, `depths`, `patch_size` and
    `layer_scale_init_value` describe it; the ResNet-only fields
    (embedding_size, layer_type, downsample_*) must keep their defaults, and
    a ResNet leaves the ConvNeXt-only ones (patch_size,
    layer_scale_init_value) at theirs. Its "stem" feature (the patchify
    output) has hidden_sizes[0] channels.
    """

    num_classes: int = 150
    # "transformers" or "csail" (see the module docstring).
    style: str = "transformers"
    # style="transformers": "resnet" or "convnext" (transformers' ResNetBackbone / ConvNextBackbone).
    backbone: str = "resnet"
    # ResNet backbone (transformers' ResNetConfig); the stem is one 7x7/2 conv,
    # BN, ReLU and a 3x3/2 max pool (style="csail": see stem_channels).
    embedding_size: int = 64
    # Stage widths and depths (ResNet or ConvNeXt).
    hidden_sizes: Tuple[int, ...] = (256, 512, 1024, 2048)
    depths: Tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    # ConvNeXt backbone (transformers' ConvNextConfig): the stem's patch size
    # and the blocks' layer-scale initial value (0: blocks have no layer scale,
    # as transformers builds them for a value <= 0).
    patch_size: int = 4
    layer_scale_init_value: float = 1e-6
    # Backbone outputs fed to the head, from "stem", "stage1", ...; None means
    # every stage (transformers' UperNet default).
    out_features: Optional[Tuple[str, ...]] = None
    # UperNet head.
    head_channels: int = 512
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    # Optional FCN auxiliary head (training-time deep supervision in UperNet).
    use_auxiliary_head: bool = False
    auxiliary_channels: int = 256
    auxiliary_num_convs: int = 1
    auxiliary_concat_input: bool = False
    auxiliary_in_channels: Optional[int] = None
    # Normalisation applied to [0, 1] pixels inside the model.
    image_mean: Tuple[float, ...] = IMAGENET_MEAN
    image_std: Tuple[float, ...] = IMAGENET_STD
    # style="csail" only: the deep stem's conv widths (mit_semseg: 64, 64, 128)
    # and the pyramid pooling branches' width (mit_semseg: 512).
    stem_channels: Tuple[int, ...] = (64, 64, 128)
    ppm_channels: int = 512

    def __post_init__(self):
        # Accept lists (e.g. from JSON) but store tuples so the config hashes.
        for name in ("hidden_sizes", "depths", "out_features", "pool_scales", "image_mean", "image_std",
                     "stem_channels"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        self._check_style()
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {self.layer_type!r}")
        if min(self.hidden_sizes, default=1) < 1:
            raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
        if len(self.depths) != len(self.hidden_sizes) or not self.depths:
            raise ValueError(f"depths {self.depths} and hidden_sizes {self.hidden_sizes} must be non-empty and of equal length")
        if min(self.depths) < 1:
            # transformers silently builds one block for depth 0; refuse instead.
            raise ValueError(f"every depth must be >= 1, got {self.depths}")
        if (self.backbone == "resnet" and self.layer_type == "bottleneck"
                and min(self.hidden_sizes) < BOTTLENECK_REDUCTION):
            raise ValueError(f"bottleneck hidden sizes must be >= {BOTTLENECK_REDUCTION}, got {self.hidden_sizes}")
        unknown = [f for f in self.feature_stages if f not in self.stage_names]
        if unknown or not self.feature_stages:
            raise ValueError(f"out_features {self.out_features} must be a non-empty subset of {self.stage_names}")
        order = [self.stage_names.index(f) for f in self.feature_stages]
        if order != sorted(set(order)):
            raise ValueError(f"out_features {self.out_features} must be unique and in stage order")
        if self.num_classes < 1 or self.head_channels < 1 or not self.pool_scales or min(self.pool_scales) < 1:
            raise ValueError("num_classes, head_channels and pool_scales must be positive")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        if self.use_auxiliary_head:
            if len(self.feature_stages) <= AUX_IN_INDEX:
                raise ValueError(f"the auxiliary head reads backbone feature {AUX_IN_INDEX}; out_features has only {len(self.feature_stages)}")
            actual = self.feature_channels[AUX_IN_INDEX]
            if self.auxiliary_in_channels is not None and self.auxiliary_in_channels != actual:
                # transformers would build the head and then fail at its first forward.
                raise ValueError(f"auxiliary_in_channels={self.auxiliary_in_channels} but feature {AUX_IN_INDEX} has {actual} channels")
            if self.auxiliary_num_convs < 0:
                raise ValueError("auxiliary_num_convs must be >= 0")
            if self.auxiliary_num_convs == 0 and actual != self.auxiliary_channels:
                # With no convs the classifier (and conv_cat) see the raw feature.
                raise ValueError("auxiliary_num_convs=0 needs auxiliary_channels equal to the input feature's channels")

    def _check_style(self):
        """The fields of the other style must keep their defaults (a set value would be silently ignored)."""
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        convnext_only = ("patch_size", "layer_scale_init_value")
        fields = {f.name: f.default for f in dataclasses.fields(self)}

        def check_unused(unused, who):
            changed = [n for n in unused if getattr(self, n) != fields[n]]
            if changed:
                raise ValueError(f"{who} does not use {changed}; leave them at their defaults")

        if self.style == "csail":
            unused = ("backbone", "embedding_size", "downsample_in_first_stage", "downsample_in_bottleneck",
                      "out_features", "use_auxiliary_head", "auxiliary_channels", "auxiliary_num_convs",
                      "auxiliary_concat_input", "auxiliary_in_channels") + convnext_only
            if not self.stem_channels or min(self.stem_channels) < 1 or self.ppm_channels < 1:
                raise ValueError(f"style='csail' needs positive stem_channels and ppm_channels, got "
                                 f"{self.stem_channels} and {self.ppm_channels}")
        else:
            unused = ("stem_channels", "ppm_channels")
        check_unused(unused, f"style={self.style!r}")
        if self.backbone == "convnext":
            check_unused(("embedding_size", "layer_type", "downsample_in_first_stage", "downsample_in_bottleneck"),
                         "backbone='convnext'")
            if self.patch_size < 1 or not self.layer_scale_init_value >= 0:
                raise ValueError(f"backbone='convnext' needs patch_size >= 1 and layer_scale_init_value >= 0, got "
                                 f"{self.patch_size} and {self.layer_scale_init_value}")
        elif self.style != "csail":
            check_unused(convnext_only, "backbone='resnet'")

    @property
    def bn_momentum(self) -> float:
        """BatchNorm running-statistics momentum (torch convention) of the style's PyTorch original."""
        return CSAIL_BN_MOMENTUM if self.style == "csail" else BN_MOMENTUM

    @property
    def stage_names(self) -> Tuple[str, ...]:
        return ("stem",) + tuple(f"stage{i + 1}" for i in range(len(self.depths)))

    @property
    def stage_channels(self) -> Tuple[int, ...]:
        if self.backbone == "convnext":
            return (self.hidden_sizes[0],) + self.hidden_sizes
        stem = self.stem_channels[-1] if self.style == "csail" else self.embedding_size
        return (stem,) + self.hidden_sizes

    @property
    def feature_stages(self) -> Tuple[str, ...]:
        return self.out_features if self.out_features is not None else self.stage_names[1:]

    @property
    def feature_indices(self) -> Tuple[int, ...]:
        return tuple(self.stage_names.index(f) for f in self.feature_stages)

    @property
    def feature_channels(self) -> Tuple[int, ...]:
        return tuple(self.stage_channels[i] for i in self.feature_indices)

    def stage_stride(self, stage: int) -> int:
        """Stride of the first block of `stage` (0-based), for a ResNet."""
        return 2 if stage > 0 or self.downsample_in_first_stage else 1

    def with_fake_class(self) -> "SegmenterConfig":
        """The discriminator's config: one extra output class, last, meaning "fake"."""
        return dataclasses.replace(self, num_classes=self.num_classes + 1)


# -------------------------------------------------------------------- resampling


def _bilinear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear, align_corners=False, size given.

    torch: scale = in / out (in float32), src = max(scale * (dst + 0.5) - 0.5, 0),
    i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Resize NHWC `x` to spatial `size` like torch's F.interpolate(bilinear, align_corners=False).

    Separable: width first, then height, which evaluates torch's
    h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11) term for term.
    Works for up- and downsampling (no antialiasing, as in torch).
    """
    for axis, out in ((2, size[1]), (1, size[0])):
        n = x.shape[axis]
        if n == out:
            continue  # torch's taps are the identity here too.
        i0, i1, w0, w1 = _bilinear_taps(n, out)
        bshape = [1] * x.ndim
        bshape[axis] = out
        w0 = jnp.asarray(w0, x.dtype).reshape(bshape)
        w1 = jnp.asarray(w1, x.dtype).reshape(bshape)
        x = w0 * jnp.take(x, i0, axis=axis) + w1 * jnp.take(x, i1, axis=axis)
    return x


def _pool_bins(in_size: int, out_size: int) -> np.ndarray:
    """0/1 matrix [out, in] of torch's adaptive pooling bins.

    torch: start = floor(i * in / out), end = ceil((i + 1) * in / out); bins
    overlap when in is not a multiple of out and repeat when out > in.
    """
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's nn.AdaptiveAvgPool2d(size) for NHWC `x`, computed in float32.

    Bin sums are a contraction with 0/1 matrices (exact in float32 at HIGHEST
    precision), then divided by the bin area, as torch does.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mh = _pool_bins(x.shape[1], size)
    mw = _pool_bins(x.shape[2], size)
    hi = jax.lax.Precision.HIGHEST
    sums = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    sums = jnp.einsum("pw,bowc->bopc", mw, sums, precision=hi)
    area = np.outer(mh.sum(1), mw.sum(1))[None, :, :, None]
    return (sums / area).astype(dtype)


# -------------------------------------------------------------------- layers


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis of NHWC inputs.

    Parameters `scale`/`bias` (torch weight/bias); `batch_stats` hold `mean`,
    `var` (torch running_mean/running_var) and `num_batches_tracked`, kept so
    that checkpoints round-trip to PyTorch exactly. Statistics are computed in
    float32 whatever the compute dtype. `momentum` in torch's convention.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, NORM_PARAM), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, NORM_PARAM), (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", with_axes(jnp.zeros, NORM_PARAM), (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", with_axes(jnp.ones, NORM_PARAM), (c,), jnp.float32)
        count = self.variable("batch_stats", "num_batches_tracked", with_axes(jnp.zeros, ()), (), jnp.int32)
        xf = x.astype(jnp.float32)
        if train:
            n = x.size // c
            if n < 2:
                # torch raises too: the unbiased running variance is undefined.
                raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got input {x.shape}")
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            # Two-pass variance: E[x^2] - E[x]^2 loses digits on large-mean activations.
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + BN_EPS) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int = 1, use_bias: bool = False, name: Optional[str] = None,
          dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal")) -> nn.Conv:
    # Symmetric kernel // 2 padding, as both transformers' ResNet and UperNet convs use.
    p = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=use_bias,
        kernel_init=with_axes(kernel_init, CONV_KERNEL),
        bias_init=with_axes(nn.initializers.zeros, BIAS),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ConvNorm(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU: transformers' ResNetConvLayer / UperNetConvModule."""

    features: int
    kernel: int
    stride: int = 1
    relu: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, self.kernel, self.stride, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, momentum=self.bn_momentum, name="norm")(x, train)
        return nn.relu(x) if self.relu else x


class ResNetBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 at features // 4) residual block."""

    features: int
    stride: int
    bottleneck: bool
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        residual = x
        # Projection shortcut only where the identity does not fit (as transformers).
        if x.shape[-1] != self.features or self.stride != 1:
            residual = ConvNorm(self.features, 1, self.stride, relu=False, name="shortcut", **kw)(x, train)
        if self.bottleneck:
            r = self.features // BOTTLENECK_REDUCTION
            s1, s3 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
            h = ConvNorm(r, 1, s1, name="layer_0", **kw)(x, train)
            h = ConvNorm(r, 3, s3, name="layer_1", **kw)(h, train)
            h = ConvNorm(self.features, 1, relu=False, name="layer_2", **kw)(h, train)
        else:
            h = ConvNorm(self.features, 3, self.stride, name="layer_0", **kw)(x, train)
            h = ConvNorm(self.features, 3, relu=False, name="layer_1", **kw)(h, train)
        return nn.relu(h + residual)


def _remat(cls, remat: bool):
    # `train` (argument 2 counting self) decides BatchNorm's mode in Python.
    return nn.remat(cls, static_argnums=(2,)) if remat else cls


class DeepStem(nn.Module):
    """CSAIL's stem: 3x3 conv-BN-ReLU per width in `channels`, the first with stride 2 (before the max pool)."""

    channels: Tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        for k, c in enumerate(self.channels):
            x = ConvNorm(c, 3, 2 if k == 0 else 1, name=f"conv_{k}", **kw)(x, train)
        return x


class ResNetBackbone(nn.Module):
    """Returns every stage's output: (stem after max pool, stage1, ..., stageK)."""

    config: SegmenterConfig
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, ...]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=cfg.bn_momentum)
        if cfg.style == "csail":
            x = _remat(DeepStem, self.remat)(cfg.stem_channels, name="stem", **kw)(x, train)
        else:
            x = _remat(ConvNorm, self.remat)(cfg.embedding_size, 7, 2, name="embedder", **kw)(x, train)
        # Padding with -inf, as torch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        hidden = [x]
        for i, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            for j in range(depth):
                x = _remat(ResNetBlock, self.remat)(
                    width,
                    cfg.stage_stride(i) if j == 0 else 1,
                    cfg.layer_type == "bottleneck",
                    cfg.downsample_in_bottleneck,
                    name=f"stage_{i}_block_{j}",
                    **kw,
                )(x, train)
            hidden.append(x)
        return tuple(hidden)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last (channel) axis, statistics in float32 whatever the compute dtype.

    Parameters `scale` / `bias` (torch weight / bias). Two-pass biased
    variance, as torch. NHWC inputs make this ConvNeXt's channels-first and
    channels-last LayerNorm alike.
    """

    eps: float = CONVNEXT_LN_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, NORM_PARAM), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, NORM_PARAM), (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


# transformers initialises ConvNeXt's convs and linears with N(0, initializer_range = 0.02), biases 0.
_CONVNEXT_INIT = nn.initializers.normal(0.02)


def _convnext_conv(features: int, kernel: int, stride: int, padding: int, groups: int = 1, name: Optional[str] = None,
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=True,
        kernel_init=with_axes(_CONVNEXT_INIT, CONV_KERNEL),
        bias_init=with_axes(nn.initializers.zeros, BIAS),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ConvNextBlock(nn.Module):
    """transformers' ConvNextLayer in eval mode (drop path is the identity).

    x + layer_scale * pwconv2(gelu(pwconv1(norm(dwconv(x))))); GELU is the
    exact (erf) one, as transformers' "gelu". Without layer scale
    (`layer_scale_init_value` 0) the branch is added unscaled.
    """

    layer_scale_init_value: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no batch statistics; drop path (training-only) is not implemented
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        h = _convnext_conv(c, CONVNEXT_DW_KERNEL, 1, CONVNEXT_DW_KERNEL // 2, groups=c, name="dwconv", **kw)(x)
        h = LayerNorm(name="norm", **kw)(h)
        dense = lambda n, name: nn.Dense(n, kernel_init=with_axes(_CONVNEXT_INIT, DENSE_KERNEL),  # noqa: E731
                                         bias_init=with_axes(nn.initializers.zeros, BIAS), name=name, **kw)
        h = dense(CONVNEXT_MLP_RATIO * c, "pwconv1")(h)
        h = nn.gelu(h, approximate=False)
        h = dense(c, "pwconv2")(h)
        if self.layer_scale_init_value > 0:
            gamma = self.param("layer_scale", with_axes(nn.initializers.constant(self.layer_scale_init_value),
                                                        NORM_PARAM), (c,), self.param_dtype)
            h = gamma.astype(h.dtype) * h
        return x + h


class ConvNextBackbone(nn.Module):
    """transformers' ConvNextBackbone.

    Returns (hidden, features): `hidden` every stage's raw output (stem =
    patchify conv + LayerNorm, stage1, ..., stageK; transformers'
    `hidden_states`), `features` the `out_features` ones each through its own
    LayerNorm (`norm_{stage}`; transformers' `feature_maps`), what the heads read.
    """

    config: SegmenterConfig
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[Tuple[jax.Array, ...], Tuple[jax.Array, ...]]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = cfg.patch_size
        x = _convnext_conv(cfg.hidden_sizes[0], p, p, 0, name="embedder_conv", **kw)(x)
        x = LayerNorm(name="embedder_norm", **kw)(x)
        hidden = [x]
        for i, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            if i > 0:
                # transformers also downsamples where the width does not change (stride 2 > 1).
                x = LayerNorm(name=f"stage_{i}_downsample_norm", **kw)(x)
                x = _convnext_conv(width, CONVNEXT_DOWNSAMPLE, CONVNEXT_DOWNSAMPLE, 0,
                                   name=f"stage_{i}_downsample_conv", **kw)(x)
            for j in range(depth):
                x = _remat(ConvNextBlock, self.remat)(cfg.layer_scale_init_value, name=f"stage_{i}_block_{j}",
                                                      **kw)(x, train)
            hidden.append(x)
        features = tuple(LayerNorm(name=f"norm_{cfg.stage_names[k]}", **kw)(hidden[k]) for k in cfg.feature_indices)
        return tuple(hidden), features


class UperNetHead(nn.Module):
    """Pyramid pooling on the last feature + FPN over the others, fused, then a 1x1 classifier."""

    channels: int
    pool_scales: Tuple[int, ...]
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.channels
        laterals = [ConvNorm(ch, 1, name=f"lateral_{i}", **kw)(f, train) for i, f in enumerate(features[:-1])]

        top = features[-1]
        size = top.shape[1:3]
        psp = [top]
        for i, s in enumerate(self.pool_scales):
            pooled = ConvNorm(ch, 1, name=f"psp_{i}", **kw)(adaptive_avg_pool(top, s), train)
            psp.append(resize_bilinear(pooled, size))
        laterals.append(ConvNorm(ch, 3, name="bottleneck", **kw)(jnp.concatenate(psp, -1), train))

        # Top-down: each level adds the (already updated) coarser level.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])

        outs = [ConvNorm(ch, 3, name=f"fpn_{i}", **kw)(laterals[i], train) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        size = outs[0].shape[1:3]
        outs = [outs[0]] + [resize_bilinear(o, size) for o in outs[1:]]
        x = ConvNorm(ch, 3, name="fpn_bottleneck", **kw)(jnp.concatenate(outs, -1), train)
        # mmseg initialises the segmentation conv with N(0, 0.01).
        return _conv(self.num_classes, 1, use_bias=True, name="classifier",
                     kernel_init=nn.initializers.normal(0.01), **kw)(x)


class CsailPPM(nn.Module):
    """mit_semseg UPerNet's pyramid pooling: per scale, adaptive average pool -> bilinear resize back to
    the feature's size -> 1x1 conv-BN-ReLU (in that order); concatenated after the feature, 3x3 conv-BN-ReLU."""

    channels: int
    branch_channels: int
    pool_scales: Tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        size = x.shape[1:3]
        branches = [x]
        for i, s in enumerate(self.pool_scales):
            up = resize_bilinear(adaptive_avg_pool(x, s), size)
            branches.append(ConvNorm(self.branch_channels, 1, name=f"conv_{i}", **kw)(up, train))
        return ConvNorm(self.channels, 3, name="last", **kw)(jnp.concatenate(branches, -1), train)


class CsailUperNetHead(nn.Module):
    """mit_semseg's UPerNet decoder up to the logits (its log_softmax / softmax is left to the caller).

    PPM on the last feature; top-down over the others: lateral 1x1 conv-BN-ReLU
    plus the bilinearly resized coarser level, then a 3x3 conv-BN-ReLU per
    level (the PPM level has none); every level resized to the finest,
    concatenated finest first, 3x3 conv-BN-ReLU, 1x1 classifier with bias.
    """

    channels: int
    ppm_channels: int
    pool_scales: Tuple[int, ...]
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_momentum=self.bn_momentum)
        ch = self.channels
        f = CsailPPM(ch, self.ppm_channels, self.pool_scales, name="ppm", **kw)(features[-1], train)
        levels = [f]
        for i in reversed(range(len(features) - 1)):
            lateral = ConvNorm(ch, 1, name=f"fpn_in_{i}", **kw)(features[i], train)
            f = lateral + resize_bilinear(f, lateral.shape[1:3])
            levels.insert(0, ConvNorm(ch, 3, name=f"fpn_out_{i}", **kw)(f, train))
        size = levels[0].shape[1:3]
        fused = jnp.concatenate([levels[0]] + [resize_bilinear(x, size) for x in levels[1:]], -1)
        x = ConvNorm(ch, 3, name="fuse", **kw)(fused, train)
        return _conv(self.num_classes, 1, use_bias=True, name="classifier",
                     kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, param_dtype=self.param_dtype)(x)


class FCNHead(nn.Module):
    """transformers' UperNetFCNHead: convs on one feature (+ optional concat), 1x1 classifier."""

    channels: int
    num_convs: int
    concat_input: bool
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = feature
        for k in range(self.num_convs):
            h = ConvNorm(self.channels, 3, name=f"conv_{k}", **kw)(h, train)
        if self.concat_input:
            h = ConvNorm(self.channels, 3, name="conv_cat", **kw)(jnp.concatenate([feature, h], -1), train)
        return _conv(self.num_classes, 1, use_bias=True, name="classifier",
                     kernel_init=nn.initializers.normal(0.01), **kw)(h)


class UperNetSegmenter(nn.Module):
    """UperNet + ResNet / ConvNeXt segmenter on images in [-1, 1] (either `config.style`).

    `__call__(images, train)` returns float32 logits [B, H, W, num_classes] at
    the input resolution. For a discriminator, `num_classes = N + 1` and the
    last channel is "fake" (see module docstring).

    `train=True` normalises with batch statistics and updates the running
    statistics: apply with `mutable=["batch_stats"]`. `train=False` uses the
    running statistics.
    """

    config: SegmenterConfig
    # Rematerialise each backbone block and the decode head in the backward
    # pass (the discriminator at 512x512 runs three times per lazy step).
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.backbone == "convnext":
            self.backbone = ConvNextBackbone(cfg, self.remat, **kw)
        else:
            self.backbone = ResNetBackbone(cfg, self.remat, **kw)
        if cfg.style == "csail":
            self.decode_head = _remat(CsailUperNetHead, self.remat)(
                cfg.head_channels, cfg.ppm_channels, cfg.pool_scales, cfg.num_classes, bn_momentum=cfg.bn_momentum,
                **kw)
        else:
            self.decode_head = _remat(UperNetHead, self.remat)(cfg.head_channels, cfg.pool_scales, cfg.num_classes,
                                                               **kw)
        if cfg.use_auxiliary_head:
            self.auxiliary_head = FCNHead(
                cfg.auxiliary_channels, cfg.auxiliary_num_convs, cfg.auxiliary_concat_input, cfg.num_classes, **kw
            )

    def normalize(self, images: jax.Array) -> jax.Array:
        """[-1, 1] -> [0, 1] -> (x - mean) / std: the PyTorch model's `pixel_values`."""
        return normalize_images(images, self.config.image_mean, self.config.image_std, self.dtype)

    def __call__(self, images: jax.Array, train: bool, return_aux: bool = False):
        """Logits [B, H, W, num_classes]; with `return_aux`, also the auxiliary head's logits.

        When the config has an auxiliary head it always runs (as in PyTorch),
        so that in train mode its BatchNorm statistics advance like PyTorch's;
        in eval mode XLA removes it if its output is unused.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
        cfg = self.config
        size = images.shape[1:3]
        _, features = self._backbone(images, train)
        logits = resize_bilinear(self.decode_head(features, train).astype(jnp.float32), size)
        aux = None
        if cfg.use_auxiliary_head:
            aux = resize_bilinear(self.auxiliary_head(features[AUX_IN_INDEX], train).astype(jnp.float32), size)
        if return_aux:
            if aux is None:
                raise ValueError("return_aux=True but the config has no auxiliary head")
            return logits, aux
        return logits

    def _backbone(self, images: jax.Array, train: bool):
        """(hidden, features): every stage's raw output, and the out_features the heads read."""
        out = self.backbone(self.normalize(images), train)
        if self.config.backbone == "convnext":
            return out
        return out, [out[i] for i in self.config.feature_indices]

    def pooled_features(self, images: jax.Array, train: bool = False, all_stages: bool = False) -> jax.Array:
        """Global-average-pooled backbone features, float32.

        The last stage [B, hidden_sizes[-1]]: transformers' ResNetModel
        `pooler_output` (flattened). With `all_stages`, every stage's pooled
        output concatenated [B, sum(hidden_sizes)]: textures (early stages) as
        well as content (late ones), what the segmenter-feature FID compares.
        For a ConvNeXt these are the stages' raw outputs (the backbone's
        `hidden_states`, before the per-feature LayerNorms and without
        ConvNextModel's pooler LayerNorm, which UperNet checkpoints lack).
        Apply with `method=UperNetSegmenter.pooled_features`.
        """
        hidden, _ = self._backbone(images, train)
        if all_stages:
            return jnp.concatenate([jnp.mean(h.astype(jnp.float32), axis=(1, 2)) for h in hidden[1:]], -1)
        return jnp.mean(hidden[-1].astype(jnp.float32), axis=(1, 2))
