"""`Trainer`: builds mesh, data, model and state, runs the loop, evaluates, samples, checkpoints.

trainer = Trainer(get_config("fashion_mnist"))
trainer.train()
images = trainer.sample(labels=[0, 1, 2])
trainer = Trainer.load("runs/fashion_mnist")      # sampling from a finished run
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_mmdit import ops as ops_lib
from jax_mmdit.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings, load_config_dict
from jax_mmdit.config import MeshConfig, TrainConfig, config_differences
from jax_mmdit.data.captions import TEXT_KEYS
from jax_mmdit.errors import UserError
from jax_mmdit.eval.evaluators import build_evaluators
from jax_mmdit.flow import make_loss_fn
from jax_mmdit.models import count_params, create_model
from jax_mmdit.text.run import RUN_TEXT, PromptConditioner, caption_run_info, read_run_text_info, resolve_text_model
from jax_mmdit.train import mesh as mesh_lib
from jax_mmdit.train import profiler
from jax_mmdit.train.init_from import load_init_params
from jax_mmdit.train.logger import MetricLogger, summarize_window
from jax_mmdit.train.rundir import RunLock, StopSignals, make_dirs, write_atomically
from jax_mmdit.train.sampling import SamplingMixin
from jax_mmdit.train.step import (
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_model,
)
from jax_mmdit.vae.codec import RUN_LATENTS, SampleDecoder, latent_run_info, read_run_latent_info


def _describe(fingerprint: dict) -> str:
    f = fingerprint
    return f"{f.get('name')}, {f.get('num_examples')} examples, sample hash {f.get('sample_sha256')}"


def _shown(key: str, value: float, scores: dict) -> str:
    """'class_accuracy 0.812 (real 0.914)': a score with its real-data floor where there is one."""
    name = key.split("/", 1)[-1]
    real = scores.get(key + "_real")
    return f"{name} {value:.4g}" + (f" (real {real:.4g})" if real is not None else "")


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


class Trainer(SamplingMixin):
    def __init__(self, cfg: TrainConfig, *, devices=None, with_data: bool = True, distributed: bool = True, model=None):
        """`distributed=False` never starts jax.distributed (sampling, evaluation: this host only);
        `model` (an NNX model of cfg.model) gives the initial weights instead of a random init. On
        captioned data (data.captions) the MMDiT's text widths come from the captions' manifest."""
        cfg = resolve_text_model(cfg)
        self.cfg = cfg
        if distributed:
            mesh_lib.maybe_initialize_distributed(cfg.mesh)
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        mesh_lib.check_batch_divisible(cfg.batch_size, self.mesh, cfg.grad_accum_steps)
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = cfg.model_for_precision
        # The backend of the model's operations, chosen once for this mesh (builds the C++ kernels
        # here when they are picked, never inside a trace).
        jvp = cfg.flow.objective == "meanflow"
        self.ops = ops_lib.resolve(cfg.kernels, cfg.attention, list(self.mesh.devices.flat),
                                   fp8=cfg.precision == "fp8", forward_mode=jvp)  # fmt: skip

        # --- data -------------------------------------------------------------------------
        self.train_data = self.eval_data = None
        if with_data:
            from jax_mmdit.data import build_dataset

            self.train_data = build_dataset(cfg.data, split="train")
            self._check_data_matches_model(self.train_data.info)
            self.eval_data = build_dataset(cfg.data, split="eval")
            wants_loss = "loss" in cfg.eval.evaluators and cfg.n_eval_batches > 0
            if wants_loss and self.eval_data.info.num_examples < cfg.batch_size:
                raise UserError(
                    f"The eval split of {self.eval_data.info.name!r} has {self.eval_data.info.num_examples} "
                    f"examples, fewer than one batch of {cfg.batch_size}: use a smaller --batch_size, "
                    "--n_eval_batches 0, or a larger --data.eval_fraction."
                )
        # A run on latents records which VAE decodes them and the normalisation to undo
        # (run_dir/latents.json, written when training starts, read by `Trainer.load`).
        self.latent_info = latent_run_info(self.train_data, cfg.data)
        self.decoder = SampleDecoder(self.latent_info, cfg.data.vae)
        # A text run's prompts -> conditions, and what it records (text_encoder.json, read by `load`).
        self.text_info, self.prompts, null_cond = None, None, None
        table = self.train_data.table if self.train_data is not None else None
        if table is not None:
            self.text_info = caption_run_info(table, self.model_cfg.context_mask)
            self.prompts = PromptConditioner(self.text_info, table)
            null_cond = table.gather([table.manifest["empty_caption"]])  # caption dropout's condition
        # What identifies the training data; saved with every checkpoint, compared on resume.
        self.data_fingerprint = self.train_data.fingerprint() if self.train_data else None

        # --- model and state (created directly in their final shardings) ---------------------
        mcfg, seed, model_ops = self.model_cfg, cfg.seed, self.ops

        def init_params():
            _, params, rest = split_model(create_model(mcfg, nnx.Rngs(seed), model_ops))
            return params, rest

        abstract_model = nnx.eval_shape(lambda: create_model(mcfg, nnx.Rngs(seed), model_ops))
        self.graphdef = nnx.graphdef(abstract_model)
        abstract_params, abstract_rest = jax.eval_shape(init_params)
        self.total_steps = self._total_steps()
        self.schedule = make_schedule(cfg.optim, self.total_steps)
        self.tx = make_optimizer(cfg.optim, self.schedule)
        init_state = lambda p: init_train_state(p, self.tx, cfg.precision)  # noqa: E731
        self.abstract_state = jax.eval_shape(init_state, abstract_params)
        self.state_sharding = mesh_lib.state_shardings(self.abstract_state, self.mesh)
        repl = mesh_lib.replicated(self.mesh)
        params_sharding = mesh_lib.state_shardings(abstract_params, self.mesh)
        rest_sharding = jax.tree.map(lambda _: repl, abstract_rest)
        if model is None:
            params, self.rest = jax.jit(init_params, out_shardings=(params_sharding, rest_sharding))()
        else:
            _, params, rest = split_model(model)
            params, self.rest = jax.device_put((params, rest), (params_sharding, rest_sharding))
        # A fresh optimizer state and EMA around given parameters (also for --init_from).
        self._fresh_state = jax.jit(init_state, out_shardings=self.state_sharding)
        self.state = self._fresh_state(params)
        del params
        self.rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), repl)
        self.param_counts = count_params(abstract_model)  # total (the DiT paper's count), trainable, fixed
        self.num_params = self.param_counts["total"]

        # --- steps ---------------------------------------------------------------------------
        null_class = mcfg.num_classes if mcfg.num_classes > 0 else None
        self.loss_fn = make_loss_fn(cfg.flow, null_class=null_class, null_cond=null_cond)
        # Eval measures the conditional model: no label dropout, fixed t/noise across evals.
        self.eval_loss_fn = make_loss_fn(dataclasses.replace(cfg.flow, label_dropout=0.0), null_class=null_class)
        train_step = make_train_step(
            self.graphdef,
            self.rest,
            self.loss_fn,
            self.tx,
            self.schedule,
            cfg.optim,
            grad_accum_steps=cfg.grad_accum_steps,
            loss_scaling=cfg.precision == "fp16",
            mesh=self.mesh,
        )
        bsh = mesh_lib.batch_sharding(self.mesh)
        keys = ("image", "label")
        if table is not None:
            keys += TEXT_KEYS if mcfg.pooled_dim else TEXT_KEYS[:2]
        batch_sh = {k: bsh for k in keys}
        self._train_step_jit = jax.jit(
            train_step,
            in_shardings=(self.state_sharding, batch_sh, repl),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )
        self.compiled_step = None  # the train step's executable, once compiled (`compile_step`)
        # On CPU one step in flight: a step dispatched while the previous one runs allocates its
        # buffers beside the previous step's, and a heap that keeps freed pages (jemalloc, which
        # `mmdit` preloads) keeps that doubled high-water mark (DiT-S/2 bf16 b128 ran out of 24 GB).
        # The host threads are the device, so the overlap bought nothing.
        self._one_step_in_flight = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        self._in_flight = None
        self.flops_per_step = None
        self._eval_step = jax.jit(
            make_eval_step(self.graphdef, self.rest, self.eval_loss_fn),
            in_shardings=(self.state_sharding.ema_params, batch_sh, repl),
            out_shardings=repl,
        )

        # --- checkpoints (resume automatically) ------------------------------------------------
        self.checkpointer = None
        self.data_iter = None
        self.history: list[dict] = []
        self.evaluators: list | None = None  # built when training starts (`build_evaluators`)

    # ------------------------------------------------------------------------------------------
    def _check_data_matches_model(self, info) -> None:
        m = self.model_cfg
        want = (m.image_size, m.image_size, m.in_channels)
        if tuple(info.image_shape) != want:
            raise UserError(
                f"Dataset {info.name!r} gives images of shape {tuple(info.image_shape)} but the model "
                f"expects {want}: set --model.image_size/--model.in_channels or --data.image_size."
            )
        if m.context_dim and info.captions is None:
            raise UserError(
                "This MMDiT is text-conditioned (model.context_dim > 0): train it on captioned data, "
                "--data.captions DIR (written by `mmdit encode-text`)."
            )
        if m.num_classes and info.num_classes and m.num_classes != info.num_classes:
            raise UserError(
                f"Dataset {info.name!r} has {info.num_classes} classes but the model has num_classes={m.num_classes}."
            )

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        if self.train_data is None:
            return 1
        return max(1, math.ceil(self.cfg.n_epochs * self.train_data.steps_per_epoch(self.cfg.batch_size)))

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def _local_batch_size(self) -> int:
        return self.cfg.batch_size // jax.process_count()

    def train_iterator(self):
        """This process's batches of the training data, from the start (set_state moves it)."""
        return self.train_data.iterator(
            self.cfg.batch_size,
            seed=self.cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            shuffle=True,
            repeat=True,
        )

    def _ensure_checkpointer(self) -> Checkpointer:
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.run_dir, keep=self.cfg.keep_checkpoints)
        return self.checkpointer

    def restore(self, step: int | None = None, data_iterator=None, check_resume: bool = False) -> int | None:
        """Load the newest usable (or the given) checkpoint of `run_dir` onto this trainer's mesh;
        returns its step, or None when the run has none. With `check_resume`, the saved config and
        data must match this trainer's (`config_differences`, the data's fingerprint)."""
        ckpt = self._ensure_checkpointer()
        target = abstract_with_shardings(self.abstract_state, self.state_sharding)
        found = ckpt.restore(target, data_iterator, step, check=self._check_resume if check_resume else None)
        if found is None:
            return None
        step, self.state = found
        return step

    def _check_resume(self, step: int, items: dict) -> None:
        """Refuse to resume a run whose saved config or data differ from what was asked for."""
        where = f"{self.run_dir} (checkpoint step {step})"
        if "converted_from" in items.get("meta", {}):
            raise UserError(
                f"{self.run_dir} holds converted weights (mmdit convert), not a training run: fine-tune them in a "
                f"new run, --init_from {self.run_dir} --run_dir NEW_DIR."
            )
        diffs = config_differences(items["config"], self.cfg) if "config" in items else []
        if diffs:
            raise UserError(
                f"Cannot resume {where}: the requested config differs from the run's in {'; '.join(diffs)}. "
                "Resume with the run's values, use a new --run_dir, or name the fields in --allow_config_change."
            )
        saved = items.get("meta", {}).get("data")
        if saved is not None and "data" not in self.cfg.allow_config_change and saved != self.data_fingerprint:
            raise UserError(
                f"Cannot resume {where}: it was trained on other data ({_describe(saved)}; now "
                f"{_describe(self.data_fingerprint)}). Point --data.source at the run's data, use a new --run_dir, "
                "or pass --allow_config_change data."
            )

    def train_step(self, local_batch: dict) -> dict:
        """One optimizer step on this process's share of a global batch; returns device metrics
        (no host sync: call jax.device_get on them when you need numbers)."""
        batch = mesh_lib.global_batch_from_local(local_batch, self.mesh)
        compiled = self.compile_step(batch)
        if self._in_flight is not None:
            jax.block_until_ready(self._in_flight)
        self.state, metrics = compiled(self.state, batch, self.rng)
        if self._one_step_in_flight:
            self._in_flight = metrics["loss"]
        return metrics

    def compile_step(self, batch):
        """The train step compiled for batches shaped like `batch` (once; later calls return it).
        Sets `flops_per_step` through the backend's FLOP hook."""
        if self.compiled_step is None:
            self.compiled_step = self._train_step_jit.lower(self.state, batch, self.rng).compile()
            self.flops_per_step = self.ops.flops(self.compiled_step)
        return self.compiled_step

    # ------------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict[str, float]:
        """Train to `total_steps` (or stop, checkpointed, at `until_step`), resuming from the run
        directory's newest usable checkpoint. SIGTERM/SIGINT stop after the current step, which is
        saved first. Returns the last logged metrics; all logged rows are kept in `self.history`."""
        if self.train_data is None:
            raise ValueError("This Trainer was built with with_data=False; it can sample, not train.")
        # The lock first: the checkpointer's start-up cleans temporary directories, which would be
        # another run's in-flight saves.
        with RunLock(self.run_dir, jax.process_index()), StopSignals() as stop:
            ckpt = self._ensure_checkpointer()
            self.data_iter = self.train_iterator()
            resumed = self.restore(data_iterator=self.data_iter, check_resume=True)
            if self.cfg.init_from is not None:
                if resumed is None:
                    params, note = load_init_params(
                        self.cfg.init_from, self.cfg, self.state.params, self.mesh, self.ops
                    )
                    self.state = self._fresh_state(params)
                else:
                    note = f"resuming step {resumed}: --init_from {self.cfg.init_from} only starts a fresh run"
                if jax.process_index() == 0:
                    print(f"[mmdit] {note}", flush=True)
            if self.evaluators is None:
                self.evaluators = build_evaluators(self.cfg.eval, self.cfg, self)
            completed = False
            try:
                last = self._loop(ckpt, stop, resumed, until_step)
                completed = True
            finally:
                if not completed:  # an error or an abort: still make an earlier, good save durable
                    try:
                        ckpt.finish()
                    except Exception:  # noqa: BLE001 - the original exception is the one to report
                        pass
        return last

    def _loop(self, ckpt: Checkpointer, stop: StopSignals, resumed: int | None, until_step: int | None) -> dict:
        cfg = self.cfg
        main = jax.process_index() == 0
        start = self.step
        samples_dir = self.run_dir / "samples"
        if main:
            write_atomically(self.run_dir / "config.json", cfg.to_json())
            if self.latent_info is not None:
                write_atomically(self.run_dir / RUN_LATENTS, json.dumps(self.latent_info, indent=2))
            if self.text_info is not None:
                write_atomically(self.run_dir / RUN_TEXT, json.dumps(self.text_info, indent=2))
            make_dirs(samples_dir, self.run_dir / "tb")
            msg = f"resumed from step {resumed}" if resumed is not None else "starting fresh"
            print(
                f"[mmdit] {self.num_params / 1e6:.2f}M params, mesh {dict(self.mesh.shape)}, "
                f"{jax.process_count()} process(es), {self.total_steps} steps, {msg} in {self.run_dir}"
            )
        logger = MetricLogger(self.run_dir / "tb")
        meta = {"data": self.data_fingerprint}
        window: list = []
        last: dict[str, float] = {}
        t_window, steps_window = None, 0
        peak = profiler.device_peak_flops(jax.devices()[0], self.model_cfg.dtype)
        bar = tqdm(total=self.total_steps, initial=start, disable=not main, dynamic_ncols=True, desc="train")
        step, saved = start, resumed
        try:
            while step < self.total_steps and not stop.requested:
                # --- data + step (async dispatch: no host sync here) ----------------------------
                metrics = self.train_step(next(self.data_iter))
                step += 1
                window.append(metrics)
                if t_window is None:  # the first step includes compilation: time from its end
                    jax.block_until_ready(metrics["loss"])
                    t_window, steps_window = time.perf_counter(), 0
                else:
                    steps_window += 1
                bar.update(1)
                is_last = step == self.total_steps
                if until_step is not None and step >= until_step:
                    stop.requested = True
                # --- logging (the only host sync in the loop) ---------------------------------
                if window and (step % cfg.log_every == 0 or is_last or stop.requested):
                    fetched = jax.device_get(window)
                    self._check_finite(step)
                    dt = time.perf_counter() - t_window
                    last = summarize_window(fetched, cfg.flow.num_loss_bins)
                    if steps_window:
                        step_time = dt / steps_window
                        last["perf/img_per_s"] = cfg.batch_size / step_time
                        last["perf/step_time_s"] = step_time
                        last["perf/mfu"] = profiler.mfu(self.flops_per_step, step_time, self.mesh.size, peak)
                    logger.scalars(step, last)
                    self.history.append({"step": step, **last})
                    bar.set_postfix(loss=f"{last['train/loss']:.4f}", img_s=f"{last.get('perf/img_per_s', 0):.0f}")
                    window, t_window, steps_window = [], time.perf_counter(), 0
                # --- eval + checkpoint (a stop skips both: the end below saves) -------------------
                t_extra = time.perf_counter()
                if (step % cfg.eval_save_steps == 0 or is_last) and not stop.requested:
                    self._check_finite(step)
                    ckpt.save(step, self.state, self.data_iter, cfg.to_json(), meta)
                    saved = step
                # --- evaluators (each at its own interval; the save above runs meanwhile) ---------
                due = [ev for ev in self.evaluators if step % ev.every == 0 or is_last]
                if due and not stop.requested:
                    self._check_finite(step)
                    scores = self._run_evaluators(due, step, bar if main else None)
                    last.update(scores)
                    logger.scalars(step, scores)
                # --- samples ---------------------------------------------------------------------
                if ((cfg.sample_every_n and step % cfg.sample_every_n == 0) or is_last) and not stop.requested:
                    self.write_samples(step, samples_dir, logger)
                ckpt.poll()  # a finished save gets its manifest (no waiting)
                t_window += time.perf_counter() - t_extra  # keep eval/sampling out of img/s
            # --- the end: the last completed step is saved, and durable, before anything says so --
            self._check_finite(step)
            if saved != step:
                ckpt.save(step, self.state, self.data_iter, cfg.to_json(), meta)
            ckpt.finish(self.state)
            if stop.requested and main:
                print(f"\n[mmdit] stop requested: saved step {step}, exiting.", flush=True)
        finally:
            bar.close()
            logger.close()
        return last

    def _run_evaluators(self, evaluators: list, step: int, bar=None) -> dict[str, float]:
        scores, parts = {}, []
        for ev in evaluators:
            t0 = time.perf_counter()
            got = ev(self)
            scores.update(got)
            scores[f"perf/eval_{ev.name}_s"] = time.perf_counter() - t0
            parts += [_shown(k, v, got) for k, v in got.items() if not k.endswith("_real")]
        if bar is not None:
            bar.write(f"[mmdit] step {step}: " + ", ".join(parts))
        return scores

    def _check_finite(self, step: int) -> None:
        bad = int(jax.device_get(self.state.nonfinite_step))
        if bad >= 0:
            ckpt = self._ensure_checkpointer()
            ckpt.finish()
            good = ckpt.latest_step()
            kept = f"last good checkpoint: step {good}" if good is not None else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"Loss became NaN/inf at step {bad + 1} (detected at step {step}); stopped, {kept} "
                f"in {self.run_dir}. Try a lower --optim.learning_rate or --precision fp32."
            )

    # ------------------------------------------------------------------------------------------
    def evaluate(self, n_batches: int | None = None) -> float:
        """Mean flow loss of the EMA model on the eval split, same batches/noise every call."""
        n = self.cfg.n_eval_batches if n_batches is None else n_batches
        it = self.eval_data.iterator(
            self.cfg.batch_size,
            seed=0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            shuffle=False,
            repeat=True,
            num_workers=0,
        )
        eval_rng = jax.device_put(jax.random.key_data(jax.random.key(1234)), mesh_lib.replicated(self.mesh))
        losses = []
        for i in range(n):
            batch = mesh_lib.global_batch_from_local(next(it), self.mesh)
            losses.append(self._eval_step(self.state.ema_params, batch, jax.random.fold_in(eval_rng, i)))
        it.close()
        return float(np.mean(jax.device_get(losses)))

    @property
    def is_latent(self) -> bool:
        return self.latent_info is not None

    def ema_model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.ema_params, self.rest)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str, step: int | None = None, devices=None, **overrides) -> Trainer:
        """A trainer for a saved run, for sampling: its config read from the checkpoint, its mesh
        built for this host's devices (no jax.distributed) unless `mesh` is overridden, and the
        weights of the newest usable checkpoint (or exactly `step`) restored. Nothing in the run
        directory is written, moved or cleaned: it may be training at the same time."""
        cfg_dict, _ = load_config_dict(run_dir, step)
        overrides.setdefault("mesh", dataclasses.asdict(MeshConfig()))
        cfg = TrainConfig.from_dict({**cfg_dict, "run_dir": str(run_dir), **overrides})
        trainer = cls(cfg, devices=devices, with_data=False, distributed=False)
        trainer.latent_info = read_run_latent_info(run_dir)
        text_info = read_run_text_info(run_dir)
        trainer.text_info = text_info
        trainer.prompts = PromptConditioner(text_info) if text_info else None
        trainer.decoder = SampleDecoder(trainer.latent_info, cfg.data.vae)
        trainer.checkpointer = Checkpointer(run_dir, read_only=True)
        if trainer.restore(step) is None:
            raise CheckpointError(f"No checkpoint found in {run_dir}.")
        return trainer
