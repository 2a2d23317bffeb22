"""stage=grpo: critic-free RL with group baselines (GRPO, RLOO, REINFORCE++) against a reward model
or a reward function. Its config schema and descriptor; the LightningModule is in .module.

Kept free of torch and Lightning: the config is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config import STAGE_SCHEMAS, RolloutConfig, StageConfig

# The keys of rlhf.rl.ADVANTAGE_ESTIMATORS (a test checks they agree).
ADVANTAGES = ("grpo", "rloo", "reinforce_pp")
KL_PLACES = ("reward", "loss")
LOSS_AVERAGES = ("token", "sequence")
REWARD_NORMS = ("auto", "model", "running", "none")


@dataclass
class GRPOStageConfig(StageConfig):
    name: str = "grpo"
    # Policy learning rate (the PPO stage's default, for comparable runs); decays linearly to
    # min_lr_ratio * lr over trainer.max_steps iterations.
    lr: float = 3e-6
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    min_lr_ratio: float = 0.0
    # Policy start: latest (newest finished SFT run), base, a directory or runs:/<run_id>/model.
    policy_from: str = "latest"
    # Reward: latest (newest finished RM run), a directory, runs:/<run_id>/model, or
    # fn:package.module.function scoring (prompts, responses) strings.
    reward_from: str = "latest"
    # Sampling; rollout.batch_size counts prompts per iteration on each device, each sampled
    # group_size times.
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(batch_size=4))
    # Responses sampled per prompt: the group whose rewards are each other's baseline.
    group_size: int = 4
    # Advantage estimator: grpo (group mean and std), rloo (leave-one-out group mean) or
    # reinforce_pp (REINFORCE++: normalised over the whole batch).
    advantage: str = "grpo"
    # Where the KL to the reference goes: loss (k3 estimate added to the loss, as GRPO) or reward
    # (per-token penalty in the reward, as PPO, with kl_estimator).
    kl_in: str = "loss"
    # Weight of the KL term (loss) or per-token penalty (reward).
    kl_coef: float = 0.04
    # Estimator of the per-token KL in the reward and in the logged KL: k1 or k3 (the loss term is k3).
    kl_estimator: str = "k1"
    # Optimisation epochs over each rollout batch, one optimizer step each (1: fully on-policy).
    ppo_epochs: int = 1
    # Episodes per forward and backward pass; an epoch's passes add up to one step (memory only).
    minibatch_size: int = 8
    # Clipping of the policy ratio (binds only from the second epoch on).
    clip_range: float = 0.2
    # Loss averaged over all tokens of the batch (token) or per response first (sequence, as the
    # GRPO paper; short responses then weigh more per token).
    loss_average: str = "token"
    # Reward normalisation: auto (the reward model's stored statistics, else running statistics),
    # model, running, or none; then clipping to +- reward_clip (null: no clipping).
    reward_norm: str = "auto"
    reward_clip: float | None = 10.0
    # Added to the score of responses that end without EOS (null: no penalty), e.g. -1.0.
    missing_eos_penalty: float | None = None
    # Log a table of sample prompts, responses and scores every this many iterations (0: never).
    log_samples_every: int = 10
    # Prompts per validation batch (one response each) and validation batches per validation (null: all).
    eval_batch_size: int = 8
    limit_eval_batches: int | None = 2

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
        return out


STAGE_INFO = {
    "builder": "rlhf.stages.grpo.module:build",
    "schema": GRPOStageConfig,
    "sources": {"policy_from": "sft", "reward_from": "rm"},
    "objective": ("val/score_raw", "maximize"),
    "bench": "rlhf.bench:grpo_workload",
}

# Until the stages are one descriptor table: this stage's schema joins rlhf.config's.
STAGE_SCHEMAS.setdefault("grpo", GRPOStageConfig)
