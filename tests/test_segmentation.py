"""Ignore-aware losses and metrics for label maps."""

import jax
import jax.numpy as jnp
import numpy as np

from sdsup import segmentation


def test_class_balance_weights_follow_the_oasis_rule():
    labels = np.array([[[0, 0, 0, 1], [0, 0, 255, 1]]])  # 5 x class 0, 2 x class 1, 1 ignore
    w = np.asarray(segmentation.class_balance_weights(jnp.asarray(labels), num_classes=3, ignore_id=255,
                                                      num_outputs=4))
    n_valid, present = 7, 2
    assert np.isclose(w[0, 0, 0], n_valid / (present * 4 * 5))
    assert np.isclose(w[0, 0, 3], n_valid / (present * 4 * 2))
    assert w[0, 1, 2] == 0
    # Each present class carries the same total weight.
    assert np.isclose(w[labels == 0].sum(), w[labels == 1].sum())


def test_balanced_mean_gives_each_class_equal_weight_at_power_one():
    labels = jnp.asarray([[[0, 0, 0, 1], [0, 0, 255, 1]]])  # 5 x class 0, 2 x class 1, 1 ignore
    loss = jnp.asarray([[[1.0, 1.0, 1.0, 4.0], [1.0, 1.0, 100.0, 4.0]]])
    plain = segmentation.balanced_mean(loss, labels, 3, 255, 0.0)
    assert np.isclose(plain, (5 * 1.0 + 2 * 4.0) / 7)  # the ignore pixel's 100 never counts
    # Power 1: classes 0 and 1 weigh the same in total -> the mean of the two class means.
    assert np.isclose(segmentation.balanced_mean(loss, labels, 3, 255, 1.0), (1.0 + 4.0) / 2)
    half = float(segmentation.balanced_mean(loss, labels, 3, 255, 0.5))
    assert float(plain) < half < 2.5
    # Constant loss: the weights are normalised, so the value stays that constant.
    assert np.isclose(segmentation.balanced_mean(jnp.full(loss.shape, 3.0), labels, 3, 255, 0.5), 3.0)


def test_pixel_cross_entropy_ignores_and_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3, 3))
    labels[0, 0, 0] = 255
    loss, valid = segmentation.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255)
    expected = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
    assert np.allclose(np.asarray(loss)[labels != 255], expected[labels != 255], atol=1e-6)
    assert loss[0, 0, 0] == 0 and not valid[0, 0, 0]


def test_confusion_and_miou():
    labels = np.array([[0, 0, 1, 1, 255]])
    pred = np.array([[0, 1, 1, 1, 0]])
    conf = segmentation.confusion_matrix(pred, labels, 3, 255)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    miou, iou = segmentation.iou_from_confusion(conf)
    assert np.isclose(iou[0], 1 / 2) and np.isclose(iou[1], 2 / 3) and np.isnan(iou[2])
    assert np.isclose(miou, (1 / 2 + 2 / 3) / 2)  # class 2 is absent from the ground truth
    masked = segmentation.confusion_matrix(pred[None].repeat(2, 0)[:, 0], labels[None].repeat(2, 0)[:, 0], 3, 255,
                                           mask=np.array([True, False]))
    assert masked.sum() == 4
