"""CLIP text encoder in Flax, numerically compatible with transformers' CLIPTextModel.

The module tree mirrors the PyTorch one name for name (`embeddings.token_embedding`,
`encoder.layers_<i>.self_attn.q_proj`, `final_layer_norm`, ...), so that
`sdsup.convert.clip_text` is a table of renames and transposes rather than a
structural rewrite, and a reader can put the two side by side.

Semantics that matter for exact agreement with transformers:

* pre-LN encoder layers, exact (two-pass) layer-norm variance, causal
  self-attention with an optional key padding mask;
* query rows with no visible key (left padding) produce a zero attention
  output, which is what transformers' default SDPA path does with torch>=2.5;
  valid positions never see padded ones, so only padded positions depend on it;
* the pooled output is taken at the EOS position with transformers' rule: the
  legacy `eos_token_id == 2` configs (checkpoints exported before
  transformers#24773, e.g. openai/clip-vit-large-patch14) use the argmax of
  the token ids (EOS was the largest id in the original vocabulary); other
  configs use the first position equal to `eos_token_id`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdsup.models.partitioning import (
    BIAS,
    DENSE_KERNEL,
    EMBEDDING,
    NORM_PARAM,
    POSITION_EMBEDDING,
    with_axes,
)

Dtype = Any


def _quick_gelu(x):
    # OpenAI CLIP's sigmoid approximation of GELU; the constant is part of the
    # trained model, not a tunable.
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


# Only activations whose transformers definition (transformers/activations.py)
# we reproduce exactly. gelu_new, gelu_fast and gelu_pytorch_tanh are the same
# tanh formula written differently; gelu and gelu_python are the erf form.
ACTIVATIONS: Mapping[str, Callable] = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}

# The pre-#24773 CLIP configs shipped eos_token_id=2; transformers keeps the old
# argmax pooling for exactly that value, so we do too.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text tower.

    Defaults equal transformers' `CLIPTextConfig` defaults, so a partial
    transformers dict converts to the same model transformers would build.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Only used when the model is applied with deterministic=False.
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (batch, seq, hidden), after the final layer norm
    pooled_output: jax.Array  # (batch, hidden), last_hidden_state at the EOS position
    # With output_hidden_states: embeddings output and each layer's output, all
    # before the final layer norm (transformers' `hidden_states`; SDXL-style
    # conditioning reads hidden_states[-2]).
    hidden_states: Optional[Tuple[jax.Array, ...]] = None
    # CLIPTextModelWithProjection only: text_projection(pooled_output).
    text_embeds: Optional[jax.Array] = None


def _dense(features: int, std: float, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=with_axes(nn.initializers.normal(std), DENSE_KERNEL),
        bias_init=with_axes(nn.initializers.zeros_init(), BIAS),
        name=name,
    )


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        # torch computes the variance as E[(x - mean)^2]; Flax's fast E[x^2] - mean^2
        # loses digits when |mean| >> std, which the residual stream has.
        use_fast_variance=False,
        scale_init=with_axes(nn.initializers.ones_init(), NORM_PARAM),
        bias_init=with_axes(nn.initializers.zeros_init(), NORM_PARAM),
        name=name,
    )


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids):
        c = self.config
        # 0.02 std: CLIP's own initialisation (initializer_factor 1).
        token = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=with_axes(nn.initializers.normal(0.02), EMBEDDING),
            name="token_embedding",
        )
        position = nn.Embed(
            c.max_position_embeddings,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=with_axes(nn.initializers.normal(0.02), POSITION_EMBEDDING),
            name="position_embedding",
        )
        return token(input_ids) + position(position_ids)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        """x: (B, L, D); mask: bool (B, 1, L, L), True where a query may see a key."""
        c = self.config
        d, h, hd = c.hidden_size, c.num_attention_heads, c.head_dim
        # CLIP's initialisation scheme: in-projections shrink with depth.
        in_std = d**-0.5 * (2 * c.num_hidden_layers) ** -0.5
        q = _dense(d, in_std, self.dtype, self.param_dtype, "q_proj")(x)
        k = _dense(d, in_std, self.dtype, self.param_dtype, "k_proj")(x)
        v = _dense(d, in_std, self.dtype, self.param_dtype, "v_proj")(x)
        split = lambda t: t.reshape(t.shape[:-1] + (h, hd))
        q, k, v = split(q), split(k), split(v)

        # Logits and softmax in fp32 like transformers (softmax dtype=float32),
        # so bf16 compute does not saturate the softmax.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * (1.0 / math.sqrt(hd))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        # A query that sees no key (left padding) gets a zero output, as torch
        # SDPA (transformers' default attention) returns, instead of a uniform
        # average over masked keys.
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
        if c.attention_dropout > 0.0 and not deterministic:
            weights = nn.Dropout(rate=c.attention_dropout)(weights, deterministic=False)
        weights = weights.astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape(out.shape[:-2] + (d,))
        return _dense(d, d**-0.5, self.dtype, self.param_dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = _dense(c.intermediate_size, (2 * c.hidden_size) ** -0.5, self.dtype, self.param_dtype, "fc1")(x)
        x = ACTIVATIONS[c.hidden_act](x)
        out_std = c.hidden_size**-0.5 * (2 * c.num_hidden_layers) ** -0.5
        return _dense(c.hidden_size, out_std, self.dtype, self.param_dtype, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm1")(x)
        x = x + CLIPAttention(c, name="self_attn", **kw)(h, mask, deterministic)
        h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm2")(x)
        return x + CLIPMLP(c, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True, output_hidden_states: bool = False):
        # remat keeps the parameter names (layers_<i>), so checkpoints do not
        # depend on whether activations are recomputed. `deterministic` is a
        # Python bool that selects code paths, hence static.
        layer_cls = nn.remat(CLIPEncoderLayer, static_argnums=(3,)) if self.remat else CLIPEncoderLayer
        hidden = [x]
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, mask, deterministic
            )
            if output_hidden_states:
                hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


def pool_eos(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: Optional[int]) -> jax.Array:
    """Hidden state at the EOS position, by transformers' CLIPTextModel rule."""
    if eos_token_id is None:
        raise ValueError("pooling needs config.eos_token_id (transformers' CLIPTextModel fails without it too)")
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        # Legacy configs: EOS was the largest id in the original vocabulary.
        index = jnp.argmax(input_ids, axis=-1)
    else:
        # First EOS (pad may equal EOS). A row without EOS pools position 0,
        # as torch's argmax over an all-zero row does.
        index = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
    """Flax counterpart of transformers' `CLIPTextModel`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """input_ids: int (B, L); attention_mask: (B, L), nonzero = real token."""
        c = self.config
        input_ids = jnp.asarray(input_ids)
        seq = input_ids.shape[-1]
        if seq > c.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings={c.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.arange(seq)[None, :]

        x = CLIPTextEmbeddings(c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(
            input_ids, position_ids
        )

        mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        mask = jnp.broadcast_to(mask, (input_ids.shape[0], 1, seq, seq))

        x, hidden_states = CLIPEncoder(
            c, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, name="encoder"
        )(x, mask, deterministic, output_hidden_states)
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)
        return CLIPTextOutput(
            last_hidden_state=x,
            pooled_output=pool_eos(x, input_ids, c.eos_token_id),
            hidden_states=hidden_states,
        )


class CLIPTextModelWithProjection(nn.Module):
    """Flax counterpart of transformers' `CLIPTextModelWithProjection`.

    Parameters: `text_model` (a CLIPTextTransformer) and `text_projection`
    (bias-free, hidden_size -> projection_dim), as in PyTorch.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        c = self.config
        out = CLIPTextTransformer(
            c, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, name="text_model"
        )(input_ids, attention_mask, position_ids, deterministic, output_hidden_states)
        proj = _dense(c.projection_dim, c.hidden_size**-0.5, self.dtype, self.param_dtype, "text_projection", False)
        return out.replace(text_embeds=proj(out.pooled_output))
