"""Turning model outputs into pictures: uint8 conversion, PNG grids and trajectory GIFs."""

from __future__ import annotations

import math
import os

import imageio.v2 as imageio
import numpy as np
from PIL import Image


def to_uint8(x_BxHxWxC: np.ndarray, is_latent: bool = False) -> np.ndarray:
    """[-1, 1] images → uint8. Latents have no fixed range, so each is min-max scaled (a preview,
    not a decode) and only the first 3 channels are kept."""
    x = np.asarray(x_BxHxWxC, np.float32)
    if is_latent:
        x = x[..., :3]
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-6) * 2 - 1
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images_BxHxWxC: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile a uint8 batch into one image (H', W', C), row-major, with a `pad`-pixel border."""
    b, h, w, c = images_BxHxWxC.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = images_BxHxWxC[i]
    return grid


def _squeeze_gray(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.shape[-1] == 1 else img


def save_png(path: str | os.PathLike, image_HxWxC: np.ndarray, scale: int = 1) -> None:
    img = Image.fromarray(_squeeze_gray(image_HxWxC))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_grid_png(path, images_BxHxWxC_uint8, ncols=None, scale=1) -> np.ndarray:
    grid = make_grid(images_BxHxWxC_uint8, ncols)
    save_png(path, grid, scale)
    return grid


def trajectory_frames(traj_TxBxHxWxC_uint8: np.ndarray, ncols: int | None = None) -> list[np.ndarray]:
    """One grid of the whole batch per sampling step."""
    return [make_grid(frame, ncols) for frame in traj_TxBxHxWxC_uint8]


def trajectory_grid(traj_TxBxHxWxC_uint8: np.ndarray, max_rows: int = 10) -> np.ndarray:
    """Static overview: X = batch element, Y = sampling step (evenly spaced steps, last included)."""
    t, b = traj_TxBxHxWxC_uint8.shape[:2]
    rows = np.unique(np.linspace(0, t - 1, min(max_rows, t)).round().astype(int))
    picked = traj_TxBxHxWxC_uint8[rows]  # R x B x H x W x C
    return make_grid(picked.reshape(-1, *picked.shape[2:]), ncols=b)


def save_trajectory_gif(
    path, traj_TxBxHxWxC_uint8: np.ndarray, ncols=None, scale: int = 2, fps: int = 12, hold_last: int = 12
) -> None:
    """Animated GIF of the sampling trajectory, noise → image, holding the final frame."""
    frames = trajectory_frames(traj_TxBxHxWxC_uint8, ncols)
    frames = frames + [frames[-1]] * hold_last
    if scale > 1:
        frames = [np.kron(f, np.ones((scale, scale, 1), np.uint8)) for f in frames]
    frames = [_squeeze_gray(f) for f in frames]
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
