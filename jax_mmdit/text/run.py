"""A text-conditioned run's encoders: recorded in the run (`text_encoder.json`), found from an SD3
pipeline's layout, and turned into the model's condition for a prompt.

The condition is a dict of the MMDiT's keyword inputs (context_BxTxE, pooled_BxP and, when the run
masks padding, context_mask_BxT), which the samplers pass through and guide against the same dict
for the negative (by default the empty) prompt, as SD3 does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jax_mmdit.errors import UserError
from jax_mmdit.text.encoders import TextEncoder, TextEncoderConfig, identity

RUN_TEXT = "text_encoder.json"


def run_text_info(cfg: TextEncoderConfig, use_mask: bool) -> dict[str, Any]:
    """What a run records about its text encoders. `use_mask`: whether its model saw a padding mask
    (SD3 was trained without one: its converted runs attend to padding as it did)."""
    return {"encoder": asdict(cfg), "identity": identity(cfg), "use_mask": use_mask}


def read_run_text_info(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_TEXT
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_text_encoders(pipeline: str | Path, width: int | None = None) -> TextEncoderConfig | None:
    """SD3's encoders in a diffusers pipeline directory: text_encoder (CLIP-L), text_encoder_2
    (CLIP-G) and text_encoder_3 (T5, optional; without it, zero tokens as SD3's pipeline uses), with
    SD3's lengths (77 and 256), tokens padded to `width` (the model's); None if absent."""
    root = Path(pipeline).expanduser()
    clips = [root / d for d in ("text_encoder", "text_encoder_2") if (root / d / "config.json").is_file()]
    t5 = root / "text_encoder_3"
    if not clips:
        return None
    # CLIP's token length is its position table's (77 for SD3's CLIPs).
    length = min(json.loads((c / "config.json").read_text()).get("max_position_embeddings", 77) for c in clips)
    t5_dir = str(t5) if (t5 / "config.json").is_file() else None
    return TextEncoderConfig(
        clip=tuple(str(c) for c in clips),
        t5=t5_dir,
        clip_max_length=length,
        zeros_for_missing_t5=t5_dir is None,
        width=width,
    )


def encoder_widths(cfg: TextEncoderConfig) -> tuple[int, int]:
    """(widest token width, pooled width) of the encoders, from their config.json files (no weights)."""

    def read(path: str) -> dict:
        return json.loads((Path(path).expanduser() / "config.json").read_text())

    clips = [read(c) for c in cfg.clip]
    clip_width = sum(c["hidden_size"] for c in clips)
    t5_width = read(cfg.t5)["d_model"] if cfg.t5 else 0
    return max(clip_width, t5_width), sum(c["projection_dim"] for c in clips)


def check_fits(cfg: TextEncoderConfig, model_cfg) -> None:
    """The encoders' tokens (zero-padded up to the model's width) and pooled embedding fit the model."""
    widest, pooled = encoder_widths(cfg)
    if widest > model_cfg.context_dim or pooled != model_cfg.pooled_dim:
        raise UserError(
            f"The text encoders give tokens {widest} wide and a pooled embedding of {pooled}; the model takes "
            f"context width {model_cfg.context_dim} and pooled width {model_cfg.pooled_dim}."
        )


def resolve_text_model(cfg):
    """A TrainConfig on captioned data (data.captions) with the MMDiT's text widths from the caption
    manifest where left at 0; given ones must agree. Without captions, `cfg` itself."""
    if cfg.data.captions is None:
        return cfg
    from jax_mmdit.data.captions import read_text_manifest

    m, model = read_text_manifest(cfg.data.captions), cfg.model
    if model.arch != "mmdit":
        raise UserError(f"Captioned data trains a text-conditioned MMDiT: set --model.arch mmdit (not {model.arch!r}).")
    if model.num_classes:
        raise UserError(f"A text-conditioned MMDiT takes captions, not class labels: set --model.num_classes 0 (not "
                        f"{model.num_classes}).")  # fmt: skip
    widths = {"context_dim": m["context_dim"], "pooled_dim": m["pooled_dim"]}
    for name, want in widths.items():
        if getattr(model, name) not in (0, want):
            raise UserError(f"The captions in {cfg.data.captions} are {want} wide ({name}) but --model.{name} is "
                            f"{getattr(model, name)}: leave it at 0 to take the captions' width.")  # fmt: skip
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **widths))


def caption_run_info(table, use_mask: bool) -> dict[str, Any]:
    """What a run trained on a caption directory records (text_encoder.json): its encoders, the
    directory (known prompts are read from it, not re-encoded), the prompts it samples by default,
    and whether its model masks padding (model.context_mask)."""
    m = table.manifest
    texts = table.texts()
    defaults = m["class_prompts"] or [t for t in texts if t][:16]
    return {**m["encoder"], "use_mask": use_mask, "captions": table.directory, "class_prompts": m["class_prompts"],
            "default_prompts": defaults}  # fmt: skip


class PromptConditioner:
    """Prompts -> the model's condition dicts: read from the run's caption directory where it holds
    them, else encoded with the run's encoders (loaded on first use)."""

    def __init__(self, info: dict[str, Any], table=None):
        self.info = info
        self._encoder: TextEncoder | None = None
        self._table, self._known = table, None

    def _lookup(self) -> dict[str, int]:
        """Caption text -> record of the run's caption directory (empty if it has none, or it moved)."""
        if self._known is None:
            self._known = {}
            where = self.info.get("captions")
            if self._table is None and where and (Path(where) / "text.json").is_file():
                from jax_mmdit.data.captions import CaptionTable

                self._table = CaptionTable(where)
            if self._table is not None:
                self._known = {t: i for i, t in enumerate(self._table.texts())}
        return self._known

    def _encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        known = self._lookup()
        if all(p in known for p in prompts):
            cond = self._table.gather(np.asarray([known[p] for p in prompts]))
            if not self.info["use_mask"]:
                cond.pop("context_mask_BxT")
            return cond
        if self._encoder is None:
            cfg = TextEncoderConfig(**self.info["encoder"])
            recorded, found = self.info["identity"], identity(cfg)
            for a, b in zip([*recorded["clip"], recorded["t5"]], [*found["clip"], found["t5"]]):
                if a is not None and a["config_sha256"] != b["config_sha256"]:
                    raise UserError(
                        f"The text encoder at {b['path']} is not the one this run recorded (its config differs)."
                    )
            self._encoder = TextEncoder(cfg)
        out = self._encoder.encode(prompts)
        cond = {"context_BxTxE": out.tokens_BxTxE}
        if out.pooled_BxP is not None:
            cond["pooled_BxP"] = out.pooled_BxP
        if self.info["use_mask"]:
            cond["context_mask_BxT"] = out.mask_BxT
        return cond

    def __call__(self, prompts: list[str], negative: str = "") -> tuple[dict, dict]:
        """(condition of the prompts, condition of the negative prompt with batch 1)."""
        if not prompts:
            raise UserError("Give at least one prompt.")
        cond = self._encode(list(prompts) + [negative])
        return {k: v[:-1] for k, v in cond.items()}, {k: v[-1:] for k, v in cond.items()}
