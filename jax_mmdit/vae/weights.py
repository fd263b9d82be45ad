"""VAE weights on disk, in diffusers' format: a directory with `config.json` and
`diffusion_pytorch_model.safetensors`, the layout of every published `AutoencoderKL` (e.g.
`stabilityai/sd-vae-ft-ema`, or the `vae/` subfolder of SD3 and Flux).

`load_vae` reads it with `safetensors`' numpy API (no torch at run time): every tensor must find its
parameter and every parameter its tensor, else one error names the keys. Older checkpoints name the
middle attention `query/key/value/proj_attn` (sometimes as 1x1 convs); they load too. `save_vae`
writes the same layout (atomically: a complete directory or none), which diffusers and `load_vae`
read back. `vae_identity` is what latents and runs record to find the same VAE again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.ops import Ops
from jax_mmdit.vae.config import VAEConfig
from jax_mmdit.vae.model import AutoencoderKL

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
_WEIGHT_FILES = (WEIGHTS, "diffusion_pytorch_model.fp16.safetensors")
# Old diffusers/ldm names of the middle attention -> today's.
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def weights_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a VAE directory: it has no {CONFIG}.")
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    hint = " (a .bin checkpoint: convert it to safetensors)" if (path / "diffusion_pytorch_model.bin").exists() else ""
    raise UserError(f"{path} has no {WEIGHTS}{hint}.")


def read_config(path: str | Path) -> VAEConfig:
    file = Path(path).expanduser() / CONFIG
    try:
        d = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read the VAE config {file}: {e}.") from None
    return VAEConfig.from_diffusers(d)


def _ours_to_theirs(key: str) -> str:
    stem, leaf = key.rsplit(".", 1)
    return f"{stem}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def _canonical(key: str) -> str:
    stem, leaf = key.rsplit(".", 1)
    head, _, last = stem.rpartition(".")
    if ".attentions." in stem and last in _LEGACY:
        return f"{head}.{_LEGACY[last]}.{leaf}"
    return key


def _to_ours(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 4:  # conv: torch (O, I, kh, kw) -> (kh, kw, I, O)
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2:  # linear: torch (out, in), or a legacy 1x1 conv (out, in, 1, 1) -> (in, out)
        return value.reshape(value.shape[0], -1).T
    return value


def _to_theirs(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def load_vae(path: str | Path, dtype=jnp.float32, ops: Ops | None = None) -> tuple[AutoencoderKL, VAEConfig]:
    """The diffusers-format VAE directory `path` -> (our AutoencoderKL computing in `dtype`, its config)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    file = weights_file(path)
    cfg = read_config(path)
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise UserError(f"Cannot read the VAE weights {file}: {e}.") from None
    src = {_canonical(k): v for k, v in raw.items()}
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, ops=ops))
    graphdef, state = nnx.split(abstract)
    filled, used, missing = [], set(), []
    for p, var in nnx.to_flat_state(state):
        key = _ours_to_theirs(".".join(str(x) for x in p))
        if key not in src:
            missing.append(key)
            continue
        value = _to_ours(np.asarray(src[key], np.float32), var.shape)
        if value.shape != var.shape:
            raise UserError(f"VAE weight {key} has shape {src[key].shape} in {file}, the config needs {var.shape}.")
        filled.append((p, var.replace(jnp.asarray(value, var.dtype))))
        used.add(key)
    if missing:
        raise UserError(f"The VAE weights in {file} lack {len(missing)} tensors the config needs: {missing[:6]}.")
    extra = sorted(set(src) - used)
    if extra:
        raise UserError(f"{len(extra)} tensors in {file} have no place in the VAE its config describes: {extra[:6]}.")
    return nnx.merge(graphdef, nnx.from_flat_state(filled)), cfg


def save_vae(model: AutoencoderKL, cfg: VAEConfig, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a diffusers-format directory at `path`, which must not exist yet, with
    `extra_files` (name -> text) beside the weights."""
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    if path.exists():
        raise UserError(f"{path} already exists; the VAE is written to a new directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        _ours_to_theirs(".".join(str(x) for x in p)): np.ascontiguousarray(
            _to_theirs(np.asarray(jax.device_get(v[...])))
        )
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg.to_diffusers(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def vae_identity(path: str | Path) -> dict[str, Any]:
    """{"path", "config", "weights_sha256"}: enough to find and check the same VAE later."""
    path = Path(path).expanduser().resolve()
    file = weights_file(path)
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return {"path": str(path), "config": read_config(path).to_dict(), "weights_sha256": h.hexdigest()}
