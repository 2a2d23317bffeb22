"""Evaluation (stage=eval): policies compared on held-out prompts, nothing trained.

The package is not named `eval`, which would shadow the builtin.

Light on purpose: the schema and the descriptor are read when a config is checked, before torch and
Lightning are imported (module.py holds the training code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rlhf.config import BaseStageConfig, RolloutConfig
from rlhf.memory import Footprint, Held, Pass
from rlhf.stages import Stage

# Who picks the best policy: auto (gold when the data has a gold annotator, else the reward model) | gold | rm.
JUDGE_SETTINGS = ("auto", "gold", "rm")


@dataclass
class EvalStageConfig(BaseStageConfig):
    """Compares policies on held-out prompts; nothing is trained."""

    policies: list[str] | None = MISSING
    reward_from: str = MISSING
    reference: str = MISSING
    split: str = MISSING
    num_prompts: int = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    perplexity_examples: int = MISSING
    confidence: float = MISSING
    judge: str = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.policies is not None and len(self.policies) < 1:
            out.append(("policies", "must name at least one policy, or be null"))
        if self.num_prompts < 1:
            out.append(("num_prompts", f"must be >= 1, got {self.num_prompts}"))
        if self.perplexity_examples < 0:
            out.append(("perplexity_examples", f"must be >= 0, got {self.perplexity_examples}"))
        if not 0 < self.confidence < 1:
            out.append(("confidence", f"must be in (0, 1), got {self.confidence}"))
        if self.judge not in JUDGE_SETTINGS:
            out.append(("judge", f"must be one of {', '.join(JUDGE_SETTINGS)}, got {self.judge!r}"))
        return out


def footprint(run) -> Footprint:
    """One policy at a time, the reference and the reward model, sampling a rollout batch."""
    held = [Held("policy", trained=False), Held("reference", trained=False)]
    if not str(run.stage.reward_from).startswith("fn:"):
        held.append(Held("reward", trained=False, scalar=True))
    length = run.data.max_prompt_length + run.stage.rollout.max_new_tokens
    return Footprint(tuple(held), generate=Pass(run.stage.rollout.batch_size, length))


STAGE = Stage(
    name="eval",
    schema=EvalStageConfig,
    builder="rlhf.stages.evaluate.module:build",
    # policies: `latest` alone means the newest PPO run; the default (stage.policies=null) is the
    # newest lineage of every evaluated stage (see module._lineage_defaults).
    sources={"policies": "ppo", "reference": "sft", "reward_from": "rm"},
    accepts={"policies": ("causal_lm",), "reference": ("causal_lm",), "reward_from": ("reward_model",)},
    # The best policy's win rate against the baseline by stage.judge (rlhf.report); a sweep's parent
    # records that policy as its best run.
    objective=("eval/best/win_rate", "maximize"),
    key_metrics=("eval/best/gold_mean", "eval/best/kl"),
    bench=None,
    # No Trainer: under a data-parallel strategy rank 0 evaluates alone.
    trains=False,
    footprint=footprint,
)
