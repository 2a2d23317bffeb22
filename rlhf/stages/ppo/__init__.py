"""PPO against a reward model, with a KL penalty to the frozen starting policy.

Light on purpose: the schema and the descriptor are read when a config is checked, before torch and
Lightning are imported (module.py holds the training code).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlhf.config.schema import OnPolicyStageConfig
from rlhf.hardware import INSTEAD_OF_SHARDING_RL
from rlhf.memory import Footprint, Held, Pass
from rlhf.stages import Stage


@dataclass
class PPOStageConfig(OnPolicyStageConfig):
    """Typed and checked here (the keys every on-policy stage has are in OnPolicyStageConfig); every
    default, with its comment, is in conf/stage/ppo.yaml."""

    critic: str = MISSING
    critic_lr: float | None = MISSING
    value_clip_range: float = MISSING
    vf_coef: float = MISSING
    entropy_coef: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    kl_target: float | None = MISSING
    kl_horizon: int = MISSING
    max_approx_kl: float | None = MISSING
    whiten_advantages: bool = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.kl_horizon < 1:
            out.append(("kl_horizon", f"must be >= 1, got {self.kl_horizon}"))
        if self.minibatch_size > self.rollout.batch_size:
            out.append(
                (
                    "minibatch_size",
                    f"must be <= stage.rollout.batch_size ({self.rollout.batch_size}), got {self.minibatch_size}",
                )
            )
        if not self.value_clip_range > 0:
            out.append(("value_clip_range", f"must be > 0, got {self.value_clip_range}"))
        for key in ("vf_coef", "entropy_coef"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            out.append(("gamma" if not 0 <= self.gamma <= 1 else "lam", "must be in [0, 1]"))
        if self.kl_target is not None and not self.kl_target > 0:
            out.append(("kl_target", f"must be > 0 or null, got {self.kl_target}"))
        if self.critic not in ("separate", "shared"):
            out.append(("critic", f"must be separate or shared, got {self.critic!r}"))
        if self.critic_lr is not None and not self.critic_lr > 0:
            out.append(("critic_lr", f"must be > 0 or null, got {self.critic_lr}"))
        if self.batch_size != self.rollout.batch_size:
            out.append(("batch_size", "PPO's batch is a rollout batch; set stage.rollout.batch_size"))
        return out


def footprint(run) -> Footprint:
    """Policy, reference, reward model and a separate value model (a value head on the policy when
    stage.critic=shared); a rollout batch generated, then minibatches through policy and critic."""
    stage = run.stage
    held = stage.held_models(run.model.lora.enabled)
    roles = ("policy",)
    if stage.critic == "separate":
        held.append(Held("critic", trained=True, scalar=True))
        roles = ("policy", "critic")
    length = stage.episode_length(run.data.max_prompt_length)
    return Footprint(
        tuple(held),
        train=Pass(
            stage.minibatch_size, length, roles, logprobs=True, head_length=stage.rollout.max_new_tokens
        ),
        generate=Pass(stage.rollout.batch_size, length),
        batch_key="minibatch_size",
    )


STAGE = Stage(
    name="ppo",
    schema=PPOStageConfig,
    builder="rlhf.stages.ppo.module:build",
    sources={"policy_from": "sft", "reward_from": "rm"},
    accepts={"policy_from": ("causal_lm",), "reward_from": ("reward_model",)},
    objective=("val/score_raw", "maximize"),
    key_metrics=("val/gold", "val/kl", "val/response_length"),
    bench="rlhf.stages.ppo.module:bench_workload",
    evaluated=True,
    refused_strategies={
        "fsdp": "PPO generates with the policy inside its training step, which FSDP's sharded parameters do not allow",
        "deepspeed": "PPO generates with the policy and steps several models inside its training step, which DeepSpeed's engine does not allow",
    },
    refused_instead=INSTEAD_OF_SHARDING_RL,
    footprint=footprint,
)
