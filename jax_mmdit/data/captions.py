"""Captions: where they come from, how `mmdit encode-text` stores their embeddings, and how the
training pipeline draws one per example per step.

Caption sources (`read_captions`), one list of captions per example of every split:
- a text column of a save_to_disk / parquet / hub dataset (a string or a list of strings per row);
- an image folder with a sidecar per image: `cat1.png` + `cat1.txt` (one caption per line) or
  `cat1.json` (`{"caption": "..."}` or `{"captions": [...]}`);
- caption templates for a class-labelled dataset ("a photo of a {class}", ...), so any labelled
  dataset can train a text model.

A caption directory (written by `mmdit encode-text`):

    text.json                    the manifest, written last: the directory is complete iff it exists
    embeddings.array_record      one fixed-size record per unique caption: tokens (T, E), mask (T,),
                                 pooled (P,); record 0 is the empty prompt (caption dropout, CFG)
    captions.json                the unique caption texts, in record order
    index-<split>.npz            per example of the split: `offsets` (N+1) into `ids` (its captions)

Examples are matched to their captions by position in the source's split (before any training-time
selection), so each example's caption list travels with it through every `select`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jax_mmdit.errors import UserError

TEXT_MANIFEST = "text.json"
TEXT_FORMAT = "jax-mmdit captions v1"
EMBEDDINGS = "embeddings.array_record"
CAPTIONS = "captions.json"
EMPTY_CAPTION = 0  # record of the empty prompt
# The condition keys a text batch carries beside "image" and "label": the MMDiT's keyword inputs.
TEXT_KEYS = ("context_BxTxE", "context_mask_BxT", "pooled_BxP")

# Several phrasings per class: the model learns the class word, not one sentence.
DEFAULT_TEMPLATES = (
    "a photo of a {class}",
    "a picture of a {class}",
    "a black-and-white picture of a {class}",
    "an image of a {class}",
    "a {class}",
)


def index_name(split: str) -> str:
    return f"index-{split}.npz"


def template_captions(templates: tuple[str, ...], class_names: tuple[str, ...]) -> list[list[str]]:
    """Per class, its captions: every template with the (lower-cased) class name, "a" -> "an" before
    a vowel."""
    for t in templates:
        if "{class}" not in t:
            raise UserError(f"Caption template {t!r} has no {{class}} placeholder.")
    out = []
    for name in class_names:
        name = name.lower()
        out.append([re.sub(r"\ba ([aeiou])", r"an \1", t.replace("{class}", name)) for t in templates])
    return out


def read_templates(arg: str) -> tuple[str, ...]:
    """`--templates`: "default", or a text file with one template per line."""
    if arg == "default":
        return DEFAULT_TEMPLATES
    path = Path(arg).expanduser()
    if not path.is_file():
        raise UserError(f"--templates must be 'default' or a file of templates, one per line; {arg} is neither.")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not templates:
        raise UserError(f"The template file {path} is empty.")
    return templates


def as_caption_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: a caption must be a non-empty string or list of strings, got {value!r:.80}.")
    return [v.strip() for v in value]


def sidecar_captions(image_path: str) -> list[str]:
    """The captions of an image folder's image: its `.txt` (one per line) or `.json` sidecar."""
    stem = os.path.splitext(image_path)[0]
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        return as_caption_list(lines, stem + ".txt")
    if os.path.isfile(stem + ".json"):
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                value = json.load(f)
        except ValueError as e:
            raise UserError(f"{stem}.json is not valid JSON: {e}.") from None
        if not isinstance(value, dict) or not ({"caption", "captions"} & set(value)):
            raise UserError(f'{stem}.json must hold {{"caption": ...}} or {{"captions": [...]}}.')
        return as_caption_list(value.get("captions", value.get("caption")), stem + ".json")
    raise UserError(f"The image {image_path} has no caption sidecar ({os.path.basename(stem)}.txt or .json).")


@dataclass(frozen=True)
class CaptionIndex:
    """Each example's caption ids: example i has ids[offsets[i]:offsets[i+1]] (at least one)."""

    offsets: np.ndarray  # int64 (N + 1,)
    ids: np.ndarray  # int32

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> CaptionIndex:
        counts = np.asarray([len(x) for x in lists], np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ids = np.asarray([i for x in lists for i in x], np.int32)
        return cls(offsets, ids)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def select(self, indices: np.ndarray) -> CaptionIndex:
        indices = np.asarray(indices, np.int64)
        starts, counts = self.offsets[indices], self.offsets[indices + 1] - self.offsets[indices]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Vectorised gather of every selected example's ids (select runs on whole datasets).
        positions = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
        return CaptionIndex(offsets, self.ids[positions])

    def draw(self, indices: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One caption id per example of `indices`, the u-th quantile (u in [0, 1)) of its list."""
        starts, stops = self.offsets[indices], self.offsets[indices + 1]
        pick = np.minimum((u * (stops - starts)).astype(np.int64), stops - starts - 1)
        return self.ids[starts + pick]


@dataclass(frozen=True)
class EmbeddingLayout:
    """One caption record: tokens (T, E) and pooled (P,) in `dtype`, then the mask (T,) as bytes."""

    max_length: int
    context_dim: int
    pooled_dim: int
    dtype: str  # float32, float16 or bfloat16

    @property
    def _np_dtype(self) -> np.dtype:
        if self.dtype == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        values = self.max_length * self.context_dim + self.pooled_dim
        return values * self._np_dtype.itemsize + self.max_length

    def encode(self, tokens_TxE: np.ndarray, mask_T: np.ndarray, pooled_P: np.ndarray | None) -> bytes:
        pooled_P = np.zeros((0,), np.float32) if pooled_P is None else pooled_P
        if tokens_TxE.shape != (self.max_length, self.context_dim) or pooled_P.shape != (self.pooled_dim,):
            raise ValueError(f"caption embedding shaped {tokens_TxE.shape}, {pooled_P.shape} does not fit {self}")
        values = np.concatenate([tokens_TxE.reshape(-1), pooled_P]).astype(self._np_dtype)
        return values.tobytes() + np.asarray(mask_T, np.uint8).tobytes()

    def decode(self, records: list[bytes]) -> dict[str, np.ndarray]:
        """Records -> {context_BxTxE, context_mask_BxT, pooled_BxP} (float32, bool, float32)."""
        raw = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), self.nbytes)
        T, E, P = self.max_length, self.context_dim, self.pooled_dim
        values = raw[:, : raw.shape[1] - T].copy().view(self._np_dtype).astype(np.float32)
        out = {
            "context_BxTxE": values[:, : T * E].reshape(len(records), T, E),
            "context_mask_BxT": raw[:, raw.shape[1] - T :].astype(bool),
        }
        if P:
            out["pooled_BxP"] = values[:, T * E :]
        return out


def layout_of(manifest: dict[str, Any]) -> EmbeddingLayout:
    return EmbeddingLayout(manifest["max_length"], manifest["context_dim"], manifest["pooled_dim"], manifest["dtype"])


def is_caption_dir(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / TEXT_MANIFEST).is_file()


def read_text_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete caption directory; one clear error otherwise."""
    path = Path(path).expanduser()
    if not (path / TEXT_MANIFEST).is_file():
        hint = " (an encoding stopped before its end: rerun it)" if path.is_dir() and any(path.iterdir()) else ""
        raise UserError(f"{path} is not a caption directory: it has no {TEXT_MANIFEST}{hint}; `mmdit encode-text` "
                        "writes one.")  # fmt: skip
    manifest = json.loads((path / TEXT_MANIFEST).read_text())
    if manifest.get("format") != TEXT_FORMAT:
        raise UserError(f"{path / TEXT_MANIFEST} is in format {manifest.get('format')!r}; this version reads "
                        f"{TEXT_FORMAT!r}.")  # fmt: skip
    return manifest


class CaptionTable:
    """The embeddings of a caption directory's unique captions, read on demand."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any] | None = None):
        import grain

        self.directory = str(Path(directory).expanduser().resolve())
        self.manifest = manifest or read_text_manifest(self.directory)
        self.layout = layout_of(self.manifest)
        self.source = grain.sources.ArrayRecordDataSource([os.path.join(self.directory, EMBEDDINGS)])
        if len(self.source) != self.manifest["num_captions"]:
            raise UserError(f"{self.directory} holds {len(self.source)} caption embeddings but its manifest says "
                            f"{self.manifest['num_captions']}: encode it again.")  # fmt: skip

    def texts(self) -> list[str]:
        return json.loads((Path(self.directory) / CAPTIONS).read_text())

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The condition dict of caption `ids` (each unique record read once)."""
        unique, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        rows = self.layout.decode(self.source.__getitems__([int(i) for i in unique]))
        return {k: v[inverse] for k, v in rows.items()}

    def index(self, split: str) -> CaptionIndex:
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise UserError(f"The captions in {self.directory} cover the splits {', '.join(self.manifest['splits'])}, "
                            f"not {split!r}.")  # fmt: skip
        with np.load(os.path.join(self.directory, entry["file"])) as z:
            return CaptionIndex(z["offsets"], z["ids"])


@dataclass(frozen=True)
class CaptionedRecords:
    """Records (images or latents) with each example's caption ids: `select` keeps them together."""

    records: Any  # ArrayRecords, HFRecords or LatentRecords
    captions: CaptionIndex

    def __post_init__(self) -> None:
        if len(self.records) != len(self.captions):
            raise UserError(f"{len(self.records)} examples but captions for {len(self.captions)}: the captions were "
                            "encoded from another copy of the data; encode them again.")  # fmt: skip

    def __len__(self) -> int:
        return len(self.records)

    def select(self, indices: np.ndarray) -> CaptionedRecords:
        return CaptionedRecords(self.records.select(indices), self.captions.select(indices))

    def read(self, indices: np.ndarray):
        return self.records.read(indices)

    def decode_all(self):
        records, bad, kept = self.records.decode_all()
        return CaptionedRecords(records, self.captions.select(kept)), bad, kept

    def readable(self):
        records, bad, kept = self.records.readable()
        return CaptionedRecords(records, self.captions.select(kept)), bad, kept


def unwrap(records):
    """The image records under a caption wrapper (or the records themselves)."""
    return records.records if isinstance(records, CaptionedRecords) else records
