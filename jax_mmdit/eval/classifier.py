"""A small CNN classifier per dataset: the offline judge of samples where Inception is unavailable
(no weights offline) or a poor fit (28×28 grayscale).

    clf = train_classifier(DataConfig(name="fashion_mnist"))     # seeded; a few CPU minutes
    clf.save(default_classifier_dir(data_cfg))                   # ~/.cache/jax_mmdit/classifiers/...
    clf = load_classifier(path)
    feats_NxF, logits_NxK = clf.features(images_u8_NxHxWxC)

Its penultimate layer (`feature_dim` wide) gives the features of a Fréchet distance between
samples and the real test split; its predictions give the class accuracy of samples (how often a
sample drawn for class c is classified as c).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_mmdit.cache import cache_root
from jax_mmdit.errors import UserError

WEIGHTS = "classifier.safetensors"
META = "classifier.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """The network and its training (every field is part of what the classifier is)."""

    widths: tuple[int, int] = (32, 64)  # channels of the two conv stages (each: conv 3x3, ReLU, 2x2 max-pool)
    feature_dim: int = 128  # width of the penultimate layer: the features of the Fréchet distance
    epochs: int = 4  # passes over the train split
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam, cosine decay to 0
    seed: int = 0


class ClassifierNet(nnx.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, cfg: ClassifierConfig, rngs: nnx.Rngs):
        h, w, c = image_shape
        c1, c2 = cfg.widths
        self.conv1 = nnx.Conv(c, c1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear((h // 4) * (w // 4) * c2, cfg.feature_dim, rngs=rngs)
        self.head = nnx.Linear(cfg.feature_dim, num_classes, rngs=rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] -> (features_BxF, logits_BxK)."""
        x = nnx.max_pool(jax.nn.relu(self.conv1(x_BxHxWxC)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        f_BxF = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
        return f_BxF, self.head(f_BxF)


def to_unit_range(images_u8) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] (the training pipeline's normalisation)."""
    return jnp.asarray(images_u8, jnp.float32) * (2 / 255) - 1


class Classifier:
    """A trained `ClassifierNet` with its metadata (dataset, image shape, test accuracy, ...)."""

    def __init__(self, net: ClassifierNet, meta: dict):
        self.net, self.meta = net, meta
        graphdef, state = nnx.split(net)

        @jax.jit
        def forward(state, images_u8):
            return nnx.merge(graphdef, state)(to_unit_range(images_u8))

        self._state, self._forward = state, forward

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def features(self, images_u8_NxHxWxC: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(features_NxF, logits_NxK) as float32 NumPy, in fixed-size chunks (one compiled shape)."""
        x = np.asarray(images_u8_NxHxWxC)
        want = tuple(self.meta["image_shape"])
        if x.shape[1:] != want:
            raise UserError(f"The classifier of {self.meta['dataset']!r} takes images {want}, got {x.shape[1:]}.")
        feats, logits = [], []
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            pad = batch_size - len(chunk) if len(x) > batch_size else 0
            f, lg = self._forward(self._state, np.concatenate([chunk, np.zeros((pad, *want), x.dtype)]))
            feats.append(np.asarray(f)[: len(chunk)])
            logits.append(np.asarray(lg)[: len(chunk)])
        return np.concatenate(feats), np.concatenate(logits)

    def accuracy(self, images_u8: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.features(images_u8)[1].argmax(1) == np.asarray(labels)))

    def save(self, directory: str | os.PathLike) -> Path:
        """Weights (safetensors) and metadata (JSON), each written under a temporary name and renamed."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(self.net))}
        tmp = out / (WEIGHTS + ".tmp")
        save_file(flat, str(tmp))
        os.replace(tmp, out / WEIGHTS)
        tmp = out / (META + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1, sort_keys=True))
        os.replace(tmp, out / META)
        return out


def default_classifier_dir(dataset: str, image_shape: tuple[int, int, int]) -> Path:
    """Where `mmdit train-classifier` stores a dataset's classifier (and where evaluators look):
    `jax_mmdit.cache.cache_root()`, then classifiers/<dataset>-<H>x<W>x<C>."""
    return cache_root() / "classifiers" / f"{dataset}-{'x'.join(map(str, image_shape))}"


def load_classifier(directory: str | os.PathLike) -> Classifier:
    from safetensors.numpy import load_file

    d = Path(directory)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(
            f"No classifier in {d}: train one with `mmdit train-classifier --dataset NAME` (a few CPU minutes)."
        )
    meta = json.loads((d / META).read_text())
    cfg = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    net = nnx.eval_shape(lambda: ClassifierNet(tuple(meta["image_shape"]), meta["num_classes"], cfg, nnx.Rngs(0)))
    weights = load_file(str(d / WEIGHTS))
    state = nnx.state(net)
    flat = dict(nnx.to_flat_state(state))
    names = {".".join(map(str, k)) for k in flat}
    if names != set(weights):
        raise UserError(f"{d / WEIGHTS} does not match its config: keys differ ({sorted(names ^ set(weights))[:4]}).")
    for k, v in flat.items():
        v.set_value(jnp.asarray(weights[".".join(map(str, k))]))
    nnx.update(net, state)
    return Classifier(net, meta)


def train_classifier(
    data_cfg, cfg: ClassifierConfig = ClassifierConfig(), log=print, max_examples: int | None = None
) -> Classifier:
    """Train on the train split of `data_cfg` (all of it, or its first `max_examples`; seeded: the
    same classifier on every run), report the test accuracy. Data come through the training
    pipeline (with its flips where the dataset allows them)."""
    from jax_mmdit.data import build_dataset

    data_cfg = dataclasses.replace(data_cfg, max_examples=max_examples)
    train, test = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "eval")
    info = train.info
    if info.is_latent or not info.num_classes:
        raise UserError(f"A classifier needs labelled pixel images; {info.name!r} has none.")
    net = ClassifierNet(info.image_shape, info.num_classes, cfg, nnx.Rngs(cfg.seed))
    steps_per_epoch = train.steps_per_epoch(cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    tx = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, total))
    graphdef, params = nnx.split(net)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            _, logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    with train.iterator(cfg.batch_size, seed=cfg.seed, shuffle=True, repeat=True) as it:
        for i in range(total):
            batch = next(it)
            params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
            if (i + 1) % steps_per_epoch == 0:
                log(f"[mmdit] classifier epoch {(i + 1) // steps_per_epoch}/{cfg.epochs}: loss {float(loss):.4f}")
    nnx.update(net, params)
    meta = {
        "dataset": info.name,
        "source": data_cfg.source,
        "image_shape": list(info.image_shape),
        "num_classes": info.num_classes,
        "class_names": list(info.class_names) if info.class_names else None,
        "config": dataclasses.asdict(cfg),
        "train_examples": info.num_examples,
        "data": train.fingerprint(),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    clf = Classifier(net, meta)
    x_test, y_test = test.images()
    clf.meta["test_accuracy"] = clf.accuracy(x_test, y_test)
    clf.meta["test_examples"] = len(y_test)
    return clf
