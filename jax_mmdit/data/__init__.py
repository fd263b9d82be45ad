"""Datasets and the Grain input pipeline.

    ds = build_dataset(DataConfig(name="fashion_mnist"), split="train")   # or "eval"
    ds.info             # DatasetInfo: name, num_examples, image_shape (H, W, C), num_classes, ...
    with ds.iterator(global_batch_size=128, seed=0, process_index=0, process_count=1) as it:
        batch = next(it)  # {"image": float32[B_local, H, W, C] in [-1, 1] (latents: scaled), "label": int32[B_local]}
        state = it.get_state()   # a small JSON-able dict; it.set_state(state) resumes exactly here

- Process p reads rows [p*B_local, (p+1)*B_local) of global batch s; the global batch at step s
  (flips included) is the same for any process count, so a state restores across process counts.
- Batches never span epochs; each epoch is reshuffled (seed + epoch); the last partial global batch
  is dropped. Flips only on the train split of datasets whose spec allows them.
- Sources (`DataConfig.source`): a hub id, a save_to_disk directory, parquet file(s), an image
  folder (one sub-folder per class), MNIST-format IDX files, or an .npz; with none, the dataset's
  local copy, else its hub id. Neither reachable: `DatasetUnavailableError` naming the alternatives.
"""

from jax_mmdit.data.config import DataConfig
from jax_mmdit.data.pipeline import BatchIterator, DatasetInfo, ImageDataset, build_dataset
from jax_mmdit.data.registry import DATASETS, DatasetSpec, get_spec
from jax_mmdit.data.sources import DatasetUnavailableError

__all__ = [
    "DATASETS",
    "BatchIterator",
    "DataConfig",
    "DatasetInfo",
    "DatasetSpec",
    "DatasetUnavailableError",
    "ImageDataset",
    "build_dataset",
    "get_spec",
]
