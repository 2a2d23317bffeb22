"""PPO against a reward model, with a KL penalty to the frozen starting policy.

Light on purpose: the schema and the descriptor are read when a config is checked, before torch and
Lightning are imported (module.py holds the training code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rlhf.config.schema import RolloutConfig, StageConfig, on_policy_problems
from rlhf.stages import Stage


@dataclass
class PPOStageConfig(StageConfig):
    policy_from: str = MISSING
    reward_from: str = MISSING
    critic: str = MISSING
    critic_lr: float | None = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo_epochs: int = MISSING
    minibatch_size: int = MISSING
    clip_range: float = MISSING
    value_clip_range: float = MISSING
    vf_coef: float = MISSING
    entropy_coef: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    kl_coef: float = MISSING
    kl_estimator: str = MISSING
    kl_target: float | None = MISSING
    kl_horizon: int = MISSING
    max_approx_kl: float | None = MISSING
    reward_norm: str = MISSING
    reward_clip: float | None = MISSING
    missing_eos_penalty: float | None = MISSING
    whiten_advantages: bool = MISSING
    log_samples_every: int = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        positive = ("ppo_epochs", "minibatch_size", "kl_horizon")
        for key in positive:
            if getattr(self, key) < 1:
                out.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if self.minibatch_size > self.rollout.batch_size:
            out.append(("minibatch_size", f"must be <= stage.rollout.batch_size ({self.rollout.batch_size}), got {self.minibatch_size}"))
        for key in ("clip_range", "value_clip_range"):
            if not getattr(self, key) > 0:
                out.append((key, f"must be > 0, got {getattr(self, key)}"))
        for key in ("vf_coef", "entropy_coef", "kl_coef"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            out.append(("gamma" if not 0 <= self.gamma <= 1 else "lam", "must be in [0, 1]"))
        if self.kl_estimator not in ("k1", "k3"):
            out.append(("kl_estimator", f"must be k1 or k3, got {self.kl_estimator!r}"))
        if self.kl_target is not None and not self.kl_target > 0:
            out.append(("kl_target", f"must be > 0 or null, got {self.kl_target}"))
        if self.critic not in ("separate", "shared"):
            out.append(("critic", f"must be separate or shared, got {self.critic!r}"))
        if self.reward_norm not in ("auto", "model", "running", "none"):
            out.append(("reward_norm", f"must be auto, model, running or none, got {self.reward_norm!r}"))
        if self.critic_lr is not None and not self.critic_lr > 0:
            out.append(("critic_lr", f"must be > 0 or null, got {self.critic_lr}"))
        if self.log_samples_every < 0:
            out.append(("log_samples_every", f"must be >= 0, got {self.log_samples_every}"))
        out += on_policy_problems("PPO", self.rollout, self.missing_eos_penalty)
        if self.batch_size != self.rollout.batch_size:
            out.append(("batch_size", "PPO's batch is a rollout batch; set stage.rollout.batch_size"))
        return out


STAGE = Stage(
    name="ppo",
    schema=PPOStageConfig,
    builder="rlhf.stages.ppo.module:build",
    sources={"policy_from": "sft", "reward_from": "rm"},
    objective=("val/score_raw", "maximize"),
    bench="rlhf.stages.ppo.module:bench_workload",
    evaluated=True,
    refused_strategies={
        "fsdp": "PPO generates with the policy inside its training step, which FSDP's sharded parameters do not allow",
        "deepspeed": "PPO generates with the policy and steps several models inside its training step, which DeepSpeed's engine does not allow",
    },
)
