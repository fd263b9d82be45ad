"""The Grain input pipeline: shuffled, sharded, batched, normalised, flipped, checkpointable.

The pipeline is a `grain.MapDataset` indexed by global step:

    range(N) -> shuffle(seed) -> batch(global_batch, drop_remainder) -> repeat -> load(step, indices)

Grain's shuffle, batch and repeat are epoch-aware: batch `s` of a repeated dataset is batch
`s % steps_per_epoch` of epoch `s // steps_per_epoch`, and each epoch is reshuffled with seed+epoch.
Batches never span two epochs; each epoch drops its last partial batch.

Batching record *indices* before loading lets each process read only its share of a global batch
(process p takes rows [p*B_local, (p+1)*B_local)), and lets one vectorised map normalise and flip the
whole batch (about 4x faster than a map per record). Because every process builds the same global
index batches, and flips are drawn for the global batch, the global batch at step s is the same
whatever the number of processes. The iterator's state is therefore just the step, and restoring it
re-slices the pipeline at that step: no grain internals, any worker count, any process count.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal

import grain
import numpy as np

from jax_mmdit.data.captions import CaptionedRecords, CaptionTable, unwrap
from jax_mmdit.data.config import DataConfig
from jax_mmdit.data.latents import LatentRecords, latent_normalization, read_manifest
from jax_mmdit.data.registry import get_spec
from jax_mmdit.data.sources import HFRecords, Records, detect_source, load_splits, resolve_source
from jax_mmdit.errors import UserError

# Mixed into the RNG seeds so flips and latent noise stay independent of other draws from the seed.
_FLIP_STREAM = 0x666C6970
_LATENT_STREAM = 0x6C61746E
_CAPTION_STREAM = 0x63617074
# Fixed seed of the held-out eval slice: the eval set must not change with the training seed.
_HOLDOUT_SEED = 0
# Batches prepared ahead by background threads: overlaps loading with the training step while
# keeping memory small (grain's default of 500 would hold ~500 batches).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and trainer need to know about a dataset split."""

    name: str
    num_examples: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    class_names: tuple[str, ...] | None
    is_latent: bool  # a latent directory: `image` is a normalised VAE latent, not pixels
    captions: str | None = None  # the caption directory whose embeddings each batch carries


@dataclass(frozen=True)
class _LoadBatch:
    """Global batch of record indices -> this process's batch, normalised and maybe flipped.

    A picklable object rather than a closure: worker processes receive it by pickling.
    """

    records: Records | LatentRecords | CaptionedRecords
    start: int  # this process's rows of each global batch
    stop: int
    seed: int
    flip: bool
    # Latents: (shift_C, scale_C), the model sees (z - shift) * scale; None: uint8 pixels -> [-1, 1].
    latent_norm: tuple[np.ndarray, np.ndarray] | None
    # Captioned data: the embeddings; each example's caption is drawn afresh every step.
    table: CaptionTable | None = None

    def __call__(self, step: int, indices_G: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._images(step, indices_G)
        if self.table is not None:
            # Drawn for the whole global batch, like flips: independent of process_count.
            u = np.random.default_rng((self.seed, _CAPTION_STREAM, step)).random(len(indices_G))
            mine = slice(self.start, self.stop)
            batch |= self.table.gather(self.records.captions.draw(indices_G[mine], u[mine]))
        return batch

    def _images(self, step: int, indices_G: np.ndarray) -> dict[str, np.ndarray]:
        images, labels = self.records.read(indices_G[self.start : self.stop])
        # Drawn for the whole global batch so an example's flip does not depend on process_count.
        flips = None
        if self.flip:
            rng = np.random.default_rng((self.seed, _FLIP_STREAM, step))
            flips = (rng.random(len(indices_G)) < 0.5)[self.start : self.stop]
        if self.latent_norm is not None:
            return {"image": self._latents(step, images, flips, len(indices_G)), "label": labels}
        x = images.astype(np.float32)
        x *= np.float32(2 / 255)
        x -= np.float32(1)
        if flips is not None:
            x[flips] = x[flips, :, ::-1]
        return {"image": x, "label": labels}

    def _latents(self, step: int, moments_BxVx2xhxwxc: np.ndarray, flips, global_batch: int) -> np.ndarray:
        """A fresh posterior sample z = mean + std * eps of each example (of its mirrored image's
        encoding where it is flipped), normalised."""
        variant = flips.astype(np.int64) if flips is not None else np.zeros(len(moments_BxVx2xhxwxc), np.int64)
        m = moments_BxVx2xhxwxc[np.arange(len(variant)), variant]  # (B, 2, h, w, c)
        rng = np.random.default_rng((self.seed, _LATENT_STREAM, step))
        eps = rng.standard_normal((global_batch, *m.shape[2:]), np.float32)[self.start : self.stop]
        shift_C, scale_C = self.latent_norm
        return ((m[:, 0] + m[:, 1] * eps) - shift_C) * scale_C


class BatchIterator:
    """Yields batches {"image": float32[B_local, H, W, C], "label": int32[B_local]} (captioned data:
    also the TEXT_KEYS of one caption per example); checkpointable.

    `get_state()` is a small JSON-able dict; `set_state()` makes the next batch exactly the one the
    uninterrupted iterator would have yielded. Call `close()` (or use `with`) to stop worker processes.
    """

    def __init__(self, batches: grain.MapDataset, fingerprint: dict[str, Any], num_workers: int):
        self._batches = batches
        self._fingerprint = fingerprint
        self._num_workers = num_workers
        self._step = 0
        self._iterator: grain.DatasetIterator | None = None

    @property
    def step(self) -> int:
        """Global index of the next batch."""
        return self._step

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start(self._step)
        batch = next(self._iterator)
        self._step += 1
        return batch

    def _start(self, step: int) -> grain.DatasetIterator:
        dataset = self._batches[step:].to_iter_dataset(_READ_OPTIONS)
        if self._num_workers > 0:
            # Grain 0.2.18 workers read an absl flag that is never parsed outside an absl app.
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            # Workers take batches round-robin, so the order is the same as with no workers.
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(dataset)

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise UserError(
                    f"Iterator state was saved with {key}={state.get(key)!r} but this iterator has {key}={value!r}."
                )
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageDataset:
    """One split of a dataset, ready to iterate: `.info`, `.iterator(...)`, `.steps_per_epoch(...)`."""

    def __init__(
        self,
        info: DatasetInfo,
        records: Records | LatentRecords,
        flip: bool,
        num_workers: int,
        latent_norm: tuple[np.ndarray, np.ndarray] | None = None,
        manifest: dict | None = None,
        table: CaptionTable | None = None,
    ):
        self.info = info
        self.records = records
        self.flip = flip
        self.num_workers = num_workers
        self.latent_norm = latent_norm  # (shift_C, scale_C) of a latent directory
        self.manifest = manifest  # a latent directory's manifest (its VAE, statistics, shards)
        self.table = table  # captioned data: the caption embeddings

    def fingerprint(self, samples: int = 32) -> dict[str, Any]:
        """What identifies this data: its name, size, shape and a hash of `samples` evenly spaced
        examples (images and labels). Saved with every checkpoint; a resume on other data is refused."""
        n = self.info.num_examples
        images, labels = self.records.read(np.unique(np.linspace(0, n - 1, min(samples, n)).astype(np.int64)))
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes() + np.asarray(labels, np.int64).tobytes())
        if self.table is not None:  # other captions are other data
            digest.update(json.dumps(self.table.manifest, sort_keys=True).encode())
        return {"name": self.info.name, "num_examples": n, "image_shape": list(self.info.image_shape),
                "sample_sha256": digest.hexdigest()[:16]}  # fmt: skip

    def images(self, limit: int | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All examples as arrays (uint8 NHWC; latents: their moments), int32 labels, or
        `limit` of them: the first ones, or a seeded random subset when `seed` is given."""
        n = self.info.num_examples
        indices = np.arange(n)
        if limit is not None and limit < n:
            indices = (
                np.sort(np.random.default_rng(seed).permutation(n)[:limit]) if seed is not None else indices[:limit]
            )
        chunks = [self.records.read(indices[i : i + 4096]) for i in range(0, len(indices), 4096)]
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]).astype(np.int32)

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Full global batches per epoch (the last partial batch is dropped)."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
        steps = self.info.num_examples // global_batch_size
        if steps == 0:
            raise UserError(
                f"global batch {global_batch_size} is larger than the {self.info.num_examples} examples "
                f"of {self.info.name!r}; use a smaller batch."
            )
        return steps

    def iterator(
        self,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        repeat: bool = True,
        num_workers: int | None = None,
    ) -> BatchIterator:
        """Batches of this process's share of each global batch (see the module docstring)."""
        self.steps_per_epoch(global_batch_size)  # validates the batch size
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count}).")
        if global_batch_size % process_count:
            raise UserError(f"global batch {global_batch_size} does not split evenly over {process_count} processes.")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
        num_workers = self.num_workers if num_workers is None else num_workers
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        local = global_batch_size // process_count
        batches = grain.MapDataset.range(self.info.num_examples)
        if shuffle:
            batches = batches.shuffle(seed=seed)
        batches = batches.batch(global_batch_size, drop_remainder=True)
        if repeat:
            batches = batches.repeat()
        load = _LoadBatch(self.records, process_index * local, (process_index + 1) * local, seed, self.flip,
                          self.latent_norm, self.table)  # fmt: skip
        batches = batches.map_with_index(load)
        fingerprint = {
            "dataset": self.info.name,
            "num_examples": self.info.num_examples,
            "global_batch_size": global_batch_size,
            "seed": seed,
            "shuffle": shuffle,
        }
        return BatchIterator(batches, fingerprint, num_workers)


def build_dataset(cfg: DataConfig, split: Literal["train", "eval"]) -> ImageDataset:
    """Load `cfg`'s dataset and pick `split`: "train", or "eval" (the test split, else a held-out slice)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    spec = get_spec(cfg.name)
    if cfg.source is not None and detect_source(cfg.source) == "latents":
        return _latent_dataset(cfg, split)
    if cfg.vae is not None:
        raise UserError("data.vae names the VAE of a latent directory, but data.source is not one.")
    image_size = cfg.image_size or spec.image_size
    splits, class_names = load_splits(spec, cfg.source, image_size)
    table = None
    if cfg.captions is not None:
        table = caption_table(cfg, resolve_source(spec, cfg.source))
        splits = {name: CaptionedRecords(r, table.index(name)) for name, r in splits.items()}
    records = pick_split(splits, spec, cfg, split)
    if isinstance(unwrap(records), HFRecords):  # every image decoded once here, before any training step
        records, unreadable, _ = records.decode_all() if spec.in_memory else records.readable()
        if unreadable:
            listed = "; ".join(unreadable[:3]) + (f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
            where = f"the {split} split of {cfg.source or spec.name!r}"
            if cfg.strict:
                raise UserError(f"{len(unreadable)} image(s) of {where} cannot be decoded: {listed}.")
            print(f"[mmdit] warning: skipped {len(unreadable)} unreadable image(s) of {where}: {listed} "
                  "(--data.strict makes this an error).", file=sys.stderr, flush=True)  # fmt: skip
        if len(records) == 0:
            raise UserError(f"No image of the {split} split of {cfg.source or spec.name!r} can be decoded.")
    info = DatasetInfo(
        name=spec.name,
        num_examples=len(records),
        image_shape=(image_size, image_size, spec.channels),
        num_classes=spec.num_classes,
        class_names=class_names,
        is_latent=False,
        captions=None if table is None else table.directory,
    )
    flip = spec.flip and cfg.flip and split == "train"
    return ImageDataset(info, records, flip, cfg.num_workers, table=table)


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def caption_table(cfg: DataConfig, source: str) -> CaptionTable:
    """The caption directory of cfg.captions, checked to be of this dataset and source."""
    table = CaptionTable(cfg.captions)
    m = table.manifest
    if m["dataset"] != cfg.name or not _same_path(m["source"], source):
        raise UserError(f"The captions in {cfg.captions} were encoded for {m['dataset']!r} from {m['source']}, not "
                        f"{cfg.name!r} from {source}: encode captions for this data.")  # fmt: skip
    return table


def pick_split(splits: dict[str, Records], spec, cfg: DataConfig, split: str) -> Records:
    """The records of `split`: the train split, or the eval one (the spec's eval split, else "test",
    else a held-out slice of train); max_examples applies to train."""
    if spec.train_split not in splits:
        raise UserError(
            f"The source of {spec.name!r} has splits {', '.join(splits)} but no {spec.train_split!r} split."
        )
    records = splits[spec.train_split]
    eval_split = next((s for s in (spec.eval_split, "test") if s in splits), None)
    if eval_split is not None:
        records = records if split == "train" else splits[eval_split]
    else:
        train_indices, eval_indices = _held_out(len(records), cfg.eval_fraction)
        records = records.select(train_indices if split == "train" else eval_indices)
    if split == "train" and cfg.max_examples is not None:
        records = records.select(np.arange(min(cfg.max_examples, len(records))))
    return records


def _latent_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """A split of a latent directory: streamed from its shards; the eval split is a held-out slice
    (a directory holds one encoded split; point another run at the encoded test split if wanted)."""
    spec = get_spec(cfg.name)
    manifest = read_manifest(cfg.source)
    if cfg.image_size is not None:
        raise UserError("data.image_size cannot resize latents: encode the images at another --resolution.")
    if spec.num_classes != manifest["num_classes"]:
        raise UserError(
            f"The latents in {cfg.source} have {manifest['num_classes']} classes but dataset {spec.name!r} has "
            f"{spec.num_classes}: set --data.name to the dataset they were encoded from ({manifest['dataset']!r})."
        )
    records, table = LatentRecords(cfg.source, manifest), None
    if cfg.captions is not None:
        table = caption_table(cfg, manifest["source"])
        records = CaptionedRecords(records, _latent_captions(table, manifest, spec, cfg.source))
    train_indices, eval_indices = _held_out(len(records), cfg.eval_fraction)
    records = records.select(train_indices if split == "train" else eval_indices)
    if split == "train" and cfg.max_examples is not None:
        records = records.select(np.arange(min(cfg.max_examples, len(records))))
    shift, scale = latent_normalization(manifest, cfg.latent_norm)
    info = DatasetInfo(
        name=spec.name,
        num_examples=len(records),
        image_shape=tuple(manifest["latent_shape"]),
        num_classes=manifest["num_classes"],
        class_names=tuple(manifest["class_names"]) if manifest.get("class_names") else spec.class_names,
        is_latent=True,
        captions=None if table is None else table.directory,
    )
    # A flip picks the encoding of the mirrored image, where the directory holds one.
    flip = spec.flip and cfg.flip and split == "train" and manifest["variants"] == 2
    norm = (np.asarray(shift, np.float32), np.asarray(scale, np.float32))
    return ImageDataset(info, records, flip, cfg.num_workers, latent_norm=norm, manifest=manifest, table=table)


def _latent_captions(table: CaptionTable, manifest: dict, spec, source: str):
    """The caption ids of a latent directory's examples: its split's first num_examples (encoding
    keeps the source's order; a skipped image would shift it, so it is refused)."""
    if manifest["skipped"]:
        raise UserError(f"{source} skipped {manifest['skipped']} unreadable image(s) when it was encoded, so its "
                        "latents no longer line up with the captions: remove them from the source and encode both "
                        "again.")  # fmt: skip
    names = [spec.train_split] if manifest["split"] == "train" else [n for n in (spec.eval_split, "test") if n]
    name = next((n for n in names if n in table.manifest["splits"]), names[0])
    return table.index(name).select(np.arange(manifest["num_examples"]))


def _held_out(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, eval) index sets; sorted so Arrow reads stay mostly sequential."""
    if n < 2:
        raise UserError(f"Cannot hold out an eval slice from {n} example(s).")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])
