"""Benchmark worker processes, one per measured implementation.

    python -m benchmarks.workers '<json spec>'

Each worker builds its case (compiling/warming it up), reports `ready`, then serves `run` requests
from the orchestrator (bench_train.py) on stdin until `quit`. Keeping every implementation of one
config alive lets the orchestrator alternate short timed segments between them, so machine noise
(other jobs on the shared 2 cores) hits all of them alike, while only one of them computes at a time.

Protocol lines on stdout start with PREFIX; anything else a library prints is ignored.
A worker never imports jax before its environment (XLA_FLAGS) is final.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time

PREFIX = "@@bench "


def cpu_name() -> str:
    """The CPU's model name and the ISA extensions that decide the matmul rates (AMX, AVX512-BF16):
    the same VM has been an Intel Xeon with AMX on some days and an AMD EPYC Zen 4 on others."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    isa = [
        label
        for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
        if flag in flags
    ]
    return f"{name.group(1).strip() if name else platform.machine()} ({', '.join(isa) or 'no AVX-512'})"


def emit(obj: dict) -> None:
    sys.__stdout__.write(PREFIX + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


# ---- memory --------------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak we read covers the timed steps
    only (not compilation, which can need GBs of its own)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> float | None:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else None


def rss_bytes() -> float | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


# ---- serving -------------------------------------------------------------------------------------
def serve(step, sync, info: dict) -> None:
    """`step()` launches one unit of work (may be async), `sync(result)` waits for it.

    Ops: run (timed steps), quit. The orchestrator quits an idle worker when the next one would
    not fit in memory and starts it again (from the compilation cache) for its next segment: a
    process's exit is the one way to hand all of its heap back (a jemalloc heap purged while idle
    regrew larger than a training process's, DiT-S/2 bf16 b32: 7.7 GB against 5.2, and OOM-killed
    the batch-128 bf16 row)."""
    warmup_peak = peak_rss_bytes()  # warm-up steps (and compilation): what a step may need
    reset_peak_rss()
    emit({"ready": True, "idle_rss": rss_bytes(), "warmup_peak_rss": warmup_peak, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            # Back to back like a real training loop (JAX dispatch overlaps the next step), one
            # sync at the end.
            t0 = time.perf_counter()
            out = None
            for _ in range(cmd["n"]):
                out = step()
            sync(out)
            emit({"seconds": time.perf_counter() - t0, "n": cmd["n"], "rss": rss_bytes(), "peak_rss": peak_rss_bytes()})
        elif cmd["op"] == "quit":
            emit({"peak_rss": peak_rss_bytes()})
            return


def _timed_warmup(step, sync, n: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of the following `n` calls)."""
    t0 = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    times.sort()
    return first, times[len(times) // 2] if times else first


# ---- configs shared by the JAX and torch workers ---------------------------------------------------
def train_config(spec: dict):
    """The TrainConfig of a case: a named preset, optionally with another model and batch."""
    import dataclasses

    from jax_mmdit.config import get_config
    from jax_mmdit.models import ModelConfig

    cfg = get_config(spec.get("base", "fashion_mnist"))
    model = cfg.model
    if spec.get("preset"):
        model = ModelConfig.from_preset(spec["preset"], **spec.get("model", {}))
    elif spec.get("model"):
        model = dataclasses.replace(model, **spec["model"])
    return dataclasses.replace(
        cfg,
        model=model,
        batch_size=spec["batch"],
        precision=spec.get("precision", "fp32"),
        grad_accum_steps=spec.get("accum", 1),
        kernels=spec.get("kernels", "auto"),
        attention=spec.get("attention", "auto"),
        run_dir="/tmp/mmdit-bench-unused",
    )


def synthetic_batch(mcfg, batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, mcfg.image_size, mcfg.image_size, mcfg.in_channels)).astype(np.float32)
    y = rng.integers(0, max(mcfg.num_classes, 1), (batch,)).astype(np.int32)
    return x, y


# ---- JAX: the real Trainer.train_step ------------------------------------------------------------
def jax_train(spec: dict) -> None:
    from jax_mmdit import runtime

    if spec.get("xla_flags"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + spec["xla_flags"]).strip()
    if not spec.get("no_runtime_flags"):
        runtime.configure()

    import jax

    from jax_mmdit.train import profiler
    from jax_mmdit.train.trainer import Trainer

    cfg = train_config(spec)
    try:
        tr = Trainer(cfg, devices=jax.devices()[:1], with_data=False)
        x, y = synthetic_batch(tr.model_cfg, cfg.batch_size)
        batch = {"image": x, "label": y}
        step = lambda: tr.train_step(batch)  # noqa: E731
        sync = lambda m: jax.block_until_ready(m["loss"])  # noqa: E731
        first, warm = _timed_warmup(step, sync, spec.get("warmup", 2))
    except Exception as e:  # e.g. RESOURCE_EXHAUSTED on a GPU: the orchestrator retries smaller
        emit({"error": f"{type(e).__name__}: {str(e)[:300]}", "oom": "RESOURCE_EXHAUSTED" in str(e)})
        return
    dev = jax.devices()[0]
    mem = profiler.compiled_memory(tr.compiled_step)
    plan = sum(mem.get(k, 0.0) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
    plan -= mem.get("alias_size_in_bytes", 0.0)
    serve(
        step,
        sync,
        {
            "compile_s": first - warm,
            "warm_step_s": warm,
            "flops": tr.flops_per_step,
            "xla_temp": mem.get("temp_size_in_bytes"),
            "xla_plan": plan,
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "peak_flops": profiler.device_peak_flops(dev, tr.model_cfg.dtype),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "batch": cfg.batch_size,
            "kernels": sorted(tr.ops.kernel_calls(tr.compiled_step)),
        },
    )


# ---- PyTorch: diffusers DiTTransformer2DModel / SD3Transformer2DModel, same config, same loss,
# AdamW + clip + EMA ----------------------------------------------------------------------------------
def torch_mmdit(m, label_dropout: float):
    """diffusers' SD3Transformer2DModel (the MMDiT our convert.py maps) with our MMDiT's class
    conditioning around it: `num_context_tokens` learned tokens and a pooled embedding per class
    (null row for CFG, labels dropped as in training). SD3 then runs its own context projection
    and pooled MLP on them: a (T, D) x (D, D) linear and a (D, D) MLP per image more than ours."""
    import diffusers
    import torch

    D, T, null = m.hidden_size, m.num_context_tokens, m.num_classes

    class ClassConditionedSD3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = diffusers.SD3Transformer2DModel(
                sample_size=m.image_size, patch_size=m.patch_size, in_channels=m.in_channels,
                num_layers=m.depth, attention_head_dim=m.head_dim, num_attention_heads=m.num_heads,
                joint_attention_dim=D, caption_projection_dim=D, pooled_projection_dim=D,
                out_channels=m.out_channels, pos_embed_max_size=m.grid_size,
                qk_norm="rms_norm" if m.qk_norm else None,
            )  # fmt: skip
            self.class_tokens = torch.nn.Embedding(null + 1, T * D)
            self.class_pooled = torch.nn.Embedding(null + 1, D)

        def forward(self, x, timestep, class_labels):
            drop = torch.rand(class_labels.shape, device=class_labels.device) < label_dropout
            y = torch.where(drop, torch.full_like(class_labels, null), class_labels)
            ctx = self.class_tokens(y).view(y.shape[0], T, D)
            return self.net(x, encoder_hidden_states=ctx, pooled_projections=self.class_pooled(y), timestep=timestep)

    return ClassConditionedSD3()


def torch_train(spec: dict) -> None:
    import torch

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(threads)
    # XLA:CPU runs with denormals flushed to zero; eager PyTorch does not by default, and on this
    # benchmark AdamW's second moments and some activations go denormal after a few steps, which
    # made torch's fp32 step ~4x slower (20 s instead of 4.9 s at DiT-S/2 batch 32). Flushing
    # gives the faster, like-for-like reference; `--torch-denormals` measures the default.
    torch.set_flush_denormal(not spec.get("keep_denormals"))
    import diffusers

    cfg = train_config(spec)
    m = cfg.model
    dev = torch.device("cuda" if spec.get("cuda") else "cpu")
    if m.arch == "mmdit":
        model = torch_mmdit(m, cfg.flow.label_dropout)
    else:
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=m.num_heads, attention_head_dim=m.head_dim, in_channels=m.in_channels,
            out_channels=m.out_channels, num_layers=m.depth, sample_size=m.image_size, patch_size=m.patch_size,
            num_embeds_ada_norm=max(m.num_classes, 1), norm_eps=1e-6,
        )  # fmt: skip
    model = model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ema = [p.detach().clone() for p in params]
    fwd = torch.compile(model) if spec.get("compile") else model
    autocast = spec.get("precision") == "bf16"
    x_np, y_np = synthetic_batch(m, cfg.batch_size)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(dev)  # NCHW
    y = torch.from_numpy(y_np).long().to(dev)

    def step():
        # Same maths as jax_mmdit.flow's loss: logit-normal t, x_t = (1-t) x + t eps, v = eps - x.
        # Label dropout happens inside the model: diffusers DiT's label embedder
        # (class_dropout_prob 0.1), ClassConditionedSD3.forward.
        t = torch.sigmoid(torch.randn(x.shape[0], device=dev))
        noise = torch.randn_like(x)
        tb = t[:, None, None, None]
        xt = (1 - tb) * x + tb * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            v = fwd(xt, timestep=t * 1000.0, class_labels=y).sample
        loss = torch.mean((v.float() - (noise - x)) ** 2)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - o.ema_decay)
        return loss

    def sync(loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    first, warm = _timed_warmup(step, sync, spec.get("warmup", 2))
    serve(
        step,
        sync,
        {
            "compile_s": first - warm,
            "warm_step_s": warm,
            "threads": torch.get_num_threads(),
            "device": str(dev),
            "batch": cfg.batch_size,
        },
    )


# ---- sampling and data loading of the default config -----------------------------------------------
def jax_sample(spec: dict) -> None:
    from jax_mmdit import runtime

    runtime.configure()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_mmdit.flow import SamplerConfig, sample
    from jax_mmdit.models import create_model

    cfg = train_config(spec)
    model = create_model(cfg.model_for_precision, rngs=nnx.Rngs(0))
    m = cfg.model
    n = spec["batch"]
    scfg = SamplerConfig(method="euler", num_steps=spec.get("steps", 50), cfg_scale=spec.get("cfg_scale", 2.0))
    noise = jax.random.normal(jax.random.key(0), (n, m.image_size, m.image_size, m.in_channels), jnp.float32)
    y = jnp.arange(n, dtype=jnp.int32) % max(m.num_classes, 1)
    step = lambda: sample(model, noise, y, scfg)  # noqa: E731
    first, warm = _timed_warmup(step, jax.block_until_ready, 1)
    serve(
        step,
        jax.block_until_ready,
        {
            "compile_s": first - warm,
            "warm_step_s": warm,
            "batch": n,
            "steps": scfg.num_steps,
            "cfg_scale": scfg.cfg_scale,
        },
    )


def data_loader(spec: dict) -> None:
    from jax_mmdit import runtime

    runtime.configure()
    from jax_mmdit.data import build_dataset

    cfg = train_config(spec)
    ds = build_dataset(cfg.data, split="train")
    it = ds.iterator(cfg.batch_size, seed=0)
    step = lambda: next(it)  # noqa: E731
    first, warm = _timed_warmup(step, lambda b: b, 5)
    serve(
        step,
        lambda b: b,
        {"compile_s": first - warm, "warm_step_s": warm, "batch": cfg.batch_size, "num_workers": cfg.data.num_workers},
    )
    it.close()


# ---- matmul peaks ----------------------------------------------------------------------------------
def matmul_peak(spec: dict) -> None:
    """Best median GFLOP/s of square matmuls: numpy fp32 (the sgemm peak we quote), plus torch and
    JAX fp32/bf16 for context (does a framework reach the peak, and does bf16 pay on this CPU?)."""
    import numpy as np

    sizes = spec.get("sizes", [1024, 2048, 4096])
    reps = spec.get("reps", 5)

    def best(fn_for_size) -> float:
        out = 0.0
        for n in sizes:
            fn = fn_for_size(n)
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out = max(out, 2 * n**3 / sorted(times)[len(times) // 2] / 1e9)
        return out

    res = {}
    rng = np.random.default_rng(0)

    def np_case(n):
        a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
        return lambda: a @ b

    res["numpy_fp32"] = best(np_case)
    if spec.get("frameworks", True):
        try:
            import torch

            torch.set_num_threads(spec.get("threads", 2))
            for name, dt in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):

                def tc(n, dt=dt):
                    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
                    return lambda: a @ b

                res[name] = best(tc)
        except ImportError:
            pass
        from jax_mmdit import runtime

        runtime.configure()
        import jax
        import jax.numpy as jnp

        for name, dt in (("jax_fp32", jnp.float32), ("jax_bf16", jnp.bfloat16)):

            def jc(n, dt=dt):
                a = jax.random.normal(jax.random.key(0), (n, n), dt)
                f = jax.jit(lambda a: a @ a)
                return lambda: f(a).block_until_ready()

            res[name] = best(jc)
    emit({"ready": True, "result": res})


KINDS = {
    "jax_train": jax_train,
    "torch_train": torch_train,
    "jax_sample": jax_sample,
    "data_loader": data_loader,
    "matmul_peak": matmul_peak,
}


def use_source(src: str) -> None:
    """Import jax_mmdit from `src` instead of the installed package. An editable install maps the
    package through a meta-path finder that outranks sys.path, so that finder is dropped."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, src)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("src"):
        use_source(spec["src"])
    # Libraries' chatter must not interleave with protocol lines.
    sys.stdout = sys.stderr
    KINDS[spec["kind"]](spec)
