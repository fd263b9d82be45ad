"""Training system: sharded == single device, FSDP really partitions, exact resume, restore onto
another mesh, fp16 loss scaling, NaN handling, multi-process jax.distributed."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_mmdit.checkpoint import CheckpointError
from jax_mmdit.config import MeshConfig, OptimConfig, TrainConfig, get_config
from jax_mmdit.train.trainer import NonFiniteLossError, Trainer

N_STEPS = 3


def tiny(tmp_path, **kw) -> TrainConfig:
    base = get_config("tiny")
    kw.setdefault("run_dir", str(tmp_path / "run"))
    return dataclasses.replace(base, **kw)


def same_ops(tmp_path, **kw) -> TrainConfig:
    """`tiny` on XLA's ops for every mesh: sharded and single-device runs then differ in sharding only."""
    return tiny(tmp_path, kernels="xla", **kw)


def run_losses(cfg, devices, n=N_STEPS):
    tr = Trainer(cfg, devices=devices)
    it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
    losses = [tr.train_step(next(it))["loss"] for _ in range(n)]
    return np.asarray(jax.device_get(losses)), tr


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    cfg = same_ops(tmp_path_factory.mktemp("single"), mesh=MeshConfig(data=1, fsdp=1))
    losses, tr = run_losses(cfg, jax.devices()[:1])
    return losses, jax.device_get(tr.state.params)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)], ids=["ddp8", "fsdp2x4"])
def test_sharded_matches_single_device(tmp_path, single_device_losses, data, fsdp):
    ref_losses, ref_params = single_device_losses
    cfg = same_ops(tmp_path, mesh=MeshConfig(data=data, fsdp=fsdp))
    losses, tr = run_losses(cfg, jax.devices()[:8])
    assert len(set(np.round(ref_losses, 6))) == N_STEPS  # the loss really moves step to step
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    params = jax.device_get(tr.state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fsdp_partitions_params_and_optimizer_state(tmp_path):
    cfg = tiny(tmp_path, mesh=MeshConfig(data=2, fsdp=4))
    tr = Trainer(cfg, devices=jax.devices()[:8])
    sharded = 0
    for leaf in jax.tree.leaves(tr.state.params):
        if leaf.size >= 2**12:
            assert "fsdp" in str(leaf.sharding.spec), leaf.sharding
            shard = leaf.addressable_shards[0].data
            assert shard.size * 4 == leaf.size  # each device holds a quarter
            sharded += 1
    assert sharded > 0
    mu = tr.state.opt_state[1][0].mu  # clip, adamw(scale_by_adam: mu, nu)
    big = [x for x in jax.tree.leaves(mu) if x.size >= 2**12]
    assert big and all("fsdp" in str(x.sharding.spec) for x in big)


@pytest.mark.parametrize("kind", ["labels", "captions", "meanflow"])
def test_grad_accumulation_averages_micro_batch_gradients(tmp_path, request, kind):
    # Micro-batch i is rows i, i+A, ... with key fold_in(step_key, i): recompute that by hand.
    from flax import nnx

    from jax_mmdit.flow.config import FlowConfig, MeanFlowConfig, SamplerConfig
    from jax_mmdit.train.step import condition_of, reported_loss

    accum = 2
    cfg = tiny(tmp_path, grad_accum_steps=accum, mesh=MeshConfig(data=4, fsdp=2))
    if kind == "captions":  # the text condition (context, mask, pooled) is split into the same micro-batches
        captions = str(request.getfixturevalue("fm_captions"))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="mmdit", num_classes=0),
                                  data=dataclasses.replace(cfg.data, captions=captions))  # fmt: skip
    if kind == "meanflow":  # its logged loss is the plain squared error the micro-batches carry in aux
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, interval_embed=True),
                                  flow=FlowConfig(objective="meanflow", meanflow=MeanFlowConfig(kappa=0.5)),
                                  sampler=SamplerConfig(method="meanflow", num_steps=1))  # fmt: skip
    tr = Trainer(cfg, devices=jax.devices()[:8])
    batch = next(tr.train_data.iterator(cfg.batch_size, seed=cfg.seed))
    params0 = jax.device_get(tr.state.params)
    metrics = jax.device_get(tr.train_step(batch))
    step_key = jax.random.fold_in(jax.device_get(tr.rng), 0)

    def micro(i):
        def loss(p):
            model = nnx.merge(tr.graphdef, p, tr.rest)
            x, y = batch["image"][i::accum], jax.tree.map(lambda a: a[i::accum], condition_of(batch))
            objective, aux = tr.loss_fn(model, x, y, jax.random.fold_in(step_key, i))
            return objective, reported_loss(objective, aux)

        (_, logged), grads = jax.value_and_grad(loss, has_aux=True)(params0)
        return logged, grads

    (l0, g0), (l1, g1) = micro(0), micro(1)
    grads = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    np.testing.assert_allclose(metrics["loss"], (l0 + l1) / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    assert abs(float(l0) - float(l1)) > 1e-4  # the two micro-batches really differ


def test_resume_is_exact(tmp_path):
    straight_cfg = tiny(tmp_path / "a", log_every=1, sample_every_n=0)
    straight = Trainer(straight_cfg)
    straight.train()
    resumed_cfg = tiny(tmp_path / "b", log_every=1, sample_every_n=0)
    first = Trainer(resumed_cfg)
    first.train(until_step=3)
    assert first.step == 3
    second = Trainer(resumed_cfg)
    second.train()
    assert second.step == straight.step == straight_cfg.max_steps
    ref = [h["train/loss"] for h in straight.history]
    got = [h["train/loss"] for h in first.history + second.history]
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(jax.device_get(second.state)), jax.tree.leaves(jax.device_get(straight.state))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_restore_fsdp_checkpoint_on_one_device_and_ddp(tmp_path):
    cfg = tiny(tmp_path, mesh=MeshConfig(data=2, fsdp=4), max_steps=2, eval_save_steps=2, sample_every_n=0)
    saver = Trainer(cfg, devices=jax.devices()[:8])
    saver.train()
    want = jax.device_get(saver.state.ema_params)
    for mesh, devices in [(MeshConfig(data=1), jax.devices()[:1]), (MeshConfig(data=4), jax.devices()[:4])]:
        tr = Trainer.load(cfg.run_dir, devices=devices, mesh=dataclasses.asdict(mesh))
        assert tr.step == 2 and tr.mesh.size == len(devices)
        for a, b in zip(jax.tree.leaves(jax.device_get(tr.state.ema_params)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
        x = tr.sample(labels=[0, 1], sampler_cfg=dataclasses.replace(cfg.sampler, num_steps=2))
        assert x.shape == (2, 28, 28, 1) and np.isfinite(x).all()


def test_load_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoints directory"):
        Trainer.load(str(tmp_path / "nothing"))


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoint(tmp_path):
    cfg = tiny(
        tmp_path,
        optim=OptimConfig(learning_rate=1e30, warmup_steps=0, grad_clip=0.0),
        max_steps=6,
        eval_save_steps=1,
        log_every=1,
        sample_every_n=0,
    )
    tr = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as e:
        tr.train()
    ckpts = tr.checkpointer.steps()
    assert ckpts, "the last good checkpoint must be kept"
    bad = int(str(e.value).split("at step ")[1].split()[0])
    assert max(ckpts) < bad


def test_fp16_an_overflowing_step_is_skipped_and_halves_the_loss_scale(tmp_path):
    cfg = tiny(tmp_path, precision="fp16", mesh=MeshConfig(data=1), optim=OptimConfig(warmup_steps=0))
    # XLA:CPU has no fp16 dot at the 'highest' precision the other tests pin.
    with jax.default_matmul_precision("default"):
        tr = Trainer(cfg, devices=jax.devices()[:1])
        assert tr.model_cfg.dtype == "float16"
        it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
        # A loss scale of 2^100 makes the scaled fp16 cotangents overflow: the step must change
        # nothing but the bookkeeping.
        huge = jax.device_put(jnp.float32(2.0**100), tr.state_sharding.loss_scale)
        tr.state = tr.state.replace(loss_scale=huge)
        before = jax.device_get(tr.state)
        skipped = jax.device_get(tr.train_step(next(it)))
        after = jax.device_get(tr.state)
        assert int(skipped["skipped"]) == 1 and not np.isfinite(float(skipped["grad_norm"]))
        assert int(after.step) == int(before.step) + 1 and int(after.good_steps) == 0
        assert float(after.loss_scale) == 2.0**99
        for name in ("params", "opt_state", "ema_params"):
            jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
        assert int(after.nonfinite_step) == -1  # the loss itself was finite: not a NaN run
        # From the default scale, steps apply: finite losses, weights move, the scale holds.
        tr.state = tr.state.replace(loss_scale=jax.device_put(jnp.float32(2.0**15), tr.state_sharding.loss_scale))
        losses = [float(tr.train_step(next(it))["loss"]) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    final = jax.device_get(tr.state)
    assert float(final.loss_scale) == 2.0**15 and int(final.good_steps) == 3
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), final.params, after.params)
    assert any(jax.tree.leaves(moved))


def test_bad_batch_for_mesh_is_clear(tmp_path):
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        Trainer(tiny(tmp_path, batch_size=12), devices=jax.devices()[:8])


WORKER = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax_mmdit.config import MeshConfig, get_config
    from jax_mmdit.train.trainer import Trainer
    pid, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = dataclasses.replace(
        get_config("tiny"), run_dir=run_dir,
        mesh=MeshConfig(data=-1, coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid),
    )
    tr = Trainer(cfg)
    it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed, process_index=pid, process_count=2)
    losses = [float(tr.train_step(next(it))["loss"]) for _ in range(2)]
    print("LOSSES", json.dumps(losses), flush=True)
    """
)


def test_two_processes_with_jax_distributed_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "mp")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    got = [json.loads(next(line for line in o.splitlines() if line.startswith("LOSSES"))[7:]) for o in outs]
    assert got[0] == got[1]  # both processes see the same global loss
    ref, _ = run_losses(tiny(tmp_path, mesh=MeshConfig(data=2)), jax.devices()[:2], n=2)
    np.testing.assert_allclose(got[0], ref, atol=1e-5, rtol=0)


def test_mmdit_with_class_tokens_trains_sharded_like_single_device(tmp_path):
    base = same_ops(tmp_path)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, arch="mmdit", qk_norm=True))
    ref, _ = run_losses(dataclasses.replace(cfg, mesh=MeshConfig(data=1)), jax.devices()[:1])
    got, _ = run_losses(dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=4)), jax.devices()[:8])
    assert len(set(np.round(ref, 6))) == N_STEPS  # the parameters really change
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_text_mmdit_on_captions_trains_sharded_like_single_device(tmp_path, fm_captions):
    """Text batches (context, mask, pooled) shard with the images."""
    base = same_ops(tmp_path)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, arch="mmdit", num_classes=0),
                              data=dataclasses.replace(base.data, captions=str(fm_captions)))  # fmt: skip
    ref, _ = run_losses(dataclasses.replace(cfg, mesh=MeshConfig(data=1)), jax.devices()[:1])
    got, _ = run_losses(dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=4)), jax.devices()[:8])
    assert len(set(np.round(ref, 6))) == N_STEPS
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_cpu_trainer_keeps_one_step_in_flight(tmp_path, monkeypatch):
    # Under jemalloc two overlapping steps doubled the resident heap (DiT-S/2 bf16 b128 was
    # OOM-killed at 24 GB), so on CPU a step is dispatched only once the previous one finished.
    import jax_mmdit.train.trainer as trainer_mod

    cfg = tiny(tmp_path, mesh=MeshConfig(data=1, fsdp=1))
    tr = Trainer(cfg, devices=jax.devices()[:1])
    it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
    waited = []
    real_wait = trainer_mod.jax.block_until_ready
    monkeypatch.setattr(trainer_mod.jax, "block_until_ready", lambda x: waited.append(x) or real_wait(x))
    first = tr.train_step(next(it))
    assert waited == []  # nothing in flight before the first step
    tr.train_step(next(it))
    assert len(waited) == 1 and waited[0] is first["loss"]


@pytest.mark.parametrize("data,fsdp", [(1, 1), (2, 4)], ids=["single", "fsdp2x4"])
def test_ema_follows_the_new_weights_and_the_step_copies_no_parameter(tmp_path, data, fsdp):
    cfg = tiny(tmp_path, mesh=MeshConfig(data=data, fsdp=fsdp))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, ema_decay=0.9, ema_warmup=True))
    tr = Trainer(cfg, devices=jax.devices()[: data * fsdp])
    it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
    ema = jax.device_get(tr.state.ema_params)
    for step in range(3):
        tr.train_step(next(it))
        params, new_ema = jax.device_get((tr.state.params, tr.state.ema_params))
        decay = min(0.9, (1 + step) / (10 + step))  # warmup: 0.1, 0.18, 0.25
        jax.tree.map(
            lambda e1, e0, p, decay=decay: np.testing.assert_allclose(
                e1, decay * e0 + (1 - decay) * p, rtol=1e-5, atol=1e-7
            ),
            new_ema,
            ema,
            params,
        )
        ema = new_ema
    # The EMA reads the stored new weights (an optimization barrier): before, XLA recomputed the
    # update inside the EMA's fusion, and copy insertion copied every parameter each step.
    text = tr.compiled_step.as_text()
    copied = [n for n in re.findall(r" copy\(%([\w.\-]+)\)", text) if n.startswith("state_params")]
    assert copied == []


def test_a_non_finite_gradient_skips_the_step_and_keeps_weights_moments_and_ema(tmp_path):
    from jax_mmdit.train.step import make_train_step

    # No warmup: the first update has a learning rate (a skipped step leaves the optimizer's count).
    cfg = tiny(tmp_path, mesh=MeshConfig(data=1, fsdp=1), optim=OptimConfig(learning_rate=1e-3, warmup_steps=0))
    tr = Trainer(cfg, devices=jax.devices()[:1])
    batch = next(tr.train_data.iterator(cfg.batch_size, seed=cfg.seed))

    def step_with(poison: bool):
        def loss_fn(model, x, y, rng):
            loss, aux = tr.loss_fn(model, x, y, rng)
            # sqrt(0 * w) is 0, its gradient inf * 0 = NaN: a finite loss with a NaN gradient in
            # one leaf only (the final layer's bias).
            w = model.final.linear.bias[...]
            return loss + (jnp.sqrt(0.0 * jnp.abs(w)).sum() if poison else 0.0), aux

        return jax.jit(make_train_step(tr.graphdef, tr.rest, loss_fn, tr.tx, tr.schedule, cfg.optim))

    before = jax.device_get(tr.state)
    state, metrics = step_with(poison=True)(tr.state, batch, tr.rng)
    after = jax.device_get(state)
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped"]) == 1 and int(after.step) == int(before.step) + 1
    for name in ("params", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    # The same step without the NaN applies the update.
    state, metrics = step_with(poison=False)(state, batch, tr.rng)
    assert int(metrics["skipped"]) == 0
    # (adaLN-Zero: at initialisation only the last layers get a gradient.)
    new_kernel = jax.device_get(state.params["final"]["linear"]["kernel"][...])
    assert not np.array_equal(new_kernel, after.params["final"]["linear"]["kernel"][...])


def test_the_compiled_step_grows_linearly_with_the_number_of_weights(tmp_path):
    # Per-weight all-finite flags and-ed together were fused, and-chain and all, into every
    # select fusion of the update: the compiled step grew with (number of weights)^2 (MMDiT-S/2
    # compiled in 49 s). Instructions per weight must not grow with depth.
    base = tiny(tmp_path, mesh=MeshConfig(data=1, fsdp=1))
    per_weight = []
    for depth in (2, 8):
        model = dataclasses.replace(base.model, arch="mmdit", qk_norm=True, depth=depth)
        tr = Trainer(dataclasses.replace(base, model=model), devices=jax.devices()[:1], with_data=False)
        batch = {"image": np.zeros((16, 28, 28, 1), np.float32), "label": np.zeros((16,), np.int32)}
        tr.train_step(batch)
        instructions = len(re.findall(r"\n\s*(?:ROOT )?%\S+ = ", tr.compiled_step.as_text()))
        per_weight.append(instructions / len(jax.tree.leaves(tr.state.params)))
    # Measured here (8 fake devices, XLA's dots): 317 -> 399 per weight (1.26x: at these tiny sizes
    # XLA also fuses the global norm's small reductions into their consumers); the and-chain gave
    # 759 -> 1993 (2.6x).
    assert per_weight[1] < 1.5 * per_weight[0], per_weight
