"""Text encoders through Hugging Face `transformers`, from local directories: CLIP text encoders
(CLIP-L/14, OpenCLIP bigG) and a T5 encoder, alone or combined as SD3 combines them.

    enc = TextEncoder(TextEncoderConfig(clip=("clip-l", "clip-g"), t5="t5-xxl"))
    out = enc.encode(["a photo of a sandal", ""])   # TextEmbeddings: tokens, mask, pooled (numpy)

They run in PyTorch: encoding is done once per caption, offline, so the JAX model never holds the
encoders. SD3's layout (Esser et al. 2024, Sec. 5.1):
- tokens: each CLIP's penultimate hidden layer, concatenated along the width, zero-padded to the
  T5 width, then the T5 tokens appended along the sequence: (77 + T5 length, T5 width);
- pooled: the CLIPs' projected pooled embeddings concatenated (768 + 1280 = 2048 for SD3);
- mask: the tokenizers' attention masks in the same order, so padding can be left out of attention.
A directory is a model directory with its tokenizer inside, or a pipeline's `text_encoder*/` with
the tokenizer in the matching `tokenizer*/` beside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jax_mmdit.errors import UserError

DtypeName = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which encoders, and how they run."""

    # CLIP text encoder directories (CLIPTextModelWithProjection); pooled and tokens concatenated.
    clip: tuple[str, ...] = ()
    # A T5 encoder directory (T5EncoderModel), or None.
    t5: str | None = None
    # Token lengths (CLIP's is its position table's: 77).
    clip_max_length: int = 77
    t5_max_length: int = 256
    # Without a T5: append t5_max_length zero tokens anyway (masked out), as SD3's pipeline does when
    # its T5 is left out, so an SD3 model sees the sequence it was trained on.
    zeros_for_missing_t5: bool = False
    # Zero-pad every token to this width (None: the widest encoder's), e.g. SD3's 4096 without T5.
    width: int | None = None
    # PyTorch dtype and device the encoders run in (bf16/fp16 on a GPU halves memory and time).
    dtype: DtypeName = "float32"
    device: str = "cpu"
    # Captions per forward pass.
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.clip and self.t5 is None:
            raise UserError("A text encoder needs at least one CLIP directory or a T5 directory.")
        object.__setattr__(self, "clip", tuple(self.clip))
        if self.clip_max_length < 2 or self.t5_max_length < 2 or self.batch_size < 1:
            raise UserError("clip_max_length and t5_max_length must be >= 2 and batch_size >= 1.")


@dataclass(frozen=True)
class TextEmbeddings:
    tokens_BxTxE: np.ndarray  # float32
    mask_BxT: np.ndarray  # bool: real tokens
    pooled_BxP: np.ndarray | None  # float32; None without a CLIP


def _tokenizer_dir(model_dir: Path) -> Path:
    """The tokenizer of `model_dir`: inside it, or a pipeline's `tokenizer_N/` for `text_encoder_N/`."""
    if any(
        (model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")
    ):
        return model_dir
    sibling = model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer")
    if model_dir.name.startswith("text_encoder") and sibling.is_dir():
        return sibling
    raise UserError(
        f"No tokenizer found for the text encoder {model_dir} (in it, or a pipeline's tokenizer*/ beside it)."
    )


def _check_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a text encoder directory: it has no config.json.")
    return p


def identity(cfg: TextEncoderConfig) -> dict[str, Any]:
    """What a run records to find and check its encoders again: paths, lengths and each model's
    config.json hash (weights are too large to hash at every prompt)."""

    def one(path: str) -> dict[str, str]:
        p = _check_dir(path).resolve()
        return {"path": str(p), "config_sha256": hashlib.sha256((p / "config.json").read_bytes()).hexdigest()}

    return {
        "clip": [one(c) for c in cfg.clip],
        "t5": one(cfg.t5) if cfg.t5 else None,
        "clip_max_length": cfg.clip_max_length,
        "t5_max_length": cfg.t5_max_length,
    }


class TextEncoder:
    """The encoders of a `TextEncoderConfig`, loaded once; `encode(prompts)` -> `TextEmbeddings`."""

    def __init__(self, cfg: TextEncoderConfig):
        try:
            import torch
            import transformers
        except ImportError:
            raise UserError("Text encoders need PyTorch and transformers: pip install 'jax-mmdit[text]'.") from None
        self.cfg, self._torch = cfg, torch
        dtype = getattr(torch, cfg.dtype)

        def load(cls, path: str):
            p = _check_dir(path)
            tok_dir = _tokenizer_dir(p)
            try:
                model = cls.from_pretrained(p, dtype=dtype).to(cfg.device).eval()
                tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
            except (OSError, ValueError) as e:
                raise UserError(f"Cannot load the text encoder {p}: {str(e).splitlines()[0]}") from None
            return model, tok

        self.clips = [load(transformers.CLIPTextModelWithProjection, c) for c in cfg.clip]
        self.t5 = load(transformers.T5EncoderModel, cfg.t5) if cfg.t5 else None

    @property
    def clip_width(self) -> int:
        return sum(m.config.hidden_size for m, _ in self.clips)

    @property
    def context_dim(self) -> int:
        """Width of the token embeddings (the MMDiT's context_dim)."""
        widest = max(self.clip_width, self.t5[0].config.d_model if self.t5 else 0)
        if self.cfg.width is not None and self.cfg.width < widest:
            raise UserError(f"Text encoder width {self.cfg.width} is below its encoders' {widest}.")
        return self.cfg.width or widest

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding (the MMDiT's pooled_dim; 0 without a CLIP)."""
        return sum(m.config.projection_dim for m, _ in self.clips)

    @property
    def max_length(self) -> int:
        t5 = self.t5 is not None or self.cfg.zeros_for_missing_t5
        return (self.cfg.clip_max_length if self.clips else 0) + (self.cfg.t5_max_length if t5 else 0)

    def _tokens(self, tok, prompts: list[str], length: int):
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return enc["input_ids"].to(self.cfg.device), enc["attention_mask"].to(self.cfg.device)

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        torch, cfg = self._torch, self.cfg
        parts, masks, pooled = [], [], []
        with torch.no_grad():
            if self.clips:
                clip_tokens = []
                for model, tok in self.clips:
                    ids, mask = self._tokens(tok, prompts, cfg.clip_max_length)
                    out = model(input_ids=ids, output_hidden_states=True)
                    clip_tokens.append(out.hidden_states[-2].float())  # SD3: the penultimate layer
                    pooled.append(out.text_embeds.float())
                # The CLIPs share one tokenisation length; a token is real if any tokenizer says so.
                x = torch.cat(clip_tokens, dim=-1)
                parts.append(torch.nn.functional.pad(x, (0, self.context_dim - x.shape[-1])))
                masks.append(mask.bool())
            if self.t5:
                model, tok = self.t5
                ids, mask = self._tokens(tok, prompts, cfg.t5_max_length)
                x = model(input_ids=ids).last_hidden_state.float()
                parts.append(torch.nn.functional.pad(x, (0, self.context_dim - x.shape[-1])))
                masks.append(mask.bool())
            elif cfg.zeros_for_missing_t5:
                parts.append(torch.zeros(len(prompts), cfg.t5_max_length, self.context_dim))
                masks.append(torch.zeros(len(prompts), cfg.t5_max_length, dtype=torch.bool))
        return TextEmbeddings(
            torch.cat(parts, dim=1).cpu().numpy(),
            torch.cat(masks, dim=1).cpu().numpy(),
            torch.cat(pooled, dim=-1).cpu().numpy() if pooled else None,
        )

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Embeddings of `prompts`, in batches of cfg.batch_size."""
        if isinstance(prompts, str):
            prompts = [prompts]
        chunks = [self._encode_batch(list(prompts[i : i + self.cfg.batch_size]))
                  for i in range(0, len(prompts), self.cfg.batch_size)]  # fmt: skip
        return TextEmbeddings(
            np.concatenate([c.tokens_BxTxE for c in chunks]),
            np.concatenate([c.mask_BxT for c in chunks]),
            None if chunks[0].pooled_BxP is None else np.concatenate([c.pooled_BxP for c in chunks]),
        )
