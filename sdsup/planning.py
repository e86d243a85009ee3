"""Object plans: label map <-> box tokens, the shape bank, and plan sampling and drawing.

A plan lists a picture's things (the dataset's `thing_classes`) class by
class: per class a token sequence of its instances' boxes (`sdsup.models.planner`),
[num_things, length] per picture. Training plans are read off the label maps:
an object is a connected component (8-neighbour) of a thing class of at least
`min_pixels` pixels, so a pair of houses drawn overlapping is one object with a
wide box, as it is one blob in the map. A class's objects are listed left to
right; beyond `max_per_class` the smallest are dropped.

Drawing a plan (`draw`) puts into each box a mask from the **shape bank**:
real instance masks of that class cut from training maps, the one whose
aspect ratio is nearest the box's. The network decides what, how many and
where; the bank supplies what a house's outline looks like. Later (lower)
boxes are drawn over earlier ones, nearer things hiding farther ones.

Everything after `PlanTokens` and `ShapeBank.build` is pure JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from sdsup.models.planner import EOS, PAD, SPECIAL_TOKENS, TOKENS_PER_BOX, PlannerConfig

_EIGHT = np.ones((3, 3), bool)
NO_THING = -1  # `draw`'s value where no box covers a pixel


@dataclasses.dataclass(frozen=True)
class Box:
    """One object of a label map: its thing index (into thing_ids) and pixel box [y0, y1) x [x0, x1)."""

    thing: int
    y0: int
    x0: int
    y1: int
    x1: int
    area: int


def objects_in_map(label: np.ndarray, config: PlannerConfig, min_pixels: int, with_masks: bool = False):
    """The map's objects, class by class, each class's left to right (and, `with_masks`, each one's boolean
    mask cropped to its box)."""
    found = []
    for t, cls in enumerate(config.thing_ids):
        components, count = ndimage.label(label == cls, structure=_EIGHT)
        if not count:
            continue
        objects = []
        for i, sl in enumerate(ndimage.find_objects(components), start=1):
            mask = components[sl] == i
            area = int(mask.sum())
            if area >= min_pixels:
                objects.append((Box(t, sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, area), mask))
        objects = sorted(objects, key=lambda o: -o[0].area)[:config.max_per_class]  # the largest if too many
        found += sorted(objects, key=lambda o: (o[0].x0 + o[0].x1, o[0].y0))
    return found if with_masks else [box for box, _ in found]


def encode(boxes: Iterable[Box], config: PlannerConfig, height: int, width: int) -> np.ndarray:
    """Plan tokens [num_things, config.length]: per class its token, (x0, y0, x1, y1) per box, EOS, PAD..."""
    bins = config.num_bins
    rows = [[SPECIAL_TOKENS + t] for t in range(config.num_things)]
    for b in boxes:
        # A box covers bins first..last inclusive: bin(x0) and the bin holding the last column x1 - 1.
        coords = (b.x0 * bins // width, b.y0 * bins // height, (b.x1 - 1) * bins // width, (b.y1 - 1) * bins // height)
        rows[b.thing] += [config.first_bin + int(c) for c in coords]
    out = np.full((config.num_things, config.length), PAD, np.int32)
    for t, row in enumerate(rows):
        row = row + [EOS]
        if len(row) > config.length:
            raise ValueError(f"{(len(row) - 2) // TOKENS_PER_BOX} objects of class {config.thing_ids[t]} exceed "
                             f"max_per_class={config.max_per_class}")
        out[t, :len(row)] = row
    return out


def decode(tokens: np.ndarray, config: PlannerConfig, height: int, width: int) -> List[Tuple[int, Tuple[int, ...]]]:
    """(class id, (x0, y0, x1, y1) pixel box, end exclusive) per object of one plan [num_things, length]."""
    out = []
    for row in np.asarray(tokens):
        cls = config.thing_ids[int(row[0]) - SPECIAL_TOKENS]
        for i in range(config.max_per_class):
            box = row[1 + i * TOKENS_PER_BOX:1 + (i + 1) * TOKENS_PER_BOX]
            if len(box) < TOKENS_PER_BOX or (box < config.first_bin).any():
                break
            bx0, by0, bx1, by1 = (int(c) - config.first_bin for c in box)
            out.append((cls, (bx0 * width // config.num_bins, by0 * height // config.num_bins,
                              -(-(bx1 + 1) * width // config.num_bins), -(-(by1 + 1) * height // config.num_bins))))
    return out


@dataclasses.dataclass
class PlanTokens:
    """The input pipeline's `derive` step: adds "plan" (the label map's plan tokens [num_things, length]).

    It runs after cropping and flipping, so the plan describes the picture the
    model sees (and the caption it reads, which the flip also mirrors).
    """

    config: PlannerConfig
    min_pixels: int

    def __call__(self, example: dict) -> dict:
        label = example["label"]
        boxes = objects_in_map(label, self.config, self.min_pixels)
        return {"plan": encode(boxes, self.config, *label.shape)}


@dataclasses.dataclass(frozen=True)
class ShapeBank:
    """shapes [things, K, S, S] float (1 inside), log_aspects [things, K] (log width/height; inf = empty slot)."""

    shapes: np.ndarray
    log_aspects: np.ndarray

    @classmethod
    def build(cls, labels: Iterable[np.ndarray], config: PlannerConfig, min_pixels: int) -> "ShapeBank":
        """The first `config.shapes_per_class` objects of each thing class in `labels` (label maps)."""
        k, s = config.shapes_per_class, config.shape_size
        shapes = np.zeros((config.num_things, k, s, s), np.float32)
        log_aspects = np.full((config.num_things, k), np.inf, np.float32)
        filled = np.zeros(config.num_things, np.int64)
        for label in labels:
            for box, mask in objects_in_map(label, config, min_pixels, with_masks=True):
                t = box.thing
                if filled[t] < k:
                    h, w = mask.shape
                    rows = (np.arange(s) + 0.5) * h / s
                    cols = (np.arange(s) + 0.5) * w / s
                    shapes[t, filled[t]] = mask[rows.astype(int)[:, None], cols.astype(int)[None, :]]
                    log_aspects[t, filled[t]] = np.log(w / h)
                    filled[t] += 1
            if filled.min() >= k:
                break
        missing = [config.thing_ids[t] for t in np.nonzero(filled == 0)[0]]
        if missing:
            # A class never seen as an object is drawn as its box, filled.
            for t in np.nonzero(filled == 0)[0]:
                shapes[t, 0] = 1.0
                log_aspects[t, 0] = 0.0
        return cls(shapes, log_aspects)

    def as_params(self) -> dict:
        return {"shapes": self.shapes, "log_aspects": self.log_aspects}


def allowed_tokens(config: PlannerConfig, tokens: jax.Array, position) -> jax.Array:
    """[B, vocab] bool: the tokens the plan grammar allows at `position` (>= 1) after `tokens` [B, T]."""
    vocab = jnp.arange(config.vocab_size)
    is_bin = vocab >= config.first_bin
    slot = (position - 1) % TOKENS_PER_BOX
    last = position == config.length - 1
    # Corners: x1 >= x0 and y1 >= y0 (two tokens back).
    start = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(position - 2, 0), axis=1, keepdims=False)
    corner_ok = vocab[None, :] >= start[:, None]
    ended = jnp.any((tokens == EOS) & (jnp.arange(tokens.shape[1])[None, :] < position), axis=1)
    ok = jnp.where(slot == 0, (is_bin | (vocab == EOS))[None, :],
                   jnp.where(slot >= 2, is_bin[None, :] & corner_ok, is_bin[None, :]))
    ok = jnp.where(last, (vocab == EOS)[None, :], ok)
    return jnp.where(ended[:, None], (vocab == PAD)[None, :], ok)


def sample(logits_fn: Callable[[jax.Array], jax.Array], rng: jax.Array, batch_size: int, config: PlannerConfig,
           temperature: float = 1.0) -> jax.Array:
    """Plans [B, num_things, length], every class's drawn token by token under the grammar (temperature 0: the
    most probable token).

    `logits_fn(tokens [B * num_things, length - 1]) -> [B * num_things, length - 1, vocab]` closes over the
    network, its weights, the text (each example's repeated num_things times, class fastest) and any guidance;
    position p's logits give token p + 1.
    """
    length, things = config.length, config.num_things
    first = jnp.tile(SPECIAL_TOKENS + jnp.arange(things, dtype=jnp.int32), batch_size)
    tokens = jnp.full((batch_size * things, length), PAD, jnp.int32).at[:, 0].set(first)

    def body(p, carry):
        tokens, rng = carry
        rng, rng_draw = jax.random.split(rng)
        logits = jax.lax.dynamic_index_in_dim(logits_fn(tokens[:, :-1]), p - 1, axis=1, keepdims=False)
        logits = jnp.where(allowed_tokens(config, tokens, p), logits.astype(jnp.float32), -jnp.inf)
        if temperature > 0:
            drawn = jax.random.categorical(rng_draw, logits / temperature, axis=-1)
        else:
            drawn = jnp.argmax(logits, axis=-1)
        return tokens.at[:, p].set(drawn.astype(jnp.int32)), rng

    tokens, _ = jax.lax.fori_loop(1, length, body, (tokens, rng))
    return tokens.reshape(batch_size, things, length)


def draw(tokens: jax.Array, bank: dict, config: PlannerConfig, height: int, width: int) -> jax.Array:
    """Class ids [B, height, width] of plans [B, num_things, length] (NO_THING where no box covers a pixel),
    each box filled by its bank shape."""
    b, things, m = tokens.shape[0], config.num_things, config.max_per_class
    boxes = tokens[:, :, 1:1 + TOKENS_PER_BOX * m].reshape(b, things, m, TOKENS_PER_BOX)
    # A box is whole when its four tokens are bins (the sampler writes EOS, then PAD, after the last box).
    valid = jnp.all(boxes >= config.first_bin, axis=-1).reshape(b, things * m)
    thing = jnp.broadcast_to(jnp.arange(things)[None, :, None], (b, things, m)).reshape(b, things * m)
    bins = jnp.clip(boxes - config.first_bin, 0, config.num_bins - 1).astype(jnp.float32).reshape(b, things * m, 4)
    step_x, step_y = width / config.num_bins, height / config.num_bins
    x0, y0 = bins[..., 0] * step_x, bins[..., 1] * step_y
    x1, y1 = (jnp.maximum(bins[..., 2], bins[..., 0]) + 1) * step_x, (jnp.maximum(bins[..., 3], bins[..., 1]) + 1) * step_y
    log_aspect = jnp.log((x1 - x0) / (y1 - y0))
    aspects = jnp.asarray(bank["log_aspects"])[thing]  # [B, N, K]
    choice = jnp.argmin(jnp.abs(aspects - log_aspect[..., None]), axis=-1)
    shapes = jnp.asarray(bank["shapes"])[thing, choice]  # [B, N, S, S]
    s = config.shape_size
    v = ((jnp.arange(height) + 0.5)[None, None, :] - y0[..., None]) / (y1 - y0)[..., None]  # [B, N, H]
    u = ((jnp.arange(width) + 0.5)[None, None, :] - x0[..., None]) / (x1 - x0)[..., None]  # [B, N, W]
    rows = jnp.clip(jnp.floor(v * s), 0, s - 1).astype(jnp.int32)
    cols = jnp.clip(jnp.floor(u * s), 0, s - 1).astype(jnp.int32)
    inside_v, inside_u = (v >= 0) & (v < 1), (u >= 0) & (u < 1)
    picked = jnp.take_along_axis(shapes, rows[..., :, None], axis=2)  # [B, N, H, S]
    picked = jnp.take_along_axis(picked, jnp.broadcast_to(cols[..., None, :], picked.shape[:3] + (width,)), axis=3)
    covers = (picked > 0.5) & inside_v[..., :, None] & inside_u[..., None, :] & valid[..., None, None]
    # Draw order: by the box's bottom edge, so lower (nearer) things hide higher ones; ties by plan order.
    n = things * m
    order = jnp.argsort(jnp.argsort(y1 + 1e-3 * jnp.arange(n)[None, :] / n, axis=1), axis=1)
    rank = jnp.where(covers, order[..., None, None], -1)
    top = jnp.argmax(rank, axis=1)  # [B, H, W]
    ids = jnp.asarray(config.thing_ids, jnp.int32)[jnp.take_along_axis(thing, top.reshape(b, -1), axis=1)]
    return jnp.where(jnp.max(rank, axis=1) >= 0, ids.reshape(b, height, width), NO_THING)
