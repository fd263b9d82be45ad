"""Starting a run from another run's weights (`--init_from RUN_DIR`, e.g. one `mmdit convert` wrote):
fine-tuning.

The EMA weights of the source's newest verified checkpoint become this run's parameters and EMA;
the optimizer starts fresh, at step 0. The two models must be the same network except where
fine-tuning is expected to differ, as DiT's users ask for:
- the class count: the label tables (DiT's y_embedder, MMDiT's class tokens) are re-initialised;
- the image size: a fixed sin-cos position table is recomputed by the new model, a learned one is
  resized (bicubic, as ViT fine-tuning does).
Everything else, the objective included, must match, or one error names the differences.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from jax_mmdit.checkpoint import Checkpointer, abstract_with_shardings, load_config_dict
from jax_mmdit.errors import UserError
from jax_mmdit.models import create_model
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.train import mesh as mesh_lib
from jax_mmdit.train.step import split_model

# Model fields a fine-tune may change (dtype and remat are how it computes, not what).
ADAPTABLE = ("num_classes", "image_size", "dtype", "remat")


def _differences(src: ModelConfig, dst: ModelConfig) -> list[str]:
    a, b = dataclasses.asdict(src), dataclasses.asdict(dst)
    return [f"model.{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in ADAPTABLE and a[k] != b[k]]


def _key(path) -> str:
    key = jax.tree_util.keystr(path, simple=True, separator=".")
    return key.removesuffix(".value")  # an nnx Variable's leaf


def _resize_grid(table_LxD: np.ndarray, grid: int) -> np.ndarray:
    old = int(round(table_LxD.shape[0] ** 0.5))
    square = table_LxD.reshape(old, old, -1)
    out = jax.image.resize(square, (grid, grid, square.shape[-1]), method="bicubic")
    return np.asarray(out).reshape(grid * grid, -1)


def check_compatible(init_dir: str, cfg) -> Any:
    """The source run's TrainConfig, after checking that `cfg` (this run's) can start from it."""
    from jax_mmdit.config import TrainConfig

    src = TrainConfig.from_dict(load_config_dict(init_dir)[0])
    diffs = _differences(src.model, cfg.model)
    if src.flow.objective != cfg.flow.objective:
        diffs.append(f"flow.objective: {src.flow.objective!r} -> {cfg.flow.objective!r}")
    if diffs:
        raise UserError(
            f"Cannot start from {init_dir}: its network differs from this run's in {'; '.join(diffs)}. "
            f"Only {', '.join(ADAPTABLE)} may change; start from its config (--config {init_dir})."
        )
    return src


def load_init_params(init_dir: str, cfg, params: nnx.State, mesh, ops) -> tuple[nnx.State, str]:
    """`params` (this run's freshly initialised ones) with every array taken from the source run's
    EMA weights, adapted as the module docstring says; and a line saying what was done."""
    src_cfg = check_compatible(init_dir, cfg)
    src_model_cfg = dataclasses.replace(src_cfg.model, dtype="float32", remat=False)
    abstract = nnx.eval_shape(lambda: create_model(src_model_cfg, nnx.Rngs(0), ops))
    _, abstract_params, _ = split_model(abstract)
    target = abstract_with_shardings(abstract_params, mesh_lib.state_shardings(abstract_params, mesh))
    ckpt = Checkpointer(init_dir, read_only=True)
    try:
        step, src_params = ckpt.restore_ema(target)
    finally:
        ckpt.close()

    src_flat = {_key(p): v for p, v in jax.tree_util.tree_leaves_with_path(src_params)}
    used, fresh = set(), []
    new_classes = src_cfg.model.num_classes != cfg.model.num_classes

    def pick(path, new):
        k = _key(path)
        old = src_flat.get(k)
        if old is not None and old.shape == new.shape:
            used.add(k)
            return jax.device_put(old, new.sharding)
        if old is not None and k.endswith("table.embedding") and new_classes:
            used.add(k)
            fresh.append(k)
            return new
        if old is not None and k == "pos_embed":
            used.add(k)
            return jax.device_put(_resize_grid(np.asarray(old), cfg.model.grid_size), new.sharding)
        raise UserError(f"{init_dir} has no weights for {k} (shape {tuple(new.shape)}); cannot start from it.")

    out = jax.tree_util.tree_map_with_path(pick, params)
    left = sorted(set(src_flat) - used)
    if left and not (new_classes and cfg.model.num_classes == 0 and all("table" in k for k in left)):
        raise UserError(f"{len(left)} weights of {init_dir} have no place in this model: {left[:6]}.")
    note = f"initialised from {init_dir} (its step {step})"
    if fresh:
        note += f"; label tables re-initialised for {cfg.model.num_classes} classes (was {src_cfg.model.num_classes})"
    if src_cfg.model.image_size != cfg.model.image_size:
        note += f"; position table for {cfg.model.image_size}² (was {src_cfg.model.image_size}²)"
    return out, note
