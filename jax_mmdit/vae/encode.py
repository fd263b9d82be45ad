"""`mmdit encode`: images -> a latent directory (ArrayRecord shards of VAE posterior moments).

mmdit encode --vae sd-vae-ft-ema --dataset imagenet --source ~/ILSVRC/train --out latents/imagenet256

Every image is preprocessed as ADM/DiT do (`center_crop_arr` to --resolution), encoded by the VAE
(and, with --flip, its mirror too), and its posterior mean and std stored, so training draws a
fresh latent every step. The work is split into shards of --shard_size source images; shard i is
encoded by process i mod process_count (over that host's devices), written to a temporary name,
fsynced and renamed, then its `.json` (count, skipped images, channel sums) marks it done. A rerun
of the same command skips the done shards: after kill -9 nothing is lost and no reader ever sees
half a shard. Process 0 writes the manifest (`latents.json`) last; training reads only complete
directories (`jax_mmdit.data.latents`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_mmdit.data.latents import FORMAT, MANIFEST, PLAN, RecordLayout, shard_name
from jax_mmdit.data.registry import get_spec
from jax_mmdit.data.sources import HFRecords, load_splits, resolve_source
from jax_mmdit.errors import UserError
from jax_mmdit.train.rundir import RunLock, write_atomically
from jax_mmdit.vae.codec import VaeRunner
from jax_mmdit.vae.weights import load_vae, read_config, vae_identity

# At most this many skipped image names are kept per shard (the count is always exact).
_MAX_NAMES = 100


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit encode", description="Encode a dataset's images to VAE latent shards.")
    p.add_argument("--vae", required=True, help="a diffusers-format VAE directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="the latent directory to write (a rerun resumes it)")
    p.add_argument("--dataset", default="imagenet", help="a name from `mmdit datasets` (labels, class names)")
    p.add_argument("--source", default=None, help="where the images are (as --data.source): an image folder, ...")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--resolution", type=int, default=256, help="images are center-cropped to this side")
    p.add_argument("--crop", choices=["adm", "fit"], default="adm", help="adm: DiT's center_crop_arr")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="also encode each mirror")
    p.add_argument("--max_examples", type=int, default=None, help="encode only the first N images")
    p.add_argument("--batch_size", type=int, default=64, help="images per VAE call (per host)")
    p.add_argument("--shard_size", type=int, default=4096, help="source images per shard")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="how moments are stored")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the VAE's compute dtype")
    # Several hosts (as `mmdit train --mesh.*`; unset, the usual env vars / cluster detection apply).
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0, for several processes")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    return p


def cmd_encode(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(a, name)}.")
    from jax_mmdit.config import MeshConfig
    from jax_mmdit.train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(MeshConfig(coordinator_address=a.coordinator_address,
                                            num_processes=a.num_processes, process_id=a.process_id))  # fmt: skip
    summary = encode(a)
    if jax.process_index() == 0:
        print(
            f"[mmdit] {summary['num_examples']} images encoded to {a.out} ({summary['skipped']} skipped), latents "
            f"{tuple(summary['latent_shape'])} x{summary['variants']}; train on them with --data.source {a.out}"
        )
    return 0


def encode(a: argparse.Namespace) -> dict[str, Any]:
    """Encode (or finish encoding) the latent directory `a.out`; returns its manifest."""
    out = Path(a.out).expanduser()
    vae_cfg = read_config(a.vae)
    if a.resolution % vae_cfg.downsample_factor:
        raise UserError(
            f"--resolution {a.resolution} is not a multiple of the VAE's downsampling factor "
            f"{vae_cfg.downsample_factor}."
        )
    # The VAE decides the channels: grayscale datasets become RGB for an RGB VAE, and back.
    spec = dataclasses.replace(get_spec(a.dataset), channels=vae_cfg.in_channels)
    source = resolve_source(spec, a.source)
    splits, class_names = load_splits(spec, source, a.resolution, a.crop)
    records = _split(splits, spec, a.split, source)
    if a.max_examples is not None:
        records = records.select(np.arange(min(a.max_examples, len(records))))
    identity = vae_identity(a.vae)
    f = vae_cfg.downsample_factor
    layout = RecordLayout((a.resolution // f, a.resolution // f, vae_cfg.latent_channels), 2 if a.flip else 1, a.dtype)
    plan = {
        "format": FORMAT,
        "dataset": a.dataset,
        "source": str(source),
        "split": a.split,
        "resolution": a.resolution,
        "crop": a.crop,
        "variants": layout.variants,
        "dtype": a.dtype,
        "latent_shape": list(layout.latent_shape),
        "shard_size": a.shard_size,
        "source_examples": len(records),
        "vae_sha256": identity["weights_sha256"],
    }
    if (out / MANIFEST).is_file():
        _check_plan(out, plan, write=False)
        manifest = json.loads((out / MANIFEST).read_text())
        print(f"[mmdit] {out} is already complete ({manifest['num_examples']} latents).")
        return manifest
    index, count = jax.process_index(), jax.process_count()
    n_shards = -(-len(records) // a.shard_size)
    with _locked(out, index):
        _check_plan(out, plan, write=True)  # every process: the same text, written atomically
        mine = [i for i in range(index, n_shards, count) if not (out / _sidecar(i)).is_file()]
        _remove_stale(out, mine)
        if mine:
            model, _ = load_vae(a.vae, dtype=jax.numpy.bfloat16 if a.precision == "bf16" else jax.numpy.float32)
            runner = VaeRunner(model, a.batch_size)
            todo = sum(min(a.shard_size, len(records) - i * a.shard_size) for i in mine)
            _encode_shards(out, records, runner, layout, mine, a.shard_size, a.batch_size, todo, index == 0)
        if count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mmdit encode: shards written")
        if index != 0:
            return {**plan, "num_examples": -1, "skipped": -1}
        manifest = _manifest(out, plan, n_shards, identity, spec, class_names)
        write_atomically(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class _locked:
    """This process's lock on the latent directory: two encoders never write the same shards."""

    def __init__(self, out: Path, index: int):
        self.lock = RunLock(out, index)

    def __enter__(self):
        try:
            self.lock.acquire()
        except UserError:
            raise UserError(
                f"{self.lock.path.parent} is being written by another `mmdit encode`; wait for it."
            ) from None

    def __exit__(self, *exc):
        self.lock.release()


def _split(splits, spec, split: str, source: str):
    """A whole split of the source (no held-out slice: training holds out its own eval slice)."""
    names = [spec.train_split] if split == "train" else [s for s in (spec.eval_split, "test") if s]
    name = next((n for n in names if n in splits), None)
    if name is None:
        raise UserError(f"{source} has splits {', '.join(splits)}, none of them a {split} split ({', '.join(names)}).")
    return splits[name]


def _sidecar(i: int) -> str:
    return shard_name(i).replace(".array_record", ".json")


def _check_plan(out: Path, plan: dict[str, Any], write: bool) -> None:
    """A rerun must ask for the same encoding as the run that started the directory."""
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        diff = sorted(k for k in set(plan) | set(old) if plan.get(k) != old.get(k))
        if diff:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {plan.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"{out} holds a different encoding ({shown}): rerun with its settings, or pick another --out."
            )
        return
    # (Another process of this encoding may have just written the plan.)
    foreign = [n for n in os.listdir(out) if not n.startswith(".lock") and n != PLAN]
    if foreign:
        raise UserError(f"{out} is not empty and not a latent directory (it has {foreign[0]}); pick another --out.")
    if write:
        write_atomically(out / PLAN, json.dumps(plan, indent=1))


def _remove_stale(out: Path, mine: list[int]) -> None:
    """Temporary files of this process's unfinished shards, left by a killed run."""
    names = {shard_name(i) for i in mine}
    for f in out.iterdir():
        if f.name.startswith(".") and f.name.endswith(".tmp") and f.name[1:-4] in names:
            f.unlink()


def _read(records, rows: np.ndarray):
    if isinstance(records, HFRecords):
        return records.read_each(rows)
    images, labels = records.read(rows)
    return images, labels, []


def _encode_shards(out, records, runner, layout, shards, shard_size, batch_size, total, show) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="encode", unit="img", dynamic_ncols=True, disable=not show)
    # Images are decoded in a thread while the VAE runs on the previous chunk.
    with ThreadPoolExecutor(1) as pool:
        for i in shards:
            start, stop = i * shard_size, min((i + 1) * shard_size, len(records))
            chunks = [np.arange(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
            tmp = out / f".{shard_name(i)}.tmp"
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            stats = {"count": 0, "skipped": 0, "skipped_names": []}
            sums = np.zeros((3, layout.latent_shape[-1]), np.float64)  # sum mean, sum mean², sum std²
            pending = pool.submit(_read, records, chunks[0])
            for j in range(len(chunks)):
                images, labels, bad = pending.result()
                if j + 1 < len(chunks):
                    pending = pool.submit(_read, records, chunks[j + 1])
                moments = _moments(runner, images, layout)
                finite = np.isfinite(moments).reshape(len(moments), -1).all(axis=1)
                stats["skipped"] += len(bad) + int((~finite).sum())
                if not finite.all():  # a correct VAE never does this; such images are left out all the same
                    bad.append(f"{int((~finite).sum())} image(s) of shard {i} (non-finite latents)")
                for label, m in zip(labels[finite], moments[finite]):
                    writer.write(layout.encode(int(label), m))
                good = moments[finite]
                sums += np.stack([good[:, :, 0].sum((0, 1, 2, 3)), (good[:, :, 0] ** 2).sum((0, 1, 2, 3)),
                                  (good[:, :, 1] ** 2).sum((0, 1, 2, 3))])  # fmt: skip
                stats["count"] += int(finite.sum())
                stats["skipped_names"] += bad[: max(0, _MAX_NAMES - len(stats["skipped_names"]))]
                for name in bad:
                    bar.write(f"mmdit: skipped {name}", file=sys.stderr)
                bar.update(len(chunks[j]))
            writer.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out / shard_name(i))
            n_values = stats["count"] * layout.variants * int(np.prod(layout.latent_shape[:2]))
            stats |= {
                "values": n_values,
                "sum": sums[0].tolist(),
                "sum_sq": sums[1].tolist(),
                "sum_var": sums[2].tolist(),
            }
            write_atomically(out / _sidecar(i), json.dumps(stats))
    bar.close()


def _moments(runner: VaeRunner, u8_NxHxWxC: np.ndarray, layout: RecordLayout) -> np.ndarray:
    """(N, V, 2, h, w, c) posterior mean/std of each image (and of its mirror when V = 2)."""
    variants = layout.variants
    if len(u8_NxHxWxC) == 0:
        return np.zeros((0, *layout.moments_shape), np.float32)
    batch = u8_NxHxWxC if variants == 1 else np.concatenate([u8_NxHxWxC, u8_NxHxWxC[:, :, ::-1]])
    mean, std = runner.encode(batch)
    n = len(u8_NxHxWxC)
    m = np.stack([mean, std], axis=1)  # (V*N, 2, h, w, c)
    return m.reshape(variants, n, *m.shape[1:]).swapaxes(0, 1)


def _manifest(out: Path, plan, n_shards: int, identity, spec, class_names) -> dict[str, Any]:
    shards, sums, skipped, names = [], np.zeros((3, plan["latent_shape"][-1])), 0, []
    values = 0
    for i in range(n_shards):
        side = out / _sidecar(i)
        if not side.is_file():
            raise UserError(f"Shard {i} of {out} is missing after encoding: rerun the same command.")
        s = json.loads(side.read_text())
        shards.append({"file": shard_name(i), "count": s["count"]})
        sums += np.asarray([s["sum"], s["sum_sq"], s["sum_var"]])
        values += s["values"]
        skipped += s["skipped"]
        names += s["skipped_names"]
    if values == 0:
        raise UserError(f"No image of {plan['source']} could be encoded.")
    mean = sums[0] / values
    # Var[z] for z = mean + std * eps: the spread of the means plus the posterior's own variance.
    var = np.maximum(sums[1] / values - mean**2, 0) + sums[2] / values
    return {
        **{k: v for k, v in plan.items() if k not in ("vae_sha256", "shard_size", "source_examples")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_examples": sum(s["count"] for s in shards),
        "num_classes": spec.num_classes,
        "class_names": list(class_names) if class_names else None,
        "shards": shards,
        "channel_mean": mean.tolist(),
        "channel_std": np.sqrt(var).tolist(),
        "vae": identity,
        "skipped": skipped,
        "skipped_names": names[:_MAX_NAMES],
    }
