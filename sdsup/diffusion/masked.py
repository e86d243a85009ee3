"""Masked (absorbing-state) discrete diffusion over label maps: MaskGIT / D3PM-absorbing style.

A label map [B, H, W] of class ids is corrupted by replacing a fraction r of
its pixels with the MASK id (= num_classes); the network sees the partly
masked map, r and the text, and predicts every pixel's class. Training is
cross-entropy on the masked pixels, with r drawn from the cosine schedule
r = cos(pi/2 * u), u ~ U(0, 1) (MaskGIT), which spends more steps on heavily
masked maps: those decide the layout.

Inference:
  most_probable_map  one pass on the all-masked map, per-pixel argmax: the
                     map that maximises expected per-pixel accuracy, and the
                     best bet for expected mIoU; at a larger size, the
                     argmax of the logits resized there (smooth boundaries
                     instead of the model's pixel blocks);
  sample_maps        confidence-ordered unmasking in S steps: at step s every
                     masked pixel draws a class (temperature), the most
                     confident draws are kept and the rest masked again, so
                     that cos(pi/2 (s+1)/S) of the pixels stay masked.

Pixels whose label is the ignore id are always masked in the input and never
scored. Everything is pure JAX; `logits_fn(ids, ratio) -> logits [B, H, W, N]`
closes over the network, its weights, the text and any guidance.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp


def mask_ratio(u: jax.Array) -> jax.Array:
    """Cosine schedule: the fraction of pixels masked at time u in [0, 1] (1 at u=0, 0 at u=1)."""
    return jnp.cos(0.5 * math.pi * u)


def corrupt(rng: jax.Array, labels: jax.Array, num_classes: int, ignore_id: int, full_mask_fraction: float = 0.0
            ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(input ids, masked [B, H, W] bool, ratio [B]) for labels [B, H, W].

    Each example masks exactly ceil(r * H * W) pixels (at least one), r from
    the cosine schedule, chosen uniformly at random; ignore pixels are masked
    in the input on top of that but are not counted as targets. A share
    `full_mask_fraction` of the examples is masked entirely (r = 1): that pass
    is the most probable map's predictor, which the cosine schedule alone
    trains on few examples (r > 0.9 for 29% of them).
    """
    b = labels.shape[0]
    n = math.prod(labels.shape[1:])
    rng_u, rng_p, rng_f = jax.random.split(rng, 3)
    ratio = mask_ratio(jax.random.uniform(rng_u, (b,)))
    if full_mask_fraction > 0:
        ratio = jnp.where(jax.random.uniform(rng_f, (b,)) < full_mask_fraction, 1.0, ratio)
    count = jnp.maximum(1, jnp.ceil(ratio * n)).astype(jnp.int32)
    # Rank of each pixel in a random permutation; the `count` lowest are masked.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng_p, (b, n)), axis=1), axis=1)
    masked = (ranks < count[:, None]).reshape(labels.shape)
    valid = labels != ignore_id
    ids = jnp.where(masked | ~valid, num_classes, labels.astype(jnp.int32))
    return ids, masked & valid, ratio


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, masked: jax.Array,
                         pixel_weights: Optional[jax.Array] = None) -> jax.Array:
    """Mean CE over the masked pixels of the batch (labels outside `masked` may be anything).

    `pixel_weights` (e.g. class balancing) scale each pixel's term; the mean
    is then a weighted mean over the masked pixels.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(masked, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    weight = masked.astype(jnp.float32)
    if pixel_weights is not None:
        weight = weight * pixel_weights
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


UPSAMPLE_METHODS = ("nearest", "linear", "cubic", "lanczos3", "lanczos5")


def most_probable_map(logits_fn: Callable, shape: Tuple[int, int, int], num_classes: int, upsample: int = 1,
                      method: str = "nearest", known: Optional[jax.Array] = None,
                      allowed: Optional[jax.Array] = None) -> jax.Array:
    """Per-pixel argmax of one pass on the all-masked map: ids [B, H * upsample, W * upsample].

    With `upsample` > 1 the logits are resized by `method` (`jax.image.resize`)
    before the argmax; "nearest" repeats each pixel. `known` ([B, H, W], MASK
    where unknown) is the pass's input instead of the all-masked map; `allowed`
    ([num_classes] bool) limits the argmax to those classes, at every pixel.
    """
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f"upsampling method must be one of {UPSAMPLE_METHODS}, got {method!r}")
    ids = jnp.full(shape, num_classes, jnp.int32) if known is None else known.astype(jnp.int32)
    ratio = jnp.mean((ids == num_classes).astype(jnp.float32), axis=(1, 2))
    logits = _restrict(logits_fn(ids, ratio).astype(jnp.float32), allowed)
    if upsample > 1 and method != "nearest":
        b, h, w, n = logits.shape
        logits = jax.image.resize(jnp.maximum(logits, _FLOOR), (b, h * upsample, w * upsample, n), method)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return upsample_labels(jnp.argmax(logits, axis=-1).astype(jnp.int32), upsample)


# Disallowed classes' logits: low enough never to win, finite so that resizing them stays finite.
_FLOOR = -1e9


def _restrict(logits: jax.Array, allowed: Optional[jax.Array]) -> jax.Array:
    return logits if allowed is None else jnp.where(allowed, logits, _FLOOR)


def redraw(logits_fn: Callable, ids: jax.Array, where: jax.Array, num_classes: int,
           allowed: Optional[jax.Array] = None) -> jax.Array:
    """`ids` [B, H, W] with the pixels `where` replaced by one pass's argmax (over `allowed`) with them masked.

    E.g. the stuff behind things a plan placed: mask the things' pixels and ask for stuff only.
    """
    masked_ids = jnp.where(where, num_classes, ids)
    ratio = jnp.mean(where.astype(jnp.float32), axis=(1, 2))
    best = jnp.argmax(_restrict(logits_fn(masked_ids, ratio).astype(jnp.float32), allowed), axis=-1)
    return jnp.where(where, best.astype(jnp.int32), ids)


def sample_maps(logits_fn: Callable, rng: jax.Array, shape: Tuple[int, int, int], num_classes: int, steps: int,
                temperature: float = 1.0, choice_temperature: float = 4.5, known: Optional[jax.Array] = None,
                allowed: Optional[jax.Array] = None) -> jax.Array:
    """Confidence-ordered unmasking (MaskGIT) in `steps` passes: ids [B, H, W].

    `temperature` scales the logits before each draw (0 = argmax draws).
    `choice_temperature` adds Gumbel noise, annealed linearly to 0 over the
    steps, to the log-confidences that pick which draws to keep, so early
    steps do not lock in only the easiest pixels. `known` ([B, H, W], MASK
    where unknown) starts the sampler with those pixels given; `allowed`
    ([num_classes] bool) limits the draws to those classes.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b = shape[0]
    n = math.prod(shape[1:])
    if known is None:
        ids = jnp.full((b, n), num_classes, jnp.int32)
    else:
        ids = known.reshape(b, n).astype(jnp.int32)

    def body(s, carry):
        ids, rng = carry
        rng, rng_draw, rng_choice = jax.random.split(rng, 3)
        unknown = ids == num_classes
        ratio = jnp.sum(unknown, axis=1).astype(jnp.float32) / n
        logits = _restrict(logits_fn(ids.reshape(shape), ratio).reshape(b, n, -1).astype(jnp.float32), allowed)
        logp = jax.nn.log_softmax(logits, axis=-1)
        if temperature > 0:
            drawn = jax.random.categorical(rng_draw, logits / temperature, axis=-1)
        else:
            drawn = jnp.argmax(logits, axis=-1)
        drawn = jnp.where(unknown, drawn, ids)
        confidence = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
        anneal = choice_temperature * (1.0 - (s + 1.0) / steps)
        confidence = confidence + anneal * jax.random.gumbel(rng_choice, confidence.shape)
        confidence = jnp.where(unknown, confidence, jnp.inf)  # known pixels stay known
        # How many stay masked after this step: the cosine schedule, but at
        # least one fewer than now (progress every step) and 0 at the end.
        still = jnp.floor(n * mask_ratio((s + 1.0) / steps)).astype(jnp.int32)
        still = jnp.minimum(still, jnp.sum(unknown, axis=1) - 1)
        still = jnp.where(s == steps - 1, 0, jnp.maximum(still, 0))
        ranks = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)
        remask = ranks < still[:, None]
        return jnp.where(remask, num_classes, drawn), rng

    ids, _ = jax.lax.fori_loop(0, steps, body, (ids, rng))
    return ids.reshape(shape)


def downsample_labels(labels: jax.Array, factor: int, num_classes: int, ignore_id: int) -> jax.Array:
    """[B, H, W] -> [B, H/f, W/f]: the most frequent valid class of each f x f block (ignore if none)."""
    if factor == 1:
        return labels.astype(jnp.int32)
    b, h, w = labels.shape
    if h % factor or w % factor:
        raise ValueError(f"label map {h}x{w} does not divide by {factor}")
    blocks = labels.reshape(b, h // factor, factor, w // factor, factor).astype(jnp.int32)
    counts = jnp.sum(jax.nn.one_hot(blocks, num_classes, dtype=jnp.int32), axis=(2, 4))  # ignore -> all zeros
    winner = jnp.argmax(counts, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.max(counts, axis=-1) > 0, winner, ignore_id)


def upsample_labels(ids, factor: int):
    """Nearest-neighbour [B, h, w] -> [B, h*f, w*f] (NumPy or JAX arrays)."""
    xp = jnp if isinstance(ids, jax.Array) else __import__("numpy")
    return xp.repeat(xp.repeat(ids, factor, axis=1), factor, axis=2)
