"""Sample-quality metrics from features: Fréchet distance, Inception Score, precision/recall.

    mu, sigma = feature_stats(feats_NxD)                      # float64 mean and covariance
    fd = frechet_distance(mu, sigma, mu_ref, sigma_ref)       # FID on Inception pool features
    is_mean, is_std = inception_score(logits_NxK)             # torch-fidelity's protocol
    p, r = precision_recall(fake_NxD, real_MxD, k=3)          # Kynkäänniemi et al. 2019

Statistics and the Fréchet distance are computed in float64 on the host (NumPy), as the reference
suites do. Pairwise distances for precision/recall run in JAX, in blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def feature_stats(feats_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (np.cov's, as pytorch-fid and ADM), in float64."""
    x = np.asarray(feats_NxD, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), the distance between two Gaussians.

    Tr (S1 S2)^½ is the sum of the square roots of the eigenvalues of S1^½ S2 S1^½, a symmetric
    positive semi-definite matrix: two `eigh` calls, stable where `scipy.linalg.sqrtm` of the
    non-symmetric S1 S2 returns complex or non-finite values (pytorch-fid then retries with an
    offset on the diagonal)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}.")
    r1 = _sqrt_psd(s1)
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits_NxK: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) over `splits` chunks of a seeded shuffle: (mean, std), as
    torch-fidelity computes it (on the unbiased logits: pool features @ fc weights, no bias)."""
    x = np.asarray(logits_NxK, np.float64)
    n = len(x)
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, got {n}.")
    x = x[np.random.RandomState(seed).permutation(n)]
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(axis=0, keepdims=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@jax.jit
def _sq_dists(a_AxD: jax.Array, b_BxD: jax.Array) -> jax.Array:
    d = jnp.sum(a_AxD**2, 1)[:, None] + jnp.sum(b_BxD**2, 1)[None, :] - 2 * a_AxD @ b_BxD.T
    return jnp.maximum(d, 0.0)


def _blocks(a: np.ndarray, b: np.ndarray, block: int):
    with jax.default_matmul_precision("highest"):
        for i in range(0, len(a), block):
            yield i, np.asarray(_sq_dists(jnp.asarray(a[i : i + block]), jnp.asarray(b)))


def kth_neighbour_radii(feats_NxD: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    if len(feats_NxD) <= k:
        raise ValueError(f"need more than k={k} points, got {len(feats_NxD)}.")
    out = np.empty(len(feats_NxD), np.float32)
    for i, d in _blocks(feats_NxD, feats_NxD, block):
        out[i : i + len(d)] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def _coverage(query: np.ndarray, support: np.ndarray, radii: np.ndarray, block: int) -> float:
    """Fraction of `query` points inside some support point's k-NN ball."""
    inside = np.zeros(len(query), bool)
    for i, d in _blocks(query, support, block):
        inside[i : i + len(d)] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(fake_NxD, real_MxD, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision (fraction of samples inside the real manifold: the union of the real
    points' k-NN balls) and recall (fraction of real points inside the samples' manifold)."""
    fake, real = np.asarray(fake_NxD, np.float32), np.asarray(real_MxD, np.float32)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {fake.shape} and {real.shape}.")
    precision = _coverage(fake, real, kth_neighbour_radii(real, k, block), block)
    recall = _coverage(real, fake, kth_neighbour_radii(fake, k, block), block)
    return precision, recall
