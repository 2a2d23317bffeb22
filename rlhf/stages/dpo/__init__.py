"""Direct preference optimisation: the policy learns from preference pairs directly, against a frozen
reference, without a reward model. The schema and the stage's descriptor; the training code is in
`module` (imported only when the stage runs)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlhf.config import StageConfig
from rlhf.memory import Footprint, Held, Pass
from rlhf.stages import Stage

# The losses of rlhf.preference.dpo_loss.
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOStageConfig(StageConfig):
    """Typed and checked here; every default, with its comment, is in conf/stage/dpo.yaml."""

    name: str = MISSING
    init_from: str = MISSING
    beta: float = MISSING
    loss: str = MISSING
    label_smoothing: float = MISSING
    precompute_ref: bool = MISSING
    share_prefix: bool = MISSING
    group_by_record: bool = MISSING
    sample_prompts: int = MISSING
    sample_max_new_tokens: int = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if not self.beta > 0:
            out.append(("beta", f"must be > 0, got {self.beta}"))
        if self.loss not in DPO_LOSSES:
            out.append(("loss", f"must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}"))
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"))
        elif self.label_smoothing and self.loss != "sigmoid":
            out.append(("label_smoothing", f"applies to the sigmoid loss only, not {self.loss}"))
        if self.sample_prompts < 0:
            out.append(("sample_prompts", f"must be >= 0, got {self.sample_prompts}"))
        if self.sample_max_new_tokens < 1:
            out.append(("sample_max_new_tokens", f"must be >= 1, got {self.sample_max_new_tokens}"))
        return out


def footprint(run) -> Footprint:
    """The policy on both responses of each pair, and a frozen reference unless it is the policy with
    its LoRA adapters off or its log-probabilities are computed beforehand (stage.precompute_ref)."""
    held = [Held("policy", trained=True)]
    if not run.model.lora.enabled and not run.stage.precompute_ref:
        held.append(Held("reference", trained=False))
    return Footprint(
        tuple(held),
        train=Pass(2 * run.stage.batch_size, run.data.max_length, logprobs=True),
        batch_key="batch_size",
    )


STAGE = Stage(
    name="dpo",
    schema=DPOStageConfig,
    builder="rlhf.stages.dpo.module:build",
    sources={"init_from": "sft"},
    accepts={"init_from": ("causal_lm",)},
    objective=("val/rewards/accuracies", "maximize"),
    key_metrics=("val/gold", "val/kl", "val/loss"),
    bench="rlhf.stages.dpo.module:bench_workload",
    evaluated=True,
    footprint=footprint,
)
