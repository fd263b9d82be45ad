"""`mmdit eval`, `mmdit fid-stats`, `mmdit train-classifier`.

mmdit eval --run runs/fashion_mnist --num 10000                      # classifier metric (offline)
mmdit eval --run RUN --metric fid --inception pt_inception.pth --ref VIRTUAL_imagenet256_labeled.npz
mmdit fid-stats --dataset cifar10 --inception pt_inception.pth      # cached reference statistics
mmdit train-classifier --dataset fashion_mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from jax_mmdit.errors import UserError


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion_mnist", help="a name from `mmdit datasets`")
    p.add_argument("--source", default=None, help="where the data come from (as --data.source)")
    p.add_argument("--image_size", type=int, default=None, help="as --data.image_size")


def _data_cfg(a):
    from jax_mmdit.data import DataConfig

    return DataConfig(name=a.dataset, source=a.source, image_size=a.image_size)


def cmd_train_classifier(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmdit train-classifier", description="Train the dataset's evaluation CNN.")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=None, help="passes over the train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory; default: where evaluators look for it")
    a = p.parse_args(argv)
    from jax_mmdit.eval.classifier import ClassifierConfig, default_classifier_dir, train_classifier

    cfg = ClassifierConfig(seed=a.seed, **({"epochs": a.epochs} if a.epochs else {}))
    clf = train_classifier(_data_cfg(a), cfg)
    out = clf.save(a.out or default_classifier_dir(clf.meta["dataset"], tuple(clf.meta["image_shape"])))
    print(
        f"[mmdit] classifier for {clf.meta['dataset']}: test accuracy {clf.meta['test_accuracy']:.4f} "
        f"on {clf.meta['test_examples']} images, trained in {clf.meta['train_seconds']} s; saved to {out}"
    )
    return 0


def cmd_fid_stats(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmdit fid-stats", description="Inception reference statistics of a dataset.")
    _data_args(p)
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--num", type=int, default=None, help="seeded subset of N examples (default: all)")
    p.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
    p.add_argument("--resize", choices=["tf1", "pytorch"], default="tf1")
    p.add_argument("--out", default=None, help=".npz; default: the cache the fid evaluator reads")
    p.add_argument("--inception_batch", type=int, default=64, help="images per Inception call")
    a = p.parse_args(argv)
    from jax_mmdit.data import build_dataset
    from jax_mmdit.eval.inception import InceptionFeatures, load_inception
    from jax_mmdit.eval.reference import dataset_stats

    features = InceptionFeatures(load_inception(a.inception, resize=a.resize), batch_size=a.inception_batch)
    data = build_dataset(_data_cfg(a), a.split)
    protocol = {"dataset": data.info.name, "split": a.split, "extractor": "inception-2015-12-05", "resize": a.resize}
    t0 = time.perf_counter()
    stats, path = dataset_stats(data, features, protocol, num=a.num, path=a.out)
    print(
        f"[mmdit] reference statistics of {stats['protocol']['num']} images ({time.perf_counter() - t0:.0f} s): {path}"
    )
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit eval", description="Sample a run's EMA model and score the samples.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (newest usable checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoint step directory: RUN/checkpoints/STEP")
    p.add_argument("--metric", choices=["classifier", "fid"], default=None,
                   help="default: fid if the run's evaluators have it, else classifier")  # fmt: skip
    p.add_argument("--num", type=int, default=None, help="samples (default: the metric's eval.*.num_samples)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's sampler)")
    p.add_argument("--cfg_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--method", choices=["euler", "heun", "meanflow"], default=None)
    p.add_argument("--seed", type=int, default=0, help="noise and label seed")
    p.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    p.add_argument("--batch", type=int, default=250, help="images per sampling call (part of the protocol)")
    p.add_argument("--inception", default=None, help="FID Inception weights (--metric fid)")
    p.add_argument("--ref", default=None, help="reference statistics .npz (fid-stats or ADM); default: eval split")
    p.add_argument("--resize", choices=["tf1", "pytorch"], default=None)
    p.add_argument("--inception_batch", type=int, default=None, help="images per Inception call")
    p.add_argument("--classifier", default=None, help="classifier directory (--metric classifier)")
    p.add_argument("--samples", default=None, help="the samples' .npz (resumable); default: RUN/eval/")
    p.add_argument("--out", default=None, help="results JSON; default: next to the samples")
    return p


def cmd_eval(argv: list[str]) -> int:
    a = _eval_parser().parse_args(argv)
    from jax_mmdit.eval import evaluators as evs
    from jax_mmdit.eval.images import atomic_path
    from jax_mmdit.train.trainer import Trainer

    run, step = a.run, None
    if a.checkpoint:
        ck = Path(a.checkpoint)
        if not ck.name.isdigit():
            raise UserError(f"--checkpoint must be RUN/checkpoints/STEP, got {a.checkpoint}.")
        run, step = str(ck.parent.parent), int(ck.name)
    if a.num is not None and a.num < 2:
        raise UserError(f"--num must be at least 2, got {a.num}.")
    if a.batch < 1:
        raise UserError(f"--batch must be at least 1, got {a.batch}.")
    trainer = Trainer.load(run, step)
    cfg = trainer.cfg
    metric = a.metric or ("fid" if "fid" in cfg.eval.evaluators else "classifier")
    base = cfg.eval.fid if metric == "fid" else cfg.eval.classifier
    ecfg = dataclasses.replace(base, num_samples=a.num or base.num_samples, seed=a.seed, labels=a.labels)
    if metric == "fid":
        inception = a.inception or ecfg.inception
        if not inception:
            raise UserError("--metric fid needs --inception PATH (pt_inception-2015-12-05-6726825d.pth).")
        ecfg = dataclasses.replace(ecfg, inception=inception, ref_stats=a.ref or ecfg.ref_stats,
                                   resize=a.resize or ecfg.resize,
                                   inception_batch=a.inception_batch or ecfg.inception_batch)  # fmt: skip
    elif a.classifier:
        ecfg = dataclasses.replace(ecfg, path=a.classifier)
    overrides = {"cfg_scale": a.cfg, "num_steps": a.steps, "method": a.method}
    overrides["cfg_interval"] = tuple(a.cfg_interval) if a.cfg_interval else None
    scfg = dataclasses.replace(cfg.sampler, **{k: v for k, v in overrides.items() if v is not None})
    labels = evs.eval_labels(ecfg, trainer.label_classes)
    protocol = {
        "run": str(Path(run).absolute()),
        "checkpoint_step": trainer.step,
        "sampler": dataclasses.asdict(scfg),
        "seed": a.seed,
        "labels": a.labels,
        "num_samples": len(labels),
        "batch": evs.eval_batch_size(len(labels), a.batch),
        "ema": True,
    }
    tag = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]
    samples = Path(a.samples) if a.samples else Path(run) / "eval" / f"step_{trainer.step:07d}-{tag}.npz"
    out = Path(a.out) if a.out else samples.with_suffix(".json")
    for path, suffix in ((samples, ".npz"), (out, ".json")):
        if path.suffix != suffix:
            raise UserError(f"{path} must end in {suffix}.")
    images = _draw(trainer, labels, scfg, a, protocol, samples)

    t0 = time.perf_counter()
    if metric == "fid":
        ev = evs.FidEvaluator(ecfg, cfg.data, 0, mesh=trainer.mesh)
        scores = ev.score(images)
        reference = {"ref_stats": ecfg.ref_stats, "ref_protocol": ev.ref["protocol"], "inception": ecfg.inception,
                     "resize": ecfg.resize}  # fmt: skip
    else:
        ev = evs.ClassifierEvaluator(ecfg, cfg.data, 0)
        scores = ev.score(images, labels)
        names = trainer.captions(range(trainer.label_classes)) or (trainer.text_info or {}).get("class_prompts")
        per_class = evs.per_class_accuracy(ev.classifier, images, labels)
        scores_by_class = {(names[k] if names else str(k)): v for k, v in per_class.items()}
        reference = {"classifier": str(ecfg.path or "default"), "classifier_test_accuracy":
                     ev.classifier.meta["test_accuracy"], "real": "test split"}  # fmt: skip
    result = {"metric": metric, "scores": scores, "protocol": protocol, "reference": reference,
              "samples": str(samples), "metric_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if metric == "classifier":
        result["class_accuracy_by_class"] = scores_by_class
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    _print_table(result)
    print(f"[mmdit] results: {out}")
    return 0


def _draw(trainer, labels, scfg, a, protocol, samples: Path) -> np.ndarray:
    """The samples of `protocol`: read from `samples` if complete, else drawn batch by batch into
    `samples`.parts/ (an interrupted run resumes from the batches already written)."""
    from tqdm.auto import tqdm

    from jax_mmdit.eval import evaluators as evs
    from jax_mmdit.eval.images import atomic_path

    if samples.is_file():
        with np.load(samples) as z:
            if json.loads(str(z["protocol"])) == protocol:
                return z["images"]
        raise UserError(f"{samples} holds samples of another protocol; pass another --samples path.")
    parts = samples.with_name(samples.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    stamp = parts / "protocol.json"
    if stamp.exists() and json.loads(stamp.read_text()) != protocol:
        raise UserError(f"{parts} holds a partial sampling of another protocol; remove it or pass another --samples.")
    stamp.write_text(json.dumps(protocol, sort_keys=True))
    b = evs.eval_batch_size(len(labels), a.batch)
    n_batches = -(-len(labels) // b)
    done = sum((parts / f"{i:05d}.npy").exists() for i in range(n_batches))
    bar = tqdm(total=n_batches, initial=done, desc="sample", unit="batch", dynamic_ncols=True)
    for i in range(n_batches):
        part = parts / f"{i:05d}.npy"
        if part.exists():
            continue
        x = trainer.sample_images(labels[i * b : (i + 1) * b], a.seed, scfg, batch_size=b, first_batch=i)
        with atomic_path(part) as tmp:
            np.save(tmp, x)
        bar.update(1)
    bar.close()
    images = np.concatenate([np.load(parts / f"{i:05d}.npy") for i in range(n_batches)])
    with atomic_path(samples) as tmp:
        np.savez(tmp, images=images, labels=labels, protocol=np.array(json.dumps(protocol, sort_keys=True)))
    shutil.rmtree(parts)
    return images


def _print_table(result: dict) -> None:
    s, p = result["scores"], result["protocol"]
    sc = p["sampler"]
    print(
        f"step {p['checkpoint_step']} | {p['num_samples']} samples ({p['labels']} labels, seed {p['seed']}) | "
        f"{sc['method']} {sc['num_steps']} steps, cfg {sc['cfg_scale']}"
        + (f" on t in {sc['cfg_interval']}" if sc.get("cfg_interval") else ""),
        file=sys.stdout,
    )
    rows = [(k.split("/", 1)[-1], v, s.get(k + "_real")) for k, v in s.items() if not k.endswith("_real")]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'samples':>10}  {'real data':>10}")
    for name, v, real in rows:
        print(f"{name:<{width}}  {v:>10.4f}  {'' if real is None else f'{real:>10.4f}'}")
    if result.get("class_accuracy_by_class"):
        print(
            "class accuracy by class: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["class_accuracy_by_class"].items())
        )
