"""Pixels <-> latents with a VAE, compiled once per chunk shape and sharded over this host's devices.

`VaeRunner` encodes uint8 images to posterior (mean, std) and decodes raw latents to uint8, in fixed
chunks (`batch_size`, the last one padded) so one executable serves any number of images and a 256²
or 512² decode fits in device memory. `LatentCodec` is what a run needs to turn its normalised
samples into pictures: the VAE it was trained with (checked by its weights' hash) and the latent
normalisation to undo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_mmdit.errors import UserError
from jax_mmdit.vae.weights import load_vae, vae_identity

# Written into a run directory trained on latents: which VAE decodes it and how to undo the
# normalisation its model saw.
RUN_LATENTS = "latents.json"


class VaeRunner:
    """A VAE's encode/decode as jitted functions of fixed-size chunks, sharded over `devices`."""

    def __init__(self, model: nnx.Module, batch_size: int = 64, devices=None):
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), ("batch",))
        # Every chunk the same size, a multiple of the device count: one compiled shape.
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))

        def encode(state, u8_BxHxWxC):
            x = u8_BxHxWxC.astype(jnp.float32) * (2 / 255) - 1
            mean, logvar = nnx.merge(graphdef, state).encode(x)
            return mean.astype(jnp.float32), jnp.exp(0.5 * logvar.astype(jnp.float32))

        def decode(state, z_Bxhxwxc):
            x = nnx.merge(graphdef, state).decode(z_Bxhxwxc).astype(jnp.float32)
            return jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5).astype(jnp.uint8)

        self._encode = jax.jit(encode, out_shardings=(self.sharding, self.sharding))
        self._decode = jax.jit(decode, out_shardings=self.sharding)

    def _chunks(self, fn, x: np.ndarray):
        b = self.batch_size
        for start in range(0, len(x), b):
            chunk = x[start : start + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            out = fn(self.state, jax.device_put(chunk, self.sharding))
            yield jax.tree.map(lambda a, n=n: np.asarray(jax.device_get(a))[:n], out)

    def encode(self, u8_NxHxWxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images -> the posterior's (mean, std), float32 (N, h, w, c)."""
        parts = list(self._chunks(self._encode, np.asarray(u8_NxHxWxC, np.uint8)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def decode(self, z_Nxhxwxc: np.ndarray) -> np.ndarray:
        """Raw latents (before any scaling) -> uint8 images (N, H, W, C)."""
        return np.concatenate(list(self._chunks(self._decode, np.asarray(z_Nxhxwxc, np.float32))))


def run_latent_info(manifest: dict[str, Any], shift_C, scale_C, latent_dir: str) -> dict[str, Any]:
    """What a run trained on `manifest`'s latents records about them (`RUN_LATENTS`)."""
    return {
        "vae": manifest["vae"],
        "shift": [float(s) for s in shift_C],
        "scale": [float(s) for s in scale_C],
        "latent_shape": list(manifest["latent_shape"]),
        "resolution": manifest["resolution"],
        "latent_dir": str(latent_dir),
    }


def latent_run_info(dataset, data_cfg) -> dict[str, Any] | None:
    """`run_latent_info` of a training set (an `ImageDataset`), None when it is not latents; a VAE
    given as `data_cfg.vae` (it moved) must be the one that encoded them."""
    if dataset is None or not dataset.info.is_latent:
        return None
    if data_cfg.vae is not None:
        check_vae(data_cfg.vae, dataset.manifest["vae"])
    return run_latent_info(dataset.manifest, *dataset.latent_norm, data_cfg.source)


def read_run_latent_info(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_LATENTS
    return json.loads(path.read_text()) if path.is_file() else None


def check_vae(path: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """`vae_identity(path)`, after checking it is the VAE `expected` (an identity) names."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"The VAE these latents need is not at {path} (no config.json there): pass its directory with "
            "--vae DIR (mmdit sample) or --data.vae DIR (mmdit train)."
        )
    found = vae_identity(path)
    if found["weights_sha256"] != expected["weights_sha256"]:
        raise UserError(
            f"Mismatched VAE: {path} is not the VAE the latents were encoded with (weights sha256 "
            f"{found['weights_sha256'][:12]}, the latents' {expected['weights_sha256'][:12]}); pass the right one."
        )
    return found


class LatentCodec:
    """A latent run's samples -> uint8 images: undo the normalisation, decode with the run's VAE."""

    def __init__(self, info: dict[str, Any], vae_path: str | None = None, batch_size: int = 32, dtype=jnp.float32):
        path = vae_path or info["vae"]["path"]
        check_vae(path, info["vae"])
        model, self.vae_cfg = load_vae(path, dtype=dtype)
        self.runner = VaeRunner(model, batch_size)
        self.shift_C = np.asarray(info["shift"], np.float32)
        self.scale_C = np.asarray(info["scale"], np.float32)

    def to_uint8(self, x_BxhxwxC: np.ndarray) -> np.ndarray:
        """Normalised latents (what the model samples) -> uint8 pixels."""
        z = np.asarray(x_BxhxwxC, np.float32) / self.scale_C + self.shift_C
        return self.runner.decode(z)


class SampleDecoder:
    """A run's samples -> uint8 images: pixels rescaled from [-1, 1]; latents (when the run has
    `latent_info`) decoded by its VAE, loaded on first use from `vae_path` or the manifest's path."""

    def __init__(self, latent_info: dict[str, Any] | None, vae_path: str | None = None):
        self.latent_info, self.vae_path = latent_info, vae_path
        self._codec: LatentCodec | None = None

    def use_vae(self, path: str) -> None:
        """Decode with the VAE at `path` (checked to be the run's own)."""
        if self.latent_info is None:
            raise UserError("--vae is for runs trained on latents; this run models pixels.")
        self._codec = LatentCodec(self.latent_info, path)

    def __call__(self, x_BxHxWxC: np.ndarray) -> np.ndarray:
        if self.latent_info is None:
            from jax_mmdit.eval.images import to_uint8

            return to_uint8(x_BxHxWxC)
        if self._codec is None:
            self._codec = LatentCodec(self.latent_info, self.vae_path)
        return self._codec.to_uint8(x_BxHxWxC)

    def trajectory(self, traj_TxBxHxWxC: np.ndarray) -> np.ndarray:
        """A sampling trajectory -> uint8 frames (T, B, H, W, C); latents decoded frame by frame."""
        traj = np.asarray(traj_TxBxHxWxC)
        u8 = self(traj.reshape(-1, *traj.shape[2:]))
        return u8.reshape(*traj.shape[:2], *u8.shape[1:])
