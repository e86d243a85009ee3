"""CLIP vision tower in Flax, numerically compatible with transformers' CLIPVisionModel(WithProjection).

The module tree mirrors the PyTorch one name for name (`embeddings.patch_embedding`,
`pre_layrnorm` -- transformers' spelling, kept so keys map one to one --
`encoder.layers_<i>`, `post_layernorm`), so that `sdsup.convert.clip_vision` is
a table of renames and transposes, as for the text tower.

The encoder is the text tower's (`sdsup.models.clip_text.CLIPEncoder`): CLIP's
two towers share their layer structure exactly (pre-LN, q/k/v/out projections
with biases, fc1-act-fc2), and the layers only read the fields both configs
have (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
head_dim, hidden_act, layer_norm_eps, attention_dropout). The vision tower
attends everywhere: no causal mask, no padding.

Images are NHWC, like the rest of sdsup (transformers takes NCHW), already
preprocessed (`sdsup.evaluation.clip_score.preprocess`): resized and
centre-cropped to image_size, normalised with CLIP's mean and std.

Semantics that matter for exact agreement with transformers:

* the patch embedding is a bias-free conv with stride = kernel = patch_size;
  patches are read row-major, so the token order matches torch's
  `flatten(2).transpose(1, 2)`;
* the class token goes first, then position embeddings are added to all
  num_patches + 1 tokens, then `pre_layrnorm`;
* `last_hidden_state` is the encoder output *without* a final norm;
  `pooled_output` is `post_layernorm` of the class token only;
* `image_embeds` is the bias-free `visual_projection` of the pooled output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdsup.models.clip_text import ACTIVATIONS, CLIPEncoder, _dense, _layer_norm
from sdsup.models.partitioning import BIAS, CONV_KERNEL, POSITION_EMBEDDING, with_axes

Dtype = Any


def _square(name: str, value) -> int:
    """transformers types image_size/patch_size as int or pair, but its CLIP model only works with squares."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r}: CLIP's vision tower needs one square size")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower.

    Defaults equal transformers' `CLIPVisionConfig` defaults (ViT-B/32), so a
    partial transformers dict converts to the same model transformers would
    build.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Only used when the model is applied with deterministic=False.
    attention_dropout: float = 0.0

    def __post_init__(self):
        # Normalise [s, s] (a transformers config may store pairs) to s; frozen, hence object.__setattr__.
        object.__setattr__(self, "image_size", _square("image_size", self.image_size))
        object.__setattr__(self, "patch_size", _square("patch_size", self.patch_size))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            # transformers floors the patch count but its conv then yields a
            # different number of tokens than it has positions: refuse early.
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # the class token has a position too


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (batch, 1 + num_patches, hidden), encoder output, no final norm
    pooled_output: jax.Array  # (batch, hidden), post_layernorm of the class token
    # With output_hidden_states: the encoder input (after pre_layrnorm) and
    # each layer's output, as transformers' `hidden_states`.
    hidden_states: Optional[Tuple[jax.Array, ...]] = None
    # CLIPVisionModelWithProjection only: visual_projection(pooled_output).
    image_embeds: Optional[jax.Array] = None


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        # CLIP's own initialisation (initializer_range 0.02, factor 1).
        patches = nn.Conv(
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_axes(nn.initializers.normal(0.02), CONV_KERNEL),
            name="patch_embedding",
        )(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)  # row-major over the patch grid, as torch flattens
        # A width-D vector like a bias; its std is CLIP's (hidden_size ** -0.5).
        class_token = self.param(
            "class_embedding", with_axes(nn.initializers.normal(c.hidden_size**-0.5), BIAS), (c.hidden_size,),
            self.param_dtype,
        )
        class_token = jnp.broadcast_to(jnp.asarray(class_token, self.dtype), (batch, 1, c.hidden_size))
        position = nn.Embed(
            c.num_positions,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=with_axes(nn.initializers.normal(0.02), POSITION_EMBEDDING),
            name="position_embedding",
        )
        return jnp.concatenate([class_token, patches], axis=1) + position(jnp.arange(c.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """Flax counterpart of transformers' `CLIPVisionModel`."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self, pixel_values, deterministic: bool = True, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """pixel_values: float (B, image_size, image_size, num_channels), NHWC, normalised."""
        c = self.config
        pixel_values = jnp.asarray(pixel_values)
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}) for this config, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        x = CLIPVisionEmbeddings(c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(
            pixel_values.astype(self.dtype)
        )
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(x)
        # Every token sees every token: one all-true mask that broadcasts over
        # batch, heads and positions (XLA folds the select away).
        mask = jnp.ones((1, 1, 1, 1), dtype=bool)
        x, hidden_states = CLIPEncoder(
            c, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, name="encoder"
        )(x, mask, deterministic, output_hidden_states)
        pooled = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "post_layernorm")(x[:, 0])
        return CLIPVisionOutput(last_hidden_state=x, pooled_output=pooled, hidden_states=hidden_states)


class CLIPVisionModelWithProjection(nn.Module):
    """Flax counterpart of transformers' `CLIPVisionModelWithProjection`.

    Parameters: `vision_model` (a CLIPVisionTransformer) and
    `visual_projection` (bias-free, hidden_size -> projection_dim), as in PyTorch.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self, pixel_values, deterministic: bool = True, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        c = self.config
        out = CLIPVisionTransformer(
            c, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, name="vision_model"
        )(pixel_values, deterministic, output_hidden_states)
        proj = _dense(c.projection_dim, c.hidden_size**-0.5, self.dtype, self.param_dtype, "visual_projection", False)
        return out.replace(image_embeds=proj(out.pooled_output))


def dummy_pixels(config: CLIPVisionConfig, batch: int = 1) -> jax.Array:
    """Zeros of the input shape, for `init` / `jax.eval_shape`."""
    return jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32)
