"""`ModelConfig`: one frozen dataclass for DiT and MMDiT, plus the paper presets.

Presets follow the DiT paper (Peebles & Xie 2023, Table 1): S/B/L/XL widths and depths with
patch sizes 2/4/8. `"MMDiT-<size>/<patch>"` reuses the same width/depth/heads so DiT and MMDiT
runs of one size are directly comparable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import jax.numpy as jnp

from jax_mmdit.errors import UserError

# (hidden_size, depth, num_heads) per size, from the DiT paper.
_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_PATCHES = (2, 4, 8)


def _build_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for arch, prefix in (("dit", "DiT"), ("mmdit", "MMDiT")):
        for size, (hidden, depth, heads) in _SIZES.items():
            for patch in _PATCHES:
                presets[f"{prefix}-{size}/{patch}"] = dict(
                    arch=arch,
                    hidden_size=hidden,
                    depth=depth,
                    num_heads=heads,
                    patch_size=patch,
                    # SD3.5 showed QK-norm stabilises MMDiT training; plain DiT keeps the paper's block.
                    qk_norm=(arch == "mmdit"),
                )
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
Arch = Literal["dit", "mmdit"]
PosEmbed = Literal["sincos", "learned"]
Stem = Literal["patch", "conv"]
MlpKind = Literal["gelu", "swiglu"]
DtypeName = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DiT or MMDiT. Defaults are DiT-S/2 on 32x32x4 ImageNet latents."""

    # Which network: "dit" (single stream, adaLN-Zero) or "mmdit" (SD3 two-stream joint attention).
    arch: Arch = "dit"
    # Input height = width in pixels (or latent cells); must be a multiple of patch_size.
    image_size: int = 32
    # Input channels (3 for RGB, 4 for SD VAE latents, 16 for SD3 latents).
    in_channels: int = 4
    # Side of the square patch that becomes one token; smaller = more tokens = more compute.
    patch_size: int = 2
    # Transformer width D.
    hidden_size: int = 384
    # Number of transformer blocks.
    depth: int = 12
    # Attention heads; hidden_size must divide evenly.
    num_heads: int = 6
    # MLP hidden width = mlp_ratio * hidden_size (SwiGLU uses 2/3 of that to keep params equal).
    mlp_ratio: float = 4.0
    # Number of classes (0 = unconditional). Index num_classes is the null class used for CFG.
    num_classes: int = 1000
    # Output 2*C channels like published DiT weights (the flow only uses the first C).
    learn_sigma: bool = False
    # "sincos": fixed 2D sin-cos table (DiT/SD3); "learned": trainable table.
    pos_embed: PosEmbed = "sincos"
    # "patch": linear patchify (paper); "conv": 3x3 conv + GroupNorm stem first, helps tiny images.
    stem: Stem = "patch"
    # RMSNorm on per-head queries and keys (SD3.5); avoids attention-logit growth at scale.
    qk_norm: bool = False
    # "gelu": paper MLP (tanh GELU); "swiglu": gated MLP, often slightly better per FLOP.
    mlp: MlpKind = "gelu"
    # Compute dtype of activations/matmuls; parameters, norms and softmax stay float32. In training
    # it is set by TrainConfig.precision, so leave it at float32 there.
    dtype: DtypeName = "float32"
    # Recompute each block in the backward pass: less activation memory, ~30% more compute.
    remat: bool = False
    # MMDiT only: width of precomputed text-token embeddings (0 = learned class tokens).
    context_dim: int = 0
    # MMDiT only: learned context tokens per class when context_dim == 0 (also sizes FLOP counts).
    num_context_tokens: int = 4
    # MMDiT only: width of the pooled text embedding added to the timestep embedding (0 = none).
    pooled_dim: int = 0
    # MMDiT text models: padded text tokens are left out of joint attention (a given mask is used).
    # SD3 was trained attending to its padding: its converted runs set False and ignore masks.
    context_mask: bool = True
    # MeanFlow (flow.objective "meanflow"): a second timestep embedder for the interval h = t - r,
    # its embedding summed into the conditioning vector (MeanFlow's (t, t - r) input). Off: the
    # plain one-time network, as every other objective and published checkpoint has it.
    interval_embed: bool = False
    # The timestep embedder sees time_scale * t: 1000 maps t in [0, 1] onto DiT/SD3's 0..1000
    # timestep range; SiT's published weights embed t in [0, 1] directly (time_scale 1).
    time_scale: float = 1000.0
    # The sin-cos table's positions are (offset + i) * scale for i in [0, grid): DiT's with (0, 1);
    # SD3's table is a centre crop of a larger grid rescaled to its training size.
    pos_embed_offset: float = 0.0
    pos_embed_scale: float = 1.0
    # MMDiT only: blocks (0-based) whose image stream adds a second, image-only self-attention
    # after the joint one (SD3.5's "MMDiT-X", e.g. blocks 0..12 of SD3.5 Medium); () = SD3.0.
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        def one_of(name: str, choices) -> None:
            value = getattr(self, name)
            need(value in get_args(choices), f"{name} must be one of {get_args(choices)}, got {value!r}.")

        for name, choices in (
            ("arch", Arch),
            ("pos_embed", PosEmbed),
            ("stem", Stem),
            ("mlp", MlpKind),
            ("dtype", DtypeName),
        ):
            one_of(name, choices)
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}.")
        need(
            self.image_size % self.patch_size == 0,
            f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}.",
        )
        need(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.",
        )
        # The 2D sin-cos table splits D into (h, w) halves, each split into (sin, cos).
        need(self.hidden_size % 4 == 0, f"hidden_size must be a multiple of 4, got {self.hidden_size}.")
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}.")
        need(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}.")
        need(self.pos_embed_scale > 0, f"pos_embed_scale must be > 0, got {self.pos_embed_scale}.")
        need(self.num_classes >= 0, f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}.")
        need(self.context_dim >= 0 and self.pooled_dim >= 0, "context_dim and pooled_dim must be >= 0.")
        if self.arch == "dit":
            need(
                self.context_dim == 0 and self.pooled_dim == 0,
                "context_dim and pooled_dim are MMDiT options; set them to 0 for arch='dit'.",
            )
        else:
            need(
                not (self.context_dim > 0 and self.num_classes > 0),
                "MMDiT conditions on text embeddings (context_dim>0) or on classes (num_classes>0), not both.",
            )
            need(
                self.context_dim > 0 or self.pooled_dim == 0,
                "pooled_dim needs text conditioning (context_dim>0); class-token MMDiT pools a label embedding.",
            )
            need(self.num_context_tokens > 0, f"num_context_tokens must be > 0, got {self.num_context_tokens}.")
        # Lists (from JSON or a command line) become a tuple so the config stays hashable.
        layers = self.dual_attention_layers
        need(isinstance(layers, (tuple, list)), f"dual_attention_layers must be a tuple of ints, got {layers!r}.")
        object.__setattr__(self, "dual_attention_layers", tuple(layers))
        need(
            not layers or self.arch == "mmdit",
            "dual_attention_layers is an MMDiT option (SD3.5); leave it empty for arch='dit'.",
        )
        need(
            all(isinstance(i, int) and 0 <= i < self.depth for i in layers) and len(set(layers)) == len(layers),
            f"dual_attention_layers must be distinct block indices in [0, {self.depth}), got {layers!r}.",
        )

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def uses_class_tokens(self) -> bool:
        return self.arch == "mmdit" and self.context_dim == 0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """`ModelConfig.from_preset("DiT-XL/2", image_size=32, num_classes=1000)`."""
        if name not in PRESETS:
            raise UserError(f"Unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UserError(f"Unknown ModelConfig field(s) {unknown}; valid fields are {sorted(fields)}.")
        return cls(**{**PRESETS[name], **overrides})
