"""The datasets jax-mmdit knows by name. Adding a dataset is adding one `DatasetSpec` to `DATASETS`."""

from __future__ import annotations

from dataclasses import dataclass

from jax_mmdit.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its images become model inputs."""

    name: str
    # Hugging Face hub id; None where no public copy exists: then a local source must be given.
    hub_id: str | None
    # Number of classes; 0 = unconditional (labels are then all 0).
    num_classes: int
    # Square side length the model sees; images are resized + center-cropped to it.
    image_size: int
    # 1 = grayscale, 3 = RGB.
    channels: int
    # Column names in the hub / save_to_disk / parquet copies (imagefolder always uses image/label).
    image_column: str = "image"
    # None = the dataset has no labels (unconditional).
    label_column: str | None = "label"
    # Human-readable class names: the captions under sample grids (`mmdit train`, `mmdit sample`);
    # None where the source's ClassLabel names (if any) are good enough.
    class_names: tuple[str, ...] | None = None
    # (H, W, C) as stored, None if it varies per image; documents the data and validates arrays.
    native_shape: tuple[int, int, int] | None = None
    # Mirroring must not change what an image shows: fine for clothes, wrong for digits.
    flip: bool = True
    # Split used for evaluation; None (or missing in the source) = hold out DataConfig.eval_fraction.
    eval_split: str | None = "test"
    train_split: str = "train"
    # Local copies tried before the hub, in order (e.g. Debian's dataset-fashion-mnist package).
    local_paths: tuple[str, ...] = ()
    # True: decode every image once into a uint8 array (small datasets: fastest batches);
    # False: keep the Arrow table and decode per batch (datasets too big for memory).
    in_memory: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise UserError(f"Dataset {self.name!r}: num_classes must be >= 0, got {self.num_classes}.")
        if self.image_size <= 0:
            raise UserError(f"Dataset {self.name!r}: image_size must be positive, got {self.image_size}.")
        if self.channels not in (1, 3):
            raise UserError(f"Dataset {self.name!r}: image channels must be 1 or 3, got {self.channels}.")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise UserError(
                f"Dataset {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes."
            )
        if self.num_classes > 0 and self.label_column is None:
            raise UserError(f"Dataset {self.name!r}: num_classes > 0 needs a label_column.")


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            hub_id="ylecun/mnist",
            num_classes=10,
            image_size=28,
            channels=1,
            class_names=tuple(str(d) for d in range(10)),
            native_shape=(28, 28, 1),
            flip=False,
        ),
        DatasetSpec(
            name="fashion_mnist",
            hub_id="zalando-datasets/fashion_mnist",
            num_classes=10,
            image_size=28,
            channels=1,
            class_names=FASHION_MNIST_CLASSES,
            native_shape=(28, 28, 1),
            local_paths=("/usr/share/datasets/fashion-mnist",),
        ),
        DatasetSpec(
            name="cifar10",
            hub_id="uoft-cs/cifar10",
            num_classes=10,
            image_size=32,
            channels=3,
            image_column="img",
            class_names=CIFAR10_CLASSES,
            native_shape=(32, 32, 3),
        ),
        DatasetSpec(
            name="flowers",
            hub_id="nelorth/oxford-flowers",
            num_classes=102,
            image_size=64,
            channels=3,
            in_memory=False,
        ),
        DatasetSpec(
            # 1000 images, no class labels and no test split.
            name="butterflies",
            hub_id="huggan/smithsonian_butterflies_subset",
            num_classes=0,
            image_size=64,
            channels=3,
            label_column=None,
            eval_split=None,
            in_memory=False,
        ),
        DatasetSpec(
            # ILSVRC-2012 from a local copy: the train folder with one sub-folder per synset (an image
            # folder), the hub copy is gated. Latent diffusion encodes it first (`mmdit encode`).
            name="imagenet",
            hub_id="ILSVRC/imagenet-1k",
            num_classes=1000,
            image_size=256,
            channels=3,
            eval_split="validation",
            in_memory=False,
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under `name`; unknown names fail with the list of valid ones."""
    if name not in DATASETS:
        raise UserError(f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]
