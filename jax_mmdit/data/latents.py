"""Latent datasets: VAE posterior moments in ArrayRecord shards, written by `mmdit encode`.

A latent directory:

    latents.json                  the manifest, written last: the directory is complete iff it exists
    encode.json                   the settings of the encoding, fixed by its first run (reruns must match)
    shard-00003.array_record      source examples [3·S, 4·S), one record each (corrupt images skipped)
    shard-00003.json              that shard's count, skipped images and channel sums, written after the
                                  shard is renamed into place: a shard is done iff its .json exists

A record is fixed-size bytes: an int32 label, then `(V, 2, h, w, c)` floats, the posterior mean and
std of V variants of the image (V = 2: also its horizontal mirror, encoded by the VAE, since latents
cannot be flipped). Training draws z = mean + std·ε afresh every step (as DiT does) from a random
variant, then normalises it once, `(z - shift_C) · scale_C` (`latent_normalization`).

Reading is random access through Grain's `ArrayRecordDataSource`: nothing but the manifest is held
in memory, whatever the size of the set, and worker processes open the files themselves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jax_mmdit.errors import UserError

MANIFEST = "latents.json"
PLAN = "encode.json"
FORMAT = "jax-mmdit latents v1"
# How latents are brought to ~unit scale for the diffusion model: "vae" = the VAE config's
# scaling/shift factors (SD, SDXL, SD3, Flux); "channel" = each channel's mean/std over the data
# (LightningDiT).
LatentNorm = Literal["vae", "channel"]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


@dataclass(frozen=True)
class RecordLayout:
    """The bytes of one record: int32 label, then (variants, 2, h, w, c) values of `dtype`."""

    latent_shape: tuple[int, int, int]
    variants: int
    dtype: str  # "float32" or "float16"

    @property
    def moments_shape(self) -> tuple[int, ...]:
        return (self.variants, 2, *self.latent_shape)

    @property
    def nbytes(self) -> int:
        return 4 + int(np.prod(self.moments_shape)) * np.dtype(self.dtype).itemsize

    def encode(self, label: int, moments_Vx2xhxwxc: np.ndarray) -> bytes:
        if moments_Vx2xhxwxc.shape != self.moments_shape:
            raise ValueError(f"moments shaped {moments_Vx2xhxwxc.shape}, layout says {self.moments_shape}")
        return np.int32(label).tobytes() + np.ascontiguousarray(moments_Vx2xhxwxc, self.dtype).tobytes()

    def decode(self, records: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Records -> (moments float32 (N, V, 2, h, w, c), labels int32 (N,))."""
        raw = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), self.nbytes)
        labels = raw[:, :4].copy().view(np.int32)[:, 0]
        moments = raw[:, 4:].copy().view(self.dtype).reshape(len(records), *self.moments_shape)
        return moments.astype(np.float32, copy=False), labels


def layout_of(manifest: dict[str, Any]) -> RecordLayout:
    return RecordLayout(tuple(manifest["latent_shape"]), int(manifest["variants"]), manifest["dtype"])


def is_latent_dir(path: str | os.PathLike) -> bool:
    """A directory `mmdit encode` wrote into (complete or not)."""
    return (Path(path) / MANIFEST).is_file() or (Path(path) / PLAN).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete latent directory; one clear error for an incomplete one."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        if (path / PLAN).is_file():
            raise UserError(
                f"The latent directory {path} is incomplete (an encoding stopped before its end): rerun the "
                "same `mmdit encode` command to finish it."
            )
        raise UserError(f"{path} is not a latent directory (it has no {MANIFEST}; `mmdit encode` writes one).")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read {path / MANIFEST}: {e}.") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path / MANIFEST} is in format {manifest.get('format')!r}; this version reads {FORMAT!r}.")
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise UserError(f"The latent directory {path} lacks {shard['file']}, which its manifest lists.")
    return manifest


def latent_normalization(manifest: dict[str, Any], mode: LatentNorm) -> tuple[list[float], list[float]]:
    """(shift_C, scale_C) with which the model sees `(z - shift_C) * scale_C`; the decoder inverts it."""
    channels = manifest["latent_shape"][-1]
    if mode == "vae":
        vae = manifest["vae"]["config"]
        return [float(vae.get("shift_factor") or 0.0)] * channels, [float(vae["scaling_factor"])] * channels
    if mode == "channel":
        std = np.maximum(np.asarray(manifest["channel_std"], np.float64), 1e-6)
        return [float(m) for m in manifest["channel_mean"]], [float(s) for s in 1.0 / std]
    raise UserError(f"data.latent_norm must be 'vae' or 'channel', got {mode!r}.")


class LatentRecords:
    """The examples of a latent directory, read on demand (the `Records` interface of
    `jax_mmdit.data.sources`): `len`, `select(indices)`, `read(indices) -> (moments, labels)`."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any], indices: np.ndarray | None = None):
        import grain

        self.directory = str(Path(directory).expanduser())
        self.manifest = manifest
        self.layout = layout_of(manifest)
        paths = [os.path.join(self.directory, s["file"]) for s in manifest["shards"] if s["count"] > 0]
        self.source = grain.sources.ArrayRecordDataSource(paths)
        if len(self.source) != manifest["num_examples"]:
            raise UserError(
                f"The shards of {self.directory} hold {len(self.source)} records but its manifest says "
                f"{manifest['num_examples']}: the directory was changed after encoding; encode it again."
            )
        # None = all records in order (no index array: memory stays flat as the set grows).
        self.indices = indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def select(self, indices: np.ndarray) -> LatentRecords:
        indices = np.asarray(indices, np.int64)
        return LatentRecords(self.directory, self.manifest, indices if self.indices is None else self.indices[indices])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(indices, np.int64)
        if self.indices is not None:
            rows = self.indices[rows]
        return self.layout.decode(self.source.__getitems__([int(i) for i in rows]))
