"""Orbax checkpoints: train state, data-iterator state and the config, saved together.

Layout: `<run_dir>/checkpoints/<step>/{state, data, config}`. Saves are asynchronous (training
continues while arrays are written); restore takes the target shardings, so a run saved under
FSDP on 8 devices restores onto 1 device or a DDP mesh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jax_mmdit.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing or unreadable (the message says which and where)."""


def _checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def _is_grain_iterator(it) -> bool:
    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = _checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config_json: str | None = None, force=False) -> bool:
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _data_save_args(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config_json))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state, data_iterator=None):
        """Restore onto `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = _data_restore_args(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; the user needs one readable line
            detail = (str(e).splitlines() or [""])[0]
            detail = detail if len(detail) <= 300 else detail[:300] + "..."
            raise CheckpointError(
                f"Could not restore checkpoint step {step} from {self.directory} (corrupt or "
                f"incompatible with this model): {type(e).__name__}: {detail}"
            ) from e
        if data_iterator is not None and not _is_grain_iterator(data_iterator):
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _data_save_args(it):
    if _is_grain_iterator(it):
        return grain.checkpoint.CheckpointSave(it)
    return ocp.args.JsonSave(it.get_state())


def _data_restore_args(it):
    if _is_grain_iterator(it):
        return grain.checkpoint.CheckpointRestore(it)
    return ocp.args.JsonRestore()


def load_config_dict(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
    """The config saved with a run's checkpoint (latest unless `step`): needed before the model
    can be built, so it is read without touching the arrays."""
    directory = _checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoints directory at {directory}; is {run_dir} a run directory?")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"No checkpoint found in {directory}.")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"Checkpoint step {step} in {directory} has no readable config: {e}") from e
    finally:
        manager.close()
    return dict(restored["config"]), step


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs of `state` carrying the target `shardings` (for restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
