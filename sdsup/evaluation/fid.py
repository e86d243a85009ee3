"""Frechet Inception Distance: streaming feature statistics, the distance, and feature extractors.

FID (Heusel et al. 2017) fits a Gaussian to the features of real and of
generated images and measures

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The pieces:

* `FeatureStats` accumulates the mean and covariance of feature batches
  without keeping the features (float64 sums), merges across hosts, and
  saves/loads as .npz, so a real dataset's reference statistics are computed
  once. `load_mu_sigma` also reads pytorch-fid's `--save-stats` files
  (`mu`, `sigma`).
* `frechet_distance(mu1, sigma1, mu2, sigma2)`, `fid_from_features(a, b)`,
  `fid_from_stats(a, b)`.
* `FeatureExtractor`: uint8 images [N, H, W, 3] in fixed-size batches ->
  float features [N, D], around any jitted `images -> features` function.
  `inception_extractor(model_dir)` gives the standard FID features (pool3 of
  the TF-FID Inception, see `sdsup.models.inception` and
  `sdsup.convert.inception` for the weights file); a domain extractor, such
  as the evaluation segmenter's pooled features for the synthetic scenes
  (where no pretrained Inception exists offline), plugs in the same way:

      seg = UperNetSegmenter(config)
      fn = jax.jit(lambda u8: seg.apply(variables, u8.astype(jnp.float32) / 127.5 - 1.0,
                                        method=UperNetSegmenter.pooled_features))
      extractor = FeatureExtractor(fn, batch_size=64, name="evalseg-pooled")

  A FID from such an extractor is only comparable with FIDs from the same
  extractor and weights; report it under its own name.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Tuple, Union

import jax
import numpy as np
from PIL import Image
from scipy import linalg

from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.inception import InceptionV3, preprocess


class FIDError(SdsupError, ValueError):
    """Bad FID input: shapes, too few samples, non-finite values, unreadable statistics files."""


# ----------------------------------------------------------------------------- distance
#
# NumPy/SciPy in float64 on the host, not JAX: the 2048x2048 covariances need
# float64 (FID is a small difference of large traces, and float32 loses the
# small eigenvalues), S1 S2 is not symmetric, so the standard method needs a
# general matrix square root (SciPy's Schur method), which JAX has only on CPU;
# and the computation runs once per evaluation on host data. The default
# method is the one pytorch-fid and the TF reference use, so numbers are
# comparable with published FIDs.
#
# method="eigh" computes the same trace another way: S1 S2 is similar to the
# symmetric S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) is the sum of the
# square roots of that matrix's (real, non-negative) eigenvalues. It never
# meets complex numbers or singular-matrix failures, and at D = 2048 on this
# project's shared 2-core machine it took 56 s against sqrtm's 100 s (both
# slowed by other jobs), agreeing to 2e-14 relative (tests: 1e-9 on smaller
# cases). FID needs N >= D samples per set for full-rank covariances
# (pytorch-fid recommends at least 2048; 10k-50k is usual).

METHODS = ("sqrtm", "eigh")


def _check_gaussian(mu, sigma, which: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1:
        raise FIDError(f"mu{which} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"sigma{which} must be [D, D] = {(mu.shape[0],) * 2} to match mu{which}, got {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise FIDError(f"mu{which} / sigma{which} contain NaN or Inf")
    # Lenient enough for statistics saved in float32.
    if np.max(np.abs(sigma - sigma.T), initial=0.0) > 1e-5 * np.max(np.abs(sigma), initial=0.0):
        raise FIDError(f"sigma{which} is not symmetric, so it is not a covariance matrix")
    return mu, sigma


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float, max_imag: float) -> float:
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise FIDError(f"sqrt(sigma1 @ sigma2) is not finite even after adding {eps} * I to both")
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > max_imag:
            raise FIDError(f"sqrt(sigma1 @ sigma2) has an imaginary diagonal component of {imag:.3g} (> {max_imag}): "
                           "the covariances are not positive semi-definite")
        covmean = covmean.real
    return float(np.trace(covmean))


def _check_psd(eigenvalues: np.ndarray, which: str) -> None:
    # Rounding makes the zero eigenvalues of a rank-deficient covariance
    # slightly negative; anything beyond that is not a covariance.
    if eigenvalues.min() < -1e-6 * max(eigenvalues.max(), 0.0) - 1e-12:
        raise FIDError(f"sigma{which} has a negative eigenvalue {eigenvalues.min():.3g}: "
                       "it is not positive semi-definite")


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh(sigma1)
    _check_psd(w, "1")
    _check_psd(np.linalg.eigvalsh(sigma2), "2")
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2)
    m = r @ sigma2 @ r
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, max_imag: float = 1e-3,
                     method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a Python float.

    method="sqrtm" (the standard): tr((S1 S2)^(1/2)) from scipy.linalg.sqrtm.
    When S1 S2 is near singular (fewer samples than dimensions, collapsed
    features) sqrtm can return non-finite values; then both covariances get
    eps * I added, as pytorch-fid and the TF reference do. Rounding leaves
    tiny imaginary parts in the square root, which are dropped; an imaginary
    diagonal entry above `max_imag` (pytorch-fid's threshold) means the
    inputs are not positive semi-definite and raises FIDError.
    method="eigh": the same value from symmetric eigendecompositions (see
    above); faster, and exact on singular covariances without eps.
    """
    if method not in METHODS:
        raise FIDError(f"method must be one of {METHODS}, got {method!r}")
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise FIDError(f"the two Gaussians have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, max_imag)
    else:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of feature vectors.

    Keeps the count, the sum and the sum of outer products in float64
    (O(D^2) memory whatever the number of samples), the form that merges by
    addition across batches and hosts. The raw second moment loses relative
    precision ~1e-16 * (mean / std)^2 when converted to a covariance, which
    is negligible for network features (mean and spread of the same order).
    """

    def __init__(self, dim: Optional[int] = None):
        self.dim = None
        self.count = 0
        self._sum = self._outer = None
        if dim is not None:
            self._start(dim)

    def _start(self, dim: int) -> None:
        self.dim = int(dim)
        self._sum = np.zeros(self.dim, np.float64)
        self._outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, features) -> "FeatureStats":
        """Adds a batch [N, D] (numpy or jax, any float dtype); returns self."""
        f = np.asarray(features)
        if f.ndim != 2:
            raise FIDError(f"features must be [N, D], got shape {f.shape}")
        if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
            raise FIDError(f"features must be numbers, got dtype {f.dtype}")
        f = f.astype(np.float64)
        if self.dim is None:
            self._start(f.shape[1])
        if f.shape[1] != self.dim:
            raise FIDError(f"features have dimension {f.shape[1]}, these statistics have {self.dim}")
        if not np.all(np.isfinite(f)):
            raise FIDError("features contain NaN or Inf")
        self.count += f.shape[0]
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds another accumulator's samples (e.g. another host's); returns self."""
        if other.count == 0:
            return self
        if self.dim is None:
            self._start(other.dim)
        if other.dim != self.dim:
            raise FIDError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self._sum += other._sum
        self._outer += other._outer
        return self

    def _need(self, n: int, what: str) -> None:
        if self.count < n:
            raise FIDError(f"{what} needs at least {n} samples, these statistics have {self.count}")

    def mean(self) -> np.ndarray:
        self._need(1, "the mean")
        return self._sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased (N - 1) covariance [D, D], as np.cov."""
        self._need(2, "the covariance")
        mu = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2.0  # exact symmetry; rounding in the subtraction can break it

    def mu_sigma(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.mean(), self.covariance()

    def save(self, path: str) -> None:
        """Writes an .npz with the sums (to resume or merge) and `mu`/`sigma` (what pytorch-fid reads)."""
        self._need(2, "saving FID statistics")
        mu, sigma = self.mu_sigma()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
        np.savez(tmp, count=np.int64(self.count), sum=self._sum, outer_sum=self._outer, mu=mu, sigma=sigma)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        """Reads what `save` wrote (a pytorch-fid mu/sigma file has no sums: use `load_mu_sigma`)."""
        data = _read_npz(path)
        if not {"count", "sum", "outer_sum"} <= set(data):
            raise FIDError(f"{path} has no streaming sums (keys {sorted(data)}); if it holds only mu and sigma, "
                           "read it with load_mu_sigma")
        s, o, n = data["sum"], data["outer_sum"], data["count"]
        if s.ndim != 1 or o.shape != (s.shape[0], s.shape[0]) or n.shape != () or int(n) < 0:
            raise FIDError(f"{path}: inconsistent statistics (count {n.shape}, sum {s.shape}, outer_sum {o.shape})")
        stats = cls(s.shape[0])
        stats.count = int(n)
        stats._sum = s.astype(np.float64)
        stats._outer = o.astype(np.float64)
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


def _read_npz(path: str) -> dict:
    if not os.path.isfile(path):
        raise FIDError(f"statistics file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise FIDError(f"{path} is not a readable .npz statistics file: {type(e).__name__}: {e}") from e


def load_mu_sigma(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a `FeatureStats.save` file or a pytorch-fid statistics .npz."""
    data = _read_npz(path)
    if {"mu", "sigma"} <= set(data):
        return _check_gaussian(data["mu"], data["sigma"], f" in {path}")
    if {"count", "sum", "outer_sum"} <= set(data):
        return FeatureStats.load(path).mu_sigma()
    raise FIDError(f"{path} holds neither mu/sigma nor streaming sums (keys {sorted(data)})")


StatsLike = Union[FeatureStats, Tuple[np.ndarray, np.ndarray], str]


def _mu_sigma(s: StatsLike) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(s, FeatureStats):
        return s.mu_sigma()
    if isinstance(s, (str, os.PathLike)):
        return load_mu_sigma(os.fspath(s))
    mu, sigma = s
    return mu, sigma


def fid_from_stats(a: StatsLike, b: StatsLike, method: str = "sqrtm") -> float:
    """FID between two FeatureStats, (mu, sigma) pairs or statistics files."""
    return frechet_distance(*_mu_sigma(a), *_mu_sigma(b), method=method)


def fid_from_features(a, b, method: str = "sqrtm") -> float:
    """FID between two feature sets [N, D] and [M, D] (each with at least 2 rows)."""
    return fid_from_stats(FeatureStats().add(a), FeatureStats().add(b), method=method)


# ----------------------------------------------------------------------------- feature extractors


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise FIDError(f"images must be [N, H, W, 3], got shape {x.shape}")
    if x.dtype != np.uint8:
        raise FIDError(f"images must be uint8 (0..255), got dtype {x.dtype}")
    return x


class FeatureExtractor:
    """uint8 images [N, H, W, 3] -> float32 features [N, D] through `fn`, `batch_size` images at a time.

    `fn` maps a uint8 batch [batch_size, H, W, 3] to [batch_size, D]; pass a
    jitted function. The last, short batch is padded with copies of its first
    image to `batch_size` so that `fn` compiles once per image size, and the
    padding rows are dropped; this assumes `fn` treats images independently
    (inference-mode normalisation, as every FID network does).
    """

    def __init__(self, fn: Callable, batch_size: int = 50, name: str = "features"):
        if batch_size < 1:
            raise FIDError(f"batch_size must be >= 1, got {batch_size}")
        self.fn = fn
        self.batch_size = int(batch_size)
        self.name = name

    def _batch(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[:1], self.batch_size - n, axis=0)])
        f = np.asarray(self.fn(x), dtype=np.float32)
        if f.ndim != 2 or f.shape[0] != self.batch_size:
            raise FIDError(f"feature function {self.name!r} returned shape {f.shape} for {self.batch_size} images; "
                           f"expected [{self.batch_size}, D]")
        return f[:n]

    def __call__(self, images) -> np.ndarray:
        x = _check_images(images)
        if x.shape[0] == 0:
            raise FIDError("no images given")
        return np.concatenate([self._batch(x[i:i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    def accumulate(self, batches: Iterable, stats: Optional[FeatureStats] = None) -> FeatureStats:
        """Streams uint8 image batches (any sizes, e.g. from a data pipeline) into `stats` (new if None)."""
        stats = FeatureStats() if stats is None else stats
        for images in batches:
            stats.add(self(images))
        return stats


# How images reach Inception's 299x299: pytorch-fid's torch bilinear resize, or clean-fid's "clean" mode.
RESIZES = ("pytorch_fid", "clean")


def inception_extractor(model_dir: str, batch_size: int = 50, resize: str = "pytorch_fid") -> FeatureExtractor:
    """FID's standard features: pool3 of the Inception in an sdsup model directory (`sdsup.convert.inception`)."""
    kind, config, variables, _ = model_io.load(model_dir)
    if kind != "inception":
        raise FIDError(f"{model_dir} holds a {kind!r} model, not an Inception (convert one with "
                       "python -m sdsup.convert.inception)")
    return inception_extractor_from_variables(config, variables, batch_size, name=f"inception-{config.variant}",
                                              resize=resize)


def clean_resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, size, size, 3] in 0..255 as clean-fid's "clean" mode resizes: each
    channel as a float32 PIL image, bicubic with PIL's antialiasing, clipped to [0, 255] (Parmar et al., "On
    Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022)."""
    out = np.empty((images.shape[0], size, size, 3), np.float32)
    for i, image in enumerate(np.asarray(images)):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, :, :, c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 255.0)


def inception_extractor_from_variables(config, variables, batch_size: int = 50, name: str = "inception",
                                       resize: str = "pytorch_fid") -> FeatureExtractor:
    """As `inception_extractor`, from an InceptionConfig and its {params, batch_stats}.

    `resize="pytorch_fid"`: x / 255, torch's bilinear resize without antialiasing, 2x - 1 (inside the jitted
    function). `resize="clean"`: clean-fid's antialiased bicubic resize on the host (`clean_resize`), then the
    TF Inception graph's own input scaling, (x - 128) / 128, as clean-fid feeds it.
    """
    if resize not in RESIZES:
        raise FIDError(f"unknown FID resize {resize!r}; expected one of {RESIZES}")
    model = InceptionV3(config)
    variables = jax.device_put(variables)
    if resize == "clean":
        apply = jax.jit(lambda v, x: model.apply(v, (x - 128.0) / 128.0))
        return FeatureExtractor(lambda u8: apply(variables, clean_resize(u8, config.image_size)),
                                batch_size=batch_size, name=f"{name}-clean")
    apply = jax.jit(lambda v, u8: model.apply(v, preprocess(u8, config.image_size)))
    return FeatureExtractor(lambda u8: apply(variables, u8), batch_size=batch_size, name=name)
