"""The train state and the pure, jitted train/eval steps.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function: the model's graph
definition and the optimizer are closed over, everything that changes lives in `TrainState`.
It is jitted once by the trainer with explicit shardings and the state donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mmdit.config import OptimConfig
from jax_mmdit.data.captions import TEXT_KEYS
from jax_mmdit.train.mesh import BATCH_AXES

# fp16 dynamic loss scaling: start high, halve on overflow, double after this many clean steps.
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_PERIOD = 2000


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied or skipped so far
    params: Any  # nnx.State of nnx.Param, fp32 master weights
    opt_state: Any
    ema_params: Any  # same structure as params
    loss_scale: jax.Array  # f32 scalar; stays 1 unless precision == fp16
    good_steps: jax.Array  # int32: consecutive finite fp16 steps (drives loss-scale growth)
    nonfinite_step: jax.Array  # int32: first step whose loss was NaN/inf, -1 if none


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            cfg.learning_rate,
            warmup_steps=max(warmup, 1),
            decay_steps=max(total_steps, warmup + 1),
            end_value=cfg.learning_rate * cfg.min_lr_ratio,
        )
    if warmup == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.linear_schedule(0.0, cfg.learning_rate, warmup)


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    # Decay matrices only: decaying norms' scales and biases hurts and is not what DiT/SD3 do.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


def split_model(model: nnx.Module):
    """(graphdef, params, rest): only `params` is trained; `rest` (e.g. fixed tables) is constant."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(params, tx: optax.GradientTransformation, precision: str) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        loss_scale=jnp.asarray(INITIAL_LOSS_SCALE if precision == "fp16" else 1.0, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def condition_of(batch: dict):
    """The model's condition in a batch: the labels, or (captioned data) the dict of text inputs."""
    text = {k: batch[k] for k in TEXT_KEYS if k in batch}
    return text or batch["label"]


def reported_loss(loss: jax.Array, aux: dict, accum: int = 1) -> jax.Array:
    """The loss to log: the objective's, or where it is reweighted (MeanFlow's adaptive weights make
    it about 1 whatever the fit) the plain squared error it carries in aux["mse"], summed over the
    `accum` micro-batches there."""
    return aux["mse"] / accum if "mse" in aux else loss


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_train_step(
    graphdef,
    rest,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    optim: OptimConfig,
    *,
    grad_accum_steps: int = 1,
    loss_scaling: bool = False,
    mesh: Mesh | None = None,
):
    """Build `train_step(state, batch, rng) -> (state, metrics)` (not yet jitted). `optim` gives
    the EMA (decay, warmup); `loss_scaling` turns on fp16's dynamic loss scale; with `mesh`, the
    micro-batches of gradient accumulation keep the batch's sharding."""
    accum = grad_accum_steps
    fp16 = loss_scaling
    ocfg = optim

    def micro_loss(params, x, y, rng, loss_scale):
        model = nnx.merge(graphdef, params, rest)
        loss, aux = loss_fn(model, x, y, rng)
        return loss * loss_scale, (loss, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_and_loss(params, x, y, rng, loss_scale):
        if accum == 1:
            (_, (loss, aux)), grads = grad_fn(params, x, y, rng, loss_scale)
            return grads, loss, aux

        # Micro-batch i takes rows i, i+A, i+2A, … so every device keeps only its local rows
        # (a plain reshape would move micro-batch 0 onto the first devices).
        def split(a):
            a = a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1)
            if mesh is not None:
                spec = P(None, BATCH_AXES, *([None] * (a.ndim - 2)))
                a = jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))
            return a

        xs, ys = split(x), jax.tree.map(split, y)

        def body(carry, i):
            g_acc, loss_acc, aux_acc = carry
            y_i = jax.tree.map(lambda a: a[i], ys)
            (_, (loss, aux)), g = grad_fn(params, xs[i], y_i, jax.random.fold_in(rng, i), loss_scale)
            return (
                jax.tree.map(jnp.add, g_acc, g),
                loss_acc + loss,
                jax.tree.map(jnp.add, aux_acc, aux),
            ), None

        zeros_g = jax.tree.map(jnp.zeros_like, params)
        _, (_, aux0) = jax.eval_shape(micro_loss, params, xs[0], jax.tree.map(lambda a: a[0], ys), rng, loss_scale)
        zeros_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0)
        (g, loss, aux), _ = jax.lax.scan(body, (zeros_g, jnp.zeros(()), zeros_aux), jnp.arange(accum))
        return jax.tree.map(lambda a: a / accum, g), loss / accum, aux

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        # One key per step, derived from the step: resuming replays exactly the same randomness.
        step_rng = jax.random.fold_in(rng, state.step)
        y = condition_of(batch)
        grads, loss, aux = grads_and_loss(state.params, batch["image"], y, step_rng, state.loss_scale)
        grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
        # One scalar says whether every gradient is finite: a NaN or inf anywhere makes the global
        # norm NaN or inf. (So does a norm past float32's range, ~1.8e19: a gradient no step should
        # follow, which clipping would have zeroed.) Per-leaf all(isfinite) flags and-ed together
        # gave the same answer, but XLA duplicated that and-chain into each of the ~4 select
        # fusions per weight below: an HLO quadratic in the number of weights (MMDiT-S/2: 750k
        # instructions, 49 s to compile; now 53k and 9 s).
        grad_norm = optax.tree.norm(grads)
        grads_finite = jnp.isfinite(grad_norm)
        loss_finite = jnp.isfinite(loss)
        apply = grads_finite & loss_finite

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step changes nothing but the bookkeeping: the last good weights survive.
        params = _select(apply, new_params, state.params)
        opt_state = _select(apply, new_opt_state, state.opt_state)
        # The EMA reads the stored new weights. Left to itself XLA fused the update into the EMA
        # too, so two fusions read the old weights, one of them writing over them in place (the
        # donated buffer): copy insertion then copied every parameter each step.
        params = jax.lax.optimization_barrier(params)
        if ocfg.ema_decay > 0:
            decay = jnp.asarray(ocfg.ema_decay, jnp.float32)
            if ocfg.ema_warmup:
                s = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
            new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
            ema = _select(apply, new_ema, state.ema_params)
        else:
            ema = _select(apply, params, state.ema_params)

        loss_scale, good_steps = state.loss_scale, state.good_steps
        if fp16:
            grow = apply & (good_steps + 1 >= LOSS_SCALE_PERIOD)
            loss_scale = jnp.where(
                apply, jnp.where(grow, loss_scale * 2.0, loss_scale), jnp.maximum(loss_scale / 2.0, 1.0)
            )
            good_steps = jnp.where(apply & ~grow, good_steps + 1, 0)
        nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~loss_finite, state.step, state.nonfinite_step)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            loss_scale=loss_scale,
            good_steps=good_steps,
            nonfinite_step=nonfinite_step,
        )
        metrics = {
            "loss": reported_loss(loss, aux, accum),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "loss_bin_sum": aux["loss_bin_sum"],
            "loss_bin_count": aux["loss_bin_count"],
            "skipped": (~apply).astype(jnp.int32),
            "loss_scale": state.loss_scale,
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest, loss_fn: Callable):
    """`eval_step(ema_params, batch, rng) -> loss` with the EMA weights (what we sample with)."""

    def eval_step(params, batch, rng):
        model = nnx.merge(graphdef, params, rest)
        loss, aux = loss_fn(model, batch["image"], condition_of(batch), rng)
        return reported_loss(loss, aux)

    return eval_step
