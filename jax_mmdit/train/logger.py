"""Metric logging: TensorBoard (tensorboardX) on the main process, a console line elsewhere."""

from __future__ import annotations

import os

import jax
import numpy as np


class MetricLogger:
    def __init__(self, log_dir: str | os.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:  # NaN and inf too: a NaN eval loss must show, not vanish
                self.writer.add_scalar(k, float(v), step)

    def image(self, step: int, tag: str, image_HxWxC_uint8: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_HxWxC_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def summarize_window(metrics: list[dict], num_bins: int) -> dict[str, float]:
    """Reduce the per-step metrics fetched at a logging step into scalars to log."""
    out = {
        "train/loss": float(np.mean([m["loss"] for m in metrics])),
        "train/grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
        "train/learning_rate": float(metrics[-1]["learning_rate"]),
        "train/skipped_steps": float(np.sum([m["skipped"] for m in metrics])),
    }
    if "loss_scale" in metrics[-1]:
        out["train/loss_scale"] = float(metrics[-1]["loss_scale"])
    sums = np.sum([m["loss_bin_sum"] for m in metrics], axis=0)
    counts = np.sum([m["loss_bin_count"] for m in metrics], axis=0)
    for i in range(num_bins):
        if counts[i] > 0:
            lo, hi = i / num_bins, (i + 1) / num_bins
            out[f"train_loss_by_t/{lo:.1f}-{hi:.1f}"] = float(sums[i] / counts[i])
    return out
