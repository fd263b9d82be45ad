"""Orbax checkpoints that are verified: train state, data-iterator position, config and run
metadata saved together, then a manifest of checksums; a restore checks both and falls back.

Layout: `<run_dir>/checkpoints/<step>/{state, data, config, meta, mmdit_manifest.json}`.
- Saves are asynchronous (training continues while arrays are written). Once Orbax has committed
  a step (its directory appears whole, by an atomic rename), `finish` writes the step's manifest
  (size and SHA-256 of every file) and only then drops the checkpoints beyond `keep`: a step is
  durable, and counted, only with its manifest.
- `restore` tries the newest step first: its files must match its manifest and its arrays must
  be finite. A step that fails is named in one warning line and the one before it is tried; the
  failed ones are moved to `<run_dir>/checkpoints_bad/` (kept, not deleted) once a good one is
  found, so a resumed run can save those steps again. A step without a manifest (written by an
  older version, or interrupted between commit and manifest) is used if it restores finite, with
  a warning that it is unverified. A verified step that Orbax cannot read is not corrupt but
  incompatible with the requested model: that is an error, and nothing is moved.
- Restore takes the target shardings, so a run saved under FSDP on 8 devices restores onto one
  device or a DDP mesh.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jax_mmdit.errors import UserError

MANIFEST = "mmdit_manifest.json"
BAD_DIR = "checkpoints_bad"
_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or unusable (the message says which and where)."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def _is_grain_iterator(it) -> bool:
    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[mmdit] warning: {message}", file=sys.stderr, flush=True)


# ---- manifests -----------------------------------------------------------------------------------
def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Checksums of every file of a committed step, written atomically (temporary name, fsync,
    rename) as the step's last file."""
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: Path) -> str | None:
    """None if the step's files match its manifest (or it has none: see `has_manifest`), else what
    differs, in a few words."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"its manifest is unreadable ({e})"
    for name, want in files.items():
        f = step_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def all_finite(tree) -> bool:
    """Are all floating-point leaves of `tree` finite? (One reduction per leaf, one host sync.)"""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(jnp.all(jnp.stack(flags)))) if flags else True


def is_disk_full(e: BaseException) -> bool:
    """Did `e` (or what caused it) come from a full disk?"""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    """The run's checkpoints. `read_only=True` (sampling, evaluation) never writes, moves or cleans
    anything: another process may be training into the same directory."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.run_dir = Path(run_dir).absolute()
        self.directory = checkpoint_dir(run_dir)
        self.keep, self.read_only = keep, read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"No checkpoints directory at {self.directory}; is {run_dir} a run directory?")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # a step saved but not yet made durable by `finish`

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def has_manifest(self, step: int) -> bool:
        return (self.step_dir(step) / MANIFEST).exists()

    # ---- saving ------------------------------------------------------------------------------
    def save(
        self, step: int, state, data_iterator=None, config_json: str | None = None, meta: dict | None = None
    ) -> None:
        """Start an asynchronous save of `step` (after making the previous one durable)."""
        self.finish()
        # Refused before Orbax starts: a save that runs out of space midway fails in its background
        # threads (noisy, and the partial step still takes the space).
        if shutil.disk_usage(self.directory).free < _local_nbytes(state):
            raise self._disk_full(step, state)
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _data_save_args(data_iterator)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config_json))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._raise_if_disk_full(step, state, e)
            raise
        self._pending = step

    def poll(self) -> None:
        """Make a finished asynchronous save durable (manifest, rotation) without waiting. Single
        process only: with several, `finish` syncs them, so it runs at the next save, where every
        process is at the same step."""
        if self._pending is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self.finish()

    def finish(self, state_for_size=None) -> int | None:
        """Wait for the pending save, write its manifest, drop checkpoints beyond `keep`. Returns
        the step now durable (None if none was pending)."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if step is not None:
                self._raise_if_disk_full(step, state_for_size, e)
            raise
        if step is None:
            return None
        if jax.process_index() == 0:
            try:
                write_manifest(self.step_dir(step))
            except OSError as e:
                self._raise_if_disk_full(step, state_for_size, e)
                raise
        _sync("mmdit_manifest")
        for old in self.steps()[: -self.keep] if self.keep > 0 else []:
            if old != step:
                self.manager.delete(old)
        return step

    def _raise_if_disk_full(self, step: int, state, e: BaseException) -> None:
        if is_disk_full(e):
            raise self._disk_full(step, state) from None

    def _disk_full(self, step: int, state) -> CheckpointError:
        free = shutil.disk_usage(self.directory).free
        need = "" if state is None else f" (it needs {_gib(_local_nbytes(state))})"
        good = [s for s in self.steps() if s != step]
        kept = (
            f"the checkpoints already written (last: step {good[-1]}) are intact"
            if good
            else "no checkpoint was written"
        )
        return CheckpointError(
            f"Disk full: cannot write checkpoint step {step} to {self.directory}{need}; {_gib(free)} free there. "
            f"Free some space and run again: {kept}."
        )

    # ---- restoring ---------------------------------------------------------------------------
    def read_items(self, step: int, names: tuple[str, ...] = ("config", "meta")) -> dict:
        """The JSON items of `step` (those it has), without touching the arrays."""
        present = [n for n in names if (self.step_dir(step) / n).is_dir()]
        if not present:
            return {}
        args = ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in present})
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"Checkpoint step {step} in {self.directory} is unreadable: {_first_line(e)}") from e
        return {n: dict(restored[n]) for n in present}

    def restore(
        self,
        abstract_state,
        data_iterator=None,
        step: int | None = None,
        check: Callable[[int, dict], None] | None = None,
    ) -> tuple[int, Any] | None:
        """Restore the newest usable step (or exactly `step`) onto `abstract_state` (ShapeDtypeStructs
        carrying the target shardings): (step, state), or None when the run has no checkpoint.
        `check(step, items)` sees the step's JSON items before its arrays are read and raises to
        refuse it (e.g. a config that does not match)."""
        candidates = self.steps() if step is None else [step]
        if step is not None and step not in self.steps():
            raise CheckpointError(f"Checkpoint step {step} does not exist in {self.directory} (steps: {self.steps()}).")
        bad: list[tuple[int, str]] = []
        for s in reversed(candidates):
            reason = verify_manifest(self.step_dir(s))
            if reason is None:
                if check is not None:
                    check(s, self.read_items(s))
                restored, reason = self._restore_arrays(s, abstract_state, data_iterator)
            if reason is None:
                if not self.has_manifest(s):
                    _warn(
                        f"checkpoint step {s} has no checksum manifest (written by an older version, or the run "
                        "stopped between saving and verifying it): loaded unverified."
                    )
                self._set_aside(bad)
                return s, restored
            if step is not None:
                raise CheckpointError(f"Checkpoint step {s} in {self.directory} is unusable: {reason}.")
            _warn(f"checkpoint step {s} is unusable ({reason}); trying the one before it.")
            bad.append((s, reason))
        if bad:
            listed = "; ".join(f"step {s}: {r}" for s, r in bad)
            raise CheckpointError(
                f"No usable checkpoint in {self.directory} ({listed}). Move them away to start fresh."
            )
        return None

    def restore_ema(self, abstract_ema) -> tuple[int, Any]:
        """(step, EMA weights) of the newest verified, finite step: only the `ema_params` of its
        state are read (a partial restore, no optimizer state in memory), onto `abstract_ema`'s
        shardings. For starting another run from this one's weights."""
        item = {"ema_params": abstract_ema}
        why = []
        for s in reversed(self.steps()):
            reason = verify_manifest(self.step_dir(s))
            if reason is None:
                args = ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                )
                try:
                    ema = self.manager.restore(s, args=ocp.args.Composite(state=args))["state"]["ema_params"]
                except Exception as e:
                    raise CheckpointError(
                        f"The weights of checkpoint step {s} in {self.directory} do not fit the model: {_first_line(e)}"
                    ) from e
                if all_finite(ema):
                    return s, ema
                reason = "its weights hold NaN or inf"
            _warn(f"checkpoint step {s} is unusable ({reason}); trying the one before it.")
            why.append(f"step {s}: {reason}")
        raise CheckpointError(f"No usable checkpoint in {self.directory}" + (f" ({'; '.join(why)})." if why else "."))

    def _restore_arrays(self, step: int, abstract_state, data_iterator):
        """(state, None) or (None, why the step is corrupt); raises if it is incompatible."""
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = _data_restore_args(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if self.has_manifest(step):  # intact files: the requested model does not fit them
                raise CheckpointError(
                    f"Checkpoint step {step} in {self.directory} does not fit this model/config: {_first_line(e)}"
                ) from e
            return None, f"it could not be read: {_first_line(e)}"
        if not all_finite(restored["state"]):
            return None, "its weights or optimizer state hold NaN or inf"
        if data_iterator is not None and not _is_grain_iterator(data_iterator):
            data_iterator.set_state(restored["data"])
        return restored["state"], None

    def _set_aside(self, bad: list[tuple[int, str]]) -> None:
        """Move the unusable newer steps out of the way (a resumed run saves those steps again)."""
        if self.read_only or not bad:
            return
        if jax.process_index() == 0:
            target = self.run_dir / BAD_DIR
            target.mkdir(exist_ok=True)
            for s, reason in bad:
                dest = target / str(s)
                n = 1
                while dest.exists():
                    dest, n = target / f"{s}.{n}", n + 1
                os.replace(self.step_dir(s), dest)
                (dest / "why.txt").write_text(reason + "\n")
                _warn(f"moved the unusable checkpoint step {s} to {dest}.")
        _sync("mmdit_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _local_nbytes(tree) -> int:
    """Bytes this process writes for `tree`: its addressable shards, one replica each."""
    total = 0
    for x in jax.tree.leaves(tree):
        shards = getattr(x, "addressable_shards", None)
        if shards is None:
            total += int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        else:
            total += sum(s.data.nbytes for s in shards if s.replica_id == 0)
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _first_line(e: BaseException) -> str:
    line = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"


def _data_save_args(it):
    if _is_grain_iterator(it):
        return grain.checkpoint.CheckpointSave(it)
    return ocp.args.JsonSave(it.get_state())


def _data_restore_args(it):
    if _is_grain_iterator(it):
        return grain.checkpoint.CheckpointRestore(it)
    return ocp.args.JsonRestore()


def load_config_dict(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
    """The config saved with a run's checkpoint (the newest readable one unless `step`): needed
    before the model can be built, so it is read without touching the arrays."""
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        steps = ckpt.steps() if step is None else [step]
        if not steps:
            raise CheckpointError(f"No checkpoint found in {ckpt.directory}.")
        error = None
        for s in reversed(steps):
            try:
                items = ckpt.read_items(s, ("config",))
            except CheckpointError as e:
                error = e
                continue
            if "config" in items:
                return items["config"], s
        raise error or CheckpointError(f"No checkpoint in {ckpt.directory} has a config.")
    finally:
        ckpt.close()


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs of `state` carrying the target `shardings` (for restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
