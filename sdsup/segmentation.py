"""Per-pixel losses and metrics for label maps (ignore-aware), shared by training and evaluation."""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_id: int) -> Tuple[jax.Array, jax.Array]:
    """(loss [B, H, W], valid [B, H, W]): softmax CE per pixel; ignore pixels give 0."""
    valid = labels != ignore_id
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, loss, 0.0), valid


def class_balance_weights(labels: jax.Array, num_classes: int, ignore_id: int, num_outputs: int) -> jax.Array:
    """OASIS/ALDM per-pixel weights from the batch's class frequencies.

    w_c = N_valid / (n_present * num_outputs * count_c) for each class present
    in the batch, 0 on ignore pixels; `num_outputs` is N + 1 for a
    discriminator with a fake class. Rare classes weigh more, so small things
    count as much as the sky.
    """
    valid = labels != ignore_id
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    counts = jnp.zeros((num_classes,), jnp.float32).at[safe.reshape(-1)].add(valid.reshape(-1).astype(jnp.float32))
    present = jnp.sum(counts > 0)
    n_valid = jnp.sum(counts)
    per_class = jnp.where(counts > 0, n_valid / (jnp.maximum(present, 1) * num_outputs * jnp.maximum(counts, 1)), 0.0)
    return jnp.where(valid, per_class[safe], 0.0)


def balanced_mean(loss_px: jax.Array, labels: jax.Array, num_classes: int, ignore_id: int,
                  power: float) -> jax.Array:
    """Mean of a per-pixel loss with each pixel weighted by its class's OASIS weight ** power.

    The weights are normalised to mean 1 over valid pixels, so the value
    keeps the plain mean's scale; power 0 is the plain mean over valid
    pixels, power 1 gives every class present in the batch the same total
    weight.
    """
    valid = labels != ignore_id
    if not power:
        return masked_mean(loss_px, valid)
    weights = class_balance_weights(labels, num_classes, ignore_id, num_classes) ** power
    return masked_mean(loss_px * weights, valid) / jnp.maximum(masked_mean(weights, valid), 1e-12)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int, ignore_id: int,
                     mask: Optional[np.ndarray] = None) -> np.ndarray:
    """[num_classes, num_classes] counts, rows = ground truth, columns = prediction.

    `mask`, if given, is either per pixel (the labels' shape) or per example
    ([B], e.g. the padding mask of an evaluation batch).
    """
    labels = np.asarray(labels)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != labels.shape:
            mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim)), labels.shape)
    pred, labels = np.asarray(pred).reshape(-1).astype(np.int64), labels.reshape(-1).astype(np.int64)
    keep = labels != ignore_id
    if mask is not None:
        keep &= mask.reshape(-1)
    keep &= (pred >= 0) & (pred < num_classes) & (labels < num_classes)
    return np.bincount(labels[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> Tuple[float, np.ndarray]:
    """(mIoU over classes that occur in the ground truth or predictions, per-class IoU with NaN for absent)."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = confusion.sum(1) > 0  # classes in the ground truth
    miou = float(np.nanmean(iou[present])) if present.any() else float("nan")
    return miou, iou
