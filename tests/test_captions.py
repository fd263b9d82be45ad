"""Text-to-image data: caption sources (templates, a text column, image-folder sidecars), `mmdit
encode-text` (embeddings equal the encoders' outputs, one record per unique caption, the empty prompt
first), batches that carry one of each example's own captions, caption dropout, and a tiny
text-to-image run end to end (train on real Fashion-MNIST with templated captions, sample a prompt)."""

import json
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_text import save_encoders

from jax_mmdit.data import DataConfig, build_dataset
from jax_mmdit.data import captions as cap
from jax_mmdit.errors import UserError
from jax_mmdit.flow import FlowConfig
from jax_mmdit.flow.rectified_flow import STREAM_LABEL_DROP, drop_condition, make_loss_fn
from jax_mmdit.text.encode import cmd_encode_text
from jax_mmdit.text.encoders import TextEncoder, TextEncoderConfig

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return save_encoders(tmp_path_factory.mktemp("enc"))


def test_templates_name_every_class_with_the_right_article(tmp_path):
    got = cap.template_captions(("a photo of a {class}", "a {class}"), ("Sandal", "Ankle boot"))
    assert got == [["a photo of a sandal", "a sandal"], ["a photo of an ankle boot", "an ankle boot"]]
    (tmp_path / "t.txt").write_text("a drawing of a {class}\n\n  a {class} again \n")
    assert cap.read_templates(str(tmp_path / "t.txt")) == ("a drawing of a {class}", "a {class} again")
    with pytest.raises(UserError, match="no {class}"):
        cap.template_captions(("a photo",), ("Sandal",))


def test_templated_caption_directory(fm_captions):
    m = cap.read_text_manifest(fm_captions)
    table = cap.CaptionTable(fm_captions)
    texts = table.texts()
    assert texts[0] == "" and m["empty_caption"] == 0 and len(texts) == len(set(texts)) == 1 + 10 * 5
    assert m["splits"]["train"]["rows"] == 60000 and m["splits"]["test"]["rows"] == 10000
    assert m["class_prompts"][5] == "a photo of a sandal"
    # Every example's captions are its class's five (labels from the IDX file itself).
    from jax_mmdit.data.sources import _read_idx

    labels = _read_idx(str(FASHION / "train-labels-idx1-ubyte.gz"))
    idx = table.index("train")
    for i in (0, 1, 59999):
        mine = [texts[j] for j in idx.ids[idx.offsets[i] : idx.offsets[i + 1]]]
        assert len(mine) == 5 and all(t.endswith(m["class_prompts"][labels[i]].split(" of ")[-1]) for t in mine)
    # The stored embeddings are the stand-in encoder's outputs, the empty prompt's included.
    enc = TextEncoder(TextEncoderConfig(**m["encoder"]["encoder"]))
    want = enc.encode([texts[0], texts[7]])
    got = table.gather(np.array([0, 7]))
    np.testing.assert_allclose(got["context_BxTxE"], want.tokens_BxTxE, atol=1e-6)
    np.testing.assert_array_equal(got["context_mask_BxT"], want.mask_BxT)
    np.testing.assert_allclose(got["pooled_BxP"], want.pooled_BxP, atol=1e-6)
    assert not got["context_mask_BxT"][0, 2:].any()  # "": just <bos> <eos>


def _folder(root: Path, captions: dict[str, object], sidecar: str) -> Path:
    rng = np.random.default_rng(0)
    for name, c in captions.items():
        (root / "all").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), np.uint8)).save(root / "all" / f"{name}.png")
        if c is None:
            continue
        if sidecar == "txt":
            (root / "all" / f"{name}.txt").write_text("\n".join(c) if isinstance(c, list) else c)
        else:
            (root / "all" / f"{name}.json").write_text(json.dumps(c))
    return root


def test_sidecar_captions_encoded_in_sd3_layout(tmp_path, encoders):
    folder = _folder(tmp_path / "imgs", {"a": ["a sandal", "a black-and-white sandal"], "b": "a bag"}, "txt")
    out = tmp_path / "cap"
    args = ["--dataset", "butterflies", "--source", str(folder), "--out", str(out), "--dtype", "float32",
            "--clip", str(encoders["clip_l"]), "--clip", str(encoders["clip_g"]), "--t5", str(encoders["t5"]),
            "--clip_max_length", "8", "--t5_max_length", "6", "--batch_size", "2"]  # fmt: skip
    assert cmd_encode_text(args) == 0
    table = cap.CaptionTable(out)
    texts = table.texts()
    assert sorted(texts) == ["", "a bag", "a black-and-white sandal", "a sandal"]
    idx = table.index("train")
    per_image = sorted(sorted(texts[j] for j in idx.ids[idx.offsets[i] : idx.offsets[i + 1]]) for i in range(2))
    assert per_image == [["a bag"], ["a black-and-white sandal", "a sandal"]]
    # SD3's layout: (8 CLIP + 6 T5 tokens, T5 width), pooled = both CLIPs' projections.
    enc = TextEncoder(TextEncoderConfig(clip=(str(encoders["clip_l"]), str(encoders["clip_g"])),
                                        t5=str(encoders["t5"]), clip_max_length=8, t5_max_length=6))  # fmt: skip
    want = enc.encode(texts)
    got = table.gather(np.arange(len(texts)))
    assert got["context_BxTxE"].shape == (4, 14, 96) and got["pooled_BxP"].shape == (4, 24 + 40)
    np.testing.assert_allclose(got["context_BxTxE"], want.tokens_BxTxE, atol=1e-5)
    np.testing.assert_array_equal(got["context_mask_BxT"], want.mask_BxT)
    # A finished directory is left as it is; a rerun says so.
    assert cmd_encode_text(args) == 0 and cap.CaptionTable(out).texts() == texts


def test_json_sidecars_a_text_column_and_their_errors(tmp_path, encoders):
    from jax_mmdit.data.registry import get_spec
    from jax_mmdit.text.encode import read_captions

    spec = get_spec("butterflies")
    folder = _folder(tmp_path / "j", {"a": {"captions": ["x one", "x two"]}, "b": {"caption": "y"}}, "json")
    got, _, origin = read_captions(spec, str(folder), None, None)
    assert origin == "sidecar" and sorted(got["train"]) == [["x one", "x two"], ["y"]]
    missing = _folder(tmp_path / "m", {"a": "x", "b": None}, "txt")
    with pytest.raises(UserError, match="no caption sidecar"):
        read_captions(spec, str(missing), None, None)
    # A save_to_disk dataset with a text column: a string or a list of strings per row.
    image = Image.fromarray(np.zeros((8, 8), np.uint8))
    ds = datasets.Dataset.from_dict({"image": [image, image], "text": ["p", "r"], "texts": [["p", "q"], ["r"]]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "disk"))
    got, _, origin = read_captions(spec, str(tmp_path / "disk"), None, "text")
    assert origin == "column:text" and got["train"] == [["p"], ["r"]]
    assert read_captions(spec, str(tmp_path / "disk"), None, "texts")[0]["train"] == [["p", "q"], ["r"]]
    with pytest.raises(UserError, match="no column 'caption'"):
        read_captions(spec, str(tmp_path / "disk"), None, "caption")
    with pytest.raises(UserError, match="holds no captions"):
        read_captions(get_spec("fashion_mnist"), str(FASHION), None, "text")
    with pytest.raises(UserError, match="not empty and not a caption directory"):
        cmd_encode_text(["--dataset", "butterflies", "--source", str(folder), "--out", str(folder), "--standin"])


def test_index_select_and_draw():
    idx = cap.CaptionIndex.from_lists([[1, 2], [3], [4, 5, 6]])
    sub = idx.select(np.array([2, 0]))
    assert sub.ids.tolist() == [4, 5, 6, 1, 2] and sub.offsets.tolist() == [0, 3, 5]
    u = np.array([0.0, 0.34, 0.99])
    assert idx.draw(np.array([2, 2, 2]), u).tolist() == [4, 5, 6]
    assert idx.draw(np.array([1, 0]), np.array([0.99, 0.5])).tolist() == [3, 2]


def test_batches_carry_one_of_each_examples_own_captions(fm_captions):
    cfg = DataConfig(name="fashion_mnist", captions=str(fm_captions), max_examples=512)
    data = build_dataset(cfg, "train")
    table = data.table
    texts = table.texts()
    class_prompts = cap.read_text_manifest(fm_captions)["class_prompts"]
    it = data.iterator(64, seed=3)
    seen = set()
    for _ in range(3):
        batch = next(it)
        assert set(batch) == {"image", "label", *cap.TEXT_KEYS}
        # Which caption each row got: its embedding matches exactly one record.
        everything = table.gather(np.arange(len(texts)))["context_BxTxE"]
        for tokens, y in zip(batch["context_BxTxE"], batch["label"]):
            (match,) = np.flatnonzero(np.abs(everything - tokens).max(axis=(1, 2)) == 0)
            assert texts[match].endswith(class_prompts[y].split(" of ")[-1])
            seen.add(texts[match])
    assert len(seen) > 20  # several phrasings of each class are drawn
    # The caption draw is part of the step: a restored iterator gives the same batch.
    state = it.get_state()
    want = next(it)
    it.set_state(state)
    got = next(it)
    np.testing.assert_array_equal(got["context_BxTxE"], want["context_BxTxE"])
    other = build_dataset(DataConfig(name="fashion_mnist", max_examples=512), "train")
    assert other.fingerprint() != data.fingerprint()  # other captions are other data
    with pytest.raises(UserError, match="encoded for 'fashion_mnist'"):
        build_dataset(DataConfig(name="mnist", source=str(FASHION), captions=str(fm_captions)), "train")


def test_caption_dropout_trains_the_empty_prompt():
    k = jax.random.key(0)
    cond = {"context_BxTxE": jnp.ones((64, 3, 2)), "context_mask_BxT": jnp.ones((64, 3), bool),
            "pooled_BxP": jnp.ones((64, 5))}  # fmt: skip
    null = {"context_BxTxE": jnp.zeros((1, 3, 2)), "context_mask_BxT": jnp.zeros((1, 3), bool),
            "pooled_BxP": jnp.zeros((1, 5))}  # fmt: skip
    assert drop_condition(k, cond, 0.0, null) is cond
    all_null = drop_condition(k, cond, 1.0, null)
    assert not any(bool(v.any()) for v in all_null.values())
    half = drop_condition(k, cond, 0.5, null)
    dropped = ~half["context_mask_BxT"].any(1)
    assert 10 < int(dropped.sum()) < 54
    for v in half.values():  # a dropped sample loses all of its condition at once
        assert bool((v.reshape(64, -1).any(1) == ~dropped).all())
    # In the loss: dropout on its own stream, to the empty prompt's condition.
    seen = []

    def model(x, t, context_BxTxE, context_mask_BxT, pooled_BxP):
        seen.append(pooled_BxP)
        return jnp.zeros_like(x) + pooled_BxP.sum(-1)[:, None, None, None]

    x = jnp.ones((64, 2, 2, 1))
    loss, _ = make_loss_fn(FlowConfig(label_dropout=0.5), null_class=0, null_cond=null)(model, x, cond, k)
    expected = drop_condition(jax.random.fold_in(k, STREAM_LABEL_DROP), cond, 0.5, null)
    loss_by_hand, _ = make_loss_fn(FlowConfig(label_dropout=0.0), null_class=0)(model, x, expected, k)
    assert 10 < int((~seen[0].any(-1)).sum()) < 54 and float(loss) == float(loss_by_hand)


def test_tiny_text_to_image_run_end_to_end(fm_captions, tmp_path):
    """Train a tiny MMDiT on captioned Fashion-MNIST, then sample it from prompts."""
    import dataclasses

    from jax_mmdit.config import get_config
    from jax_mmdit.train.trainer import Trainer

    base = get_config("tiny")
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, arch="mmdit", num_classes=0),
                              data=dataclasses.replace(base.data, captions=str(fm_captions)),
                              run_dir=str(tmp_path / "run"), max_steps=4, eval_save_steps=4,
                              sample_every_n=4)  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.model_cfg.context_dim == 64 and trainer.model_cfg.pooled_dim == 64  # from the manifest
    trainer.train()
    run = tmp_path / "run"
    info = json.loads((run / "text_encoder.json").read_text())
    assert info["captions"] == str(Path(fm_captions).resolve()) and info["class_prompts"][5] == "a photo of a sandal"
    assert (run / "samples" / "step_0000004.png").is_file()
    loaded = Trainer.load(str(run))
    x = loaded.sample_prompts(["a photo of a sandal", "a bag", "a photo of a dress"], seed=1)
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8
    # A known prompt comes from the caption table; a new one is encoded: the same embedding.
    known = loaded.prompts(["a photo of a sandal"])[0]["context_BxTxE"]
    fresh = loaded.prompts(["a photo of a sandal", "a photo of sandal"])[0]["context_BxTxE"][:1]
    np.testing.assert_allclose(known, fresh, atol=1e-5)
    # Class metrics sample each class's prompt: labels 5 and 8 are two different prompts.
    by_class = loaded.sample_images(np.array([5, 8]), seed=0, batch_size=2)
    same = loaded.sample_images(np.array([5, 5]), seed=0, batch_size=2)
    assert not np.array_equal(by_class[1], same[1]) and np.array_equal(by_class[0], same[0])
    assert loaded.label_classes == 10
    with pytest.raises(UserError, match="model.num_classes 0"):
        Trainer(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=10)))
    with pytest.raises(UserError, match="text-conditioned"):  # a text model on data without captions
        Trainer(dataclasses.replace(cfg, data=base.data, model=dataclasses.replace(cfg.model, context_dim=64)))
