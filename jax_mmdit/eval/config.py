"""EvalConfig: which evaluators run during training, how often, with what settings (`--eval.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from jax_mmdit.errors import UserError

EvaluatorName = Literal["loss", "classifier", "fid"]
LabelSampling = Literal["balanced", "random"]
EVALUATORS = get_args(EvaluatorName)


@dataclass(frozen=True)
class SampleEvalConfig:
    """Settings shared by the evaluators that judge samples."""

    # Steps between evaluations; 0 = every eval_save_steps. The last step is always evaluated.
    every: int = 0
    # Samples drawn per evaluation (the real-data floor is measured at the same N).
    num_samples: int = 1000
    # Sampler overrides for evaluation; None = the run's --sampler settings.
    num_steps: int | None = None
    cfg_scale: float | None = None
    # "balanced": N/K samples of each of K classes; "random": labels drawn uniformly (seeded).
    labels: LabelSampling = "balanced"
    # Noise and labels are drawn from this seed: every evaluation of a run sees the same noise.
    seed: int = 0

    def check(self, name: str) -> None:
        if self.every < 0:
            raise UserError(f"eval.{name}.every must be >= 0 steps, got {self.every}.")
        if self.num_samples < 2:
            raise UserError(f"eval.{name}.num_samples must be at least 2, got {self.num_samples}.")
        if self.num_steps is not None and self.num_steps < 1:
            raise UserError(f"eval.{name}.num_steps must be >= 1, got {self.num_steps}.")
        if self.labels not in get_args(LabelSampling):
            raise UserError(f"eval.{name}.labels must be one of {get_args(LabelSampling)}, got {self.labels!r}.")


@dataclass(frozen=True)
class ClassifierEvalConfig(SampleEvalConfig):
    """Class accuracy and Fréchet distance in the features of the dataset's small CNN."""

    # The classifier's directory; None = the default cache (`mmdit train-classifier`), where it is
    # trained once (a few CPU minutes) if missing.
    path: str | None = None


@dataclass(frozen=True)
class FidEvalConfig(SampleEvalConfig):
    """FID, Inception Score and precision/recall with the FID Inception-v3."""

    num_samples: int = 5000
    # The Inception weights file (pytorch-fid's pt_inception-2015-12-05-*.pth); required for "fid".
    inception: str | None = None
    # Reference statistics (`mmdit fid-stats` output or an ADM reference batch .npz); None = those
    # of the run's eval split, computed once and cached.
    ref_stats: str | None = None
    # How images reach 299x299: "tf1" (ADM's evaluator, torch-fidelity) or "pytorch" (pytorch-fid).
    resize: Literal["tf1", "pytorch"] = "tf1"
    # Images per Inception call (each call pads to it: one compiled shape).
    inception_batch: int = 64


@dataclass(frozen=True)
class EvalConfig:
    # Evaluators run at evaluation steps, in this order: "loss" (flow loss on the eval split),
    # "classifier" (class accuracy + classifier-feature FD: small labelled datasets, offline),
    # "fid" (Inception FID/IS/precision/recall: needs eval.fid.inception).
    evaluators: tuple[EvaluatorName, ...] = ("loss",)
    classifier: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)
    fid: FidEvalConfig = field(default_factory=FidEvalConfig)

    def __post_init__(self) -> None:
        for name in self.evaluators:
            if name not in EVALUATORS:
                raise UserError(f"eval.evaluators: unknown evaluator {name!r}; choose from {EVALUATORS}.")
        if len(set(self.evaluators)) != len(self.evaluators):
            raise UserError(f"eval.evaluators lists an evaluator twice: {self.evaluators}.")
        self.classifier.check("classifier")
        self.fid.check("fid")
        if "fid" in self.evaluators and not self.fid.inception:
            raise UserError(
                "eval.evaluators has 'fid' but eval.fid.inception is not set: pass the FID Inception weights "
                "(pt_inception-2015-12-05-6726825d.pth, see docs/evaluation.md)."
            )
