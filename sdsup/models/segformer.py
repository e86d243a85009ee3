"""Segformer semantic segmenter (transformers' `SegformerForSemanticSegmentation`): an image-mIoU evaluator.

SegFormer (Xie et al., NeurIPS 2021) is a hierarchical "Mix Transformer"
(MiT-b0 .. b5) encoder with an all-MLP decode head. The released ADE20K and
Cityscapes checkpoints (nvidia/segformer-b*-finetuned-*) are an alternative
to the CSAIL UperNet / DRN evaluators ALDM's paper used. This module re-states
transformers' network operation for operation (weights:
`sdsup/convert/segformer.py`).

Architecture, per stage i (transformers' `SegformerStage`):

* overlapping patch embedding: conv (kernel patch_sizes[i], stride
  strides[i], padding patch_sizes[i] // 2, with bias) from the previous
  stage's map (the image for stage 0), then LayerNorm;
* depths[i] blocks, each x + attention(LN(x)), then x + MixFFN(LN(x)):
  - efficient self-attention with num_attention_heads[i] heads: queries from
    every position; keys and values from the map reduced by a conv of kernel
    and stride sr_ratios[i] (with bias) and a LayerNorm when sr_ratios[i] > 1
    (from the map itself otherwise); softmax(q k^T / sqrt(head_dim)) v, then
    an output Linear;
  - Mix-FFN: Linear to hidden_sizes[i] * mlp_ratios[i], depthwise 3x3 conv
    (padding 1, with bias), exact (erf) GELU, Linear back;
* a final LayerNorm; its output is the stage's feature map.

Decode head (`SegformerDecodeHead`): every stage's map through its own
Linear to decoder_hidden_size, bilinearly resized (align_corners=False) to
stage 0's size (1/4 of the input), concatenated LAST stage first, 1x1 conv
without bias, BatchNorm, ReLU, 1x1 classifier conv with bias. Its logits are
at 1/4 resolution (`decode_logits`); `__call__` resizes them bilinearly to
the input size, as the image processor's `post_process_semantic_segmentation`
does before its argmax, so that the segmenter has the interface of sdsup's
others (`UperNetSegmenter`, `DRNSegmenter`).

Dropout and drop path are training-only identities and are not implemented:
`train=True` changes only the decode head's BatchNorm (batch statistics,
running statistics updated; apply with `mutable=["batch_stats"]`).

Every LayerNorm has torch's default eps 1e-5: transformers builds them with
`nn.LayerNorm(size)` and never reads its config's `layer_norm_eps`.
BatchNorm is torch's BatchNorm2d, the `sdsup.models.segmenter.BatchNorm`
the other segmenters use.

Inputs are images in [-1, 1], NHWC (sdsup's convention), of any size: the
model maps them to [0, 1] and normalises with `image_mean` / `image_std`
(the image processor's; ImageNet's by default), so the PyTorch network sees
exactly `((images + 1) / 2 - mean) / std` as its pixel_values.

Variable paths mirror transformers' (>= 5) module names, with list indices
joined to the list's name: `segformer/stages_{i}/patch_embeddings/{proj,
layer_norm}`, `segformer/stages_{i}/blocks_{j}/{layernorm_before,
attention/{q_proj,k_proj,v_proj,o_proj,sequence_reduction/{sequence_reduction,
layer_norm}},layernorm_after,mlp/{fc1,dwconv/dwconv,fc2}}`,
`segformer/stages_{i}/layer_norm`, `decode_head/linear_projections_{i}/proj`,
`decode_head/{linear_fuse,batch_norm,classifier}`.
"""

import dataclasses
from typing import Any, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsup.models.layers import normalize_images
from sdsup.models.partitioning import BIAS, CONV_KERNEL, DENSE_KERNEL, with_axes
from sdsup.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, BatchNorm, LayerNorm, resize_bilinear

# torch.nn.LayerNorm's default, which every transformers Segformer LayerNorm uses.
LAYER_NORM_EPS = 1e-5
# The Mix-FFN's depthwise conv.
DWCONV_KERNEL = 3
# transformers' SegformerConfig defaults: MiT-b0 with the ADE20K head.
MIT_B0_HIDDEN_SIZES = (32, 64, 160, 256)
MIT_DEPTHS = (2, 2, 2, 2)
MIT_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)
MIT_PATCH_SIZES = (7, 3, 3, 3)
MIT_STRIDES = (4, 2, 2, 2)
MIT_MLP_RATIOS = (4, 4, 4, 4)
ADE20K_CLASSES = 150
# The SegFormer paper's encoders (hidden_sizes, depths, decoder_hidden_size); all share the heads, reduction
# ratios, patch sizes, strides and MLP ratios above.
MIT_VARIANTS = {
    "b0": (MIT_B0_HIDDEN_SIZES, (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
# transformers initialises linears (and convs) with N(0, initializer_range = 0.02); only abstract shapes and
# tests use these initialisers, converted weights replace them.
_INIT = nn.initializers.normal(0.02)
_PER_STAGE = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios")


def _tuple(x):
    return tuple(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class SegformerConfig:
    """transformers' SegformerForSemanticSegmentation. Defaults: MiT-b0 with the ADE20K head (150 classes).

    Field names follow transformers' SegformerConfig (`num_labels` is
    `num_classes` here); every per-stage tuple has one entry per stage.
    `mit(variant, ...)` builds the paper's b0 .. b5.
    """

    num_classes: int = ADE20K_CLASSES
    hidden_sizes: Tuple[int, ...] = MIT_B0_HIDDEN_SIZES
    depths: Tuple[int, ...] = MIT_DEPTHS
    num_attention_heads: Tuple[int, ...] = MIT_HEADS
    sr_ratios: Tuple[int, ...] = MIT_SR_RATIOS
    patch_sizes: Tuple[int, ...] = MIT_PATCH_SIZES
    strides: Tuple[int, ...] = MIT_STRIDES
    # Mix-FFN width = int(hidden_size * mlp_ratio), as transformers computes it.
    mlp_ratios: Tuple[float, ...] = MIT_MLP_RATIOS
    decoder_hidden_size: int = 256
    layer_norm_eps: float = LAYER_NORM_EPS
    # Normalisation applied to [0, 1] pixels inside the model.
    image_mean: Tuple[float, ...] = IMAGENET_MEAN
    image_std: Tuple[float, ...] = IMAGENET_STD
    # Compute dtype (parameters, BatchNorm statistics, LayerNorm statistics and the logits stay float32).
    dtype: str = "float32"

    def __post_init__(self):
        for name in _PER_STAGE + ("image_mean", "image_std"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        n = len(self.hidden_sizes)
        if n < 1 or any(len(getattr(self, name)) != n for name in _PER_STAGE):
            raise ValueError("hidden_sizes, depths, num_attention_heads, sr_ratios, patch_sizes, strides and "
                             f"mlp_ratios need one entry per stage, got {[getattr(self, k) for k in _PER_STAGE]}")
        for name in _PER_STAGE:
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"every entry of {name} must be positive, got {getattr(self, name)}")
        for size, heads in zip(self.hidden_sizes, self.num_attention_heads):
            if size % heads:
                raise ValueError(f"hidden size {size} is not divisible by its {heads} attention heads")
        if min(self.ffn_sizes) < 1:
            raise ValueError(f"mlp_ratios {self.mlp_ratios} give an empty Mix-FFN")
        if self.num_classes < 1 or self.decoder_hidden_size < 1 or not self.layer_norm_eps > 0:
            raise ValueError("num_classes, decoder_hidden_size and layer_norm_eps must be positive")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need one value per RGB channel (std > 0)")
        jnp.dtype(self.dtype)  # raises for an unknown name

    @classmethod
    def mit(cls, variant: str, **fields) -> "SegformerConfig":
        """The paper's MiT-`variant` ("b0" .. "b5") encoder and decode head; `fields` set the rest (num_classes...)."""
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {variant!r}; known: {sorted(MIT_VARIANTS)}")
        hidden_sizes, depths, decoder = MIT_VARIANTS[variant]
        return cls(**{"hidden_sizes": hidden_sizes, "depths": depths, "decoder_hidden_size": decoder, **fields})

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def ffn_sizes(self) -> Tuple[int, ...]:
        """Each stage's Mix-FFN width."""
        return tuple(int(h * r) for h, r in zip(self.hidden_sizes, self.mlp_ratios))


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, kernel_init=with_axes(_INIT, DENSE_KERNEL),
                    bias_init=with_axes(nn.initializers.zeros, BIAS), dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Any, groups: int = 1,
          use_bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   feature_group_count=groups, use_bias=use_bias, kernel_init=with_axes(_INIT, CONV_KERNEL),
                   bias_init=with_axes(nn.initializers.zeros, BIAS), dtype=dtype, param_dtype=jnp.float32,
                   name=name)


class OverlapPatchEmbeddings(nn.Module):
    """Strided conv with kernel // 2 padding (neighbouring patches overlap), then LayerNorm."""

    hidden_size: int
    patch_size: int
    stride: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.hidden_size, self.patch_size, self.stride, self.patch_size // 2, "proj", self.dtype)(x)
        return LayerNorm(self.eps, dtype=self.dtype, name="layer_norm")(x)


class SequenceReduction(nn.Module):
    """The keys' and values' source map, shrunk by a conv of kernel = stride = ratio (no padding) + LayerNorm."""

    ratio: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(x.shape[-1], self.ratio, self.ratio, 0, "sequence_reduction", self.dtype)(x)
        return LayerNorm(self.eps, dtype=self.dtype, name="layer_norm")(x)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention over a map [B, H, W, C]: queries from every position, keys and values from the
    (spatially reduced, when sr_ratio > 1) map; softmax in float32."""

    num_heads: int
    sr_ratio: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        source = x
        if self.sr_ratio > 1:
            if h < self.sr_ratio or w < self.sr_ratio:
                raise ValueError(f"a {h}x{w} feature map is smaller than its attention's reduction ratio "
                                 f"{self.sr_ratio}: the input image is too small for this Segformer")
            source = SequenceReduction(self.sr_ratio, self.eps, self.dtype, name="sequence_reduction")(x)
        source = source.reshape(b, -1, c)
        q = _dense(c, "q_proj", self.dtype)(x.reshape(b, h * w, c)).reshape(b, h * w, heads, head_dim)
        k = _dense(c, "k_proj", self.dtype)(source).reshape(b, -1, heads, head_dim)
        v = _dense(c, "v_proj", self.dtype)(source).reshape(b, -1, heads, head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h, w, c)
        return _dense(c, "o_proj", self.dtype)(out)


class DepthwiseConv(nn.Module):
    """The Mix-FFN's 3x3 depthwise conv (a module of its own so that its path is transformers' `dwconv.dwconv`)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        return _conv(c, DWCONV_KERNEL, 1, DWCONV_KERNEL // 2, "dwconv", self.dtype, groups=c)(x)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv (the positional information a plain ViT MLP lacks) -> exact GELU -> fc2."""

    hidden_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.hidden_features, "fc1", self.dtype)(x)
        h = nn.gelu(DepthwiseConv(self.dtype, name="dwconv")(h), approximate=False)
        return _dense(x.shape[-1], "fc2", self.dtype)(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MixFFN(LN(x))."""

    num_heads: int
    sr_ratio: int
    hidden_features: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, eps = self.dtype, self.eps
        h = LayerNorm(eps, dtype=dt, name="layernorm_before")(x)
        x = x + EfficientSelfAttention(self.num_heads, self.sr_ratio, eps, dt, name="attention")(h)
        h = LayerNorm(eps, dtype=dt, name="layernorm_after")(x)
        return x + MixFFN(self.hidden_features, dt, name="mlp")(h)


class Stage(nn.Module):
    """Patch embedding, blocks, LayerNorm: one MiT stage, its feature map out."""

    config: SegformerConfig
    index: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, i = self.config, self.index
        dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_eps
        x = OverlapPatchEmbeddings(cfg.hidden_sizes[i], cfg.patch_sizes[i], cfg.strides[i], eps, dt,
                                   name="patch_embeddings")(x)
        for j in range(cfg.depths[i]):
            x = Block(cfg.num_attention_heads[i], cfg.sr_ratios[i], cfg.ffn_sizes[i], eps, dt, name=f"blocks_{j}")(x)
        return LayerNorm(eps, dtype=dt, name="layer_norm")(x)


class MixTransformer(nn.Module):
    """The MiT encoder (transformers' `SegformerModel`): every stage's feature map, finest first."""

    config: SegformerConfig

    def setup(self):
        self.stages = [Stage(self.config, i) for i in range(self.config.num_stages)]

    def __call__(self, x: jax.Array) -> List[jax.Array]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class DecodeProjection(nn.Module):
    """One stage's Linear to the decoder width (transformers' `SegformerMLP`, child `proj`)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense(self.features, "proj", self.dtype)(x)


class AllMLPDecodeHead(nn.Module):
    """Per-stage Linear, resize to the finest map, concat (last stage first), 1x1 conv + BN + ReLU, classifier."""

    config: SegformerConfig

    @nn.compact
    def __call__(self, features: List[jax.Array], train: bool) -> jax.Array:
        cfg = self.config
        dt, width = jnp.dtype(cfg.dtype), cfg.decoder_hidden_size
        size = features[0].shape[1:3]
        maps = [resize_bilinear(DecodeProjection(width, dt, name=f"linear_projections_{i}")(f), size)
                for i, f in enumerate(features)]
        x = _conv(width, 1, 1, 0, "linear_fuse", dt, use_bias=False)(jnp.concatenate(maps[::-1], -1))
        x = nn.relu(BatchNorm(dtype=dt, name="batch_norm")(x, train))
        return _conv(cfg.num_classes, 1, 1, 0, "classifier", dt)(x)


class SegformerSegmenter(nn.Module):
    """transformers' SegformerForSemanticSegmentation on images in [-1, 1] NHWC.

    `__call__` returns float32 logits [B, H, W, num_classes] at the input
    size (the decode head's 1/4-resolution logits resized bilinearly, as for
    sdsup's other segmenters); `decode_logits` returns the 1/4-resolution
    ones transformers' `logits` holds. `train=False` (evaluation) normalises
    the decode head with its BatchNorm running statistics. Pure: the logits
    are differentiable in the images and the weights.
    """

    config: SegformerConfig

    def setup(self):
        self.segformer = MixTransformer(self.config)
        self.decode_head = AllMLPDecodeHead(self.config)

    def normalize(self, images: jax.Array) -> jax.Array:
        """[-1, 1] -> [0, 1] -> (x - mean) / std: the PyTorch model's `pixel_values`."""
        return normalize_images(images, self.config.image_mean, self.config.image_std, jnp.dtype(self.config.dtype))

    def features(self, images: jax.Array) -> List[jax.Array]:
        """Every stage's feature map (transformers' `hidden_states`, NHWC), strides 4, 8, 16, 32 for MiT."""
        return self.segformer(self.normalize(images))

    def decode_logits(self, images: jax.Array, train: bool = False) -> jax.Array:
        """float32 logits at stage 0's resolution [B, ~H/4, ~W/4, num_classes] (transformers' `logits`)."""
        return self.decode_head(self.features(images), train).astype(jnp.float32)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        return resize_bilinear(self.decode_logits(images, train), images.shape[1:3])

    def pooled_features(self, images: jax.Array, train: bool = False, all_stages: bool = False) -> jax.Array:
        """Global-average-pooled encoder features, float32: the last stage's [B, hidden_sizes[-1]].

        With `all_stages`, every stage's pool concatenated [B, sum(hidden_sizes)]
        (textures as well as content), as `UperNetSegmenter.pooled_features`.
        The encoder has no batch statistics, so `train` changes nothing here.
        Apply with `method=SegformerSegmenter.pooled_features`.
        """
        del train
        outs = self.features(images)
        pool = lambda h: jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # noqa: E731
        if all_stages:
            return jnp.concatenate([pool(h) for h in outs], -1)
        return pool(outs[-1])


def abstract_variables(config: SegformerConfig, height: int = 64, width: int = 64):
    """The (boxed) variable shapes of SegformerSegmenter(config), without computing anything."""
    model = SegformerSegmenter(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3), jnp.float32)))
