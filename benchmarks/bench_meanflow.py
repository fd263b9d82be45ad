"""What a MeanFlow training step costs against a rectified-flow one, same model and batch.

    python -m benchmarks.bench_meanflow            # the default config's model, batch 128 (~3 min on 2 cores)
    python -m benchmarks.bench_meanflow --quick    # tiny shapes (seconds)

Rows: rectified flow on the default backend (oneDNN kernels on a CPU) and on the plain reference
ops MeanFlow runs on (its jvp needs them, `ops.resolve(forward_mode=True)`), then MeanFlow without
and with training-time guidance (kappa > 0 adds a forward of both CFG branches). The rows' timed
segments alternate for several rounds and the medians are compared, so machine noise lands on
every row alike; ratios are against the first row.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from jax_mmdit.config import get_config
from jax_mmdit.flow.config import FlowConfig, MeanFlowConfig, SamplerConfig
from jax_mmdit.ops import ReferenceOps
from jax_mmdit.train.trainer import Trainer


def _rows(quick: bool):
    base = get_config("tiny" if quick else "fashion_mnist")
    base = dataclasses.replace(base, run_dir="/tmp/mmdit-bench-meanflow-unused")
    mf_model = dataclasses.replace(base.model, interval_embed=True)
    mf = lambda m: dataclasses.replace(  # noqa: E731
        base, model=mf_model, flow=FlowConfig(objective="meanflow", logit_mean=-0.4, meanflow=m),
        sampler=SamplerConfig(method="meanflow", num_steps=1))  # fmt: skip
    return [
        ("rectified flow, default backend", base, None),
        ("rectified flow, reference ops", base, ReferenceOps(attention_impl="xla")),
        ("meanflow (jvp), reference ops", mf(MeanFlowConfig()), None),
        ("meanflow + guidance (kappa 0.5)", mf(MeanFlowConfig(kappa=0.5)), None),
    ]


def _trainer(cfg, ops):
    if ops is None:
        return Trainer(cfg, devices=jax.devices()[:1], with_data=False)
    from flax import nnx

    from jax_mmdit.models.factory import create_model

    model = create_model(cfg.model_for_precision, nnx.Rngs(cfg.seed), ops)
    return Trainer(cfg, devices=jax.devices()[:1], with_data=False, model=model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timed segment")
    a = p.parse_args()
    rows = _rows(a.quick)
    trainers = [_trainer(cfg, ops) for _, cfg, ops in rows]
    m = rows[0][1].model
    rng = np.random.default_rng(0)
    B = rows[0][1].batch_size
    batch = {"image": rng.standard_normal((B, m.image_size, m.image_size, m.in_channels)).astype(np.float32),
             "label": rng.integers(0, m.num_classes, (B,)).astype(np.int32)}  # fmt: skip
    for tr in trainers:  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(tr.train_step(batch)["loss"])
    times = [[] for _ in rows]
    for r in range(a.rounds):
        order = list(range(len(rows)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            t0 = time.perf_counter()
            out = [trainers[i].train_step(batch) for _ in range(a.steps)]
            jax.block_until_ready(out[-1]["loss"])
            times[i].append((time.perf_counter() - t0) / a.steps)
    med = [statistics.median(t) for t in times]
    print(f"| step (batch {B}, {'tiny' if a.quick else 'fashion_mnist'} model) | backend | ms/step | vs first row |")
    print("|---|---|---|---|")
    for (label, _, ops), tr, t in zip(rows, trainers, med):
        print(f"| {label} | {(ops or tr.ops).name} | {1e3 * t:.0f} | {t / med[0]:.2f}x |")


if __name__ == "__main__":
    main()
