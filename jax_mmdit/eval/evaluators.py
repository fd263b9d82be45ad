"""Evaluators: plug-ins the trainer (and `mmdit eval`) run on the EMA weights.

Each has a `name`, an interval `every` (steps) and its own settings (`EvalConfig`); calling it with
a `SampleSource` returns scalars for TensorBoard and the console:

    "loss"        eval/loss                            flow loss on the eval split
    "classifier"  eval/class_accuracy, eval/classifier_fd   and their real-data floors (*_real)
    "fid"         eval/fid, eval/sfid, eval/is, eval/precision, eval/recall

The sample evaluators draw a fixed set of noise and labels (their seed) every time, so the curve
of a run moves with the model only. Floors: the same metric for N real examples in place of the
samples (classifier: real train images vs the test split; accuracy on N test images), the value a
perfect generator would reach at this N.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Protocol

import numpy as np

from jax_mmdit.errors import UserError
from jax_mmdit.eval import metrics
from jax_mmdit.eval.config import ClassifierEvalConfig, EvalConfig, FidEvalConfig, SampleEvalConfig


class SampleSource(Protocol):
    """What sample evaluators need from a trainer (`Trainer` is one)."""

    cfg: object  # the run's TrainConfig
    model_cfg: object
    label_classes: int  # classes samples can be drawn for (a text run: its class prompts)

    def sample_images(self, labels, seed: int, sampler_cfg) -> np.ndarray: ...


def eval_labels(cfg: SampleEvalConfig, num_classes: int) -> np.ndarray:
    """The labels of an evaluation's N samples: every class in turn, or uniform draws (seeded)."""
    if not num_classes:
        return np.zeros(cfg.num_samples, np.int32)
    if cfg.labels == "balanced":
        return np.resize(np.arange(num_classes, dtype=np.int32), cfg.num_samples)
    return np.random.default_rng(cfg.seed).integers(0, num_classes, cfg.num_samples).astype(np.int32)


def eval_batch_size(num: int, batch: int = 250) -> int:
    """Images per sampling call for `num` samples: `batch`, or fewer for a small evaluation. Part
    of the protocol: the noise of the samples depends on it."""
    return min(batch, num)


def eval_sampler(cfg: SampleEvalConfig, run_sampler):
    overrides = {"num_steps": cfg.num_steps, "cfg_scale": cfg.cfg_scale}
    return dataclasses.replace(run_sampler, **{k: v for k, v in overrides.items() if v is not None})


def _note(message: str) -> None:
    print(f"[mmdit] {message}", file=sys.stderr, flush=True)


def pixel_data(data_cfg, latent_data):
    """The images a latent dataset was encoded from, at the encoded resolution: what a latent run's
    decoded samples are judged against."""
    from jax_mmdit.data.registry import get_spec

    m = latent_data.manifest
    if m["vae"]["config"]["out_channels"] != get_spec(data_cfg.name).channels:
        raise UserError(
            f"The VAE of these latents decodes {m['vae']['config']['out_channels']}-channel images but "
            f"{data_cfg.name!r} has {get_spec(data_cfg.name).channels}: sample metrics cannot compare them."
        )
    return dataclasses.replace(data_cfg, source=m["source"], image_size=m["resolution"], vae=None, max_examples=None)


class LossEvaluator:
    name = "loss"

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer) -> dict[str, float]:
        return {"eval/loss": trainer.evaluate()}


class ClassifierEvaluator:
    """Class accuracy and Fréchet distance in the features of the dataset's classifier."""

    name = "classifier"

    def __init__(self, cfg: ClassifierEvalConfig, data_cfg, every: int, train_data=None, eval_data=None):
        from jax_mmdit.data import build_dataset
        from jax_mmdit.eval.classifier import default_classifier_dir, load_classifier, train_classifier

        self.cfg, self.every = cfg, every
        eval_data = eval_data or build_dataset(data_cfg, "eval")
        if eval_data.info.is_latent:
            data_cfg = pixel_data(data_cfg, eval_data)
            train_data, eval_data = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "eval")
        train_data = train_data or build_dataset(data_cfg, "train")
        info = eval_data.info
        if not info.num_classes:
            raise UserError(f"The classifier evaluator needs labelled images; {info.name!r} has none.")
        path = cfg.path or default_classifier_dir(info.name, info.image_shape)
        if cfg.path is None and not (path / "classifier.json").is_file():
            import jax

            if jax.process_index() == 0:  # one process trains it; the others wait, then read it
                _note(f"no classifier for {info.name!r} yet: training one (once; cached in {path})")
                train_classifier(data_cfg, log=_note).save(path)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("mmdit_classifier")
        self.classifier = clf = load_classifier(path)
        if clf.meta["dataset"] != info.name or tuple(clf.meta["image_shape"]) != tuple(info.image_shape):
            raise UserError(
                f"The classifier in {path} is for {clf.meta['dataset']!r} {tuple(clf.meta['image_shape'])}, "
                f"not {info.name!r} {tuple(info.image_shape)}."
            )
        n = cfg.num_samples
        x_test, y_test = eval_data.images()
        f_test, _ = clf.features(x_test)
        self.ref = metrics.feature_stats(f_test)
        x_real, _ = train_data.images(n, seed=cfg.seed)
        x_held, y_held = eval_data.images(n, seed=cfg.seed)
        self.floors = {
            "eval/classifier_fd_real": metrics.frechet_distance(
                *metrics.feature_stats(clf.features(x_real)[0]), *self.ref
            ),
            "eval/class_accuracy_real": clf.accuracy(x_held, y_held),
        }

    def __call__(self, trainer: SampleSource) -> dict[str, float]:
        labels = eval_labels(self.cfg, trainer.label_classes)
        scfg = eval_sampler(self.cfg, trainer.cfg.sampler)
        images = trainer.sample_images(labels, self.cfg.seed, scfg, eval_batch_size(len(labels)))
        return self.score(images, labels)

    def score(self, images_u8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        feats, logits = self.classifier.features(images_u8)
        right = logits.argmax(1) == labels
        return {
            "eval/class_accuracy": float(np.mean(right)),
            # The worst class's accuracy: a model that draws most classes well can still miss one.
            "eval/class_accuracy_min": min(float(np.mean(right[labels == k])) for k in np.unique(labels)),
            "eval/classifier_fd": metrics.frechet_distance(*metrics.feature_stats(feats), *self.ref),
            **self.floors,
        }


def per_class_accuracy(classifier, images_u8: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Each drawn class's share of samples that the classifier recognises as it."""
    right = classifier.features(images_u8)[1].argmax(1) == labels
    return {int(k): float(np.mean(right[labels == k])) for k in np.unique(labels)}


class FidEvaluator:
    """FID (pool features), sFID (spatial), Inception Score, precision/recall (k=3)."""

    name = "fid"

    def __init__(self, cfg: FidEvalConfig, data_cfg, every: int, eval_data=None, mesh=None):
        from jax_mmdit.eval.inception import InceptionFeatures, load_inception
        from jax_mmdit.eval.reference import dataset_stats, load_stats

        self.cfg, self.every = cfg, every
        model = load_inception(cfg.inception, resize=cfg.resize)
        self.features = InceptionFeatures(model, batch_size=cfg.inception_batch, mesh=mesh)
        if cfg.ref_stats is not None:
            self.ref = load_stats(cfg.ref_stats)
        else:
            from jax_mmdit.data import build_dataset

            eval_data = eval_data or build_dataset(data_cfg, "eval")
            if eval_data.info.is_latent:
                eval_data = build_dataset(pixel_data(data_cfg, eval_data), "eval")
            protocol = {"dataset": eval_data.info.name, "split": "eval", "extractor": "inception-2015-12-05",
                        "resize": cfg.resize}  # fmt: skip
            self.ref, where = dataset_stats(eval_data, self.features, protocol)
            _note(f"FID reference statistics: {where}")
        if "pool" not in self.ref and "arr_0" in self.ref:  # an ADM batch: featurise its images once
            self.ref["pool"] = self.features(self.ref.pop("arr_0"))["pool"][:10_000]

    def __call__(self, trainer: SampleSource) -> dict[str, float]:
        labels = eval_labels(self.cfg, trainer.label_classes)
        scfg = eval_sampler(self.cfg, trainer.cfg.sampler)
        images = trainer.sample_images(labels, self.cfg.seed, scfg, eval_batch_size(len(labels)))
        return self.score(images)

    def score(self, images_u8: np.ndarray) -> dict[str, float]:
        f = self.features(images_u8)
        out = {
            "eval/fid": metrics.frechet_distance(*metrics.feature_stats(f["pool"]), self.ref["mu"], self.ref["sigma"])
        }
        if "mu_s" in self.ref:
            mu_s, sigma_s = metrics.feature_stats(f["spatial"])
            out["eval/sfid"] = metrics.frechet_distance(mu_s, sigma_s, self.ref["mu_s"], self.ref["sigma_s"])
        splits = 10 if len(images_u8) >= 10 else 1
        out["eval/is"], _ = metrics.inception_score(f["logits_unbiased"], splits=splits)
        if "pool" in self.ref and len(self.ref["pool"]) > 3 and len(images_u8) > 3:
            out["eval/precision"], out["eval/recall"] = metrics.precision_recall(f["pool"], self.ref["pool"], k=3)
        return out


def build_evaluators(cfg: EvalConfig, run_cfg, trainer=None) -> list:
    """The evaluators `cfg` names, in order; `trainer` lends its datasets and mesh."""
    default_every = run_cfg.eval_save_steps
    out = []
    for name in cfg.evaluators:
        t0 = time.perf_counter()
        if name == "loss":
            if run_cfg.n_eval_batches > 0:
                out.append(LossEvaluator(default_every))
            continue
        if name == "classifier":
            c = cfg.classifier
            lent = getattr(trainer, "train_data", None), getattr(trainer, "eval_data", None)
            ev = ClassifierEvaluator(c, run_cfg.data, c.every or default_every, *lent)
        else:
            c = cfg.fid
            ev = FidEvaluator(c, run_cfg.data, c.every or default_every, getattr(trainer, "eval_data", None),
                              getattr(trainer, "mesh", None))  # fmt: skip
        out.append(ev)
        _note(f"evaluator {name!r} ready in {time.perf_counter() - t0:.1f} s (every {ev.every} steps)")
    return out
