"""What a trainer draws: labels, sample batches (for evaluators, in fixed sharded shapes) and the
sample grids/GIFs written while training. A mixin of `Trainer`: it reads the trainer's config,
mesh, EMA model and sample decoder."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jax_mmdit.data.registry import get_spec
from jax_mmdit.errors import UserError
from jax_mmdit.eval import images as imgs
from jax_mmdit.flow import sample as flow_sample
from jax_mmdit.train import mesh as mesh_lib
from jax_mmdit.train.logger import MetricLogger


@functools.cache
def _noise_fn(shape: tuple[int, ...], sharding):
    """key -> standard normal noise of `shape` made in `sharding`; compiled once per shape."""
    return jax.jit(lambda key: jax.random.normal(key, shape), out_shardings=sharding)


class SamplingMixin:
    def captions(self, labels) -> list[str] | None:
        """The class names of `labels` (for grid captions), or None where the dataset names none."""
        names = (
            self.train_data.info.class_names
            if self.train_data is not None
            else get_spec(self.cfg.data.name).class_names
        )
        if not names or not self.model_cfg.num_classes:
            return None
        return [names[int(y)] for y in labels]

    def sample_labels(self, num: int, classes=None) -> np.ndarray:
        """`num` labels cycling over `classes` (default: every class in turn); zeros for an
        unconditional model."""
        if num < 1:
            raise UserError(f"The number of samples must be at least 1, got {num}.")
        if not self.model_cfg.num_classes:
            return np.zeros(num, np.int32)
        classes = np.arange(self.model_cfg.num_classes) if classes is None or len(classes) == 0 else np.asarray(classes)
        return np.resize(classes, num).astype(np.int32)

    def sample(
        self,
        labels=None,
        num: int | None = None,
        seed: int = 0,
        sampler_cfg=None,
        return_trajectory=False,
    ):
        """Draw images with the EMA model. Returns float32 NHWC in [-1, 1] (and the trajectory)."""
        scfg = sampler_cfg or self.cfg.sampler
        m = self.model_cfg
        labels = (
            self.sample_labels(num or self.cfg.num_sample_images) if labels is None else np.asarray(labels, np.int32)
        )
        if m.num_classes and (labels.min() < 0 or labels.max() >= m.num_classes):
            raise UserError(f"Class labels must be in [0, {m.num_classes}), got {labels.tolist()}.")
        shape = (len(labels), m.image_size, m.image_size, m.in_channels)
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        rng = jax.random.fold_in(jax.random.key(seed), 1)  # the DDPM sampler's noise, apart from x_T's
        out = flow_sample(
            self.ema_model(), noise, jnp.asarray(labels), scfg, return_trajectory, flow=self.cfg.flow, rng=rng
        )
        return jax.device_get(out)

    def sample_images(
        self, labels, seed: int = 0, sampler_cfg=None, batch_size: int = 250, first_batch: int = 0
    ) -> np.ndarray:
        """uint8 images of the EMA model for `labels` (any number), drawn in fixed-size batches
        sharded over the mesh's batch axes; batch i's noise comes from (seed, first_batch + i), so a
        seed and batch size give the same images whether drawn in one call or batch by batch. Pass
        `eval_batch_size(n)` for n images."""
        labels = np.asarray(labels, np.int32)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b = -(-batch_size // shards) * shards  # every batch this size (the last one padded): one compiled shape
        m, scfg = self.model_cfg, sampler_cfg or self.cfg.sampler
        bsh = mesh_lib.batch_sharding(self.mesh)
        # Noise made on the devices in its sharding, labels placed per shard: works across processes.
        draw = _noise_fn((b, m.image_size, m.image_size, m.in_channels), bsh)
        model, key, out = self.ema_model(), jax.random.key(seed), []
        for i, start in enumerate(range(0, len(labels), b)):
            y = np.pad(labels[start : start + b], (0, max(0, start + b - len(labels))))
            y_B = jax.make_array_from_callback((b,), bsh, lambda idx, y=y: y[idx])
            batch_key = jax.random.fold_in(key, first_batch + i)
            x = flow_sample(model, draw(batch_key), y_B, scfg, flow=self.cfg.flow, rng=jax.random.fold_in(batch_key, 1))
            x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else jax.device_get(x)
            out.append(self.decoder(x[: min(b, len(labels) - start)]))
        return np.concatenate(out)

    def write_samples(self, step: int, out_dir: Path, logger: MetricLogger | None = None) -> Path:
        """One image per class (capped) with CFG: PNG grid, trajectory grid PNG and GIF."""
        labels = self.sample_labels(self.cfg.num_sample_images)
        x, traj = self.sample(labels, return_trajectory=True)
        if jax.process_index() != 0:
            return out_dir
        ncols = min(len(x), max(self.model_cfg.num_classes, 1), 10)
        grid = imgs.save_grid_png(
            out_dir / f"step_{step:07d}.png",
            self.decoder(x),
            ncols,
            scale=2,
            captions=self.captions(labels),
        )
        traj_u8 = self.decoder.trajectory(traj)
        imgs.save_trajectory_gif(out_dir / f"step_{step:07d}.gif", traj_u8, ncols)
        imgs.save_png(out_dir / f"step_{step:07d}_trajectory.png", imgs.trajectory_grid(traj_u8), scale=2)
        if logger is not None:
            logger.image(step, "samples", grid)
        return out_dir

    def sample_prompts(self, prompts, negative: str = "", seed: int = 0, sampler_cfg=None, batch_size: int = 16):
        """uint8 images of a text-conditioned run for `prompts`, guided against `negative` (default
        the empty prompt), with the run's encoders (`text_encoder.json`)."""
        if self.prompts is None:
            raise UserError("This run has no text encoders recorded (text_encoder.json); it cannot encode prompts.")
        m, scfg = self.model_cfg, sampler_cfg or self.cfg.sampler
        model, out = self.ema_model(), []
        for i in range(0, len(prompts), batch_size):
            cond, null = self.prompts(list(prompts[i : i + batch_size]), negative)
            n = len(cond["context_BxTxE"])
            key = jax.random.fold_in(jax.random.key(seed), i)
            noise = jax.random.normal(key, (n, m.image_size, m.image_size, m.in_channels), jnp.float32)
            cond, null = jax.tree.map(jnp.asarray, (cond, null))
            x = flow_sample(
                model, noise, cond, scfg, flow=self.cfg.flow, rng=jax.random.fold_in(key, 1), null_cond=null
            )
            out.append(self.decoder(jax.device_get(x)))
        return np.concatenate(out)
