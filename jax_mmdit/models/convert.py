"""PyTorch weights -> our NNX models.

`dit_from_diffusers` reads a diffusers `DiTTransformer2DModel`, `mmdit_from_diffusers` an
`SD3Transformer2DModel` (SD3.0, or SD3.5 with `qk_norm="rms_norm"` and `dual_attention_layers`),
`dit_from_original` a facebookresearch/DiT or willisma/SiT state dict (the same layout), each given
as a module or its `state_dict()`. Torch is never imported here: tensors are turned into numpy
through their own methods, so numpy state dicts work too. `checkpoints.load_published` reads
such weights from files.

Every tensor of the source must be used and every array of the target filled (the fixed sin-cos
table excepted when the source has none), otherwise a UserError (a ValueError) names the keys: a
silently half-converted model is the worst outcome.

Known convention gaps (checked by tests/test_parity.py):
- diffusers' DiT port embeds timesteps with `downscale_freq_shift=1` (frequencies / (half - 1));
  the original facebookresearch/DiT and SD3 use shift 0, and so do we. Converted diffusers DiT
  weights therefore see slightly different timestep features than in diffusers (the same as in
  the original DiT code the weights were trained with).
- diffusers' DiT uses LayerNorm eps 1e-5 before the MLP (`norm_eps`); DiT and we use 1e-6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.factory import create_model
from jax_mmdit.models.layers import FixedEmbedding, sincos_pos_embed_2d
from jax_mmdit.ops import Ops


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; .float() also handles bf16/fp16 checkpoints
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


class _Source:
    """A state dict that remembers which keys were read, to report leftovers."""

    def __init__(self, module_or_state_dict: Any):
        sd = module_or_state_dict.state_dict() if hasattr(module_or_state_dict, "state_dict") else module_or_state_dict
        if not isinstance(sd, Mapping):
            raise ValueError(f"Expected a torch module or a state dict, got {type(module_or_state_dict).__name__}.")
        self.sd = {k: _to_numpy(v) for k, v in sd.items()}
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise UserError(f"The source state dict has no {key!r}; does the config match the checkpoint?")
        self.used.add(key)
        return self.sd[key]

    def linear(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """torch Linear (out, in) -> our kernel (in, out), bias."""
        return self.get(f"{prefix}.weight").T, self.get(f"{prefix}.bias")

    def check_all_used(self) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            raise UserError(f"{len(left)} source tensors have no place in our model (unsupported?): {left[:8]}")


def _put_linear(target: dict[str, np.ndarray], ours: str, kernel_bias: tuple[np.ndarray, np.ndarray]) -> None:
    target[f"{ours}.kernel"], target[f"{ours}.bias"] = kernel_bias


def _fused(*linears: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Separate q/k/v Linears -> one [q | k | v] Linear."""
    return np.concatenate([k for k, _ in linears], axis=1), np.concatenate([b for _, b in linears])


def _swap_halves(kernel_bias: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' AdaLayerNormContinuous emits (scale, shift); our modulation is (shift, scale)."""
    k, b = kernel_bias
    half = b.shape[0] // 2
    return np.concatenate([k[:, half:], k[:, :half]], axis=1), np.concatenate([b[half:], b[:half]])


def _patch_kernel(src: _Source, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv2d weight (D, C, p, p) -> patchify kernel (p*p*C, D) with rows ordered (ph, pw, c)."""
    w = src.get(f"{prefix}.weight")
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), src.get(f"{prefix}.bias")


def _center_crop_pos(table: np.ndarray, grid: int) -> np.ndarray:
    """(1, M*M, D) table -> centre (grid*grid, D) crop, as SD3's `cropped_pos_embed` does."""
    D = table.shape[-1]
    m = int(round((table.size // D) ** 0.5))
    if m * m * D != table.size or grid > m:
        raise UserError(f"Cannot crop a {table.shape} position table to a {grid}x{grid} grid.")
    top = (m - grid) // 2
    return table.reshape(m, m, D)[top : top + grid, top : top + grid].reshape(grid * grid, D)


def _build(cfg: ModelConfig, target: dict[str, np.ndarray], ops: Ops | None) -> nnx.Module:
    """Fill an abstract model (never materialising random weights) from `target`."""
    abstract = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0), ops))
    graphdef, state = nnx.split(abstract)
    filled, filled_keys, missing = [], set(), []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(p) for p in path)
        if key == "pos_embed" and isinstance(var, FixedEmbedding):
            # A fixed table is not checkpointed by value (a restored run recomputes it from the
            # config), so the checkpoint's must be the one the config describes.
            value = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size, cfg.pos_embed_offset, cfg.pos_embed_scale)
            if key in target and not np.allclose(target[key], value, atol=1e-5):
                diff = float(np.abs(target[key] - value).max())
                raise UserError(f"The checkpoint's position table is not the sin-cos table its config describes "
                                f"(max difference {diff:.3g}).")  # fmt: skip
        elif key in target:
            value = target[key]
            if value.shape != var.shape:
                raise UserError(f"Shape mismatch for {key}: checkpoint {value.shape}, config {var.shape}.")
        else:
            missing.append(key)
            continue
        filled.append((path, var.replace(jnp.asarray(value, var.dtype))))
        filled_keys.add(key)
    if missing:
        raise UserError(f"The checkpoint does not provide {missing[:8]}; does the config match it?")
    extra = sorted(set(target) - filled_keys)
    if extra:
        raise UserError(f"Converted tensors without a place in the model: {extra[:8]}.")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def dit_from_diffusers(torch_module_or_state_dict: Any, cfg: ModelConfig, ops: Ops | None = None) -> nnx.Module:
    """diffusers `DiTTransformer2DModel` -> our `DiT` (cfg must describe the same network), on the
    backend `ops` (None: `create_model`'s default)."""
    if cfg.arch != "dit" or cfg.qk_norm or cfg.mlp != "gelu" or cfg.stem != "patch" or cfg.num_classes == 0:
        raise ValueError("diffusers DiT has no QK-norm/SwiGLU/conv stem and is class-conditional; adjust cfg.")
    src = _Source(torch_module_or_state_dict)
    t: dict[str, np.ndarray] = {}
    _put_linear(t, "patch_embed.proj", _patch_kernel(src, "pos_embed.proj"))
    if "pos_embed.pos_embed" in src:
        t["pos_embed"] = src.get("pos_embed.pos_embed").reshape(cfg.num_patches, cfg.hidden_size)

    # diffusers keeps one timestep/label embedder per block; DiT (and we) share one.
    emb = "transformer_blocks.{}.norm1.emb."
    names = ["timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
             "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
             "class_embedder.embedding_table.weight"]  # fmt: skip
    for i in range(1, cfg.depth):
        for name in names:
            if not np.array_equal(src.get(emb.format(i) + name), src.get(emb.format(0) + name)):
                raise UserError(f"Block {i}'s {name} differs from block 0's; our DiT shares one embedder.")
    _put_linear(t, "t_embedder.mlp.fc1", src.linear(emb.format(0) + "timestep_embedder.linear_1"))
    _put_linear(t, "t_embedder.mlp.fc2", src.linear(emb.format(0) + "timestep_embedder.linear_2"))
    t["y_embedder.table.embedding"] = src.get(emb.format(0) + "class_embedder.embedding_table.weight")

    for i in range(cfg.depth):
        s, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        _put_linear(t, o + "modulation.linear", src.linear(s + "norm1.linear"))
        qkv = [src.linear(s + f"attn1.to_{n}") for n in "qkv"]
        _put_linear(t, o + "attn.qkv", _fused(*qkv))
        _put_linear(t, o + "attn_out", src.linear(s + "attn1.to_out.0"))
        _put_linear(t, o + "mlp.fc1", src.linear(s + "ff.net.0.proj"))
        _put_linear(t, o + "mlp.fc2", src.linear(s + "ff.net.2"))

    _put_linear(t, "final.modulation.linear", src.linear("proj_out_1"))
    _put_linear(t, "final.linear", src.linear("proj_out_2"))
    src.check_all_used()
    return _build(cfg, t, ops)


def mmdit_from_diffusers(torch_module_or_state_dict: Any, cfg: ModelConfig, ops: Ops | None = None) -> nnx.Module:
    """diffusers `SD3Transformer2DModel` -> our text-conditioned `MMDiT`.

    cfg needs arch="mmdit", context_dim = joint_attention_dim, pooled_dim = pooled_projection_dim,
    num_classes=0, qk_norm matching `qk_norm="rms_norm"`, dual_attention_layers as in diffusers'
    config, and image_size <= pos_embed_max_size * patch_size (the SD3 sin-cos table is
    centre-cropped to our grid)."""
    if cfg.arch != "mmdit" or cfg.uses_class_tokens or cfg.pooled_dim == 0 or cfg.mlp != "gelu" or cfg.stem != "patch":
        raise ValueError("SD3 is a text-conditioned MMDiT: set arch='mmdit', context_dim>0, pooled_dim>0, gelu, patch.")
    src = _Source(torch_module_or_state_dict)
    t: dict[str, np.ndarray] = {}
    _put_linear(t, "patch_embed.proj", _patch_kernel(src, "pos_embed.proj"))
    if "pos_embed.pos_embed" in src:
        t["pos_embed"] = _center_crop_pos(src.get("pos_embed.pos_embed"), cfg.grid_size)
    _put_linear(t, "t_embedder.mlp.fc1", src.linear("time_text_embed.timestep_embedder.linear_1"))
    _put_linear(t, "t_embedder.mlp.fc2", src.linear("time_text_embed.timestep_embedder.linear_2"))
    _put_linear(t, "pooled_embedder.fc1", src.linear("time_text_embed.text_embedder.linear_1"))
    _put_linear(t, "pooled_embedder.fc2", src.linear("time_text_embed.text_embedder.linear_2"))
    _put_linear(t, "context_embedder", src.linear("context_embedder"))

    for i in range(cfg.depth):
        s, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        pre_only = i == cfg.depth - 1
        _put_linear(t, o + "x_modulation.linear", src.linear(s + "norm1.linear"))
        c_mod = src.linear(s + "norm1_context.linear")
        _put_linear(t, o + "c_modulation.linear", _swap_halves(c_mod) if pre_only else c_mod)
        _put_linear(t, o + "x_attn.qkv", _fused(*[src.linear(s + f"attn.to_{n}") for n in "qkv"]))
        _put_linear(t, o + "c_attn.qkv", _fused(*[src.linear(s + f"attn.add_{n}_proj") for n in "qkv"]))
        if cfg.qk_norm:
            for ours, theirs in (("x_attn.q_norm", "norm_q"), ("x_attn.k_norm", "norm_k"),
                                 ("c_attn.q_norm", "norm_added_q"), ("c_attn.k_norm", "norm_added_k")):  # fmt: skip
                t[o + ours + ".scale"] = src.get(s + f"attn.{theirs}.weight")
        _put_linear(t, o + "x_attn_out", src.linear(s + "attn.to_out.0"))
        if i in cfg.dual_attention_layers:  # SD3.5: norm1.linear has 9 chunks, in our order
            _put_linear(t, o + "x_attn2.qkv", _fused(*[src.linear(s + f"attn2.to_{n}") for n in "qkv"]))
            if cfg.qk_norm:
                t[o + "x_attn2.q_norm.scale"] = src.get(s + "attn2.norm_q.weight")
                t[o + "x_attn2.k_norm.scale"] = src.get(s + "attn2.norm_k.weight")
            _put_linear(t, o + "x_attn2_out", src.linear(s + "attn2.to_out.0"))
        _put_linear(t, o + "x_mlp.fc1", src.linear(s + "ff.net.0.proj"))
        _put_linear(t, o + "x_mlp.fc2", src.linear(s + "ff.net.2"))
        if not pre_only:
            _put_linear(t, o + "c_attn_out", src.linear(s + "attn.to_add_out"))
            _put_linear(t, o + "c_mlp.fc1", src.linear(s + "ff_context.net.0.proj"))
            _put_linear(t, o + "c_mlp.fc2", src.linear(s + "ff_context.net.2"))

    _put_linear(t, "final.modulation.linear", _swap_halves(src.linear("norm_out.linear")))
    _put_linear(t, "final.linear", src.linear("proj_out"))
    src.check_all_used()
    return _build(cfg, t, ops)


def _check_sincos(table: np.ndarray, hidden: int) -> None:
    """Our DiT's table is fixed (`sincos_pos_embed_2d`): a checkpoint with another is refused, not
    silently given ours."""
    n = table.size // hidden
    grid = int(round(n**0.5))
    if grid * grid * hidden != table.size:
        raise UserError(f"The checkpoint's pos_embed {table.shape} is not a square grid of {hidden}-wide rows.")
    diff = float(np.abs(table.reshape(n, hidden) - sincos_pos_embed_2d(hidden, grid)).max())
    if diff > 1e-5:
        raise UserError(f"The checkpoint's pos_embed is not DiT's fixed 2D sin-cos table (max difference {diff:.3g}).")


def dit_from_original(state_dict: Any, cfg: ModelConfig, ops: Ops | None = None) -> nnx.Module:
    """facebookresearch/DiT (or willisma/SiT: the same module) state dict -> our `DiT`, on `ops`.

    The original shares one timestep/label embedder, fuses [q | k | v] (each head-major) in one
    timm Linear and orders adaLN chunks as we do, so tensors map one to one. Its `pos_embed` must
    be the sin-cos table of its own grid (checked, atol 1e-5); cfg.image_size may differ, the model
    then uses the table of its grid. SiT differs only in embedding t in [0, 1] (cfg.time_scale=1)."""
    if cfg.arch != "dit" or cfg.qk_norm or cfg.mlp != "gelu" or cfg.stem != "patch" or cfg.num_classes == 0:
        raise ValueError("The original DiT has no QK-norm/SwiGLU/conv stem and is class-conditional; adjust cfg.")
    if cfg.pos_embed != "sincos":
        raise ValueError("The original DiT's position table is the fixed sin-cos one; set cfg.pos_embed='sincos'.")
    src = _Source(state_dict)
    t: dict[str, np.ndarray] = {}
    _put_linear(t, "patch_embed.proj", _patch_kernel(src, "x_embedder.proj"))
    if "pos_embed" in src:
        _check_sincos(src.get("pos_embed"), cfg.hidden_size)
    _put_linear(t, "t_embedder.mlp.fc1", src.linear("t_embedder.mlp.0"))
    _put_linear(t, "t_embedder.mlp.fc2", src.linear("t_embedder.mlp.2"))
    t["y_embedder.table.embedding"] = src.get("y_embedder.embedding_table.weight")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        _put_linear(t, b + "modulation.linear", src.linear(b + "adaLN_modulation.1"))
        _put_linear(t, b + "attn.qkv", src.linear(b + "attn.qkv"))
        _put_linear(t, b + "attn_out", src.linear(b + "attn.proj"))
        _put_linear(t, b + "mlp.fc1", src.linear(b + "mlp.fc1"))
        _put_linear(t, b + "mlp.fc2", src.linear(b + "mlp.fc2"))
    _put_linear(t, "final.modulation.linear", src.linear("final_layer.adaLN_modulation.1"))
    _put_linear(t, "final.linear", src.linear("final_layer.linear"))
    src.check_all_used()
    return _build(cfg, t, ops)
