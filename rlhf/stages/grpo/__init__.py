"""stage=grpo: critic-free RL with group baselines (GRPO, RLOO, REINFORCE++) against a reward model
or a reward function. Its config schema and descriptor; the LightningModule is in .module.

Kept free of torch and Lightning: the config is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rlhf.config.schema import RolloutConfig, StageConfig, on_policy_problems
from rlhf.stages import Stage

# The keys of rlhf.rl.ADVANTAGE_ESTIMATORS (a test checks they agree).
ADVANTAGES = ("grpo", "rloo", "reinforce_pp")
KL_PLACES = ("reward", "loss")
LOSS_AVERAGES = ("token", "sequence")
REWARD_NORMS = ("auto", "model", "running", "none")


@dataclass
class GRPOStageConfig(StageConfig):
    """Typed and checked here; every default, with its comment, is in conf/stage/grpo.yaml."""

    name: str = MISSING
    policy_from: str = MISSING
    reward_from: str = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    group_size: int = MISSING
    advantage: str = MISSING
    kl_in: str = MISSING
    kl_coef: float = MISSING
    kl_estimator: str = MISSING
    ppo_epochs: int = MISSING
    minibatch_size: int = MISSING
    clip_range: float = MISSING
    loss_average: str = MISSING
    reward_norm: str = MISSING
    reward_clip: float | None = MISSING
    missing_eos_penalty: float | None = MISSING
    log_samples_every: int = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        for key in ("group_size", "ppo_epochs", "minibatch_size"):
            if getattr(self, key) < 1:
                out.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if self.advantage not in ADVANTAGES:
            out.append(("advantage", f"must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}"))
        elif self.advantage != "reinforce_pp" and self.group_size < 2:
            out.append(("group_size", f"must be >= 2 for stage.advantage={self.advantage} (a group is its own baseline)"))
        choices = {"kl_in": KL_PLACES, "loss_average": LOSS_AVERAGES, "reward_norm": REWARD_NORMS,
                   "kl_estimator": ("k1", "k3")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                out.append((key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"))
        if not self.clip_range > 0:
            out.append(("clip_range", f"must be > 0, got {self.clip_range}"))
        if self.kl_coef < 0:
            out.append(("kl_coef", f"must be >= 0, got {self.kl_coef}"))
        if self.reward_clip is not None and not self.reward_clip > 0:
            out.append(("reward_clip", f"must be > 0 or null, got {self.reward_clip}"))
        if self.log_samples_every < 0:
            out.append(("log_samples_every", f"must be >= 0, got {self.log_samples_every}"))
        out += on_policy_problems("GRPO", self.rollout, self.missing_eos_penalty)
        return out


STAGE = Stage(
    name="grpo",
    schema=GRPOStageConfig,
    builder="rlhf.stages.grpo.module:build",
    sources={"policy_from": "sft", "reward_from": "rm"},
    objective=("val/score_raw", "maximize"),
    bench="rlhf.stages.grpo.module:bench_workload",
    evaluated=True,
    refused_strategies={
        "fsdp": "GRPO generates with the policy inside its training step, which FSDP's sharded parameters do not allow",
        "deepspeed": "GRPO generates with the policy inside its training step, which DeepSpeed's engine does not allow",
    },
)
