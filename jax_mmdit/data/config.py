"""DataConfig: which dataset, from where, and how the input pipeline runs."""

from __future__ import annotations

from dataclasses import dataclass

from jax_mmdit.data.latents import LatentNorm
from jax_mmdit.data.registry import get_spec
from jax_mmdit.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    """Dataset choice and input-pipeline knobs (the `--data.*` CLI flags)."""

    # A name in jax_mmdit.data.DATASETS.
    name: str = "fashion_mnist"
    # Overrides where the data comes from: a hub id, or a path to a save_to_disk directory, parquet
    # file(s), an image folder, a directory of MNIST-format IDX files, an .npz, or a latent directory
    # written by `mmdit encode`; None = the dataset's local copy if installed, else its hub id.
    source: str | None = None
    # Latent sources: how latents reach ~unit scale, "vae" (the VAE config's scaling/shift factor) or
    # "channel" (each channel's mean/std over the encoded set, as LightningDiT).
    latent_norm: LatentNorm = "vae"
    # Latent sources: the VAE directory that decodes samples, when it is no longer where the latent
    # manifest says (it must be the same VAE: checked by its weights' hash). None = the manifest's.
    vae: str | None = None
    # A caption directory written by `mmdit encode-text` for this dataset and source: every batch
    # then carries one caption's embeddings per example (text-to-image training). None = no text.
    captions: str | None = None
    # Overrides the spec's target image size (e.g. 32 for MNIST to fit a patch size of 4 or 8).
    image_size: int | None = None
    # Random horizontal flips of training images; only where the dataset allows it (never digits).
    flip: bool = True
    # Fraction held out for evaluation when the source has no test split.
    eval_fraction: float = 0.05
    # Train on only the first N examples (fast end-to-end tests, overfitting checks).
    max_examples: int | None = None
    # Worker processes that prepare batches; 0 = in the training process (best on 2 cores).
    num_workers: int = 0
    # An image that cannot be decoded is skipped with a warning naming it; strict makes it an error.
    strict: bool = False

    def __post_init__(self) -> None:
        get_spec(self.name)  # raises for unknown names, listing the valid ones
        if self.image_size is not None and self.image_size <= 0:
            raise UserError(f"data.image_size must be positive, got {self.image_size}.")
        if self.latent_norm not in ("vae", "channel"):
            raise UserError(f"data.latent_norm must be 'vae' or 'channel', got {self.latent_norm!r}.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        if self.max_examples is not None and self.max_examples <= 0:
            raise UserError(f"data.max_examples must be positive, got {self.max_examples}.")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {self.num_workers}.")
        if self.captions is not None and not self.captions.strip():
            raise UserError("data.captions must be a caption directory, not an empty string.")
        if self.source is not None and not self.source.strip():
            raise UserError("data.source must be a hub id or a path, not an empty string.")
