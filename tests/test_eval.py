"""Evaluation: metrics against the reference implementations, the classifier metric, evaluators
in training, `mmdit fid-stats` + `mmdit eval` end to end with a randomised Inception."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from reference_impls import pytorch_fid_score, torch_fidelity_module

from jax_mmdit.config import DataConfig, MeshConfig, get_config
from jax_mmdit.eval import commands, metrics
from jax_mmdit.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from jax_mmdit.eval.config import ClassifierEvalConfig, EvalConfig
from jax_mmdit.eval.evaluators import ClassifierEvaluator, eval_batch_size, eval_labels
from jax_mmdit.eval.inception import random_inception_state_dict
from jax_mmdit.train.trainer import Trainer

FMNIST = DataConfig(name="fashion_mnist")


def gaussian_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


# ---- metrics against pytorch-fid and torch-fidelity ---------------------------------------------
def test_frechet_distance_matches_pytorch_fid_and_is_zero_on_itself():
    ref = pytorch_fid_score().calculate_frechet_distance
    x, y = gaussian_features(400, 48, 0), gaussian_features(500, 48, 1, shift=0.3)
    sx, sy = metrics.feature_stats(x), metrics.feature_stats(y)
    want = ref(sx[0], sx[1], sy[0], sy[1])
    got = metrics.frechet_distance(*sx, *sy)
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    assert abs(metrics.frechet_distance(*sx, *sx)) < 1e-8
    # Fewer samples than dimensions: singular covariances stay finite (and >= 0 up to rounding).
    s_small = metrics.feature_stats(gaussian_features(20, 48, 2))
    assert np.isfinite(metrics.frechet_distance(*s_small, *sy)) and metrics.frechet_distance(*s_small, *sy) > 0


def test_frechet_distance_grows_with_added_noise():
    x = gaussian_features(600, 32, 0)
    s = metrics.feature_stats(x)
    rng = np.random.default_rng(5)
    fds = [metrics.frechet_distance(*metrics.feature_stats(x + sigma * rng.normal(size=x.shape)), *s)
           for sigma in (0.1, 0.3, 1.0)]  # fmt: skip
    assert fds[0] < fds[1] < fds[2] and fds[0] > 0


def test_inception_score_matches_torch_fidelity():
    isc = torch_fidelity_module("metric_isc")
    logits = np.random.default_rng(0).normal(size=(250, 30)) * 3
    want = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    mean, std = metrics.inception_score(logits, splits=10, seed=2020)
    np.testing.assert_allclose([mean, std], [want["inception_score_mean"], want["inception_score_std"]], rtol=1e-10)
    assert metrics.inception_score(np.zeros((100, 30)))[0] == pytest.approx(1.0)  # uniform predictions


def test_precision_recall_matches_torch_fidelity():
    prc = torch_fidelity_module("metric_prc")
    fake, real = gaussian_features(300, 16, 0, shift=0.5), gaussian_features(260, 16, 1)
    want = prc.calculate_precision_recall_full(torch.from_numpy(fake).float(), torch.from_numpy(real).float(), 3)
    got = metrics.precision_recall(fake, real, k=3, block=128)
    np.testing.assert_allclose(got, want, atol=1 / 300)  # at most one point on a ball's boundary flips
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)


# ---- the classifier metric ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A small classifier trained on 2048 real Fashion-MNIST images (seconds)."""
    cfg = ClassifierConfig(widths=(8, 16), feature_dim=32, epochs=4, batch_size=64, learning_rate=3e-3)
    clf = train_classifier(FMNIST, cfg, log=lambda _: None, max_examples=2048)
    return clf.save(tmp_path_factory.mktemp("clf")), clf


def test_the_classifier_learns_is_seeded_and_round_trips(classifier_dir, tmp_path):
    path, clf = classifier_dir
    assert clf.meta["test_accuracy"] > 0.7 and clf.meta["test_examples"] == 10_000
    loaded = load_classifier(path)
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), np.uint8)
    np.testing.assert_array_equal(loaded.features(x)[0], clf.features(x)[0])
    again = train_classifier(FMNIST, _cfg(clf), lambda _: None, max_examples=2048)
    np.testing.assert_array_equal(again.features(x)[1], clf.features(x)[1])


def _cfg(clf):
    return ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in clf.meta["config"].items()})


def test_real_images_score_near_the_floor_and_noise_far_from_it(classifier_dir):
    path, _ = classifier_dir
    ev = ClassifierEvaluator(ClassifierEvalConfig(path=str(path), num_samples=500), FMNIST, every=1)
    from jax_mmdit.data import build_dataset

    x, y = build_dataset(FMNIST, "train").images(500, seed=7)
    real = ev.score(x, y)
    noise = ev.score(np.random.default_rng(0).integers(0, 256, x.shape, np.uint8), y)
    assert (
        real["eval/class_accuracy"] > 0.7 and abs(real["eval/class_accuracy"] - real["eval/class_accuracy_real"]) < 0.1
    )
    assert real["eval/classifier_fd"] < 2 * real["eval/classifier_fd_real"] + 1
    # The worst class is a real class's accuracy: below the mean, and that class's own figure.
    from jax_mmdit.eval.evaluators import per_class_accuracy

    by_class = per_class_accuracy(ev.classifier, x, y)
    assert real["eval/class_accuracy_min"] == min(by_class.values()) < real["eval/class_accuracy"]
    assert len(by_class) == 10 and abs(np.mean([by_class[k] for k in y]) - real["eval/class_accuracy"]) < 1e-6
    assert noise["eval/classifier_fd"] > 10 * real["eval/classifier_fd"] and noise["eval/class_accuracy"] < 0.3


@pytest.fixture(scope="module")
def evaluated_run(classifier_dir, tmp_path_factory):
    """A tiny run trained once with the loss and classifier evaluators (20 samples)."""
    path, _ = classifier_dir
    ev = EvalConfig(evaluators=("loss", "classifier"), classifier=ClassifierEvalConfig(path=str(path), num_samples=20))
    run = tmp_path_factory.mktemp("evaluated") / "run"
    cfg = dataclasses.replace(get_config("tiny"), run_dir=str(run), mesh=MeshConfig(data=1), eval=ev,
                              sample_every_n=0)  # fmt: skip
    tr = Trainer(cfg, devices=jax.devices()[:1])
    return run, tr, tr.train()


def test_training_runs_its_evaluators_and_the_saved_run_reproduces_their_scores(evaluated_run):
    run, tr, last = evaluated_run
    assert {"eval/loss", "eval/class_accuracy", "eval/classifier_fd", "eval/class_accuracy_real"} <= set(last)
    assert 0.0 <= last["eval/class_accuracy"] <= 1.0 and last["eval/classifier_fd"] > 0
    assert last["perf/eval_classifier_s"] > 0
    # Same seed, same noise, same batches: the last step's scores come back from the checkpoint.
    again = Trainer.load(str(run), devices=jax.devices()[:1])
    ev = tr.evaluators[-1]
    assert ev.name == "classifier"
    labels = eval_labels(ev.cfg, 10)
    images = again.sample_images(labels, ev.cfg.seed, again.cfg.sampler, eval_batch_size(len(labels)))
    rescored = ev.score(images, labels)
    assert rescored["eval/class_accuracy"] == last["eval/class_accuracy"]
    assert rescored["eval/classifier_fd"] == pytest.approx(last["eval/classifier_fd"], rel=1e-6)
    # Drawn in one call or batch by batch (as `mmdit eval` resumes), the images are the same.
    imgs_one = tr.sample_images(labels, 0, batch_size=10)
    imgs_two = np.concatenate([tr.sample_images(labels[:10], 0, batch_size=10, first_batch=0),
                               tr.sample_images(labels[10:], 0, batch_size=10, first_batch=1)])  # fmt: skip
    np.testing.assert_array_equal(imgs_one, imgs_two)


def test_a_config_with_fid_but_no_inception_fails_at_construction():
    from jax_mmdit.errors import UserError

    with pytest.raises(UserError, match="eval.fid.inception is not set"):
        EvalConfig(evaluators=("loss", "fid"))
    with pytest.raises(UserError, match="unknown evaluator 'nope'"):
        EvalConfig(evaluators=("nope",))


# ---- mmdit fid-stats + mmdit eval, end to end ----------------------------------------------------
def test_mmdit_eval_with_a_randomised_inception_end_to_end_and_resumable(evaluated_run, tmp_path, capsys):
    run, _, _ = evaluated_run
    weights = tmp_path / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_inception_state_dict(0).items()}, weights)
    stats = tmp_path / "ref.npz"
    common = ["--inception", str(weights), "--inception_batch", "8"]
    assert commands.cmd_fid_stats(["--dataset", "fashion_mnist", "--split", "eval", "--num", "24", "--out",
                                   str(stats), *common]) == 0  # fmt: skip
    args = ["--run", str(run), "--metric", "fid", "--ref", str(stats), "--num", "12", "--batch", "4", "--seed", "3",
            "--samples", str(tmp_path / "s.npz"), *common]  # fmt: skip
    assert commands.cmd_eval(args) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    s = result["scores"]
    assert {"eval/fid", "eval/sfid", "eval/is", "eval/precision", "eval/recall"} <= set(s)
    assert np.isfinite(s["eval/fid"]) and s["eval/fid"] > 0 and s["eval/is"] >= 1.0
    p = result["protocol"]
    assert p["num_samples"] == 12 and p["seed"] == 3 and p["checkpoint_step"] == 6 and p["sampler"]["num_steps"] == 4
    assert result["reference"]["ref_protocol"]["num"] == 24
    assert "fid" in capsys.readouterr().out
    first = np.load(tmp_path / "s.npz")["images"]
    # Interrupted sampling resumes: two of three batches on disk, the third drawn again, same images.
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    (parts / "protocol.json").write_text(json.dumps(p, sort_keys=True))
    np.save(parts / "00000.npy", first[:4])
    np.save(parts / "00001.npy", first[4:8])
    (tmp_path / "s.npz").unlink()
    assert commands.cmd_eval(args) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["images"], first)
    assert json.loads((tmp_path / "s.json").read_text())["scores"] == s


def test_eval_samples_sharded_over_8_devices_equal_one_device(tmp_path):
    cfg = dataclasses.replace(get_config("tiny"), run_dir=str(tmp_path / "r"), sample_every_n=0)
    one = Trainer(dataclasses.replace(cfg, mesh=MeshConfig(data=1)), devices=jax.devices()[:1], with_data=False)
    eight = Trainer(dataclasses.replace(cfg, mesh=MeshConfig(data=4, fsdp=2)), devices=jax.devices()[:8],
                    with_data=False)  # fmt: skip
    labels = np.arange(10, dtype=np.int32)
    a, b = one.sample_images(labels, 1, batch_size=8), eight.sample_images(labels, 1, batch_size=8)
    assert a.shape == (10, 28, 28, 1) and a.std() > 0
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # a rounding step apart at most


def test_adm_reference_batches_and_our_statistics_files_are_read_as_they_are(tmp_path):
    from jax_mmdit.errors import UserError
    from jax_mmdit.eval.reference import load_stats, save_stats, stats_from_features

    rng = np.random.default_rng(0)
    adm = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(adm, mu=rng.normal(size=8), sigma=np.eye(8), mu_s=np.zeros(3), sigma_s=np.eye(3),
             arr_0=rng.integers(0, 256, (5, 16, 16, 3), np.uint8))  # fmt: skip
    got = load_stats(adm)
    assert got["protocol"] == {} and got["arr_0"].shape == (5, 16, 16, 3) and got["sigma"].shape == (8, 8)
    feats = {"pool": rng.normal(size=(50, 8)), "spatial": rng.normal(size=(50, 3))}
    ours = save_stats(tmp_path / "ours.npz", stats_from_features(feats), {"dataset": "x", "num": 50})
    back = load_stats(ours)
    np.testing.assert_allclose(back["mu"], feats["pool"].mean(0), atol=1e-6)
    assert back["protocol"] == {"dataset": "x", "num": 50} and back["pool"].shape == (50, 8)
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    with pytest.raises(UserError, match="no 'mu'/'sigma'"):
        load_stats(tmp_path / "bad.npz")
