"""`VAEConfig`: the shape of an `AutoencoderKL` and how its latents are scaled, in diffusers' terms.

The fields are diffusers' `AutoencoderKL` config keys (read from and written to a published VAE's
`config.json`), so a directory this project writes loads in diffusers and the other way round. The
scaling and shift factors belong to the VAE, not to a dataset: a latent is `(z - shift) * scaling`
when a diffusion model sees it (SD 1.x/2.x: shift none, scaling 0.18215).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_mmdit.errors import UserError

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    latent_channels: int = 4  # 4 for SD 1.x/2.x/SDXL, 16 for SD3/Flux
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one resolution level each; 2x down between
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    scaling_factor: float = 0.18215  # latent -> unit variance, as the diffusion model sees it
    shift_factor: float | None = None  # subtracted before scaling (SD3/Flux)
    use_quant_conv: bool = True  # 1x1 conv on the moments (SD/SDXL); SD3/Flux have none
    use_post_quant_conv: bool = True  # 1x1 conv before decoding
    mid_block_add_attention: bool = True  # self-attention in the middle blocks
    sample_size: int = 512  # the resolution it was trained at (informational)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if min(self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) < 1:
            raise UserError("VAE channels and layers_per_block must be positive.")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise UserError(
                f"VAE block_out_channels {self.block_out_channels} must be non-empty multiples of "
                f"norm_num_groups={self.norm_num_groups}."
            )
        if self.scaling_factor <= 0:
            raise UserError(f"VAE scaling_factor must be positive, got {self.scaling_factor}.")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"Unknown VAE config keys {unknown}.")
        return cls(**d)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` diffusers' `AutoencoderKL.from_pretrained` reads."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **self.to_dict(),
            "down_block_types": [DOWN_BLOCK] * n,
            "up_block_types": [UP_BLOCK] * n,
            "act_fn": "silu",
            "force_upcast": True,
        }

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
        """A diffusers `AutoencoderKL` config.json -> VAEConfig; refuses what this module cannot run."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UserError(f"Expected an AutoencoderKL config, got _class_name {d.get('_class_name')!r}.")
        if d.get("act_fn", "silu") != "silu":
            raise UserError(f"Only act_fn 'silu' VAEs are supported, got {d.get('act_fn')!r}.")
        for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            if any(t != kind for t in d.get(key, [kind])):
                raise UserError(f"Only {kind} VAE blocks are supported, got {key}={d[key]}.")
        if d.get("latents_mean") is not None or d.get("latents_std") is not None:
            raise UserError("VAEs with per-channel latents_mean/latents_std are not supported.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and (v is not None or k == "shift_factor")}
        return cls(**kwargs)


# The published families' shapes; weights come from a local directory (`mmdit encode --vae DIR`).
VAE_PRESETS: dict[str, VAEConfig] = {
    # stabilityai/sd-vae-ft-ema, sd-vae-ft-mse (SD 1.x/2.x; DiT's VAE)
    "sd": VAEConfig(scaling_factor=0.18215),
    # stabilityai/sdxl-vae
    "sdxl": VAEConfig(scaling_factor=0.13025, sample_size=1024),
    # stabilityai/stable-diffusion-3-medium-diffusers, subfolder vae
    "sd3": VAEConfig(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=1024,
    ),
    # black-forest-labs/FLUX.1-dev, subfolder vae
    "flux": VAEConfig(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=1024,
    ),
}
