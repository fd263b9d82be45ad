"""FID Inception-v3 (jax_mmdit.eval.inception) against torch-fidelity 0.4.0, on random weights saved as a
.pth under the real key names: features, both resizes, the loaders and the sharded batched extractor."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from reference_impls import torch_fidelity_module

from jax_mmdit.errors import UserError
from jax_mmdit.eval.inception import (
    FEATURE_DIMS,
    InceptionFeatures,
    inception_from_state_dict,
    load_inception,
    random_inception_state_dict,
    resize_bilinear,
    resize_matrix,
    save_inception_npz,
)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(ref).max())


def images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return random_inception_state_dict(0)


@pytest.fixture(scope="module")
def weights_pth(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    sd = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # as in real BatchNorm state dicts
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def model(weights_pth):
    return load_inception(weights_pth)


@pytest.fixture(scope="module")
def torch_fidelity_inception(weights_pth):
    module = torch_fidelity_module("feature_extractor_inceptionv3")
    features = ["2048", "logits_unbiased", "logits"]
    return module.FeatureExtractorInceptionV3(
        "inception-v3-compat", features, feature_extractor_weights_path=weights_pth
    )


@pytest.mark.parametrize("hw", [(32, 32), (40, 24)])
def test_features_match_torch_fidelity(model, torch_fidelity_inception, hw):
    x = images(2, *hw)
    captured = {}
    hook = torch_fidelity_inception.Mixed_6d.register_forward_hook(lambda m, i, o: captured.update(m6d=o))
    try:
        with torch.no_grad():
            ref = torch_fidelity_inception(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    finally:
        hook.remove()
    ours = InceptionFeatures(model, batch_size=2)(x)
    errs = {k: rel_err(ours[k], r.numpy()) for k, r in zip(["pool", "logits_unbiased", "logits"], ref)}
    print(f"{hw}: max |ours - torch-fidelity| / max |ref|: {errs}")
    assert all(e < 1e-4 for e in errs.values()), errs
    assert ref[0].numpy().std() > 0.1  # random weights keep activations alive, so the comparison means something
    # sFID: ADM's mixed_6/conv = Mixed_6d.branch1x1 = Mixed_6d[:, :7], flattened (h, w, c) as TF's NHWC
    spatial_ref = captured["m6d"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    assert rel_err(ours["spatial"], spatial_ref) < 1e-4
    assert {k: v.shape for k, v in ours.items()} == {k: (2, d) for k, d in FEATURE_DIMS.items()}
    assert all(v.dtype == np.float32 for v in ours.values())


RESIZES = [((32, 24), (299, 299)), ((320, 333), (299, 299)), ((40, 24), (17, 50))]


@pytest.mark.parametrize("in_hw, out_hw", RESIZES)
def test_tf1_resize_matches_torch_fidelity(in_hw, out_hw):
    tf1 = torch_fidelity_module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    x = np.random.default_rng(1).uniform(0, 255, (2, *in_hw, 3)).astype(np.float32)
    ref = tf1(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, align_corners=False).permute(0, 2, 3, 1)
    ours = resize_bilinear(jnp.asarray(x), out_hw, "tf1")
    assert ours.shape == (2, *out_hw, 3)
    assert rel_err(ours, ref.numpy()) <= 1e-5
    # the weights themselves are bit-exact: resizing an identity image along H yields them
    eye = torch.eye(in_hw[0])[None, None]
    weights = tf1(eye, size=(out_hw[0], in_hw[0]), align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(resize_matrix(in_hw[0], out_hw[0], "tf1"), weights)


@pytest.mark.parametrize("in_hw, out_hw", RESIZES)
def test_pytorch_resize_matches_interpolate(in_hw, out_hw):
    x = np.random.default_rng(2).uniform(0, 1, (2, *in_hw, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False)
    ours = resize_bilinear(jnp.asarray(x), out_hw, "pytorch")
    assert rel_err(ours, ref.permute(0, 2, 3, 1).numpy()) <= 1e-5
    eye = torch.eye(in_hw[0])[None, None]
    weights = F.interpolate(eye, size=(out_hw[0], in_hw[0]), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(resize_matrix(in_hw[0], out_hw[0], "pytorch"), weights)
    # the two conventions really differ (half-pixel centres or not), so each test pins its own
    assert rel_err(resize_bilinear(jnp.asarray(x), out_hw, "tf1"), ref.permute(0, 2, 3, 1).numpy()) > 1e-3


def test_preprocess_scales_as_each_reference(model, state_dict):
    x = images(2, 40, 24)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    tf1 = torch_fidelity_module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    ref_tf1 = (tf1(xt, size=(299, 299), align_corners=False) - 128) / 128
    assert rel_err(model.preprocess(x), ref_tf1.permute(0, 2, 3, 1).numpy()) <= 1e-5
    pytorch_model = inception_from_state_dict(state_dict, resize="pytorch")
    ref_pt = F.interpolate(xt / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1  # pytorch-fid
    assert rel_err(pytorch_model.preprocess(x), ref_pt.permute(0, 2, 3, 1).numpy()) <= 1e-5
    # grayscale is the same image in all three channels
    gray = x[..., :1]
    np.testing.assert_array_equal(model.preprocess(gray), model.preprocess(np.repeat(gray, 3, axis=-1)))
    with pytest.raises(UserError, match="C 1 or 3"):
        model.preprocess(images(1, 8, 8, c=4))


def test_loaders_agree(model, state_dict, weights_pth, tmp_path):
    from safetensors.numpy import save_file

    npz, st = tmp_path / "inception.npz", tmp_path / "inception.safetensors"
    save_inception_npz(weights_pth, npz)
    save_file(state_dict, str(st))
    ref_leaves = jax.tree.leaves(nnx.state(model))
    for path in (npz, st):
        leaves = jax.tree.leaves(nnx.state(load_inception(path)))
        assert len(leaves) == len(ref_leaves) == 5 * 94 + 2
        assert all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves)), path
    x = images(2, 32, 32, seed=3)
    a, b = InceptionFeatures(model, batch_size=2)(x), InceptionFeatures(load_inception(npz), batch_size=2)(x)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loader_names_missing_extra_and_misshapen_keys(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "Mixed_6e.branch7x7_2.bn.running_var"}
    with pytest.raises(UserError, match=r"missing \(1\).*Mixed_6e\.branch7x7_2\.bn\.running_var"):
        inception_from_state_dict(missing)
    extra = {**state_dict, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}
    with pytest.raises(UserError, match=r"unexpected \(1\).*AuxLogits\.fc\.weight"):
        inception_from_state_dict(extra)
    misshapen = {**state_dict, "fc.bias": np.zeros(1000, np.float32)}
    with pytest.raises(UserError, match=r"wrong shape.*fc\.bias"):
        inception_from_state_dict(misshapen)


def test_loader_errors_say_what_to_do(tmp_path, weights_pth, monkeypatch):
    with pytest.raises(UserError, match="pt_inception-2015-12-05") as e:
        load_inception(tmp_path / "nope.pth")
    assert "torch-fidelity/releases" in str(e.value)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match=r"jax-mmdit\[convert\]"):
        load_inception(weights_pth)


def test_sharded_batched_extraction(model):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    x = images(5, 32, 32, seed=4)
    sharded = InceptionFeatures(model, batch_size=8, mesh=mesh, batch_axes=("data",))
    out = sharded(x)
    ref = InceptionFeatures(model, batch_size=5)(x)  # one unsharded call, no padding
    for k in FEATURE_DIMS:
        assert out[k].shape == (5, FEATURE_DIMS[k])
        assert rel_err(out[k], ref[k]) <= 1e-5, k
    assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded.state))
    # chunks of 2 with the last one padded give the same rows
    chunked = InceptionFeatures(model, batch_size=2)(x)
    assert all(rel_err(chunked[k], ref[k]) <= 1e-5 for k in ref)
    # grayscale goes in as the image replicated to 3 channels (the same compiled shape)
    gray = x[..., :1]
    g, rgb = sharded(gray), sharded(np.repeat(gray, 3, axis=-1))
    assert all(np.array_equal(g[k], rgb[k]) for k in g)
    assert not np.allclose(g["pool"], out["pool"])
    assert sharded(x[:0])["pool"].shape == (0, 2048)
    # batch sizes round up to a multiple of the shards; by default the batch goes over every mesh axis
    assert InceptionFeatures(model, batch_size=6, mesh=mesh).batch_size == 8
    mesh_2d = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharded_2d = InceptionFeatures(model, batch_size=4, mesh=mesh_2d)
    assert sharded_2d.batch_size == 8 and sharded_2d.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
