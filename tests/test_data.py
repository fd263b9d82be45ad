"""jax_mmdit.data: sources round-trip, the Grain pipeline is seeded, sharded, resumable."""

import gzip
import json
import os
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from jax_mmdit.data import DATASETS, DataConfig, DatasetUnavailableError, build_dataset
from jax_mmdit.data.sources import detect_source, fit_image
from jax_mmdit.errors import UserError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    # load_dataset("parquet"/"imagefolder") converts to Arrow in the HF cache; keep that out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_idx(directory, prefix, images, labels):
    """MNIST-format files written by hand, so the parser is checked against the format, not itself."""
    os.makedirs(directory, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
        with gzip.open(os.path.join(directory, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())


def index_images(n):
    """28x28 images whose constant value is their index: a batch then tells which records it holds."""
    return np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)


def decode_index(batch):
    return np.rint((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)


@pytest.fixture
def index_source(tmp_path):
    """IDX dir: 22 train records (22 % 4 != 0, to exercise the dropped remainder), 6 test records."""
    n = 22
    write_idx(tmp_path / "idx", "train", index_images(n), np.arange(n) % 10)
    write_idx(tmp_path / "idx", "t10k", index_images(6), np.arange(6))
    return str(tmp_path / "idx")


def epoch_indices(ds, seed, steps, **kw):
    it = ds.iterator(4, seed=seed, **kw)
    out = [decode_index(next(it)) for _ in range(steps)]
    it.close()
    return out


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_loads():
    train = build_dataset(DataConfig(name="fashion_mnist"), "train")
    test = build_dataset(DataConfig(name="fashion_mnist"), "eval")
    assert train.info.num_examples == 60000 and test.info.num_examples == 10000
    assert train.info.image_shape == (28, 28, 1) and train.info.num_classes == 10
    assert train.info.class_names[0] == "T-shirt/top"
    batch = next(train.iterator(256, seed=0))
    assert batch["image"].shape == (256, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert len(set(batch["label"])) > 5


def make_pairs(n, rng):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    return images, labels


def as_set(images, labels):
    return sorted((int(y), im.tobytes()) for im, y in zip(images, labels))


def read_all(cfg, split):
    ds = build_dataset(cfg, split)
    batch = next(ds.iterator(ds.info.num_examples, seed=0, shuffle=False, repeat=False))
    pixels = np.rint((batch["image"][..., 0] + 1) * 127.5).astype(np.uint8)
    return as_set(pixels, batch["label"])


def hf_dict(images, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = {"image": [Image.fromarray(im) for im in images], "label": labels.tolist()}
    return datasets.Dataset.from_dict(data, features=features)


@pytest.mark.parametrize("form", ["idx", "disk", "parquet", "parquet_file", "imagefolder", "npz"])
def test_source_round_trips(form, tmp_path):
    rng = np.random.default_rng(0)
    train, test = make_pairs(12, rng), make_pairs(5, rng)
    path = tmp_path / form
    if form == "idx":
        write_idx(path, "train", *train)
        write_idx(path, "t10k", *test)
    elif form == "disk":
        datasets.DatasetDict(train=hf_dict(*train), test=hf_dict(*test)).save_to_disk(str(path))
    elif form == "parquet":
        os.makedirs(path)
        hf_dict(*train).to_parquet(str(path / "train-00000-of-00001.parquet"))
        hf_dict(*test).to_parquet(str(path / "test-00000-of-00001.parquet"))
    elif form == "parquet_file":
        hf_dict(*train).to_parquet(str(tmp_path / "train.parquet"))
        path = tmp_path / "train.parquet"
    elif form == "imagefolder":
        for split, (images, labels) in (("train", train), ("test", test)):
            for i, (im, y) in enumerate(zip(images, labels)):
                os.makedirs(path / split / str(y), exist_ok=True)
                Image.fromarray(im).save(path / split / str(y) / f"{i}.png")
        # imagefolder names classes by folder, sorted: only labels that occur exist.
        present = sorted(set(train[1]) | set(test[1]))
        remap = {old: new for new, old in enumerate(sorted(str(c) for c in present))}
        train = (train[0], np.array([remap[str(y)] for y in train[1]]))
        test = (test[0], np.array([remap[str(y)] for y in test[1]]))
    else:
        path = tmp_path / "data.npz"
        np.savez(path, images=train[0], labels=train[1])
    expected_kind = {"parquet_file": "parquet"}.get(form, form)
    assert detect_source(str(path)) == expected_kind
    cfg = DataConfig(name="fashion_mnist", source=str(path), flip=False)
    if form in ("parquet_file", "npz"):  # one split: train and eval are a held-out partition
        got = read_all(cfg, "train") + read_all(cfg, "eval")
        assert sorted(got) == as_set(*train)
        assert len(read_all(cfg, "eval")) == 1  # 5% of 12, at least one
    else:
        assert read_all(cfg, "train") == as_set(*train)
        assert read_all(cfg, "eval") == as_set(*test)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown dataset 'nope'") as err:
        DataConfig(name="nope")
    for name in DATASETS:
        assert name in str(err.value)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="max_examples"):
        DataConfig(max_examples=0)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset(DataConfig(source="/no/such/dir"), "train")


def test_missing_hub_offline_fails_fast_naming_alternatives():
    assert datasets.config.HF_DATASETS_OFFLINE  # set by conftest
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as err:
        build_dataset(DataConfig(name="flowers", source="no-such-org/no-such-dataset"), "train")
    assert time.perf_counter() - start < 5
    assert "dataset-fashion-mnist" in str(err.value) and "--data.source" in str(err.value)
    with pytest.raises(DatasetUnavailableError, match="latent directory written by `mmdit encode`"):
        build_dataset(DataConfig(name="imagenet"), "train")


def test_shuffle_is_seeded_permutation_reshuffled_per_epoch(index_source):
    ds = build_dataset(DataConfig(source=index_source), "train")
    assert ds.steps_per_epoch(4) == 5  # 22 // 4: the partial batch is dropped
    batches = epoch_indices(ds, seed=1, steps=15)
    epochs = [np.concatenate(batches[e * 5 : (e + 1) * 5]) for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 20 and set(epoch) <= set(range(22))  # no repeats within an epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert np.array_equal(np.concatenate(epoch_indices(ds, seed=1, steps=15)), np.concatenate(batches))
    assert not np.array_equal(np.concatenate(epoch_indices(ds, seed=2, steps=5)), epochs[0])
    ordered = np.concatenate(epoch_indices(ds, seed=1, steps=5, shuffle=False))
    assert np.array_equal(ordered, np.arange(20))
    finite = ds.iterator(4, seed=1, repeat=False)
    assert len(list(finite)) == 5


def test_process_shards_are_disjoint_and_cover_global_batch(index_source):
    ds = build_dataset(DataConfig(source=index_source), "train")
    single = epoch_indices(ds, seed=3, steps=7)
    shards = [ds.iterator(4, seed=3, process_index=p, process_count=2) for p in range(2)]
    for step in range(7):
        halves = [next(it) for it in shards]
        a, b = (decode_index(h) for h in halves)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert np.array_equal(np.concatenate([a, b]), single[step])
    with pytest.raises(ValueError, match="split evenly"):
        ds.iterator(5, seed=0, process_count=2)
    with pytest.raises(ValueError, match="larger than"):
        ds.iterator(64, seed=0)


def test_restore_from_state_yields_identical_batches(index_source):
    ds = build_dataset(DataConfig(source=index_source), "train")
    it = ds.iterator(4, seed=5)
    for _ in range(7):  # crosses the epoch boundary at step 5
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    restored = ds.iterator(4, seed=5)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])
    with pytest.raises(ValueError, match="seed"):
        ds.iterator(4, seed=6).set_state(state)


def test_flip_about_half_never_for_digits_or_eval(tmp_path):
    images = np.zeros((16, 28, 28), np.uint8)
    images[:, :, 0] = 255  # bright left column: a flip moves it to the right
    write_idx(tmp_path, "train", images, np.arange(16) % 10)
    write_idx(tmp_path, "t10k", images[:8], np.arange(8))

    def flipped_fraction(name, split="train", **cfg):
        ds = build_dataset(DataConfig(name=name, source=str(tmp_path), **cfg), split)
        it = ds.iterator(8, seed=0, shuffle=False)  # flips don't depend on the order; this is faster
        flips = [next(it)["image"][:, 0, -1, 0] > 0 for _ in range(50)]
        return np.mean(flips)

    assert 0.4 < flipped_fraction("fashion_mnist") < 0.6
    assert flipped_fraction("mnist") == 0.0
    assert flipped_fraction("fashion_mnist", flip=False) == 0.0
    assert flipped_fraction("fashion_mnist", split="eval") == 0.0


def test_resize_center_crops_non_square_images(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # white center square, black sides that a center crop removes
    out = fit_image(Image.fromarray(wide), 16, 3)
    assert out.shape == (16, 16, 3) and out.min() > 200  # squashing would keep black sides (0)
    gray = fit_image(Image.fromarray(wide), 8, 1)
    assert gray.shape == (8, 8, 1)

    # Big datasets (flowers) stay in Arrow and are decoded per batch.
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=102)})
    data = {"image": [Image.fromarray(r) for r in rows], "label": list(range(6))}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "flowers"))
    ds = build_dataset(DataConfig(name="flowers", source=str(tmp_path / "flowers"), image_size=24), "train")
    assert ds.info.image_shape == (24, 24, 3) and ds.info.num_examples == 5  # one held out for eval
    batch = next(ds.iterator(4, seed=0))
    assert batch["image"].shape == (4, 24, 24, 3) and -1 <= batch["image"].min() < batch["image"].max() <= 1


def test_held_out_eval_is_disjoint_and_max_examples_limits(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, images=index_images(40), labels=np.arange(40) % 10)
    cfg = DataConfig(source=str(path), eval_fraction=0.25)
    train, test = (build_dataset(cfg, s) for s in ("train", "eval"))
    assert (train.info.num_examples, test.info.num_examples) == (30, 10)
    seen = [set(decode_index(next(d.iterator(d.info.num_examples, 0, repeat=False)))) for d in (train, test)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))
    small = build_dataset(DataConfig(source=str(path), max_examples=8), "train")
    assert small.info.num_examples == 8


def test_latents_in_an_npz_point_to_mmdit_encode(tmp_path):
    np.savez(tmp_path / "latents.npz", latents=np.zeros((6, 32, 32, 4), np.float16), labels=np.arange(6))
    with pytest.raises(UserError, match="needs an array named 'images'.*`mmdit encode`"):
        build_dataset(DataConfig(name="imagenet", source=str(tmp_path / "latents.npz")), "train")


def test_two_workers_match_in_process(index_source):
    ds = build_dataset(DataConfig(source=index_source), "train")
    with ds.iterator(4, seed=9, num_workers=0) as it:
        expected = [next(it) for _ in range(6)]
    with ds.iterator(4, seed=9, num_workers=2) as it:
        for want in expected:
            got = next(it)
            assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])
