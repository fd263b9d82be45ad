"""fp8 training (`--precision fp8`, XLA emulates fp8 on CPU): the fp8 matmul and its gradients
against float32 at any operand scale, only the blocks' matmuls in fp8, a tiny run that tracks
bf16's loss, exact resume; and the GPU check's dry run, which exercises every section of it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mmdit.config import MeshConfig, get_config
from jax_mmdit.ops.fp8 import Fp8Ops, fp8_matmul
from jax_mmdit.train.trainer import Trainer


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_fp8_matmul_and_its_gradients_match_float32_at_any_scale(scale):
    k = jax.random.split(jax.random.key(0), 3)
    x = scale * jax.random.normal(k[0], (64, 96))
    w = jax.random.normal(k[1], (96, 48)) / scale
    r = jax.random.normal(k[2], (64, 48))
    f = lambda fn: lambda x, w: jnp.sum(fn(x, w) * r)  # noqa: E731
    exact = jnp.dot(x, w, precision="highest")
    assert _rel(fp8_matmul(x, w), exact) < 0.05  # e4m3: 3 mantissa bits, per-tensor scaled
    gx, gw = jax.grad(f(fp8_matmul), argnums=(0, 1))(x, w)
    ex, ew = jax.grad(f(lambda a, b: jnp.dot(a, b, precision="highest")), argnums=(0, 1))(x, w)
    assert _rel(gx, ex) < 0.08 and _rel(gw, ew) < 0.08  # e5m2 gradients: 2 mantissa bits
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    # Without the per-tensor scale, e4m3 (max 448, min normal 2^-6) would lose these operands.
    naive = jnp.dot(x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn), preferred_element_type=jnp.float32)
    if scale != 1.0:
        assert not _rel(naive, exact) < 0.05


def _tiny(tmp_path, precision, **kw):
    """The tiny config on one device (the fake 8-device CPU mesh only slows a 2-core machine here)."""
    base = get_config("tiny")
    return dataclasses.replace(base, precision=precision, run_dir=str(tmp_path / precision), kernels="xla",
                               log_every=1, sample_every_n=0, mesh=MeshConfig(data=1), **kw)  # fmt: skip


def _trainer(cfg) -> Trainer:
    return Trainer(cfg, devices=jax.devices()[:1])


def test_only_the_blocks_matmuls_run_in_fp8(tmp_path):
    tr = _trainer(_tiny(tmp_path, "fp8"))
    assert isinstance(tr.ops, Fp8Ops) and tr.model_cfg.dtype == "bfloat16"
    model = tr.ema_model()
    assert model.blocks[0].attn_out.ops is tr.ops  # inside the blocks: fp8
    assert model.patch_embed.proj.ops is tr.ops.base and model.final.linear.ops is tr.ops.base  # outside: bf16
    batch = next(tr.train_data.iterator(tr.cfg.batch_size, seed=0))
    tr.train_step(batch)
    assert "f8e4m3fn" in tr.compiled_step.as_text() and "f8e5m2" in tr.compiled_step.as_text()


def test_fp8_training_tracks_bf16_and_resumes_exactly(tmp_path):
    """20 steps of the tiny config (the same data, noise and initial weights): fp8's loss differs
    from bf16's, by less than 1e-3 on average (over 30 steps: 6e-5, where bf16 is 2e-5 from fp32). A
    run stopped and resumed in fp8 equals the uninterrupted one (current scaling keeps no state
    between steps)."""
    losses = {}
    for p in ("bf16", "fp8"):
        tr = _trainer(_tiny(tmp_path, p, max_steps=20, eval_save_steps=20, n_eval_batches=0))
        tr.train()
        losses[p] = np.asarray([h["train/loss"] for h in tr.history])
    gap = np.mean(np.abs(losses["fp8"] - losses["bf16"]))
    assert 0 < gap < 1e-3, gap  # fp8 really runs, and stays close
    assert losses["fp8"][-5:].mean() < losses["fp8"][:5].mean() - 0.1  # it learns
    assert len(losses["fp8"]) == 20

    cfg = _tiny(tmp_path / "resume", "fp8", max_steps=6, eval_save_steps=3, n_eval_batches=0)
    first = _trainer(cfg)
    first.train(until_step=3)
    second = _trainer(cfg)
    second.train()
    got = [h["train/loss"] for h in first.history + second.history]
    # A constant learning rate after warm-up: the first 6 steps of the 20-step run are the same steps.
    np.testing.assert_allclose(got, losses["fp8"][:6], atol=1e-6, rtol=0)


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    from benchmarks import gpu_check

    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    s = data["sections"]
    assert data["dry_run"] and not any("error" in v for v in s.values()), s
    for name, r in s["train"].items():
        if name != "seconds":
            assert r["img_per_s"] > 0 and r["flops_per_step"] > 0 and r["cudnn_fmha"] is False  # CPU: XLA's
    assert s["fp8"]["fp8"]["fp8_dots"] and not s["fp8"]["bf16"]["fp8_dots"]
    assert len(s["fp8"]["fp8"]["loss_curve"]) == len(s["fp8"]["bf16"]["loss_curve"]) == 6
    assert s["sample"]["img_per_s"] > 0 and s["vae"]["decode_img_per_s"] > 0
