"""FID statistics and distance against plain NumPy/SciPy and closed forms; the feature-extractor interface.

References here are written independently of sdsup.evaluation.fid: the
textbook formula with scipy.linalg.sqrtm, the closed form for diagonal
covariances, an eigenvalue form of tr((S1 S2)^(1/2)), and np.mean / np.cov
on the full feature set.
"""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from sdsup.errors import SdsupError
from sdsup.evaluation import fid
from sdsup.evaluation.fid import FeatureExtractor, FeatureStats, FIDError, frechet_distance

METHODS = fid.METHODS


def _reference_fid(mu1, s1, mu2, s2):
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def _eig_trace_sqrt(s1, s2):
    """tr((S1 S2)^(1/2)) as the sum of sqrt of the eigenvalues of S1 S2 (real and >= 0 for PSD inputs)."""
    ev = np.linalg.eigvals(s1 @ s2)
    return float(np.sum(np.sqrt(np.clip(ev.real, 0.0, None))))


def _spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


@pytest.mark.parametrize("method", METHODS)
def test_identical_gaussians_give_zero(method):
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=48), _spd(rng, 48)
    value = frechet_distance(mu, s, mu, s, method=method)
    assert isinstance(value, float)
    assert abs(value) < 1e-9 * np.trace(s)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2.0 * np.sqrt(v1 * v2))
    value = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert value == pytest.approx(exact, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_general_covariances_match_reference(method):
    rng = np.random.default_rng(2)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    s1, s2 = _spd(rng, d), _spd(rng, d)
    value = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert value == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-10)
    d_mu = mu1 - mu2
    by_eigenvalues = d_mu @ d_mu + np.trace(s1) + np.trace(s2) - 2.0 * _eig_trace_sqrt(s1, s2)
    assert value == pytest.approx(by_eigenvalues, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_covariances(method):
    """Fewer samples than dimensions: singular covariances and product; finite and close to the exact value."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.2
    value = fid.fid_from_features(a, b, method=method)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.linalg.matrix_rank(s1) < 32
    d = a.mean(0) - b.mean(0)
    exact = d @ d + np.trace(s1) + np.trace(s2) - 2.0 * _eig_trace_sqrt(s1, s2)
    assert np.isfinite(value)
    # eps * I (sqrtm's fallback) shifts the trace by O(sqrt(eps)) per dimension.
    assert value == pytest.approx(exact, rel=1e-6)


def test_sqrtm_failure_falls_back_to_eps(monkeypatch):
    """The eps * I retry (pytorch-fid's) runs when sqrtm returns non-finite values."""
    calls = []
    real_sqrtm = linalg.sqrtm

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid, "linalg", types.SimpleNamespace(sqrtm=flaky))
    rng = np.random.default_rng(4)
    s1, s2, mu = _spd(rng, 8), _spd(rng, 8), np.zeros(8)
    value = frechet_distance(mu, s1, mu, s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)))
    # eps * I moves the value by O(eps / smallest eigenvalue) relative.
    assert value == pytest.approx(_reference_fid(mu, s1, mu, s2), rel=1e-4)


def test_not_positive_semidefinite_is_an_error():
    mu = np.zeros(2)
    for method in METHODS:
        with pytest.raises(FIDError, match="positive semi-definite"):
            frechet_distance(mu, np.eye(2), mu, np.diag([-1.0, 1.0]), method=method)


def test_distance_input_errors():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(FIDError, match=r"sigma1 must be \[D, D\]"):
        frechet_distance(mu, np.eye(4), mu, s)
    with pytest.raises(FIDError, match="different dimensions"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="NaN or Inf"):
        frechet_distance(mu, s, mu + np.nan, s)
    with pytest.raises(FIDError, match="not symmetric"):
        frechet_distance(mu, s, mu, np.triu(np.ones((3, 3))))
    with pytest.raises(FIDError, match="method"):
        frechet_distance(mu, s, mu, s, method="svd")
    assert issubclass(FIDError, SdsupError)


# ----------------------------------------------------------------------------- streaming statistics


def _features(seed=5, n=203, d=24):
    rng = np.random.default_rng(seed)
    # Offset and correlated, as network features are.
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0).astype(np.float32)


@pytest.mark.parametrize("split", [[203], [1, 1, 201], [50, 0, 100, 53], [2] * 101 + [1]])
def test_stats_equal_numpy_in_any_split(split):
    x = _features()
    stats = FeatureStats()
    for part in np.split(x, np.cumsum(split)[:-1]):
        stats.add(part)
    assert stats.count == 203 and stats.dim == 24
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats.mean(), np.mean(x64, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-10)
    assert np.array_equal(stats.covariance(), stats.covariance().T)


def test_merge_save_load(tmp_path):
    x = _features()
    whole = FeatureStats().add(x)
    merged = FeatureStats().add(x[:70]).merge(FeatureStats().add(x[70:])).merge(FeatureStats())
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)

    path = str(tmp_path / "ref" / "stats.npz")
    whole.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.count == whole.count
    assert np.array_equal(loaded.mean(), whole.mean()) and np.array_equal(loaded.covariance(), whole.covariance())
    # Keeps accumulating after a reload (reference statistics in several sittings).
    loaded.add(x[:5])
    assert loaded.count == 208
    mu, sigma = fid.load_mu_sigma(path)
    assert np.array_equal(mu, whole.mean()) and np.array_equal(sigma, whole.covariance())
    # pytorch-fid's --save-stats format: mu and sigma only.
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    assert fid.fid_from_stats(str(tmp_path / "pytorch_fid.npz"), whole) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(FIDError, match="load_mu_sigma"):
        FeatureStats.load(str(tmp_path / "pytorch_fid.npz"))


def test_fid_from_features_matches_numpy():
    a, b = _features(6, 300, 16), _features(7, 250, 16) * 1.1
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = _reference_fid(a64.mean(0), np.cov(a64, rowvar=False), b64.mean(0), np.cov(b64, rowvar=False))
    assert fid.fid_from_features(a, b) == pytest.approx(ref, rel=1e-10)
    assert fid.fid_from_features(a, b, method="eigh") == pytest.approx(ref, rel=1e-9)


def test_stats_errors(tmp_path):
    one = FeatureStats().add(np.ones((1, 4)))
    with pytest.raises(FIDError, match="at least 2 samples"):
        one.covariance()
    with pytest.raises(FIDError, match="at least 2 samples"):
        one.save(str(tmp_path / "x.npz"))
    with pytest.raises(FIDError, match="at least 1 samples"):
        FeatureStats(4).mean()
    with pytest.raises(FIDError, match=r"\[N, D\]"):
        FeatureStats().add(np.ones(4))
    with pytest.raises(FIDError, match="dimension 5"):
        one.add(np.ones((2, 5)))
    with pytest.raises(FIDError, match="NaN"):
        FeatureStats().add(np.full((2, 4), np.nan))
    with pytest.raises(FIDError, match="dtype"):
        FeatureStats().add(np.array([["a", "b"]]))
    with pytest.raises(FIDError, match="merge"):
        one.merge(FeatureStats().add(np.ones((2, 3))))
    with pytest.raises(FIDError, match="does not exist"):
        FeatureStats.load(str(tmp_path / "missing.npz"))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FIDError, match="not a readable .npz"):
        fid.load_mu_sigma(str(corrupt))
    np.savez(tmp_path / "other.npz", features=np.ones((3, 3)))
    with pytest.raises(FIDError, match="neither mu/sigma"):
        fid.load_mu_sigma(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "bad.npz", count=np.int64(3), sum=np.ones(3), outer_sum=np.ones((2, 2)))
    with pytest.raises(FIDError, match="inconsistent"):
        FeatureStats.load(str(tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- feature extractors


def _colour_stats(u8):
    x = u8.astype(jnp.float32) / 255.0
    return jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)


def test_extractor_batches_pads_and_compiles_once():
    traces = []

    @jax.jit
    def fn(u8):
        traces.append(u8.shape)  # runs once per compilation
        return _colour_stats(u8)

    images = np.random.default_rng(8).integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    extractor = FeatureExtractor(fn, batch_size=3, name="colour")
    got = extractor(images)
    x = images.astype(np.float64) / 255.0
    want = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)
    assert got.shape == (7, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert traces == [(3, 9, 11, 3)]

    stats = extractor.accumulate(iter([images[:2], images[2:]]))
    assert stats.count == 7
    np.testing.assert_allclose(stats.covariance(), np.cov(got.astype(np.float64), rowvar=False), atol=1e-7)


def test_extractor_errors():
    extractor = FeatureExtractor(jax.jit(_colour_stats), batch_size=2)
    with pytest.raises(FIDError, match="uint8"):
        extractor(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(FIDError, match=r"\[N, H, W, 3\]"):
        extractor(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(FIDError, match="no images"):
        extractor(np.zeros((0, 8, 8, 3), np.uint8))
    bad = FeatureExtractor(jax.jit(lambda u8: _colour_stats(u8)[0]), batch_size=2, name="bad")
    with pytest.raises(FIDError, match="'bad' returned shape"):
        bad(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FIDError, match="batch_size"):
        FeatureExtractor(_colour_stats, batch_size=0)
    with pytest.raises(SdsupError, match="does not exist|has no config.json"):
        fid.inception_extractor(os.path.join("/nonexistent", "inception"))
