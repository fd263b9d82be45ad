"""Faults a user meets, each reproduced: corrupt checkpoints, stop signals in every phase of the
loop, a second run on a locked directory, a resume with another model or other data, sampling
on another machine's mesh, bad data found at start-up, and one error line for every bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jax_mmdit.checkpoint import MANIFEST, Checkpointer, CheckpointError
from jax_mmdit.config import DataConfig, MeshConfig, get_config
from jax_mmdit.data import build_dataset
from jax_mmdit.errors import UserError
from jax_mmdit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny(run_dir, **kw):
    base = dict(run_dir=str(run_dir), mesh=MeshConfig(data=1), sample_every_n=0, eval_save_steps=2, max_steps=4)
    return dataclasses.replace(get_config("tiny"), **{**base, **kw})


def trainer(cfg):
    return Trainer(cfg, devices=jax.devices()[:1])


def mmdit(*args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return subprocess.run([sys.executable, "-m", "jax_mmdit.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)  # fmt: skip


def one_error_line(r) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("mmdit: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (trained once; tests work on copies)."""
    path = tmp_path_factory.mktemp("reliability") / "run"
    tr = trainer(tiny(path))
    tr.train()
    assert Checkpointer(path, read_only=True).steps() == [2, 4]
    return path, jax.device_get(tr.state.ema_params)


def copy_of(run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run[0], dest)
    return dest


def state_file(run_dir: Path, step: int) -> Path:
    """The largest array file of a step (where Orbax's OCDBT keeps the weights)."""
    return max((p for p in (run_dir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip


# ---- 1. checkpoint integrity ----------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["bytes", "truncate", "delete"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_good_one(run, tmp_path, damage, capfd):
    path = copy_of(run, tmp_path)
    f = state_file(path, 4)
    data = bytearray(f.read_bytes())
    if damage == "bytes":  # a few bytes in the middle: Orbax itself may read this "fine"
        data[len(data) // 2 : len(data) // 2 + 16] = os.urandom(16)
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 3]))
    else:
        f.unlink()
    # Sampling reads only: it falls back and leaves the run as it is; asked for by name, an error.
    tr = Trainer.load(str(path))
    assert tr.step == 2 and (path / "checkpoints" / "4").exists()
    assert "checkpoint step 4 is unusable" in capfd.readouterr().err
    with pytest.raises(CheckpointError, match="step 4 .*unusable"):
        Trainer.load(str(path), step=4)
    # Training moves the bad step aside (kept, not deleted), resumes from 2 and saves 4 again.
    tr = trainer(tiny(path))
    tr.train()
    assert tr.step == 4 and Checkpointer(path, read_only=True).steps() == [2, 4]
    assert (path / "checkpoints_bad" / "4" / "why.txt").exists()
    assert Checkpointer(path, read_only=True).has_manifest(4)


def test_non_finite_weights_are_refused_even_without_a_manifest(run, tmp_path):
    path = copy_of(run, tmp_path)
    tr = Trainer.load(str(path))
    ckpt = Checkpointer(path)
    poisoned = tr.state.replace(ema_params=jax.tree.map(lambda x: x * jnp.nan, tr.state.ema_params))
    ckpt.save(6, poisoned, config_json=tr.cfg.to_json())
    ckpt.finish()
    (path / "checkpoints" / "6" / MANIFEST).unlink()  # as if written by an older version
    ckpt.close()
    assert Trainer.load(str(path)).step == 4  # the NaN step is skipped
    with pytest.raises(CheckpointError, match="NaN or inf"):
        Trainer.load(str(path), step=6)


def test_rotation_keeps_the_newest_and_every_kept_step_has_a_manifest(tmp_path):
    tr = trainer(tiny(tmp_path / "run", max_steps=8, eval_save_steps=1, keep_checkpoints=2))
    tr.train()
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    assert ckpt.steps() == [7, 8] and all(ckpt.has_manifest(s) for s in ckpt.steps())


# ---- 2. stop signals in every phase ------------------------------------------------------------
@pytest.mark.parametrize("phase", ["step", "eval", "sample", "save"])
def test_sigterm_in_any_phase_ends_in_a_durable_checkpoint_of_the_last_step(tmp_path, phase, monkeypatch, capfd):
    cfg = tiny(tmp_path / "run", max_steps=50, eval_save_steps=3, sample_every_n=3)
    tr = trainer(cfg)
    target = {"step": tr, "eval": tr, "sample": tr}.get(phase)
    name = {"step": "train_step", "eval": "evaluate", "sample": "write_samples"}.get(phase)
    if phase == "save":
        real = Checkpointer.save

        def save_and_signal(self, *a, **k):
            real(self, *a, **k)
            os.kill(os.getpid(), signal.SIGTERM)  # while the asynchronous save is in flight

        monkeypatch.setattr(Checkpointer, "save", save_and_signal)
    else:
        real = getattr(target, name)
        calls = []

        def signalled(*a, **k):
            calls.append(1)
            if len(calls) == (4 if phase == "step" else 1):
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        monkeypatch.setattr(target, name, signalled)
    tr.train()
    out = capfd.readouterr().out
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    assert ckpt.latest_step() == tr.step and ckpt.has_manifest(tr.step), (phase, ckpt.steps(), tr.step)
    assert tr.step < 50 and f"saved step {tr.step}" in out


def test_sigterm_to_the_command_saves_and_exits_zero_and_ctrl_c_in_start_up_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "jax_mmdit.cli",
        "train",
        "--config",
        "tiny",
        "--run_dir",
        str(run_dir),
        "--max_steps",
        "100000",
        "--eval_save_steps",
        "100000",
        "--sample_every_n",
        "0",
        "--log_every",
        "1",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while not list((run_dir / "tb").glob("events*")):
        assert time.time() < deadline and p.poll() is None, "training did not start"
        time.sleep(0.5)
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "stop requested: saved step" in out, out[-3000:]
    ckpt = Checkpointer(run_dir, read_only=True)
    assert len(ckpt.steps()) == 1 and ckpt.has_manifest(ckpt.steps()[0])
    # Ctrl-C while it starts up (data, model, compile): a quiet exit. Sent once jax is loaded (the
    # command's first step), seconds before the loop starts.
    p = subprocess.Popen([*cmd[:5], str(tmp_path / "other"), *cmd[6:]], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    deadline = time.time() + 120
    while "jaxlib" not in Path(f"/proc/{p.pid}/maps").read_text():
        assert time.time() < deadline and p.poll() is None, "the command did not start"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


# ---- 3. the run-directory lock ------------------------------------------------------------------
def test_a_second_run_on_a_locked_directory_gets_one_line_naming_the_holder(run, tmp_path):
    path = copy_of(run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jax_mmdit.train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"), str(path)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(str(p) for p in (path / "checkpoints").rglob("*"))
        line = one_error_line(mmdit("train", "--config", "tiny", "--run_dir", str(path), "--max_steps", "6",
                                    "--mesh.data", "1"))  # fmt: skip
        assert f"PID {holder.pid}" in line and "in use" in line
        assert sorted(str(p) for p in (path / "checkpoints").rglob("*")) == before  # nothing touched
    finally:
        holder.kill()  # kill -9: the kernel drops the lock, no stale lock is left
        holder.wait()
    tr = trainer(tiny(path, max_steps=6))
    tr.train()
    assert tr.step == 6


# ---- 4. resume checks what it resumes --------------------------------------------------------------
def test_resume_refuses_another_model_or_other_data_and_allows_what_may_change(run, tmp_path):
    path = copy_of(run, tmp_path)
    base = tiny(path, max_steps=6)
    other_model = dataclasses.replace(base, model=dataclasses.replace(base.model, num_heads=4))
    with pytest.raises(UserError, match=r"model\.num_heads: 2 -> 4"):
        trainer(other_model).train()
    # Same count of examples, other images: the fingerprint tells them apart.
    images = np.random.default_rng(0).integers(0, 255, (400, 28, 28, 1), np.uint8)  # 380 train, 20 eval
    np.savez(tmp_path / "other.npz", images=images, labels=np.arange(400) % 10)
    other_data = dataclasses.replace(base, data=dataclasses.replace(base.data, source=str(tmp_path / "other.npz")))
    with pytest.raises(UserError, match=r"data\.source"):
        trainer(other_data).train()
    with pytest.raises(UserError, match="trained on other data"):
        trainer(dataclasses.replace(other_data, allow_config_change=("data.source",))).train()
    # A new learning rate, length and logging interval resume; a new objective only when named.
    changed = dataclasses.replace(base, optim=dataclasses.replace(base.optim, learning_rate=3e-4), log_every=1)
    changed = dataclasses.replace(changed, flow=dataclasses.replace(changed.flow, label_dropout=0.2))
    with pytest.raises(UserError, match=r"flow\.label_dropout: 0\.1 -> 0\.2"):
        trainer(changed).train()
    tr = trainer(dataclasses.replace(changed, allow_config_change=("flow.label_dropout",)))
    tr.train()
    assert tr.step == 6


# ---- 5. sampling builds its own mesh ---------------------------------------------------------------
def test_an_fsdp_multi_process_run_samples_on_one_device_without_jax_distributed(tmp_path):
    path = tmp_path / "run"
    cfg = tiny(path, mesh=MeshConfig(data=2, fsdp=4), max_steps=2)
    tr = Trainer(cfg, devices=jax.devices()[:8])
    tr.train()
    # As if the run had been two processes: the saved config asks for a coordinator.
    multi = dataclasses.replace(cfg, mesh=MeshConfig(fsdp=4, coordinator_address="10.0.0.1:1234", num_processes=2,
                                                     process_id=0))  # fmt: skip
    shutil.rmtree(path / "checkpoints" / "2")  # only the multi-process config is left to read
    ckpt = Checkpointer(path)
    ckpt.save(3, tr.state, config_json=multi.to_json())
    ckpt.finish()
    r = mmdit("sample", "--run", str(path), "--num", "2", "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert "wrote 2 samples" in r.stdout and Image.open(tmp_path / "x.png").size[0] > 56


# ---- 6. data checked at start-up ---------------------------------------------------------------------
def test_an_eval_split_smaller_than_a_batch_fails_at_start_naming_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (100, 28, 28, 1), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(100) % 10)
    cfg = tiny(tmp_path / "run", data=DataConfig(name="fashion_mnist", source=str(tmp_path / "d.npz")))
    with pytest.raises(UserError, match="eval split of 'fashion_mnist' has 5 examples"):
        trainer(cfg)


@pytest.mark.parametrize("name", ["mnist", "flowers"], ids=["decoded-in-memory", "streamed"])
def test_unreadable_images_are_skipped_and_counted_or_an_error_when_strict(tmp_path, capfd, name):
    folder = tmp_path / "folder"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(folder / cls / f"{i}.jpg")
    good = (folder / "a" / "0.jpg").read_bytes()
    (folder / "a" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "b" / "2.jpg").write_bytes(b"not an image at all")
    cfg = DataConfig(name=name, source=str(folder), eval_fraction=0.2)
    n = build_dataset(cfg, "train").info.num_examples + build_dataset(cfg, "eval").info.num_examples
    err = capfd.readouterr().err
    assert n == 10 and "a/1.jpg" in err and "b/2.jpg" in err and "--data.strict" in err, err
    with pytest.raises(UserError, match="cannot be decoded"):
        for split in ("train", "eval"):
            build_dataset(dataclasses.replace(cfg, strict=True), split)


def test_a_vae_that_yields_nan_gets_no_latents_written(tmp_path):
    from safetensors.numpy import load_file, save_file

    from jax_mmdit.vae import AutoencoderKL, VAEConfig, save_vae
    from jax_mmdit.vae.encode import cmd_encode

    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(4,), layers_per_block=1, norm_num_groups=2)
    vae = save_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "vae")
    weights = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    weights["encoder.conv_out.bias"][:] = np.nan
    save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
    args = ["--vae", str(vae), "--out", str(tmp_path / "lat"), "--dataset", "fashion_mnist", "--max_examples", "8",
            "--resolution", "8", "--no-flip"]  # fmt: skip
    with pytest.raises(UserError, match="No image .* could be encoded"):
        cmd_encode(args)
    assert json.loads((tmp_path / "lat" / "shard-00000.json").read_text())["skipped"] == 8
    assert not (tmp_path / "lat" / "latents.json").exists()


# ---- 7. one line for every bad input ---------------------------------------------------------------
def test_bad_inputs_each_give_one_error_line(run, tmp_path):
    truncated, npy = tmp_path / "t.npz", tmp_path / "n.npz"
    np.savez(truncated, images=np.zeros((64, 28, 28, 1), np.uint8), labels=np.zeros(64, np.int64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with open(npy, "wb") as f:
        np.save(f, np.zeros((4, 28, 28, 1), np.uint8))
    (tmp_path / "a_file").write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    path = str(run[0])
    cases = [
        (["train", "--config", "tiny", "--data.source", str(truncated)], "not a readable .npz"),
        (["train", "--config", "tiny", "--data.source", str(npy)], "single .npy array"),
        (["train", "--config", "tiny", "--data.source", "data/missing"], "data/missing"),
        (["sample", "--run", path, "--num", "-3"], "--num must be at least 1"),
        (["sample", "--run", path, "--out", str(tmp_path / "out_dir")], "must end in .png, .gif, .npz"),
        (["sample", "--run", path, "--out", str(tmp_path / "a_file" / "x.png")], "Cannot write --out"),
    ]
    if os.geteuid() != 0:  # root writes through a mode-0500 directory
        cases.append((["sample", "--run", path, "--out", str(readonly / "x.png")], "Cannot write --out"))
    for args, message in cases:
        t0 = time.time()
        line = one_error_line(mmdit(*args, env_extra={"HF_DATASETS_OFFLINE": "0"}, timeout=120))
        assert message in line, (args, line)
        assert time.time() - t0 < 60, (args, "took", time.time() - t0)  # no hub retries, no sampling first


def _du_kib(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0])


def test_a_full_disk_is_one_line_and_the_checkpoints_already_written_stay_loadable(run, tmp_path):
    path = copy_of(run, tmp_path)
    ckpts = path / "checkpoints"
    store = tmp_path / "store"
    shutil.move(ckpts, store)
    ckpts.mkdir()
    # A disk (a tmpfs in a private mount namespace) with room for the two checkpoints already
    # written and half of another: the run resumes, and its next save cannot fit.
    size = _du_kib(store) + _du_kib(store / "4") // 2
    cli = f"{sys.executable} -m jax_mmdit.cli"
    script = (
        f'mount -t tmpfs -o size={size}k tmpfs "{ckpts}" && cp -r "{store}"/. "{ckpts}" && '
        f'{cli} train --config tiny --run_dir "{path}" --max_steps 40 --eval_save_steps 2 --sample_every_n 0 '
        f'--mesh.data 1 2> "{tmp_path}/train.err"; echo $? > "{tmp_path}/train.rc"; '
        f'{cli} sample --run "{path}" --num 2 --steps 2 --out "{tmp_path}/after.png"'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    userns = [] if os.geteuid() == 0 else ["-r"]  # as root a mount namespace needs no user namespace
    r = subprocess.run(["unshare", "-m", *userns, "sh", "-c", script], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)  # fmt: skip
    assert (tmp_path / "train.rc").exists(), r.stderr
    train = subprocess.CompletedProcess(
        [], int((tmp_path / "train.rc").read_text()), "", (tmp_path / "train.err").read_text()
    )
    line = one_error_line(train)
    assert "Disk full" in line and str(ckpts) in line and "needs" in line and "free there" in line, line
    assert "intact" in line, line
    # On the full disk, what was written before the failure still loads.
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "after.png").size[0] > 56


def test_a_disk_that_fills_during_a_save_is_the_same_error(run, tmp_path, monkeypatch):
    # The space check passed, then another writer filled the disk: Orbax fails with ENOSPC.
    path = copy_of(run, tmp_path)
    ckpt = Checkpointer(path)
    state = {"w": jnp.ones((4, 4))}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full)
    with pytest.raises(CheckpointError, match=r"Disk full: cannot write checkpoint step 6 .*last: step 4\) are intact"):
        ckpt.save(6, state)
    assert ckpt.steps() == [2, 4]


def test_an_explicit_corrupt_checkpoint_is_one_error_line(run, tmp_path):
    path = copy_of(run, tmp_path)
    state_file(path, 4).write_bytes(b"garbage")
    line = one_error_line(mmdit("sample", "--checkpoint", str(path / "checkpoints" / "4"), "--out",
                                str(tmp_path / "x.png")))  # fmt: skip
    assert "step 4" in line and "unusable" in line
    r = mmdit("sample", "--run", str(path), "--num", "2", "--steps", "2", "--out", str(tmp_path / "y.png"))
    assert r.returncode == 0 and "step 2" in r.stdout and "step 4 is unusable" in r.stderr
