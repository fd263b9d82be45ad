"""Reference statistics for FID: computed from any data source, cached, or read from ADM's files.

    stats = dataset_stats(data_cfg, "eval", features_fn, protocol)   # cached under jax_mmdit.cache.cache_root()
    stats = load_stats("VIRTUAL_imagenet256_labeled.npz")             # ADM reference batch, as is
    stats["mu"], stats["sigma"]        # pool features (2048-d): FID
    stats.get("mu_s"), ...             # spatial features: sFID
    stats.get("pool")                  # up to 10k pool features: precision/recall

Preprocessing is the feature extractor's (Inception: resized to 299x299 inside the network, TF1
bilinear by default as ADM's evaluator). ADM's reference batches hold `arr_0` (uint8 images) with
precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`); their images are featurised only when precision
and recall need them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jax_mmdit.cache import cache_root
from jax_mmdit.errors import UserError
from jax_mmdit.eval.metrics import feature_stats

# Real features kept for precision/recall (the k-NN manifold of the reference set).
MAX_KEPT_FEATURES = 10_000


def stats_from_features(feats: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """mu/sigma of the pool features, mu_s/sigma_s of the spatial ones (if any), and a seeded
    subset of at most MAX_KEPT_FEATURES pool features."""
    pool = np.asarray(feats["pool"], np.float32)
    out = dict(zip(("mu", "sigma"), feature_stats(pool)))
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_stats(feats["spatial"])
    keep = np.sort(np.random.default_rng(seed).permutation(len(pool))[:MAX_KEPT_FEATURES])
    out["pool"] = pool[keep]
    return out


def save_stats(path: str | os.PathLike, stats: dict[str, np.ndarray], protocol: dict) -> Path:
    """An .npz of the statistics plus the protocol that made them (JSON), written atomically."""
    from jax_mmdit.eval.images import atomic_path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        np.savez(tmp, **stats, protocol=np.array(json.dumps(protocol, sort_keys=True)))
    return out


def load_stats(path: str | os.PathLike) -> dict:
    """Statistics from `mmdit fid-stats` or an ADM reference batch (`mu`, `sigma`, optionally
    `mu_s`, `sigma_s`, `arr_0`). Returns a dict of arrays plus "protocol" (a dict, {} for ADM's)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"No reference statistics at {p}: make them with `mmdit fid-stats` or pass an ADM .npz.")
    try:
        with np.load(p, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read reference statistics {p}: {e}.") from None
    if "mu" not in stats or "sigma" not in stats:
        raise UserError(f"{p} has no 'mu'/'sigma' arrays (keys: {sorted(stats)}); is it a statistics file?")
    stats["protocol"] = json.loads(str(stats["protocol"])) if "protocol" in stats else {}
    return stats


def default_stats_path(protocol: dict) -> Path:
    """Cache path of the statistics made under `protocol` (dataset, split, N, extractor, data hash)."""
    key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "fid_stats" / f"{protocol.get('dataset', 'data')}-{protocol.get('split', '')}-{key}.npz"


def dataset_stats(
    dataset,
    features_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
    protocol: dict,
    num: int | None = None,
    path: str | os.PathLike | None = None,
) -> tuple[dict, Path]:
    """Statistics of (up to `num` seeded examples of) an `ImageDataset` split, read from `path`
    (default: the cache) when made before under the same protocol, else computed and saved."""
    if dataset.info.is_latent:
        raise UserError(f"{dataset.info.name!r} holds latents, not images: its reference statistics need a VAE.")
    protocol = {**protocol, "num": num or dataset.info.num_examples, "data": dataset.fingerprint()}
    target = Path(path) if path is not None else default_stats_path(protocol)
    if target.is_file():
        stats = load_stats(target)
        if stats["protocol"] == json.loads(json.dumps(protocol, sort_keys=True)):
            return stats, target
    images, _ = dataset.images(num, seed=0)
    stats = stats_from_features(features_fn(images))
    save_stats(target, stats, protocol)
    return {**stats, "protocol": protocol}, target
