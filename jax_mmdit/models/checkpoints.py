"""Published checkpoint files -> (ModelConfig, our model): what `mmdit convert` reads.

`load_published(kind, path)` with kind
- "dit" / "sit": a facebookresearch/DiT or willisma/SiT `.pt` file (e.g. `DiT-XL-2-256x256.pt`,
  `SiT-XL-2-256.pt`), a plain state dict or a training checkpoint {"model", "ema", "opt", "args"},
  of which "ema" is read (the published weights are the EMA). The config is inferred from the
  tensor shapes; num_heads is not in them, so it comes from the DiT paper's table by width, or from
  `preset`, whose fields must then agree with the shapes. SiT embeds t in [0, 1] unscaled
  (time_scale 1); its model drops the sigma half of its output, our config keeps learn_sigma so
  that every tensor has a place (the flow reads the first C channels).
- "diffusers-dit": a diffusers `DiTTransformer2DModel` (or the older `Transformer2DModel` name)
  directory with config.json and safetensors weights, or a pipeline directory with `transformer/`.
- "sd3": the same for `SD3Transformer2DModel` (SD3 / SD3.5, incl. QK-norm and dual attention).

Safety: a `.pt` is read with `torch.load(weights_only=True)` only, so a pickle that would run code
is refused, never executed (argparse.Namespace, which DiT's train.py saves as "args", is allowed).
Safetensors are read with safetensors' numpy API, no torch needed; importing `ml_dtypes` (a jax
dependency) teaches numpy bfloat16, so bf16 files load too, without a copy onto an accelerator.

Config keys that change the maths must have the values our models compute; an unknown key is an
error rather than ignored. Known gaps kept on purpose (see `convert`): diffusers' DiT port embeds
timesteps with downscale_freq_shift=1 and uses LayerNorm eps `norm_eps` (1e-5) before the MLP,
where the original DiT, whose weights these are, and our models use shift 0 and eps 1e-6; a
`norm_eps` above 1e-5 is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.models.config import PRESETS, ModelConfig
from jax_mmdit.models.convert import dit_from_diffusers, dit_from_original, mmdit_from_diffusers
from jax_mmdit.models.layers import TIME_FREQ_DIM
from jax_mmdit.ops import Ops

KINDS = ("dit", "sit", "diffusers-dit", "sd3")
WEIGHTS = "diffusion_pytorch_model"
# Heads by width in the DiT paper (Table 1), which DiT and SiT checkpoints follow.
PAPER_HEADS = {p["hidden_size"]: p["num_heads"] for p in PRESETS.values() if p["arch"] == "dit"}


def load_published(
    kind: str,
    path: str | Path,
    *,
    preset: str | None = None,
    image_size: int | None = None,
    ops: Ops | None = None,
    num_heads: int | None = None,
) -> tuple[ModelConfig, nnx.Module]:
    """Read the published checkpoint `path` of `kind` (see the module docstring) -> (its config, our
    model on backend `ops`). `image_size` overrides the checkpoint's resolution (DiT: a sin-cos
    table of the new grid; SD3: a different crop of its table). For "dit"/"sit" only: `preset`
    (e.g. "DiT-XL/2") must agree with the file's shapes and gives num_heads; `num_heads` is needed
    for a width outside the DiT paper's table."""
    if kind not in KINDS:
        raise UserError(f"Unknown checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}.")
    path = Path(path).expanduser()
    if kind in ("dit", "sit"):
        state_dict = read_torch_weights(path)
        time_scale = 1.0 if kind == "sit" else 1000.0
        cfg = original_dit_config(state_dict, time_scale=time_scale, preset=preset, image_size=image_size,
                                  num_heads=num_heads)  # fmt: skip
        return cfg, dit_from_original(state_dict, cfg, ops)
    if preset is not None or num_heads is not None:
        raise UserError(f"A {kind} directory names its architecture in config.json; drop preset/num_heads.")
    folder = model_dir(path)
    config = read_json(folder / "config.json")
    if kind == "diffusers-dit":
        cfg = diffusers_dit_config(config, image_size)
        return cfg, dit_from_diffusers(read_safetensors(folder), cfg, ops)
    cfg = sd3_config(config, image_size)
    return cfg, mmdit_from_diffusers(read_safetensors(folder), cfg, ops)


# ---- original DiT / SiT .pt files ----------------------------------------------------------------
def read_torch_weights(path: Path) -> dict[str, Any]:
    """The model state dict in a DiT/SiT `.pt` (EMA of a training checkpoint), "module." stripped."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; expected a DiT/SiT .pt checkpoint.")
    try:
        import torch
    except ImportError:
        raise UserError("Reading a .pt checkpoint needs PyTorch: pip install torch (CPU build is enough).") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, KeyError...) on a bad file
        msg = str(e)
        if isinstance(e, pickle.UnpicklingError) or "weights only" in msg.lower():
            # torch's reason, e.g. "Unsupported global: GLOBAL exec ..." (not its advice to allowlist it)
            lines = [ln.strip() for ln in msg.splitlines()]
            detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "refused by torch")
            detail = detail.split(". ")[0].rstrip(".")
            raise UserError(f"{path} is not a plain weights file and was not loaded ({detail}).") from None
        reason = f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint: {reason}.") from None
    for key in ("ema", "model"):  # a training checkpoint; the published weights are its EMA
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors (nor an 'ema'/'model' one); is it a DiT checkpoint?")
    # DDP-wrapped models save "module.<name>".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"The checkpoint has no {key!r}: it is not a DiT/SiT (facebookresearch/DiT layout) one.")
    return tuple(sd[key].shape)


def original_dit_config(
    sd: Mapping[str, Any],
    *,
    time_scale: float,
    preset: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> ModelConfig:
    """The ModelConfig of a facebookresearch/DiT state dict, from its tensor shapes; heads from
    `num_heads`, else `preset`, else the DiT paper's table by width."""
    patch_w = _shape(sd, "x_embedder.proj.weight")
    if len(patch_w) != 4 or patch_w[2] != patch_w[3]:
        raise UserError(f"x_embedder.proj.weight has shape {patch_w}; expected a square patchify conv (D, C, p, p).")
    D, C, p, _ = patch_w
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    freq_dim = _shape(sd, "t_embedder.mlp.0.weight")[1]
    if freq_dim != TIME_FREQ_DIM:
        raise UserError(f"The timestep MLP takes {freq_dim} sinusoid features; our models use {TIME_FREQ_DIM}.")
    rows = _shape(sd, "y_embedder.embedding_table.weight")[0]
    if rows < 2:
        raise UserError(f"The label table has {rows} row(s); DiT needs its classes plus one null row for CFG.")
    out = _shape(sd, "final_layer.linear.weight")[0] // (p * p)
    if out not in (C, 2 * C):
        raise UserError(f"The final layer emits {out} channels per pixel for {C} input ones; expected {C} or {2 * C}.")
    mlp_hidden = _shape(sd, "blocks.0.mlp.fc1.weight")[0]
    if image_size is None:
        if "pos_embed" not in sd:
            raise UserError("The checkpoint has no pos_embed to tell its resolution; pass image_size.")
        image_size = math.isqrt(_shape(sd, "pos_embed")[-2]) * p
    fields = dict(arch="dit", hidden_size=D, depth=depth, patch_size=p, qk_norm=False)
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        diffs = [f"{k} {v!r} != {fields[k]!r}" for k, v in PRESETS[preset].items() if k in fields and fields[k] != v]
        if diffs:
            raise UserError(f"Preset {preset} does not match the checkpoint (preset != file): {', '.join(diffs)}.")
        heads = PRESETS[preset]["num_heads"]
        if num_heads not in (None, heads):
            raise UserError(f"Preset {preset} has {heads} heads, not the num_heads {num_heads} asked for.")
    elif num_heads is not None:
        heads = num_heads
    elif D in PAPER_HEADS:
        heads = PAPER_HEADS[D]
    else:
        raise UserError(f"Width {D} is not in the DiT paper's table and heads are not in the shapes; pass num_heads.")
    return ModelConfig(
        **fields, image_size=image_size, in_channels=C, num_heads=heads, mlp_ratio=mlp_hidden / D,
        num_classes=rows - 1, learn_sigma=out == 2 * C, time_scale=time_scale,
    )  # fmt: skip


# ---- diffusers directories -----------------------------------------------------------------------
def model_dir(path: Path) -> Path:
    """`path` itself when it has config.json, else its pipeline's `transformer/` subfolder."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    raise UserError(f"{path} has no config.json (nor transformer/config.json): it is no diffusers model directory.")


def read_json(file: Path) -> dict[str, Any]:
    try:
        d = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read {file}: {e}.") from None
    if not isinstance(d, dict):
        raise UserError(f"{file} is not a JSON object.")
    return d


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model: single, sharded (with an index), or fp16 variant."""
    for single, index in ((f"{WEIGHTS}.safetensors", f"{WEIGHTS}.safetensors.index.json"),
                          (f"{WEIGHTS}.fp16.safetensors", f"{WEIGHTS}.safetensors.index.fp16.json")):  # fmt: skip
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{folder / index} has no weight_map.")
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise UserError(f"{folder} lacks the weight shard(s) {', '.join(missing)} that {index} lists.")
            return shards
    hint = " (only a .bin: convert it to safetensors)" if (folder / f"{WEIGHTS}.bin").exists() else ""
    raise UserError(f"{folder} has no {WEIGHTS}.safetensors, sharded or fp16 variant of it{hint}.")


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the model's safetensors files, as numpy (in the file's dtype)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    if key in tensors:
                        raise UserError(f"Tensor {key} appears in two weight shards of {folder}.")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise UserError(f"Cannot read the weights {file}: {e}.") from None
    return tensors


def _check_keys(config: Mapping[str, Any], known: Mapping[str, Any], required: Mapping[str, Any], what: str) -> dict:
    """config with defaults filled in; refuses unknown keys and values of `required` keys other
    than the one our model computes."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise UserError(f"The {what} config has key(s) we do not know, which may change the maths: {unknown}.")
    d = {**known, **{k: v for k, v in config.items() if not k.startswith("_")}}
    wrong = [f"{k}={d[k]!r} (need {v!r})" for k, v in required.items() if d[k] != v]
    if wrong:
        raise UserError(f"The {what} config asks for what our model does not compute: {', '.join(wrong)}.")
    return d


# DiTTransformer2DModel's config keys and defaults. Older exports name the class Transformer2DModel;
# diffusers runs those as DiTTransformer2DModel, whose defaults then apply, and their extra keys
# must be the inert values `_DIT_REQUIRED` lists.
_DIT_KNOWN = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28, dropout=0.0,
    norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    norm_eps=1e-5, cross_attention_dim=None, num_vector_embeds=None, use_linear_projection=False,
    only_cross_attention=False, double_self_attention=False, attention_type="default", caption_channels=None,
    interpolation_scale=None, use_additional_conditions=None,
)  # fmt: skip
_DIT_REQUIRED = dict(
    attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
    cross_attention_dim=None, num_vector_embeds=None, only_cross_attention=False, double_self_attention=False,
    attention_type="default", caption_channels=None,
)  # fmt: skip


def _class_name(config: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    name = config.get("_class_name")
    if name is not None and name not in allowed:
        raise UserError(f"config.json describes a {name}, not a {' or '.join(allowed)}.")


def _learn_sigma(in_channels: int, out_channels: int | None) -> bool:
    out = in_channels if out_channels is None else out_channels
    if out not in (in_channels, 2 * in_channels):
        raise UserError(f"out_channels {out} is neither in_channels {in_channels} nor twice it.")
    return out == 2 * in_channels


def diffusers_dit_config(config: Mapping[str, Any], image_size: int | None = None) -> ModelConfig:
    """Our ModelConfig of a diffusers DiTTransformer2DModel config.json (dict)."""
    _class_name(config, ("DiTTransformer2DModel", "Transformer2DModel"))
    d = _check_keys(config, _DIT_KNOWN, _DIT_REQUIRED, "DiT")
    if d["interpolation_scale"] not in (None, 1, 1.0):
        raise UserError(f"interpolation_scale {d['interpolation_scale']} rescales DiT's sin-cos table; we use 1.")
    if d["norm_eps"] > 1e-5:  # the documented 1e-5 vs 1e-6 gap is tolerated, not a larger one
        raise UserError(f"norm_eps {d['norm_eps']} is far from DiT's 1e-6, which our model uses.")
    if not d["num_embeds_ada_norm"]:
        raise UserError("The DiT config has no num_embeds_ada_norm; our DiT converter needs a class-conditional model.")
    return ModelConfig(
        arch="dit", image_size=image_size or d["sample_size"], in_channels=d["in_channels"],
        patch_size=d["patch_size"], hidden_size=d["num_attention_heads"] * d["attention_head_dim"],
        depth=d["num_layers"], num_heads=d["num_attention_heads"], num_classes=d["num_embeds_ada_norm"],
        learn_sigma=_learn_sigma(d["in_channels"], d["out_channels"]),
    )  # fmt: skip


_SD3_KNOWN = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)  # fmt: skip


def sd3_config(config: Mapping[str, Any], image_size: int | None = None) -> ModelConfig:
    """Our ModelConfig of a diffusers SD3Transformer2DModel config.json (dict)."""
    _class_name(config, ("SD3Transformer2DModel",))
    d = _check_keys(config, _SD3_KNOWN, {}, "SD3")
    if d["qk_norm"] not in (None, "rms_norm"):
        raise UserError(f"qk_norm {d['qk_norm']!r} is not implemented; our MMDiT has none or 'rms_norm'.")
    hidden = d["num_attention_heads"] * d["attention_head_dim"]
    if d["caption_projection_dim"] != hidden:
        raise UserError(f"caption_projection_dim {d['caption_projection_dim']} must equal the width {hidden}.")
    image_size = image_size or d["sample_size"]
    limit = d["pos_embed_max_size"]
    if limit and image_size > limit * d["patch_size"]:
        raise UserError(f"image_size {image_size} exceeds SD3's position table ({limit} x patch {d['patch_size']}).")
    if not limit and image_size != d["sample_size"]:  # diffusers would rescale its table, not crop it
        raise UserError("This SD3 config has no pos_embed_max_size table to crop; leave image_size at sample_size.")
    return ModelConfig(
        arch="mmdit", image_size=image_size, in_channels=d["in_channels"], patch_size=d["patch_size"],
        hidden_size=hidden, depth=d["num_layers"], num_heads=d["num_attention_heads"], num_classes=0,
        context_dim=d["joint_attention_dim"], pooled_dim=d["pooled_projection_dim"], qk_norm=d["qk_norm"] is not None,
        context_mask=False,  # SD3 attends to its text padding
        learn_sigma=_learn_sigma(d["in_channels"], d["out_channels"]),
        dual_attention_layers=tuple(d["dual_attention_layers"]),
        **_sd3_positions(d, image_size),
    )  # fmt: skip


def _sd3_positions(d: Mapping[str, Any], image_size: int) -> dict[str, float]:
    """SD3's table: positions i * base / M of an M x M grid (M = pos_embed_max_size, base =
    sample_size / patch), centre-cropped to our grid, as diffusers' PatchEmbed builds it."""
    p = d["patch_size"]
    grid, base = image_size // p, d["sample_size"] // p
    m = d["pos_embed_max_size"] or base
    return {"pos_embed_offset": float((m - grid) // 2), "pos_embed_scale": base / m}
