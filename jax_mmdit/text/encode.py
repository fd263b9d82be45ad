"""`mmdit encode-text`: a dataset's captions -> a caption directory of text-encoder embeddings.

mmdit encode-text --dataset fashion_mnist --templates default --standin --out captions/fashion_mnist
mmdit encode-text --dataset my_set --source ~/data/captioned --caption_column text \
    --clip sd3/text_encoder --clip sd3/text_encoder_2 --t5 sd3/text_encoder_3 --out captions/my_set

Every split of the source is covered. Each unique caption is encoded once (templates: a few dozen
for a whole dataset), the empty prompt first: it is what caption dropout and guidance use. The
layout is `jax_mmdit.data.captions`'; `mmdit train --data.captions DIR` trains on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jax_mmdit.data import captions as cap
from jax_mmdit.data.registry import get_spec
from jax_mmdit.data.sources import detect_source, load_hf_dataset, load_splits, resolve_source
from jax_mmdit.errors import UserError
from jax_mmdit.train.rundir import write_atomically

_MARK = ".encode-text"  # present while a caption directory is being written by us


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit encode-text", description="Encode a dataset's captions for text-to-image.")
    p.add_argument("--dataset", default="fashion_mnist", help="a name from `mmdit datasets`")
    p.add_argument("--source", default=None, help="where the data is (as --data.source); default the dataset's")
    p.add_argument("--out", required=True, help="the caption directory to write")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--templates", default=None, help="'default' or a file of templates with {class}, one per line")
    how.add_argument("--caption_column", default=None, help="a text column (string or list of strings per row)")
    # Without --templates or --caption_column an image folder's sidecars (.txt / .json) are read.
    p.add_argument("--clip", action="append", default=[], help="a CLIP text encoder directory (repeat for SD3's two)")
    p.add_argument("--t5", default=None, help="a T5 encoder directory")
    p.add_argument("--standin", action="store_true",
                   help="no pretrained encoder here: build a small seeded random CLIP over the captions' words "
                        "into OUT/encoder (a stand-in for a real CLIP directory)")  # fmt: skip
    p.add_argument("--clip_max_length", type=int, default=77)
    p.add_argument("--t5_max_length", type=int, default=256)
    p.add_argument("--width", type=int, default=None, help="zero-pad tokens to this width (default the widest)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="how stored")
    p.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the encoders' PyTorch dtype (bf16/fp16 on a GPU)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="the encoders' PyTorch device, e.g. cuda")
    p.add_argument("--batch_size", type=int, default=64, help="captions per forward pass")
    return p


def cmd_encode_text(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    manifest = encode_text(a)
    n = sum(s["rows"] for s in manifest["splits"].values())
    print(f"[mmdit] {manifest['num_captions']} unique captions of {n} examples encoded to {a.out} (tokens "
          f"{manifest['max_length']} x {manifest['context_dim']}, pooled {manifest['pooled_dim']}); train on them "
          f"with --data.captions {a.out}")  # fmt: skip
    return 0


def read_captions(spec, source: str, templates: tuple[str, ...] | None, column: str | None):
    """({split: one caption list per example}, per-class prompts or None, what the captions came from)."""
    if templates is not None:
        splits, class_names = load_splits(spec, source, spec.image_size)
        names = class_names or spec.class_names
        if not spec.num_classes or not names:
            raise UserError(f"Caption templates need class names; {spec.name!r} has none: give --caption_column or "
                            "sidecar captions.")  # fmt: skip
        per_class = cap.template_captions(templates, names)
        out = {s: [per_class[int(y)] for y in np.asarray(r.labels)] for s, r in splits.items()}
        return out, [c[0] for c in per_class], "templates"
    kind = detect_source(source)
    if kind in ("idx", "npz", "latents"):
        raise UserError(f"{source!r} ({kind}) holds no captions: give --templates (class captions).")
    hf = load_hf_dataset(spec, source)
    if column is not None:
        out = {}
        for s, ds in hf.items():
            if column not in ds.features:
                raise UserError(
                    f"The {s} split of {source!r} has no column {column!r} (it has {', '.join(ds.features)})."
                )
            out[s] = [
                cap.as_caption_list(v, f"{column!r} of row {i} of the {s} split") for i, v in enumerate(ds[column])
            ]
        return out, None, f"column:{column}"
    if kind != "imagefolder":
        raise UserError(f"{source!r} is a {kind} dataset: say where its captions are, --caption_column or --templates.")
    import datasets

    out = {}
    for s, ds in hf.items():
        image = next(c for c, f in ds.features.items() if isinstance(f, datasets.Image))
        paths = [v["path"] for v in ds.cast_column(image, datasets.Image(decode=False))[image]]
        out[s] = [cap.sidecar_captions(p) for p in paths]
    return out, None, "sidecar"


def _prepare_out(out: Path) -> bool:
    """True if `out` is already complete; else makes it ready to write (ours from an interrupted run is
    cleared; anything else there is refused)."""
    if cap.is_caption_dir(out):
        return True
    if out.exists() and any(out.iterdir()):
        if not (out / _MARK).exists():
            raise UserError(f"{out} is not empty and not a caption directory; pick another --out.")
        shutil.rmtree(out)  # our own unfinished encoding: start it again
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARK).touch()
    return False


def _encoder_config(a: argparse.Namespace, out: Path, texts: list[str]):
    from jax_mmdit.text.encoders import TextEncoderConfig

    if a.standin:
        if a.clip or a.t5:
            raise UserError("--standin builds its own encoder: leave out --clip and --t5.")
        from jax_mmdit.text.standin import save_standin_encoder

        length = max(8, 2 + max(len(t.split()) for t in texts))
        path = save_standin_encoder(out / "encoder", texts, max_length=length)
        return TextEncoderConfig(clip=(str(path.resolve()),), clip_max_length=length, batch_size=a.batch_size)
    if not a.clip and not a.t5:
        raise UserError("Name the text encoders (--clip DIR, --t5 DIR), or --standin where none is available.")
    return TextEncoderConfig(clip=tuple(str(Path(c).expanduser().resolve()) for c in a.clip),
                             t5=str(Path(a.t5).expanduser().resolve()) if a.t5 else None,
                             clip_max_length=a.clip_max_length, t5_max_length=a.t5_max_length, width=a.width,
                             dtype=a.precision, device=a.device, batch_size=a.batch_size)  # fmt: skip


def encode_text(a: argparse.Namespace) -> dict[str, Any]:
    """Write (or find complete) the caption directory `a.out`; returns its manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    from jax_mmdit.text.encoders import TextEncoder
    from jax_mmdit.text.run import run_text_info

    if a.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {a.batch_size}.")
    out = Path(a.out).expanduser()
    if _prepare_out(out):
        manifest = cap.read_text_manifest(out)
        print(f"[mmdit] {out} is already complete ({manifest['num_captions']} captions); remove it to encode again.")
        return manifest
    spec = get_spec(a.dataset)
    source = resolve_source(spec, a.source)
    templates = cap.read_templates(a.templates) if a.templates else None
    per_split, class_prompts, origin = read_captions(spec, source, templates, a.caption_column)
    ids = {"": cap.EMPTY_CAPTION}  # unique captions -> record; the empty prompt is record 0
    index = {split: cap.CaptionIndex.from_lists([[ids.setdefault(t, len(ids)) for t in c] for c in lists])
             for split, lists in per_split.items()}  # fmt: skip
    texts = list(ids)  # insertion order = record order

    enc_cfg = _encoder_config(a, out, texts)
    encoder = TextEncoder(enc_cfg)
    layout = cap.EmbeddingLayout(encoder.max_length, encoder.context_dim, encoder.pooled_dim, a.dtype)
    tmp = out / f".{cap.EMBEDDINGS}.tmp"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    bar = tqdm(total=len(texts), desc="encode-text", unit="caption", dynamic_ncols=True)
    for i in range(0, len(texts), a.batch_size):
        e = encoder.encode(texts[i : i + a.batch_size])
        pooled = e.pooled_BxP if e.pooled_BxP is not None else [None] * len(e.tokens_BxTxE)
        for tokens, mask, p in zip(e.tokens_BxTxE, e.mask_BxT, pooled):
            writer.write(layout.encode(tokens, mask, p))
        bar.update(len(e.tokens_BxTxE))
    writer.close()
    bar.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / cap.EMBEDDINGS)
    splits = {}
    for split, idx in index.items():
        name = cap.index_name(split)
        with open(out / f".{name}.tmp", "wb") as fh:
            np.savez(fh, offsets=idx.offsets, ids=idx.ids)
        os.replace(out / f".{name}.tmp", out / name)
        splits[split] = {"file": name, "rows": len(idx), "captions": int(len(idx.ids))}
    write_atomically(out / cap.CAPTIONS, json.dumps(texts, ensure_ascii=False, indent=0))
    manifest = {
        "format": cap.TEXT_FORMAT,
        "dataset": spec.name,
        "source": str(source),
        "captions_from": origin,
        "templates": list(templates) if templates else None,
        "class_prompts": class_prompts,
        "standin": bool(a.standin),
        # What a run trained on these records (text_encoder.json): the encoders, to encode new prompts.
        "encoder": run_text_info(enc_cfg, use_mask=True),
        "context_dim": layout.context_dim,
        "pooled_dim": layout.pooled_dim,
        "max_length": layout.max_length,
        "dtype": a.dtype,
        "num_captions": len(texts),
        "empty_caption": cap.EMPTY_CAPTION,
        "splits": splits,
    }
    write_atomically(out / cap.TEXT_MANIFEST, json.dumps(manifest, indent=1))
    (out / _MARK).unlink()
    return manifest
