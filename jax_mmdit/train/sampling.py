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
    @property
    def is_text(self) -> bool:
        """A text-conditioned model: conditions are prompts, not labels."""
        return self.model_cfg.context_dim > 0

    def default_prompts(self) -> list[str]:
        """A text run's sample-grid prompts: cfg.sample_prompts, else the run's (one per class for
        templated captions, else its first captions)."""
        prompts = list(self.cfg.sample_prompts) or list((self.text_info or {}).get("default_prompts") or [])
        if not prompts:
            raise UserError("This text run has no prompts to sample: give --sample_prompts.")
        return prompts

    @property
    def label_classes(self) -> int:
        """Classes that samples can be drawn for: the model's, or a text run's class prompts'."""
        if self.is_text:
            return len((self.text_info or {}).get("class_prompts") or [])
        return self.model_cfg.num_classes

    def class_prompts(self, labels) -> list[str]:
        """The prompt of each class label (a text run on templated captions), so class metrics apply."""
        prompts = (self.text_info or {}).get("class_prompts")
        if not prompts:
            raise UserError("This text run's captions were not made from class templates: it has no prompt per "
                            "class, so it cannot be scored per class.")  # fmt: skip
        return [prompts[int(y)] for y in labels]

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
        if self.is_text:  # labels = the prompts of those classes; none: the default prompts
            prompts = self.class_prompts(labels) if labels is not None else self.default_prompts()[: num or None]
            return self._sample_text(prompts, jax.random.key(seed), scfg, return_trajectory)
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

    def _sample_text(self, prompts, key, scfg, return_trajectory: bool = False, negative: str = ""):
        """Samples of `prompts` guided against `negative`; noise from `key`, the DDPM sampler's from key+1."""
        if self.prompts is None:
            raise UserError("This run has no text encoders recorded (text_encoder.json); it cannot encode prompts.")
        m = self.model_cfg
        cond, null = jax.tree.map(jnp.asarray, self.prompts(list(prompts), negative))
        noise = jax.random.normal(key, (len(prompts), m.image_size, m.image_size, m.in_channels), jnp.float32)
        out = flow_sample(self.ema_model(), noise, cond, scfg, return_trajectory, flow=self.cfg.flow,
                          rng=jax.random.fold_in(key, 1), null_cond=null)  # fmt: skip
        return jax.device_get(out)

    def _placed_condition(self, labels_B: np.ndarray, sharding):
        """The condition of a sampling batch in `sharding`: the labels, or their class prompts' text
        inputs (with the empty prompt's, replicated, to guide against)."""
        if not self.is_text:
            return jax.make_array_from_callback(labels_B.shape, sharding, lambda idx: labels_B[idx]), None
        cond, null = self.prompts(self.class_prompts(labels_B))
        placed = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in cond.items()}
        return placed, jax.device_put(null, mesh_lib.replicated(self.mesh))

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
            y_B, null = self._placed_condition(y, bsh)
            batch_key = jax.random.fold_in(key, first_batch + i)
            x = flow_sample(model, draw(batch_key), y_B, scfg, flow=self.cfg.flow, rng=jax.random.fold_in(batch_key, 1),
                            null_cond=null)  # fmt: skip
            x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else jax.device_get(x)
            out.append(self.decoder(x[: min(b, len(labels) - start)]))
        return np.concatenate(out)

    def write_samples(self, step: int, out_dir: Path, logger: MetricLogger | None = None) -> Path:
        """One image per class (a text run: per default prompt), capped, with CFG: PNG grid,
        trajectory grid PNG and GIF."""
        if self.is_text:
            captions = self.default_prompts()[: self.cfg.num_sample_images]
            x, traj = self.sample(num=len(captions), return_trajectory=True)
        else:
            labels = self.sample_labels(self.cfg.num_sample_images)
            x, traj = self.sample(labels, return_trajectory=True)
            captions = self.captions(labels)
        if jax.process_index() != 0:
            return out_dir
        ncols = min(len(x), max(self.model_cfg.num_classes, 1 if not self.is_text else len(x)), 10)
        grid = imgs.save_grid_png(
            out_dir / f"step_{step:07d}.png",
            self.decoder(x),
            ncols,
            scale=2,
            captions=captions,
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
        scfg = sampler_cfg or self.cfg.sampler
        out = [self.decoder(self._sample_text(prompts[i : i + batch_size], jax.random.fold_in(jax.random.key(seed), i),
                                              scfg, negative=negative))
               for i in range(0, len(prompts), batch_size)]  # fmt: skip
        return np.concatenate(out)
