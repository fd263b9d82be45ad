"""The GPU check: one short run that measures what the project claims on an accelerator.

    python -m benchmarks.gpu_check --out OUT_DIR            # on the GPU machine (about 6-8 minutes)
    python -m benchmarks.gpu_check --dry-run --out OUT_DIR  # the same sections, tiny shapes, any CPU

Sections, each timed on synthetic data and recorded even when it fails (its error is kept):
- train: the bf16 training step (forward, backward, AdamW, EMA) of DiT-B/2, DiT-XL/2 and an
  MMDiT-XL/2 (the same width and depth, learned class tokens) on 32x32x4 latents at batch 256
  (halved until it fits): img/s, step time, MFU against the card's dense bf16 peak, and which
  attention the compiled step calls (cuDNN's fused attention shows as a `__cudnn$fmha` custom
  call, else XLA's softmax between matmuls);
- sample: 50-step Euler sampling with CFG of DiT-XL/2 (img/s);
- vae: SD-VAE-sized AutoencoderKL (random weights) encode and decode at 256² (img/s);
- fp8: DiT-XL/2 with `--precision fp8` against bf16: img/s, and the two loss curves over 200
  steps of the same synthetic latents from the same initial weights.
Everything goes to OUT_DIR/gpu_check.json (rewritten after each section, so a run cut short keeps
what it measured) and a table on stdout. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

FULL = {
    # (preset, arch, overrides of the preset)
    "train": [("DiT-B/2", "dit", {}), ("DiT-XL/2", "dit", {}), ("MMDiT-XL/2", "mmdit", {})],
    "latent": (32, 4),  # side, channels: 256² images through an 8x VAE
    "batch": 256,
    "steps": 20,  # timed steps per case (after 2 warm-up steps)
    "fp8_model": ("DiT-XL/2", "dit", {}),
    "fp8_curve_steps": 200,
    "sample_batch": 64,
    "sample_steps": 50,
    "vae": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "resolution": 256, "batch": 16},
}
_TINY = {"hidden_size": 64, "depth": 2, "num_heads": 2}
DRY = {
    "train": [("DiT-S/4", "dit", _TINY), ("MMDiT-S/4", "mmdit", _TINY)],
    "latent": (8, 4),
    "batch": 8,
    "steps": 2,
    "fp8_model": ("DiT-S/4", "dit", _TINY),
    "fp8_curve_steps": 6,
    "sample_batch": 4,
    "sample_steps": 2,
    "vae": {"block_out_channels": (8, 16), "norm_num_groups": 4, "resolution": 32, "batch": 2},
}


class Report:
    def __init__(self, out: Path, plan: dict, dry: bool):
        self.path = out / "gpu_check.json"
        out.mkdir(parents=True, exist_ok=True)
        self.data = {"dry_run": dry, "plan": plan, "sections": {}, "started": time.time()}

    def env(self) -> None:
        import jax

        dev = jax.devices()[0]
        self.data["env"] = {"jax": jax.__version__, "python": platform.python_version(), "platform": dev.platform,
                            "device_kind": getattr(dev, "device_kind", ""), "devices": jax.device_count()}  # fmt: skip
        self.save()

    def section(self, name: str, fn, deadline: float) -> None:
        t0 = time.perf_counter()
        if time.time() > deadline:
            self.data["sections"][name] = {"skipped": "time budget spent"}
        else:
            try:
                self.data["sections"][name] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, and the next section still runs
                self.data["sections"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                               "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        self.data["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()
        print(f"[gpu_check] {name}: {self.data['sections'][name].get('error', 'done')} "
              f"({self.data['sections'][name]['seconds']} s)", flush=True)  # fmt: skip

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _trainer(case: tuple, plan: dict, batch: int, precision: str):
    from jax_mmdit.config import get_config
    from jax_mmdit.models import ModelConfig
    from jax_mmdit.train.trainer import Trainer

    preset, arch, overrides = case
    side, channels = plan["latent"]
    model = ModelConfig.from_preset(preset, image_size=side, in_channels=channels, num_classes=1000, **overrides)
    if arch == "mmdit":
        model = dataclasses.replace(model, qk_norm=True)
    cfg = dataclasses.replace(get_config("fashion_mnist"), model=model, batch_size=batch, precision=precision,
                              run_dir="/tmp/mmdit-gpu-check-unused")  # fmt: skip
    import jax

    return Trainer(cfg, devices=jax.devices()[:1], with_data=False)


def _batch(mcfg, batch: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, mcfg.image_size, mcfg.image_size, mcfg.in_channels)).astype(np.float32)
    return {"image": x, "label": rng.integers(0, mcfg.num_classes, (batch,)).astype(np.int32)}


def _fits(make, batch: int):
    """make(batch) -> result, halving the batch on an out-of-memory error (down to 1)."""
    while True:
        try:
            return make(batch), batch
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or batch == 1:
                raise
            batch //= 2


def _time_steps(tr, batch: dict, steps: int) -> float:
    """Seconds per step after two untimed ones (compilation, warm-up)."""
    import jax

    for _ in range(2):
        jax.block_until_ready(tr.train_step(batch)["loss"])
    t0 = time.perf_counter()
    metrics = [tr.train_step(batch) for _ in range(steps)]
    jax.block_until_ready(metrics[-1]["loss"])
    return (time.perf_counter() - t0) / steps


def _attention_impl(tr) -> dict:
    text = tr.compiled_step.as_text()
    return {"cudnn_fmha": "__cudnn$fmha" in text, "fp8_dots": "f8e4m3fn" in text,
            "kernels": sorted(tr.ops.kernel_calls(tr.compiled_step))}  # fmt: skip


def train_section(plan: dict, precision: str = "bf16") -> dict:
    from jax_mmdit.train import profiler

    out = {}
    for case in plan["train"]:

        def make(b, case=case):
            tr = _trainer(case, plan, b, precision)
            step_s = _time_steps(tr, _batch(tr.model_cfg, b, 0), plan["steps"])
            return tr, step_s

        (tr, step_s), b = _fits(make, plan["batch"])
        peak = profiler.device_peak_flops(tr.mesh.devices.flat[0], "bfloat16")
        r = {"batch": b, "step_s": step_s, "img_per_s": b / step_s, "flops_per_step": tr.flops_per_step,
             "mfu": profiler.mfu(tr.flops_per_step, step_s, 1, peak), "peak_flops": peak, "params": tr.num_params,
             **_attention_impl(tr)}  # fmt: skip
        if r["cudnn_fmha"]:  # XLA's count leaves out the cuDNN call: count the same maths without it
            from jax_mmdit.models.summary import forward_flops
            from jax_mmdit.ops import ReferenceOps

            r["flops_per_step_model"] = 3 * forward_flops(tr.model_cfg, ReferenceOps(), b)
            r["mfu_model"] = profiler.mfu(r["flops_per_step_model"], step_s, 1, peak)
        out[case[0]] = r
        del tr
    return out


def fp8_section(plan: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {}
    for precision in ("bf16", "fp8"):

        def make(b, precision=precision):
            tr = _trainer(plan["fp8_model"], plan, b, precision)
            params0 = jax.tree.map(jnp.copy, tr.state.params)  # the same seed: the same weights for both
            step_s = _time_steps(tr, _batch(tr.model_cfg, b, 0), plan["steps"])
            return tr, params0, step_s

        (tr, params0, step_s), b = _fits(make, plan["batch"])
        # The loss curve of a fresh start (same weights, same batches), on the step already compiled.
        tr.state = tr._fresh_state(params0)
        curve = [tr.train_step(_batch(tr.model_cfg, b, s))["loss"] for s in range(plan["fp8_curve_steps"])]
        out[precision] = {"batch": b, "step_s": step_s, "img_per_s": b / step_s,
                          "loss_curve": [float(v) for v in jax.device_get(curve)], **_attention_impl(tr)}  # fmt: skip
        del tr, params0
    a, f = np.asarray(out["bf16"]["loss_curve"]), np.asarray(out["fp8"]["loss_curve"])
    n = min(len(a), 20)
    out["fp8_speedup"] = out["fp8"]["img_per_s"] / out["bf16"]["img_per_s"]
    out["loss_gap_last20_mean"] = float(np.mean(f[-n:] - a[-n:]))
    out["bf16_step_to_step_std_last20"] = float(np.std(np.diff(a[-n:])))
    return out


def sample_section(plan: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_mmdit.flow import SamplerConfig, sample

    tr = _trainer(plan["fp8_model"], plan, plan["sample_batch"], "bf16")
    m, n = tr.model_cfg, plan["sample_batch"]
    scfg = SamplerConfig(method="euler", num_steps=plan["sample_steps"], cfg_scale=4.0)
    noise = jax.random.normal(jax.random.key(0), (n, m.image_size, m.image_size, m.in_channels), jnp.float32)
    y = jnp.arange(n, dtype=jnp.int32) % m.num_classes
    model = tr.ema_model()
    jax.block_until_ready(sample(model, noise, y, scfg))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(sample(model, noise, y, scfg))
    dt = time.perf_counter() - t0
    return {"batch": n, "steps": scfg.num_steps, "cfg_scale": scfg.cfg_scale, "seconds": dt, "img_per_s": n / dt}


def vae_section(plan: dict) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jax_mmdit.vae import AutoencoderKL, VAEConfig
    from jax_mmdit.vae.codec import VaeRunner

    v = plan["vae"]
    cfg = VAEConfig(block_out_channels=v["block_out_channels"], norm_num_groups=v["norm_num_groups"],
                    sample_size=v["resolution"])  # fmt: skip
    runner = VaeRunner(AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=jax.numpy.bfloat16), v["batch"])
    images = np.random.default_rng(0).integers(0, 256, (v["batch"], v["resolution"], v["resolution"], 3), np.uint8)
    out = {"resolution": v["resolution"], "batch": v["batch"]}
    runner.encode(images)  # compile
    t0 = time.perf_counter()
    mean, _ = runner.encode(images)
    out["encode_img_per_s"] = v["batch"] / (time.perf_counter() - t0)
    runner.decode(mean)  # compile
    t0 = time.perf_counter()
    runner.decode(mean)
    out["decode_img_per_s"] = v["batch"] / (time.perf_counter() - t0)
    return out


def table(data: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    s, rows = data["sections"], []
    env = data.get("env", {})
    rows.append(f"gpu_check on {env.get('device_kind', '?')} ({env.get('platform', '?')}), jax {env.get('jax', '?')}"
                + (" [dry run: tiny shapes]" if data["dry_run"] else ""))  # fmt: skip
    rows.append(f"{'case':<28} {'batch':>5} {'step ms':>8} {'img/s':>9} {'MFU':>6}  attention")
    for name, r in (s.get("train") or {}).items():
        if isinstance(r, dict) and "step_s" in r:
            best = r.get("mfu_model") or r["mfu"]
            mfu = f(best and 100 * best, "5.1f")
            rows.append(f"{name + ' bf16':<28} {r['batch']:>5} {r['step_s'] * 1e3:>8.1f} {r['img_per_s']:>9.1f} "
                        f"{mfu:>6}  {'cuDNN' if r['cudnn_fmha'] else 'XLA'}")  # fmt: skip
    fp8 = s.get("fp8") or {}
    for p in ("bf16", "fp8"):
        if p in fp8:
            r = fp8[p]
            rows.append(f"{data['plan']['fp8_model'][0] + ' ' + p:<28} {r['batch']:>5} {r['step_s'] * 1e3:>8.1f} "
                        f"{r['img_per_s']:>9.1f} {'':>6}  fp8 dots: {r['fp8_dots']}")  # fmt: skip
    if "fp8_speedup" in fp8:
        rows.append(
            f"fp8 / bf16 img/s {fp8['fp8_speedup']:.2f}x; loss gap (last 20 steps, fp8 - bf16) "
            f"{fp8['loss_gap_last20_mean']:+.4f}, bf16 step-to-step std {fp8['bf16_step_to_step_std_last20']:.4f}"
        )
    if "img_per_s" in (s.get("sample") or {}):
        r = s["sample"]
        rows.append(f"sampling: {r['steps']} Euler steps, CFG {r['cfg_scale']}, batch {r['batch']}: "
                    f"{r['img_per_s']:.1f} img/s")  # fmt: skip
    if "encode_img_per_s" in (s.get("vae") or {}):
        r = s["vae"]
        rows.append(f"VAE {r['resolution']}²: encode {r['encode_img_per_s']:.1f} img/s, decode "
                    f"{r['decode_img_per_s']:.1f} img/s")  # fmt: skip
    for name, r in s.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r):
            rows.append(f"{name}: {r.get('error') or r.get('skipped')}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the folder for gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes: checks the script itself, on any machine")
    p.add_argument("--budget_s", type=float, default=450, help="sections not started by then are skipped")
    a = p.parse_args(argv)
    from jax_mmdit import runtime

    runtime.configure()
    plan = DRY if a.dry_run else FULL
    report = Report(Path(a.out), plan, a.dry_run)
    report.env()
    deadline = time.time() + a.budget_s
    report.section("train", lambda: train_section(plan), deadline)
    report.section("sample", lambda: sample_section(plan), deadline)
    report.section("vae", lambda: vae_section(plan), deadline)
    report.section("fp8", lambda: fp8_section(plan), deadline)
    print(table(report.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
