"""Masked discrete diffusion over label maps: corruption, loss, the two decoders, label resampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup.diffusion import masked

N, IGNORE = 5, 255


def _labels(b=4, h=8, w=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, N, (b, h, w)), jnp.int32)


def test_corrupt_masks_the_scheduled_count_and_hides_ignore_pixels():
    labels = _labels().at[0, 0, :].set(IGNORE)
    ids, target, ratio = masked.corrupt(jax.random.PRNGKey(0), labels, N, IGNORE)
    assert ids.shape == labels.shape and target.shape == labels.shape and ratio.shape == (4,)
    assert bool(jnp.all((ratio >= 0) & (ratio <= 1)))
    for b in range(4):
        hidden = ids[b] == N
        # Exactly ceil(ratio * H * W) pixels masked by the schedule (ignore pixels hidden on top).
        want = max(1, int(np.ceil(float(ratio[b]) * 64)))
        scheduled = int(jnp.sum(hidden & (labels[b] != IGNORE))) + int(jnp.sum(target[b] & (labels[b] == IGNORE)))
        assert int(jnp.sum(target[b])) <= want and scheduled <= want
        # Visible pixels keep their class; targets are exactly the masked valid pixels.
        np.testing.assert_array_equal(np.asarray(ids[b])[~np.asarray(hidden)], np.asarray(labels[b])[~np.asarray(hidden)])
        np.testing.assert_array_equal(np.asarray(target[b]), np.asarray(hidden & (labels[b] != IGNORE)))
    assert bool(jnp.all(ids[0, 0] == N)) and not bool(jnp.any(target[0, 0]))


def test_masked_cross_entropy_scores_only_masked_pixels():
    labels = _labels(2, 4, 4)
    logits = jax.nn.one_hot(labels, N) * 10.0  # right everywhere
    wrong = jax.nn.one_hot((labels + 1) % N, N) * 10.0
    mask = jnp.zeros(labels.shape, bool).at[:, 0, 0].set(True)
    mixed = jnp.where(mask[..., None], logits, wrong)  # right exactly where scored
    assert float(masked.masked_cross_entropy(mixed, labels, mask)) < 1e-3
    assert float(masked.masked_cross_entropy(wrong, labels, mask)) > 5.0
    assert float(masked.masked_cross_entropy(wrong, labels, jnp.zeros_like(mask))) == 0.0


def test_pixel_weights_make_a_weighted_mean_over_masked_pixels():
    labels = jnp.zeros((1, 2, 2), jnp.int32)
    logits = jnp.zeros((1, 2, 2, N)).at[0, 0, 0, 0].set(10.0)  # right (confident) at one pixel only
    mask = jnp.ones(labels.shape, bool)
    plain = float(masked.masked_cross_entropy(logits, labels, mask))
    np.testing.assert_allclose(float(masked.masked_cross_entropy(logits, labels, mask, jnp.ones(labels.shape))),
                               plain, rtol=1e-6)
    # All weight on the confident pixel: its (near-zero) loss alone.
    only_right = jnp.zeros(labels.shape).at[0, 0, 0].set(3.0)
    assert float(masked.masked_cross_entropy(logits, labels, mask, only_right)) < 1e-3
    assert float(masked.masked_cross_entropy(logits, labels, mask, 1.0 - only_right / 3.0)) == pytest.approx(
        np.log(N), rel=1e-5)


def _oracle_logits(target):
    """A 'network' that knows the answer for every pixel, whatever it is shown."""
    def fn(ids, ratio):
        assert ids.shape == target.shape and ratio.shape == (target.shape[0],)
        return jax.nn.one_hot(target, N) * 8.0
    return fn


def test_most_probable_map_is_the_argmax_of_one_all_masked_pass():
    target = _labels()
    calls = []

    def fn(ids, ratio):
        calls.append(1)
        assert bool(jnp.all(ids == N)) and bool(jnp.all(ratio == 1.0))
        return _oracle_logits(target)(ids, ratio)

    np.testing.assert_array_equal(masked.most_probable_map(fn, target.shape, N), target)
    assert len(calls) == 1


def test_the_most_probable_map_upsamples_its_logits():
    # Two classes split down the middle, and one pixel of class 1 inside class 0.
    target = np.zeros((1, 8, 8), np.int32)
    target[:, :, 4:] = 1
    target[:, 2, 1] = 1
    fn = _oracle_logits(jnp.asarray(target))
    near = np.asarray(masked.most_probable_map(fn, target.shape, N, upsample=4, method="nearest"))
    np.testing.assert_array_equal(near, masked.upsample_labels(target, 4))
    for method in ("linear", "cubic", "lanczos3"):
        smooth = np.asarray(masked.most_probable_map(fn, target.shape, N, upsample=4, method=method))
        assert smooth.shape == (1, 32, 32)
        # A straight edge between blocks stays where it was ...
        np.testing.assert_array_equal(smooth[:, 12:, :], near[:, 12:, :])
        # ... and a lone pixel keeps its centre; linear interpolation rounds its block's corners off.
        blob = smooth[0, 8:12, 4:8]
        assert blob[1:3, 1:3].all() and smooth[0].sum() == near[0].sum() - 16 + blob.sum(), method
        if method == "linear":
            assert blob.sum() == 12 and not blob[0, 0], blob
    with pytest.raises(ValueError, match="upsampling method"):
        masked.most_probable_map(fn, target.shape, N, upsample=4, method="area")


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_sampling_unmasks_everything_and_keeps_what_it_fixed(steps):
    target = _labels(seed=1)
    seen = []

    def fn(ids, ratio):
        seen.append((ids, ratio))
        return _oracle_logits(target)(ids, ratio)

    out = masked.sample_maps(fn, jax.random.PRNGKey(0), target.shape, N, steps, temperature=0.0)
    assert not bool(jnp.any(out == N))
    np.testing.assert_array_equal(out, target)  # argmax draws of a certain model


def test_sampling_fixes_pixels_monotonically_on_the_cosine_schedule():
    shape, steps = (2, 16, 16), 6
    counts = []

    def fn(ids, ratio):
        jax.debug.callback(lambda c: counts.append(np.asarray(c)), jnp.sum(ids == N, axis=(1, 2)))
        return jax.random.normal(jax.random.PRNGKey(3), ids.shape + (N,))

    out = jax.jit(lambda r: masked.sample_maps(fn, r, shape, N, steps, temperature=1.0))(jax.random.PRNGKey(1))
    out.block_until_ready()
    assert not bool(jnp.any(out == N)) and bool(jnp.all((out >= 0) & (out < N)))
    counts = np.stack(counts)  # masked pixels seen by each of the `steps` passes
    assert counts.shape == (steps, 2) and (counts[0] == 256).all()
    expected = [int(np.floor(256 * np.cos(np.pi / 2 * s / steps))) for s in range(1, steps)]
    # The cosine schedule, up to float32 rounding at exact halves (cos(pi/3) * 256 = 127.99...).
    np.testing.assert_allclose(counts[1:, 0], expected, atol=1)
    assert (np.diff(counts, axis=0) < 0).all()


def test_sampling_draws_differ_between_seeds_and_follow_temperature():
    logits = jax.nn.log_softmax(jnp.zeros((2, 8, 8, N)))  # uniform model
    fn = lambda ids, ratio: logits
    a = masked.sample_maps(fn, jax.random.PRNGKey(0), (2, 8, 8), N, 4, temperature=1.0)
    b = masked.sample_maps(fn, jax.random.PRNGKey(1), (2, 8, 8), N, 4, temperature=1.0)
    assert not bool(jnp.all(a == b))
    assert len(np.unique(np.asarray(a))) == N  # uniform draws use every class


def test_bad_steps_refused():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        masked.sample_maps(lambda i, r: None, jax.random.PRNGKey(0), (1, 4, 4), N, 0)


def test_downsample_is_a_block_majority_and_upsample_repeats():
    labels = np.zeros((1, 4, 4), np.int32)
    labels[0, :2, :2] = [[1, 1], [1, 2]]  # majority 1
    labels[0, :2, 2:] = IGNORE  # all ignore -> ignore
    labels[0, 2:, :2] = [[3, IGNORE], [IGNORE, IGNORE]]  # the only valid class wins
    low = masked.downsample_labels(jnp.asarray(labels), 2, N, IGNORE)
    np.testing.assert_array_equal(np.asarray(low), [[[1, IGNORE], [3, 0]]])
    up = masked.upsample_labels(np.asarray(low), 2)
    assert up.shape == (1, 4, 4) and up[0, 3, 1] == 3 and up[0, 0, 3] == IGNORE
    with pytest.raises(ValueError, match="does not divide"):
        masked.downsample_labels(jnp.zeros((1, 5, 4), jnp.int32), 2, N, IGNORE)


def test_a_share_of_examples_is_masked_entirely():
    labels = _labels(b=400, h=4, w=4)
    _, target, ratio = masked.corrupt(jax.random.PRNGKey(3), labels, N, IGNORE, full_mask_fraction=0.5)
    full = np.asarray(ratio) == 1.0
    assert 0.4 < full.mean() < 0.6  # the cosine schedule alone gives r == 1 with probability ~0
    assert np.asarray(target)[full].all()  # every pixel of those is a target
    _, _, plain = masked.corrupt(jax.random.PRNGKey(3), labels, N, IGNORE)
    assert (np.asarray(plain) < 1.0).mean() > 0.99
