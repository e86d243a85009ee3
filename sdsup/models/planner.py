"""Text -> object plan network: a small decoder-only transformer over box tokens.

A plan lists, for each thing class of the dataset, that class's instances in
a picture: the class token, then four tokens per instance, its box (x0, y0,
x1, y1) as bins of the image's width and height, then EOS (`sdsup.planning`
writes and reads them). The network reads one class's sequence so far (causal
self-attention) and the text encoder's states (cross-attention) and predicts
the next token, as layout-planning work decides the objects, their number and
their places before any pixel is drawn: a few discrete choices instead of
hundreds of pixel draws.

Each class is planned from the text alone, not from the other classes' boxes:
a model that reads the boxes already placed learns which classes appear
together, and drops one of a pair it never saw together (the scenes' test
split holds exactly such pairs: a car beside a tree), where the text names both.

Vocabulary: PAD, EOS, one token per thing class, one per coordinate bin.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdsup.models.layers import Attention, Dense, FeedForward, LayerNorm
from sdsup.models.partitioning import POSITION_EMBEDDING, EMBEDDING, with_axes

PAD, EOS = 0, 1
SPECIAL_TOKENS = 2
TOKENS_PER_BOX = 4  # x0, y0, x1, y1


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """A planner over `thing_ids` (class ids of the dataset's `num_classes`) with `num_bins` bins per side and
    up to `max_per_class` instances of a class."""

    num_classes: int
    thing_ids: tuple
    num_bins: int
    max_per_class: int
    width: int
    depth: int
    heads: int
    cross_attention_dim: int
    # The shape bank (`sdsup.planning.ShapeBank`) saved with the network: masks of shape_size x shape_size,
    # shapes_per_class of each thing class.
    shape_size: int = 32
    shapes_per_class: int = 64

    def __post_init__(self):
        if not self.thing_ids:
            raise ValueError("a planner needs at least one thing class (the dataset's thing_classes)")
        if any(not 0 <= c < self.num_classes for c in self.thing_ids):
            raise ValueError(f"thing_ids {self.thing_ids} must be class ids below num_classes={self.num_classes}")
        if self.num_bins < 2 or self.max_per_class < 1:
            raise ValueError(f"num_bins must be >= 2 and max_per_class >= 1, got {self.num_bins}, "
                             f"{self.max_per_class}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must divide into {self.heads} heads")

    @property
    def num_things(self) -> int:
        return len(self.thing_ids)

    @property
    def first_bin(self) -> int:
        """Token of coordinate bin 0."""
        return SPECIAL_TOKENS + self.num_things

    @property
    def vocab_size(self) -> int:
        return self.first_bin + self.num_bins

    @property
    def length(self) -> int:
        """Tokens in one class's plan: the class token, max_per_class boxes, EOS."""
        return 1 + TOKENS_PER_BOX * self.max_per_class + 1


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i sees positions <= i."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, width = x.shape
        dim_head = width // self.heads
        q, k, v = (Dense(width, name=name)(x).reshape(b, length, self.heads, dim_head)
                   for name in ("to_q", "to_k", "to_v"))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, length, width)
        return Dense(width, name="to_out_0")(o)


class PlannerBlock(nn.Module):
    """Pre-norm residual block: causal self-attention, cross-attention to the text, GEGLU feed-forward."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = CausalSelfAttention(self.heads, name="attn1")(LayerNorm(name="norm1")(x)) + x
        cross = functools.partial(Attention, self.heads, self.width // self.heads)
        x = cross(name="attn2")(LayerNorm(name="norm2")(x), context) + x
        return FeedForward(self.width, name="ff")(LayerNorm(name="norm3")(x)) + x


class PlannerModel(nn.Module):
    """logits [B, T, vocab] of the next token = f(one class's plan tokens [B, T], text states [B, L, D])."""

    config: PlannerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] > cfg.length:
            raise ValueError(f"expected plan tokens [B, <= {cfg.length}], got {tokens.shape}")
        table = self.param("token_embedding", with_axes(nn.initializers.normal(0.02), EMBEDDING),
                           (cfg.vocab_size, cfg.width))
        positions = self.param("position_embedding", with_axes(nn.initializers.normal(0.02), POSITION_EMBEDDING),
                               (cfg.length, cfg.width))
        x = jnp.take(table, tokens, axis=0) + positions[None, :tokens.shape[1]]
        for i in range(cfg.depth):
            x = PlannerBlock(cfg.width, cfg.heads, name=f"blocks_{i}")(x, context.astype(x.dtype))
        x = LayerNorm(name="norm_out")(x)
        return Dense(cfg.vocab_size, name="head")(x).astype(jnp.float32)


def dummy_inputs(config: PlannerConfig, context_length: int, batch_size: int = 1):
    """(tokens, context) zeros for init / eval_shape."""
    return (jnp.zeros((batch_size, config.length - 1), jnp.int32),
            jnp.zeros((batch_size, context_length, config.cross_attention_dim), jnp.float32))
