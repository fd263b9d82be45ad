"""DataConfig: which dataset, from where, and how the input pipeline runs."""

from __future__ import annotations

from dataclasses import dataclass

from jax_mmdit.data.registry import get_spec
from jax_mmdit.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    """Dataset choice and input-pipeline knobs (the `--data.*` CLI flags)."""

    # A name in jax_mmdit.data.DATASETS.
    name: str = "fashion_mnist"
    # Overrides where the data comes from: a hub id, or a path to a save_to_disk directory, parquet
    # file(s), an image folder, a directory of MNIST-format IDX files, or an .npz; None = the
    # dataset's local copy if installed, else its hub id.
    source: str | None = None
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
        spec = get_spec(self.name)  # raises for unknown names, listing the valid ones
        if self.image_size is not None and self.image_size <= 0:
            raise UserError(f"data.image_size must be positive, got {self.image_size}.")
        if self.image_size is not None and spec.is_latent and self.image_size != spec.image_size:
            raise UserError(f"data.image_size cannot resize the precomputed latents of {self.name!r}.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        if self.max_examples is not None and self.max_examples <= 0:
            raise UserError(f"data.max_examples must be positive, got {self.max_examples}.")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {self.num_workers}.")
        if self.source is not None and not self.source.strip():
            raise UserError("data.source must be a hub id or a path, not an empty string.")
