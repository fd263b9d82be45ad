"""Turning model outputs into pictures: uint8 conversion, PNG grids and trajectory GIFs."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(x_BxHxWxC: np.ndarray) -> np.ndarray:
    """[-1, 1] images → uint8 (latents are decoded first: `jax_mmdit.vae.codec.LatentCodec`)."""
    x = np.asarray(x_BxHxWxC, np.float32)
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary name next to `path` (same suffix) and renames it to `path` once written:
    a file is there whole or not at all, never half-written."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(path: str | os.PathLike, image_HxWxC: np.ndarray, scale: int = 1) -> None:
    img = Image.fromarray(_squeeze_gray(image_HxWxC))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp)


def save_grid_png(path, images_BxHxWxC_uint8, ncols=None, scale=1, captions=None) -> np.ndarray:
    """A grid PNG, each image `scale`x; with `captions` (one string per image) a line of text under
    every image. Returns the grid as written (uint8 HxWxC)."""
    grid = make_grid(images_BxHxWxC_uint8, ncols)
    if scale > 1:
        grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8))
    if captions is not None:
        grid = _caption(grid, images_BxHxWxC_uint8.shape[1:3], ncols, scale, captions)
    save_png(path, grid)
    return grid


_PAD = 2  # make_grid's border


def _wrap(text: str, width: float, draw, font, max_lines: int = 4) -> list[str]:
    """`text` in lines no wider than `width` (words kept whole where they fit), at most max_lines."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    lines = lines[:max_lines]
    for i, line in enumerate(lines):  # a single word wider than the image is cut
        while line and draw.textlength(line, font=font) > width:
            line = line[:-1]
        lines[i] = line
    return lines


def _caption(grid: np.ndarray, hw: tuple[int, int], ncols: int | None, scale: int, captions) -> np.ndarray:
    """The scaled grid with a text strip below each row of images, each caption under its image
    (wrapped onto up to four lines)."""
    h, w = hw[0] * scale, hw[1] * scale
    pad = _PAD * scale
    n = len(captions)
    ncols = ncols or math.ceil(math.sqrt(n))
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 4
    gray = grid.shape[-1] == 1
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    wrapped = [_wrap(str(c), w, measure, font) for c in captions]
    rows = []
    for r in range(math.ceil(n / ncols)):
        rows.append(grid[r * (h + pad) : (r + 1) * (h + pad) + (pad if r == math.ceil(n / ncols) - 1 else 0)])
        height = line * max(len(wrapped[i]) for i in range(r * ncols, min(n, (r + 1) * ncols)))
        strip = Image.new("L" if gray else "RGB", (grid.shape[1], height), 255 if gray else (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        for c in range(ncols):
            i = r * ncols + c
            if i < n:
                for k, text in enumerate(wrapped[i]):
                    draw.text((pad + c * (w + pad), 1 + k * line), text, fill=0 if gray else (0, 0, 0), font=font)
        strip = np.asarray(strip, np.uint8)
        rows.append(strip[..., None] if strip.ndim == 2 else strip)
    return np.concatenate(rows, axis=0)


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
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, frames, duration=1000 / fps, loop=0)
