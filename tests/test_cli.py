"""End to end through the command line on a slice of real Fashion-MNIST: train writes checkpoints,
TensorBoard events, PNG grids and GIFs; a second call resumes; sample exports PNG/NPZ; bad input
fails in one line with a non-zero exit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def mmdit(*args, cwd=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    return subprocess.run(
        [sys.executable, "-m", "jax_mmdit.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    if not FASHION.exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (make test does it).")
    run = tmp_path_factory.mktemp("e2e") / "run"
    r = mmdit("train", "--config", "tiny", "--run_dir", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    return run, r


def test_train_writes_checkpoints_logs_and_samples(trained_run):
    run, r = trained_run
    assert "starting fresh" in r.stdout
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboardX.proto import event_pb2  # noqa: F401 - events are real protobuf records

    tags = _event_tags(events[0])
    assert {"train/loss", "eval/loss", "train/learning_rate", "perf/img_per_s", "samples"} <= tags
    assert any(t.startswith("train_loss_by_t/") for t in tags)
    png = Image.open(run / "samples" / "step_0000006.png")
    gif = Image.open(run / "samples" / "step_0000006.gif")
    assert png.size[0] > 28 and gif.n_frames > 4  # a grid, and an animation over sampling steps


def _event_tags(path) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags, data = set(), path.read_bytes()
    i = 0
    while i < len(data):  # TFRecord framing: len(8) crc(4) payload crc(4)
        n = int.from_bytes(data[i : i + 8], "little")
        ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        tags.update(v.tag for v in ev.summary.value)
        i += 12 + n + 4
    return tags


def test_second_call_resumes_and_continues(trained_run):
    run, _ = trained_run
    r = mmdit("train", "--config", "tiny", "--run_dir", str(run), "--max_steps", "8", "--eval_save_steps", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from step 6" in r.stdout
    assert "done at step 8" in r.stdout
    assert 8 in [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]


def test_sample_png_and_npz(trained_run, tmp_path):
    run, _ = trained_run
    r = mmdit(
        "sample",
        "--run",
        str(run),
        "--class",
        "3",
        "--num",
        "4",
        "--cfg",
        "3",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "x.png").size[0] > 4 * 28
    r = mmdit("sample", "--run", str(run), "--num", "12", "--steps", "3", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    d = np.load(tmp_path / "s.npz")
    assert d["images"].shape == (12, 28, 28, 1) and d["images"].dtype == np.uint8
    np.testing.assert_array_equal(d["labels"], np.arange(12) % 10)
    assert d["images"].std() > 0  # not a constant image


def test_original_train_py_flags(tmp_path):
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--dataset_name",
            "fashion_mnist",
            "--batch_size",
            "16",
            "--n_epochs",
            "1",
            "--learning_rate",
            "1e-3",
            "--eval_save_steps",
            "2",
            "--n_eval_batches",
            "1",
            "--sample_every_n",
            "0",
            "--half_precision",
            "--run_dir",
            str(tmp_path / "r"),
            "--model.depth",
            "1",
            "--model.hidden_size",
            "32",
            "--model.num_heads",
            "2",
            "--model.patch_size",
            "7",
            "--data.max_examples",
            "64",
            "--sampler.num_steps",
            "2",
            "--eval.evaluators",
            "loss",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 steps" in r.stdout  # 64 examples / batch 16
    cfg = (tmp_path / "r" / "config.json").read_text()
    assert '"precision": "bf16"' in cfg and '"learning_rate": 0.001' in cfg


def test_train_py_keeps_the_original_fp32_default(monkeypatch):
    """The original script computed in fp32 unless --half_precision; the preset's default is bf16."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_py", ROOT / "train.py")
    train_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_py)
    seen = []
    monkeypatch.setattr(train_py.cli, "main", lambda argv: seen.append(argv) or 0)
    for argv in ([], ["--half_precision"], ["--precision", "fp16"]):
        train_py.main(argv)
    precisions = [[a for i, a in enumerate(argv) if i and argv[i - 1] == "--precision"] for argv in seen]
    assert precisions == [["fp32"], ["bf16"], ["fp16"]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--config", "tiny", "--data.name", "nope"], "valid names"),
        (["train", "--config", "tiny", "--model.patch_size", "5"], "divisible by patch_size"),
        (["train", "--config", "nope"], "Unknown config"),
        (["sample", "--run", "/nonexistent/run"], "No checkpoints directory"),
        (["train", "--config", "tiny", "--data.source", "/nonexistent/data"], "nonexistent"),
    ],
)
def test_bad_input_is_one_clear_error(args, message):
    r = mmdit(*args, timeout=120)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kernels", ["onednn", "xla"])
def test_info_prints_dit_paper_parameter_count_and_flops_on_each_backend(kernels):
    # One CPU device, as a user runs it: there "auto" picks the C++ kernels, whose calls XLA's cost
    # analysis counts as zero (this printed 0.01673 GMACs before the backends' FLOP hook).
    r = mmdit(
        "info",
        "--model",
        "DiT-XL/2",
        "--image_size",
        "32",
        "--in_channels",
        "4",
        "--num_classes",
        "1000",
        "--learn_sigma",
        "--kernels",
        kernels,
    )
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
    assert fields["params"].strip() == "675,129,632" and fields["backend"].strip() == kernels
    assert float(fields["gmacs_per_image"]) == pytest.approx(118.6, rel=0.01)  # the DiT paper's Gflops


def test_profile_reports_flops_memory_and_writes_trace(tmp_path):
    r = mmdit("profile", "--config", "tiny", "--run_dir", str(tmp_path / "p"), "--profile_steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip() and " " in line.strip())
    assert float(fields["flops_per_step_per_device"]) > 1e6
    assert float(fields["img_per_s"]) > 0
    assert fields["mfu"].strip() == "n/a"  # no peak FLOP/s is known for CPUs: omitted, no crash
    assert float(fields["mem/temp_size_in_bytes"]) > 0
    assert list((tmp_path / "p" / "profile").rglob("*.xplane.pb"))


def test_unreachable_hub_names_local_alternatives(tmp_path):
    r = mmdit("train", "--config", "cifar10", "--run_dir", str(tmp_path / "c"), timeout=120)
    assert r.returncode == 1
    assert "--data.source" in r.stderr and "Traceback" not in r.stderr


def test_latent_diffusion_chain_train_vae_encode_train_sample(tmp_path):
    """The whole latent path on 256 real images: a VAE trained here, its latents, a DiT on them,
    samples decoded back to pixels; a moved VAE is found with --vae (a wrong one: test_latents.py)."""
    vae, lat, run = tmp_path / "vae", tmp_path / "lat", tmp_path / "run"
    small = ["--block_out_channels", "8", "16", "--norm_num_groups", "4", "--batch_size", "16"]
    r = mmdit("train-vae", "--resolution", "16", *small, "--steps", "10", "--max_examples", "256",
              "--eval_examples", "32", "--out", str(vae))  # fmt: skip
    assert r.returncode == 0 and "reconstruction MSE" in r.stdout, r.stderr[-3000:]
    r = mmdit("encode", "--vae", str(vae), "--dataset", "fashion_mnist", "--resolution", "16",
              "--max_examples", "256", "--shard_size", "128", "--out", str(lat))  # fmt: skip
    assert r.returncode == 0 and "256 images encoded" in r.stdout, r.stderr[-3000:]
    r = mmdit("train", "--config", "tiny", "--data.source", str(lat), "--model.image_size", "8", "--model.in_channels",
              "4", "--model.patch_size", "2", "--data.eval_fraction", "0.1", "--run_dir", str(run))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    grid = Image.open(run / "samples" / "step_0000006.png")
    assert grid.mode == "L" and grid.size[0] >= 4 * 16 * 2  # decoded 16x16 grayscale images, not latents
    moved = tmp_path / "moved-vae"
    vae.rename(moved)
    r = mmdit("sample", "--run", str(run), "--num", "4", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 1 and "--vae DIR" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = mmdit("sample", "--run", str(run), "--num", "4", "--vae", str(moved), "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr[-3000:]
    d = np.load(tmp_path / "s.npz")
    assert d["images"].shape == (4, 16, 16, 1) and d["images"].dtype == np.uint8 and d["images"].std() > 0


def test_published_weights_convert_sample_fine_tune(tmp_path):
    """A diffusers DiT directory (random weights, 7 classes at 14x14) -> `mmdit convert` -> `mmdit
    sample` -> `mmdit train --init_from` fine-tunes it on Fashion-MNIST (10 classes, 28x28) (a pickle
    with a payload: tests/test_convert.py)."""
    import torch
    from diffusers import DiTTransformer2DModel

    dit, run, ft = tmp_path / "dit", tmp_path / "run", tmp_path / "ft"
    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                num_layers=2, sample_size=14, patch_size=7, num_embeds_ada_norm=7,
                                norm_eps=1e-6)  # fmt: skip
    blocks = ref.transformer_blocks  # one shared embedder, as in DiT's published weights
    blocks[1].norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    ref.save_pretrained(dit)
    r = mmdit("convert", "--from", "diffusers-dit", str(dit), "--out", str(run))
    assert r.returncode == 0 and "objective ddpm" in r.stdout, r.stderr[-3000:]
    r = mmdit("sample", "--run", str(run), "--num", "3", "--steps", "4", "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0 and "4 ddpm steps" in r.stdout, r.stderr[-3000:]
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 14, 14, 1)

    r = mmdit("train", "--config", str(run), "--init_from", str(run), "--data.name", "fashion_mnist",
              "--data.max_examples", "128", "--model.num_classes", "10", "--model.image_size", "28",
              "--batch_size", "16", "--n_eval_batches", "1", "--sampler.num_steps", "3", "--num_sample_images",
              "2", "--max_steps", "3", "--eval_save_steps", "3", "--run_dir", str(ft))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised from {run}" in r.stdout and "re-initialised for 10 classes (was 7)" in r.stdout, r.stdout
    assert (ft / "checkpoints" / "3").is_dir() and (ft / "samples" / "step_0000003.png").is_file()
