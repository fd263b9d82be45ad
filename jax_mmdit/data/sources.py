"""Raw data from wherever it lives: the hub, save_to_disk, parquet, an image folder, IDX files, .npz.

Every source ends as a dict `split name -> records`, where records are either `ArrayRecords` (a
uint8 array in memory) or `HFRecords` (an Arrow-backed `datasets.Dataset`, decoded per read). Both
answer `len`, `select(indices)` and `read(indices) -> (images_NxHxWxC, labels_N)`, with images
already at the target size and channel count. (Latent directories, written by `mmdit encode`, have
their own records: `jax_mmdit.data.latents`.)
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import socket
import zipfile
from dataclasses import dataclass, replace
from typing import Literal

import datasets
import numpy as np
from PIL import Image, ImageOps

from jax_mmdit.data.latents import is_latent_dir
from jax_mmdit.data.registry import DatasetSpec
from jax_mmdit.errors import UserError

SourceKind = Literal["hub", "disk", "parquet", "imagefolder", "idx", "npz", "latents"]

# IDX file-name prefixes (MNIST convention) -> split names.
_IDX_SPLITS = {"train": "train", "t10k": "test", "test": "test"}


class DatasetUnavailableError(UserError):
    """The dataset is neither installed locally nor reachable on the Hugging Face hub."""


@dataclass(frozen=True)
class ArrayRecords:
    """Examples held in memory: images uint8 NHWC at the target size, labels int32."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise UserError(
                f"Expected images (N, H, W, C) and N labels, got {self.images.shape} and {self.labels.shape}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: np.ndarray) -> ArrayRecords:
        return ArrayRecords(self.images[indices], self.labels[indices])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


@dataclass(frozen=True)
class HFRecords:
    """Examples left in an Arrow table (memory-mapped); images are decoded and resized per read.

    The image column is read undecoded (`datasets.Image(decode=False)`): HF would decode JPEGs at
    full size, while Pillow's `draft` decodes them directly at 1/2, 1/4 or 1/8 scale.
    """

    dataset: datasets.Dataset  # image column cast to Image(decode=False)
    image_column: str
    labels: np.ndarray
    image_size: int
    channels: int
    # How an image reaches image_size²: "fit" = center-crop the short side then resize (Pillow's
    # ImageOps.fit); "adm" = ADM/DiT's center_crop_arr (box-halve, resize the short side, crop).
    crop: Literal["fit", "adm"] = "fit"

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: np.ndarray) -> HFRecords:
        return replace(self, dataset=self.dataset.select(indices), labels=self.labels[indices])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.dataset[[int(i) for i in indices]][self.image_column]
        images = np.stack([self._fit(open_image(value)) for value in encoded])
        return images, self.labels[indices]

    def read_each(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Like `read`, but an image that cannot be decoded is left out: (images, labels, names of the
        left-out ones with the reason)."""
        encoded = self.dataset[[int(i) for i in indices]][self.image_column]
        images, keep, bad = [], [], []
        for j, value in enumerate(encoded):
            try:
                images.append(self._fit(open_image(value)))
                keep.append(j)
            except IMAGE_ERRORS as e:
                bad.append(f"{image_name(value, int(indices[j]))} ({error_reason(e)})")
        shape = (0, self.image_size, self.image_size, self.channels)
        return (np.stack(images) if images else np.zeros(shape, np.uint8)), self.labels[indices][keep], bad

    def _fit(self, image: Image.Image) -> np.ndarray:
        if self.crop == "adm":
            return center_crop_arr(image, self.image_size, self.channels)
        return fit_image(image, self.image_size, self.channels)

    def decode_all(self, chunk: int = 1024) -> tuple[ArrayRecords, list[str], np.ndarray]:
        """Decode every image once (small datasets): batches then need no Pillow at all. Returns the
        decodable ones, the names of those that are not (skipped) and the indices kept."""
        images = np.empty((len(self), self.image_size, self.image_size, self.channels), np.uint8)
        good, bad = np.ones(len(self), bool), []
        for start, rows in zip(range(0, len(self), chunk), self.dataset.iter(batch_size=chunk)):
            for i, value in enumerate(rows[self.image_column]):
                try:
                    images[start + i] = self._fit(open_image(value))
                except IMAGE_ERRORS as e:
                    good[start + i] = False
                    bad.append(f"{image_name(value, start + i)} ({error_reason(e)})")
        return ArrayRecords(images[good], self.labels[good]), bad, np.flatnonzero(good)

    def readable(self, chunk: int = 1024) -> tuple[HFRecords, list[str], np.ndarray]:
        """The records whose image decodes (checked once, at start-up), the names of the others and
        the indices kept."""
        good, bad = [], []
        for start, rows in zip(range(0, len(self), chunk), self.dataset.iter(batch_size=chunk)):
            for i, value in enumerate(rows[self.image_column]):
                try:
                    self._fit(open_image(value))
                    good.append(start + i)
                except IMAGE_ERRORS as e:
                    bad.append(f"{image_name(value, start + i)} ({error_reason(e)})")
        kept = np.asarray(good, np.int64)
        return (self if not bad else self.select(kept)), bad, kept


# What Pillow raises for a file that is not an image, or a truncated or corrupt one.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_name(value: dict, index: int) -> str:
    """How to name an undecoded image in a message: its file path, else its record index."""
    return value.get("path") or f"record {index}"


def error_reason(e: BaseException) -> str:
    """An exception's first line, short enough for a one-line message."""
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


Records = ArrayRecords | HFRecords


def fit_image(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Pillow image -> uint8 (size, size, channels): center-crop to square, resize, set the mode."""
    mode = "L" if channels == 1 else "RGB"
    image.draft(mode, (size, size))  # JPEG only (else a no-op): decode at the smallest scale >= size
    image = image.convert(mode)
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def center_crop_arr(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion, used by DiT): halve with a box filter while the short
    side is at least 2·size, resize the short side to `size` (bicubic), then center-crop."""
    image.draft("L" if channels == 1 else "RGB", (size, size))
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top : top + size, left : left + size]
    return array[..., None] if channels == 1 else array


def open_image(value: dict) -> Image.Image:
    """An undecoded `datasets.Image` value ({"bytes", "path"}) -> a lazily decoded Pillow image."""
    return Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"])


def detect_source(source: str) -> SourceKind:
    """Which loader a `--data.source` string needs, judged from its form."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return "npz"
        if path.endswith(".parquet"):
            return "parquet"
        raise UserError(f"Data source file {source!r} is neither .npz nor .parquet.")
    if os.path.isdir(path):
        names = os.listdir(path)
        if is_latent_dir(path):
            return "latents"
        if "dataset_dict.json" in names or "state.json" in names:
            return "disk"
        if any("-images-idx3-ubyte" in n for n in names):
            return "idx"
        if glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            return "parquet"
        return "imagefolder"
    if glob.glob(path):  # a glob of parquet files
        return "parquet"
    # A hub id is "name" or "owner/name"; anything else, or a relative path whose first directory
    # exists here, is a path that does not exist.
    first = source.split("/")[0]
    if (
        source.startswith(("/", ".", "~"))
        or source.endswith((".npz", ".parquet"))
        or source.count("/") > 1
        or "\\" in source
        or ("/" in source and os.path.isdir(first))
    ):
        raise UserError(f"Data source path {source!r} does not exist (relative to {os.getcwd()}).")
    return "hub"


def resolve_source(spec: DatasetSpec, source: str | None) -> str:
    """`source`, or where `spec`'s data is found when none is given: its local copy, else its hub id."""
    if source is None:
        source = next((p for p in spec.local_paths if os.path.isdir(p)), spec.hub_id)
        if source is None:
            raise DatasetUnavailableError(_unavailable_message(spec, "it has no public hub copy"))
    return source


def load_splits(
    spec: DatasetSpec, source: str | None, image_size: int, crop: Literal["fit", "adm"] = "fit"
) -> tuple[dict[str, Records], tuple[str, ...] | None]:
    """All splits of `spec`'s images from `source` (None: local copy, else hub), plus class names.

    Class names are the spec's when known, else the source's ClassLabel names, else None. `crop`
    is how decoded images (image folders, parquet, save_to_disk, the hub) reach image_size².
    """
    source = resolve_source(spec, source)
    kind = detect_source(source)
    path = os.path.expanduser(source)
    if kind == "latents":
        raise UserError(f"{source!r} holds latents (written by `mmdit encode`), not images.")
    if kind == "idx":
        splits = {
            name: _conform(spec, images, labels, image_size, source)
            for name, (images, labels) in _read_idx_dir(path).items()
        }
        return splits, spec.class_names
    if kind == "npz":
        images, labels = _read_npz(spec, path)
        return {spec.train_split: _conform(spec, images, labels, image_size, source)}, spec.class_names
    hf = load_hf_dataset(spec, source)
    splits = {name: _hf_records(spec, ds, source, image_size, crop) for name, ds in hf.items()}
    return splits, spec.class_names or _class_label_names(spec, next(iter(hf.values())))


def load_hf_dataset(spec: DatasetSpec, source: str) -> datasets.DatasetDict:
    """The `datasets` splits of a hub id, save_to_disk directory, parquet file(s) or image folder."""
    kind, path = detect_source(source), os.path.expanduser(source)
    if kind == "hub":
        hf = _load_hub(spec, source)
    elif kind == "disk":
        hf = datasets.load_from_disk(path)
    elif kind == "parquet":
        hf = datasets.load_dataset("parquet", **({"data_dir": path} if os.path.isdir(path) else {"data_files": path}))
    elif kind == "imagefolder":
        hf = datasets.load_dataset("imagefolder", data_dir=path)
    else:
        raise UserError(f"{source!r} is a {kind} source, not a `datasets` one.")
    if isinstance(hf, datasets.Dataset):  # save_to_disk of a single split
        hf = datasets.DatasetDict({spec.train_split: hf})
    return hf


def _unavailable_message(spec: DatasetSpec, why: str) -> str:
    local = f" Local copies looked for: {', '.join(spec.local_paths)}." if spec.local_paths else ""
    return (
        f"Dataset {spec.name!r} is unavailable: {why}.{local} Alternatives without the hub: "
        "`apt-get install dataset-fashion-mnist` (Fashion-MNIST IDX files), or `--data.source PATH` "
        "pointing at a save_to_disk directory, parquet file(s), an image folder (one subfolder per "
        "class), a directory of MNIST-format IDX files, an .npz with `images` and `labels`, or a latent "
        "directory written by `mmdit encode`."
    )


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found in well under a second (the datasets
    library retries for ~25 s); None when it may be (online, behind a proxy, or offline mode set)."""
    if datasets.config.HF_DATASETS_OFFLINE or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy")):
        return None
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host} is unreachable ({e})"
    return None


def _load_hub(spec: DatasetSpec, hub_id: str) -> datasets.DatasetDict:
    # With HF_DATASETS_OFFLINE=1 this fails in under a second instead of retrying for ~24 s.
    unreachable = _hub_unreachable()
    if unreachable is not None:
        why = f"{hub_id!r} is not a local path, and as a hub id it cannot be loaded: {unreachable}"
        raise DatasetUnavailableError(_unavailable_message(spec, why))
    try:
        return datasets.load_dataset(hub_id)
    except OSError as e:  # ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError
        offline = (
            " (HF_DATASETS_OFFLINE is set)"
            if datasets.config.HF_DATASETS_OFFLINE
            else " (set HF_DATASETS_OFFLINE=1 to fail at once instead of after the hub's retries)"
        )
        why = f"hub id {hub_id!r} could not be loaded{offline}: {e}"
        raise DatasetUnavailableError(_unavailable_message(spec, why)) from e


def _hf_records(spec: DatasetSpec, ds: datasets.Dataset, source: str, image_size: int, crop: str) -> HFRecords:
    features = ds.features
    image_column = next(
        (c for c in (spec.image_column, "image") if isinstance(features.get(c), datasets.Image)),
        next((c for c, f in features.items() if isinstance(f, datasets.Image)), None),
    )
    if image_column is None:
        raise UserError(f"Source {source!r} has no image column (columns: {', '.join(features)}).")
    if spec.num_classes == 0:
        labels = np.zeros(len(ds), np.int32)
    else:
        label_column = next((c for c in (spec.label_column, "label") if c in features), None)
        if label_column is None:
            raise UserError(f"Source {source!r} has no {spec.label_column!r} column for the labels of {spec.name!r}.")
        labels = np.asarray(ds[label_column])
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"Labels in column {label_column!r} of {source!r} must be integers, got {labels.dtype}.")
        _check_labels(spec, labels, source)
    undecoded = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    return HFRecords(undecoded, image_column, labels.astype(np.int32), image_size, spec.channels, crop)


def _class_label_names(spec: DatasetSpec, ds: datasets.Dataset) -> tuple[str, ...] | None:
    feature = ds.features.get(spec.label_column or "label") or ds.features.get("label")
    if isinstance(feature, datasets.ClassLabel) and feature.num_classes == spec.num_classes:
        return tuple(feature.names)
    return None


def _check_labels(spec: DatasetSpec, labels: np.ndarray, source: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(
            f"Labels of {source!r} span [{labels.min()}, {labels.max()}] but {spec.name!r} has "
            f"{spec.num_classes} classes."
        )


def _conform(
    spec: DatasetSpec, images: np.ndarray, labels: np.ndarray | None, image_size: int, source: str
) -> ArrayRecords:
    """Arrays from IDX/npz -> ArrayRecords at the target size and channel count."""
    if images.ndim == 3:  # grayscale stored without a channel axis (IDX)
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"Expected images shaped (N, H, W[, C]), got {images.shape}.")
    if labels is None:
        if spec.num_classes > 0:
            raise UserError(f"Dataset {spec.name!r} needs labels but the source has none.")
        labels = np.zeros(len(images), np.int32)
    if len(labels) != len(images):
        raise UserError(f"The source has {len(images)} images but {len(labels)} labels.")
    if spec.num_classes > 0:
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"Labels of {source!r} must be integers, got {labels.dtype}.")
        _check_labels(spec, labels, source)
    labels = labels.astype(np.int32)
    target = (image_size, image_size, spec.channels)
    if images.dtype != np.uint8:
        raise UserError(f"Image arrays must be uint8 in [0, 255], got {images.dtype}.")
    if images.shape[1:] != target:
        gray = images.shape[-1] == 1
        images = np.stack(
            [fit_image(Image.fromarray(im[..., 0] if gray else im), image_size, spec.channels) for im in images]
        )
    return ArrayRecords(images, labels)


def _read_npz(spec: DatasetSpec, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        npz = np.load(path)
        if isinstance(npz, np.ndarray):  # np.save's format under an .npz name
            raise UserError(f"{path} is a single .npy array, not an .npz archive (write it with np.savez).")
        with npz:
            if "images" not in npz.files:
                hint = " (latents are a directory written by `mmdit encode`)" if "latents" in npz.files else ""
                raise UserError(f"{path} needs an array named 'images'; it has {', '.join(npz.files)}{hint}.")
            return npz["images"], npz["labels"] if "labels" in npz.files else None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} is not a readable .npz archive (truncated or corrupt?): {error_reason(e)}") from None


def _read_idx(path: str) -> np.ndarray:
    """One IDX file (the MNIST format: a magic number, big-endian dims, raw data)."""
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} holds {array.size} bytes of data for shape {shape}.")
    return array.reshape(shape)


def _read_idx_dir(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for images_path in sorted(glob.glob(os.path.join(path, "*-images-idx3-ubyte*"))):
        prefix, suffix = os.path.basename(images_path).split("-images-idx3-ubyte")
        labels_path = os.path.join(path, f"{prefix}-labels-idx1-ubyte{suffix}")
        if not os.path.isfile(labels_path):
            raise UserError(f"{images_path} has no labels file {labels_path}.")
        splits[_IDX_SPLITS.get(prefix, prefix)] = (_read_idx(images_path), _read_idx(labels_path))
    return splits
