"""Typed training configuration: one frozen dataclass tree, validated at construction.

`TrainConfig` composes the per-package configs (model, flow, sampler, data) with the optimiser,
device mesh, precision and bookkeeping knobs. Named presets live in `PRESETS`; the command line
overrides any field (`mmdit train --config fashion_mnist --optim.learning_rate 1e-3`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from jax_mmdit.data.config import DataConfig
from jax_mmdit.errors import UserError
from jax_mmdit.eval.config import ClassifierEvalConfig, EvalConfig
from jax_mmdit.flow.config import FlowConfig, MeanFlowConfig, SamplerConfig, check_sampler_fits
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.ops import ATTENTIONS, Attention, Kernels

Precision = Literal["fp32", "bf16", "fp16", "fp8"]

# Model compute dtype for each precision mode; master parameters always stay fp32.
# fp8: bf16 compute with the transformer blocks' matmuls in fp8 (jax_mmdit.ops.fp8).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4  # peak LR after warmup
    weight_decay: float = 0.0  # AdamW decoupled decay (DiT used 0)
    b1: float = 0.9
    b2: float = 0.999  # DiT/SD3 use 0.999; 0.95 is more stable for very large batches
    eps: float = 1e-8
    warmup_steps: int = 200  # linear warmup from 0 avoids early adaLN blow-ups
    schedule: Literal["constant", "cosine"] = "constant"  # cosine decays to min_lr_ratio·LR at the end
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    ema_decay: float = 0.999  # EMA of parameters used for sampling and eval; 0 disables
    ema_warmup: bool = True  # decay = min(ema_decay, (1+step)/(10+step)): early EMA tracks fast

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise UserError(f"optim.learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("optim.warmup_steps, grad_clip and weight_decay must be >= 0.")
        if self.schedule not in ("constant", "cosine"):
            raise UserError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}.")


@dataclass(frozen=True)
class MeshConfig:
    # Device mesh (data, fsdp). -1 fills the axis with the remaining devices.
    # DDP: fsdp=1. FSDP: params, optimizer state and EMA are sharded along `fsdp`.
    data: int = -1
    fsdp: int = 1
    # Multi-host (jax.distributed). Left unset, the usual env vars / cluster auto-detection apply;
    # with a single process nothing is initialised.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        for name in ("data", "fsdp"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise UserError(f"mesh.{name} must be a positive device count or -1, got {v}.")
        if self.data == -1 and self.fsdp == -1:
            raise UserError("At most one of mesh.data and mesh.fsdp can be -1.")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    run_dir: str = "runs/default"  # checkpoints, TensorBoard events, samples; resumes if present
    # A run directory (e.g. written by `mmdit convert`) whose EMA weights start this run when it
    # starts fresh: fine-tuning, with a fresh optimizer (train/init_from.py: what may differ).
    init_from: str | None = None
    seed: int = 0
    batch_size: int = 128  # global batch (all devices, all hosts, all micro-batches)
    n_epochs: float = 1.0  # training length in passes over the data, unless max_steps is set
    max_steps: int | None = None  # overrides n_epochs
    grad_accum_steps: int = 1  # micro-batches per step: same maths, 1/grad_accum_steps activations
    precision: Precision = "fp32"  # bf16: bf16 compute; fp16: + dynamic loss scaling; fp8: bf16 + fp8 block matmuls
    # Which implementation of the model's operations runs (jax_mmdit.ops): "onednn" = the package's
    # C++/oneDNN kernels (CPU), "xla" = XLA's own ops, "auto" = onednn on a one-device CPU mesh
    # where the kernels build, else xla. Same maths either way; it changes speed, not results.
    kernels: Kernels = "auto"
    # How attention runs: "auto" (GPU: cuDNN flash with an XLA fallback; CPU: the fused kernel of
    # the oneDNN backend), "xla" (softmax between separate matmuls), "cudnn" (GPU flash; bf16/fp16).
    attention: Attention = "auto"
    log_every: int = 50  # steps between host syncs for metrics (the only sync in the loop)
    eval_save_steps: int = 500  # steps between evaluation (see eval.*) + checkpoint
    n_eval_batches: int = 10  # eval-split batches of the "loss" evaluator
    sample_every_n: int = 500  # steps between sample grids/GIFs (0: only at the end)
    num_sample_images: int = 16  # one per class, capped here
    # Text runs: the prompts of the sample grids; empty = the captions' (one per class for templated
    # captions, else their first ones).
    sample_prompts: tuple[str, ...] = ()
    keep_checkpoints: int = 3
    profile: bool = False  # run a few steps, print FLOPs/MFU/memory, write a trace, exit
    profile_steps: int = 5
    # Resuming checks the requested config against the saved one: fields outside RESUMABLE_CHANGES
    # must match. Name fields here to change them on purpose (e.g. --allow_config_change seed).
    allow_config_change: tuple[str, ...] = ()

    def __post_init__(self):
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be > 0, got {self.batch_size}.")
        if self.grad_accum_steps <= 0 or self.batch_size % self.grad_accum_steps:
            raise UserError(
                f"batch_size {self.batch_size} must be divisible by grad_accum_steps {self.grad_accum_steps}."
            )
        if self.precision not in PRECISION_DTYPES:
            raise UserError(f"precision must be one of {list(PRECISION_DTYPES)}, got {self.precision!r}.")
        if self.model.dtype != "float32":
            raise UserError(
                f"model.dtype={self.model.dtype!r}: in training the compute dtype comes from precision; "
                f"set --precision {'bf16' if self.model.dtype == 'bfloat16' else 'fp16'} instead."
            )
        if self.kernels not in get_args(Kernels):
            raise UserError(f"kernels must be one of {get_args(Kernels)}, got {self.kernels!r}.")
        if self.attention not in ATTENTIONS:
            raise UserError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}.")
        if self.attention == "cudnn" and self.precision == "fp32":
            raise UserError("attention='cudnn' runs in bf16 or fp16: set --precision bf16 (or fp16).")
        check_sampler_fits(self.flow, self.sampler)
        if (self.flow.objective == "meanflow") != self.model.interval_embed:
            raise UserError(
                "The meanflow objective and model.interval_embed go together (the model takes the interval t - r): "
                f"objective {self.flow.objective!r} with interval_embed={self.model.interval_embed}."
            )
        if self.flow.objective == "meanflow" and (
            self.kernels == "onednn" or self.precision == "fp8" or self.attention == "cudnn"
        ):
            raise UserError(
                "meanflow differentiates the model forward (jax.jvp); the oneDNN kernels, cuDNN attention and fp8 "
                "have reverse-mode derivatives only: use kernels and attention auto or xla, and another precision."
            )
        if self.init_from is not None and not self.init_from.strip():
            raise UserError("init_from must be a run directory, not an empty string.")
        if self.max_steps is None and self.n_epochs <= 0:
            raise UserError(f"n_epochs must be > 0, got {self.n_epochs}.")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"max_steps must be > 0, got {self.max_steps}.")
        for name in ("log_every", "eval_save_steps", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}.")

    @property
    def model_for_precision(self) -> ModelConfig:
        """The model config with its compute dtype set by `precision`."""
        return dataclasses.replace(self.model, dtype=PRECISION_DTYPES[self.precision])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of a `to_dict` (e.g. a saved run's). Fields missing from `d` take today's
        defaults (a field added since the run was saved); a field `d` has and the config does not
        (renamed or removed) is an error naming it, never dropped, except the documented moves in
        `_migrate`."""
        return _dataclass_from_dict(cls, _migrate(d), "")


# Fields a resumed run may change freely: how long, how fast and where it runs, how it logs,
# evaluates, samples and saves, and the optimizer's schedule. Everything else (the model, the
# data, the objective, the seed, the batch) must match the run being resumed, unless named in
# --allow_config_change. A trailing ".*" covers a whole sub-config.
RESUMABLE_CHANGES = (
    "run_dir", "n_epochs", "max_steps", "precision", "kernels", "grad_accum_steps", "log_every",
    "eval_save_steps", "n_eval_batches", "sample_every_n", "num_sample_images", "sample_prompts", "keep_checkpoints",
    "profile", "profile_steps", "allow_config_change", "mesh.*", "sampler.*", "eval.*", "attention",
    "model.remat", "init_from", "data.num_workers", "data.strict", "data.vae", "flow.num_loss_bins",
    "optim.learning_rate", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio", "optim.weight_decay",
    "optim.b1", "optim.b2",
    "optim.eps", "optim.grad_clip", "optim.ema_decay", "optim.ema_warmup",
)  # fmt: skip


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def _may_change(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or (a.endswith(".*") and name.startswith(a[:-1])) for a in (*RESUMABLE_CHANGES, *allowed))


def config_differences(saved: dict[str, Any], requested: TrainConfig) -> list[str]:
    """The fields where `requested` departs from a saved run's config (`saved`, as `to_dict`)
    without being allowed to, each as "name: saved -> requested". Fields the saved config lacks
    (added since) are not compared."""
    old, new = _flatten(saved), _flatten(json.loads(requested.to_json()))
    allowed = requested.allow_config_change
    diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old) if k in new and old[k] != new[k]
             and not _may_change(k, allowed)]  # fmt: skip
    # Gradient clipping on or off changes the optimizer state's structure: no resume can bridge it.
    clip_old, clip_new = old.get("optim.grad_clip"), new["optim.grad_clip"]
    if clip_old is not None and (clip_old > 0) != (clip_new > 0):
        diffs.append(f"optim.grad_clip: {clip_old!r} -> {clip_new!r} (clipping on/off changes the optimizer state)")
    return diffs


def _migrate(d: dict[str, Any]) -> dict[str, Any]:
    """Saved configs of earlier versions: `model.attention` (a backend choice, not maths) is now
    the top-level `attention`."""
    model = d.get("model")
    if isinstance(model, dict) and "attention" in model:
        model = dict(model)
        d = {**d, "model": model}
        d.setdefault("attention", model.pop("attention"))
    return d


def _sub_config(cls, name: str):
    """The dataclass type of field `name` of `cls` when it is a nested config, else None."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None or f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return type(default) if dataclasses.is_dataclass(default) else None


def _unknown_fields(cls, d: dict[str, Any], prefix: str = "") -> list[str]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [prefix + k for k in d if k not in names]
    for k, v in d.items():
        sub = _sub_config(cls, k) if k in names else None
        if sub is not None and isinstance(v, dict):
            unknown += _unknown_fields(sub, v, f"{prefix}{k}.")
    return sorted(unknown)


def _dataclass_from_dict(cls, d: dict[str, Any], prefix: str):
    unknown = _unknown_fields(cls, d, prefix)
    if unknown:
        raise UserError(
            f"The saved config has field(s) this version does not know: {', '.join(unknown)} "
            "(renamed or removed since the run was written); load the run with the version of jax-mmdit that wrote it."
        )
    kwargs = {}
    for k, v in d.items():
        sub = _sub_config(cls, k)
        if sub is not None and isinstance(v, dict):
            kwargs[k] = _dataclass_from_dict(sub, v, f"{prefix}{k}.")
        else:  # JSON turns tuples into lists; frozen configs expect tuples for hashability.
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


# Seconds per MeanFlow training step over a rectified-flow one for the default's model on 2 CPU
# cores (oneDNN kernels for rectified flow; MeanFlow's jvp runs the plain ops): `python -m
# benchmarks.bench_meanflow`. Sizes the MeanFlow preset's training to the default's wall-clock.
MEANFLOW_STEP_COST = 2.3


def _fashion_mnist() -> TrainConfig:
    """The default: a small class-conditional MMDiT that draws recognisable Fashion-MNIST on a
    2-core CPU in ~8 minutes (the recipe and its ablation: docs/recipe.md)."""
    return TrainConfig(
        model=ModelConfig(
            # SD3's two streams: the class enters as 4 learned context tokens in joint attention
            # (and adaLN), not adaLN alone as in DiT; one epoch: class accuracy 0.90 against DiT's
            # 0.62 at the same width, depth and time per step. QK-norm as in the MMDiT presets.
            arch="mmdit",
            qk_norm=True,
            # Patch 4 -> 49 tokens: 4x cheaper per image than patch 2.
            image_size=28,
            in_channels=1,
            patch_size=4,
            hidden_size=192,
            depth=6,
            num_heads=3,
            num_classes=10,
        ),
        data=DataConfig(name="fashion_mnist"),
        sampler=SamplerConfig(num_steps=32, cfg_scale=2.0),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, ema_decay=0.999),
        # Sample quality offline: class accuracy and FD in a small CNN's features (docs/evaluation.md),
        # every 702 steps (at the end of the default run): 1000 samples cost about 150 training steps.
        eval=EvalConfig(evaluators=("loss", "classifier"), classifier=ClassifierEvalConfig(every=702)),
        # bf16 compute, fp32 master weights: fp32's quality at 1.57x its speed on a CPU with AVX-512
        # BF16 or AMX (the operations layer's bf16 kernels); elsewhere --precision fp32 may be faster.
        precision="bf16",
        run_dir="runs/fashion_mnist",
        batch_size=128,
        # 702 steps: the time bf16 saves spent on steps, within the default's 10-minute budget.
        n_epochs=1.5,
        eval_save_steps=200,
        sample_every_n=200,
        log_every=25,
    )


def _tiny() -> TrainConfig:
    """A seconds-long config for tests and smoke runs."""
    return TrainConfig(
        model=ModelConfig(
            arch="dit",
            image_size=28,
            in_channels=1,
            patch_size=7,
            hidden_size=32,
            depth=2,
            num_heads=2,
            num_classes=10,
        ),
        data=DataConfig(name="fashion_mnist", max_examples=256),
        sampler=SamplerConfig(num_steps=4, cfg_scale=2.0),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=2),
        run_dir="runs/tiny",
        batch_size=16,
        max_steps=6,
        log_every=2,
        eval_save_steps=3,
        n_eval_batches=1,
        sample_every_n=3,
        num_sample_images=4,
    )


def _for_dataset(name: str, eval_every: int = 0, **model_kw) -> TrainConfig:
    """The default recipe moved to another registered dataset: image size, channels and classes
    come from the dataset's spec, the model from `model_kw`; the classifier evaluator runs every
    `eval_every` steps (0: every eval_save_steps)."""
    from jax_mmdit.data.registry import get_spec

    spec = get_spec(name)
    base = _fashion_mnist()
    model = dataclasses.replace(
        base.model,
        image_size=spec.image_size,
        in_channels=spec.channels,
        num_classes=spec.num_classes,
        **model_kw,
    )
    # Unconditional datasets have nothing to guide with.
    sampler = base.sampler if spec.num_classes else dataclasses.replace(base.sampler, cfg_scale=1.0)
    # The classifier evaluator needs labelled pixel images.
    evaluators = ("loss", "classifier") if spec.num_classes else ("loss",)
    return dataclasses.replace(
        base,
        model=model,
        data=DataConfig(name=name),
        sampler=sampler,
        eval=EvalConfig(evaluators=evaluators, classifier=ClassifierEvalConfig(every=eval_every)),
        run_dir=f"runs/{name}",
    )


def _fashion_mnist_latents() -> TrainConfig:
    """A DiT of the default's size and its recipe on latents: Fashion-MNIST at 32x32 through a VAE trained here
    (`mmdit train-vae`, then `mmdit encode`, as the README shows), 8x8x4 latents in patches of 2 ->
    16 tokens. Judged like the default, in pixels: decoded samples through the classifier."""
    base = _fashion_mnist()
    return dataclasses.replace(
        base,
        # The DiT its numbers in docs/latents.md were measured with; the default's MMDiT is not checked here.
        model=dataclasses.replace(base.model, arch="dit", qk_norm=False, image_size=8, in_channels=4, patch_size=2),
        precision="fp32",  # as docs/latents.md measured it
        # The latent directory `mmdit encode --out latents/fashion_mnist` writes.
        data=DataConfig(name="fashion_mnist", source="./latents/fashion_mnist"),
        # An epoch of 16-token latents costs about a tenth of the pixel model's 49-token one: 8
        # epochs fit the default's CPU budget. Evaluated once per epoch (57 000 / 128 steps).
        n_epochs=8.0,
        eval=dataclasses.replace(base.eval, classifier=dataclasses.replace(base.eval.classifier, every=445)),
        run_dir="runs/fashion_mnist_latents",
    )


def _fashion_mnist_text() -> TrainConfig:
    """Text-to-image on Fashion-MNIST: the default's recipe and size as an MMDiT conditioned on
    templated captions ("a photo of a sandal", ...) encoded by `mmdit encode-text` (as the README
    shows). Judged like the default: samples of each class's prompt through the classifier."""
    base = _fashion_mnist()
    return dataclasses.replace(
        base,
        # Text widths (context_dim, pooled_dim) come from the captions' manifest. Without the default's
        # QK-norm, as docs/text.md measured it.
        model=dataclasses.replace(base.model, arch="mmdit", qk_norm=False, num_classes=0),
        # The caption directory `mmdit encode-text --out captions/fashion_mnist` writes.
        data=DataConfig(name="fashion_mnist", captions="./captions/fashion_mnist"),
        # One epoch in fp32, evaluated once per epoch: as docs/text.md measured it.
        precision="fp32",
        n_epochs=1.0,
        eval=dataclasses.replace(base.eval, classifier=dataclasses.replace(base.eval.classifier, every=468)),
        run_dir="runs/fashion_mnist_text",
    )


def _fashion_mnist_meanflow() -> TrainConfig:
    """One-step generation: the default's model and data trained with the MeanFlow objective (Geng
    et al. 2025) for the default's wall-clock, guidance folded into training (effective CFG 2 like
    the default's sampler), sampled in one jump from noise (`--sampler.num_steps` or `mmdit sample
    --steps k` for k jumps). The average velocity needs a jvp of the model: plain ops, no oneDNN."""
    base = _fashion_mnist()
    return dataclasses.replace(
        base,
        # time_scale 1 embeds t and t - r in [0, 1]: with DiT's 0..1000 the embedder's sinusoids make
        # du/dt in the target 1000x steeper, and the fit was far worse (measured in docs/meanflow.md).
        model=dataclasses.replace(base.model, interval_embed=True, time_scale=1.0),
        # The paper's t, r schedule (logit-normal(-0.4, 1), r = t for 75 %), omega 1 and kappa 0.5:
        # targets guided with scale omega / (1 - kappa) = 2.
        flow=FlowConfig(objective="meanflow", logit_mean=-0.4, meanflow=MeanFlowConfig(kappa=0.5)),
        sampler=SamplerConfig(method="meanflow", num_steps=1, cfg_scale=1.0),
        # fp32, as docs/meanflow.md measured it.
        precision="fp32",
        # A MeanFlow step costs MEANFLOW_STEP_COST rectified-flow steps here (benchmarks/bench_meanflow.py):
        # this many epochs take one epoch of the default's model in fp32.
        n_epochs=round(1.0 / MEANFLOW_STEP_COST, 2),
        eval=dataclasses.replace(base.eval, classifier=dataclasses.replace(base.eval.classifier, every=468)),
        run_dir="runs/fashion_mnist_meanflow",
    )


def _imagenet_latents() -> TrainConfig:
    """DiT-XL/2's recipe at 256² (Peebles & Xie): 32x32x4 SD-VAE (ft-ema) latents of ImageNet, batch
    256, AdamW at a constant 1e-4 without weight decay or warmup, EMA 0.9999, 400k steps. A GPU recipe:
    encode the ImageNet train folder first (`mmdit encode`, see the README)."""
    base = _for_dataset("imagenet")
    return dataclasses.replace(
        base,
        model=ModelConfig.from_preset("DiT-XL/2", image_size=32, in_channels=4, num_classes=1000),
        # The latent directory `mmdit encode --out latents/imagenet256` writes.
        data=DataConfig(name="imagenet", source="./latents/imagenet256"),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0, ema_decay=0.9999),
        sampler=SamplerConfig(num_steps=50, cfg_scale=1.5),
        # Decoding a sample grid of latents needs the VAE; the loss is the cheap signal while training.
        eval=EvalConfig(evaluators=("loss",)),
        precision="bf16",
        batch_size=256,
        max_steps=400_000,  # DiT-XL/2's 400k-step row (FID-50K 19.5 without guidance)
        eval_save_steps=10_000,
        sample_every_n=10_000,
        log_every=100,
        run_dir="runs/imagenet",
    )


PRESETS = {
    "fashion_mnist": _fashion_mnist,
    "tiny": _tiny,
    "mnist": lambda: _for_dataset("mnist", eval_every=468),  # once per epoch of 60000 / 128
    "cifar10": lambda: _for_dataset("cifar10", eval_every=390, hidden_size=256, depth=8, num_heads=4, patch_size=2),
    "flowers": lambda: _for_dataset("flowers", hidden_size=256, depth=8, num_heads=4, patch_size=4),
    "butterflies": lambda: _for_dataset("butterflies", hidden_size=256, depth=8, num_heads=4, patch_size=4),
    "fashion_mnist_latents": _fashion_mnist_latents,
    "fashion_mnist_text": _fashion_mnist_text,
    "fashion_mnist_meanflow": _fashion_mnist_meanflow,
    "imagenet": _imagenet_latents,
}


def get_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise UserError(f"Unknown config {name!r}; choose from {sorted(PRESETS)}.")
    return PRESETS[name]()
