"""The benchmark orchestrator's stop/restart protocol (benchmarks/bench_train.py), on a tiny model."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_train  # noqa: E402


def test_a_stopped_worker_restarts_from_its_compilation_cache(tmp_path):
    args = argparse.Namespace(log_dir=tmp_path, verbose=False, allocator="system")
    tiny = {"image_size": 16, "in_channels": 3, "hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
    spec = {"kind": "jax_train", "model": tiny, "batch": 4, "precision": "fp32", "warmup": 1}
    w = bench_train.start("tiny", spec, args)
    try:
        assert "error" not in w.info, w.info
        w.run(2)
        assert w.running and len(w.step_seconds) == 1
        first_compile = w.info["compile_s"]
        bench_train.make_room(float("inf"), [w])  # nothing is ever enough: every idle worker stops
        assert not w.running and w.rss == 0.0
        assert any((tmp_path / "jax-cache" / "tiny").iterdir())  # the first start filled its cache
        w.run(2)  # restarts it, then times it
        assert w.restarts == 1 and w.running and len(w.step_seconds) == 2 and "error" not in w.info
        assert w.info["compile_s"] == first_compile  # the table keeps the first start's figures
        assert w.timed_peak > 0
    finally:
        w.quit()
    assert not w.running


def test_the_torch_mmdit_reference_is_sd3_with_our_class_conditioning():
    # bench_train's MMDiT rows time diffusers' SD3Transformer2DModel against ours: same blocks and
    # weights, plus SD3's context projection and pooled MLP (our class tokens skip both).
    import jax
    import torch

    from benchmarks.workers import torch_mmdit, train_config
    from jax_mmdit.train.trainer import Trainer

    model = {"image_size": 16, "in_channels": 3, "hidden_size": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
    cfg = train_config({"preset": "MMDiT-S/2", "model": model, "batch": 4})
    ref = torch_mmdit(cfg.model, label_dropout=0.1)
    D = cfg.model.hidden_size
    sd3_extras = (D * D + D) + 2 * (D * D + D)  # context_embedder; pooled MLP (two linears)
    ours = Trainer(cfg, devices=jax.devices()[:1], with_data=False).param_counts["trainable"]  # SD3's table is a buffer
    assert sum(p.numel() for p in ref.parameters()) == ours + sd3_extras
    assert ref.net.config.qk_norm == "rms_norm" and cfg.model.qk_norm
    x = torch.randn(4, 3, 16, 16)
    out = ref(x, timestep=torch.rand(4) * 1000, class_labels=torch.arange(4)).sample
    assert out.shape == x.shape
