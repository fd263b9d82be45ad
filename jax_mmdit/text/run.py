"""A text-conditioned run's encoders: recorded in the run (`text_encoder.json`), found from an SD3
pipeline's layout, and turned into the model's condition for a prompt.

The condition is a dict of the MMDiT's keyword inputs (context_BxTxE, pooled_BxP and, when the run
masks padding, context_mask_BxT), which the samplers pass through and guide against the same dict
for the negative (by default the empty) prompt, as SD3 does.
"""

from __future__ import annotations

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


class PromptConditioner:
    """Prompts -> the model's condition dicts, with the run's encoders (loaded on first use)."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self._encoder: TextEncoder | None = None

    def _encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
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
