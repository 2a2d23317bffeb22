"""stage=grpo: critic-free RL with group baselines (GRPO, RLOO, REINFORCE++) against a reward model
or a reward function. Its config schema and descriptor; the LightningModule is in .module.

Kept free of torch and Lightning: the config is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlhf.config.schema import OnPolicyStageConfig
from rlhf.hardware import INSTEAD_OF_SHARDING_RL
from rlhf.memory import Footprint, Pass
from rlhf.stages import Stage

# The keys of rlhf.rl.ADVANTAGE_ESTIMATORS (a test checks they agree).
ADVANTAGES = ("grpo", "rloo", "reinforce_pp")
KL_PLACES = ("reward", "loss")
LOSS_AVERAGES = ("token", "sequence")


@dataclass
class GRPOStageConfig(OnPolicyStageConfig):
    """Typed and checked here (the keys every on-policy stage has are in OnPolicyStageConfig); every
    default, with its comment, is in conf/stage/grpo.yaml."""

    group_size: int = MISSING
    advantage: str = MISSING
    kl_in: str = MISSING
    loss_average: str = MISSING

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.group_size < 1:
            out.append(("group_size", f"must be >= 1, got {self.group_size}"))
        if self.advantage not in ADVANTAGES:
            out.append(("advantage", f"must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}"))
        elif self.advantage != "reinforce_pp" and self.group_size < 2:
            out.append(
                (
                    "group_size",
                    f"must be >= 2 for stage.advantage={self.advantage} (a group is its own baseline)",
                )
            )
        for key, allowed in (("kl_in", KL_PLACES), ("loss_average", LOSS_AVERAGES)):
            if getattr(self, key) not in allowed:
                out.append((key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"))
        return out


def footprint(run) -> Footprint:
    """Policy, reference and reward model; stage.group_size responses per prompt generated at once,
    then minibatches through the policy."""
    stage = run.stage
    length = stage.episode_length(run.data.max_prompt_length)
    return Footprint(
        tuple(stage.held_models(run.model.lora.enabled)),
        train=Pass(
            min(stage.minibatch_size, stage.rollout.batch_size * stage.group_size),
            length,
            logprobs=True,
            head_length=stage.rollout.max_new_tokens,
        ),
        generate=Pass(stage.rollout.batch_size * stage.group_size, length),
        batch_key="minibatch_size",
    )


STAGE = Stage(
    name="grpo",
    schema=GRPOStageConfig,
    builder="rlhf.stages.grpo.module:build",
    sources={"policy_from": "sft", "reward_from": "rm"},
    accepts={"policy_from": ("causal_lm",), "reward_from": ("reward_model",)},
    objective=("val/score_raw", "maximize"),
    key_metrics=("val/gold", "val/kl", "val/response_length"),
    bench="rlhf.stages.grpo.module:bench_workload",
    evaluated=True,
    refused_strategies={
        "fsdp": "GRPO generates with the policy inside its training step, which FSDP's sharded parameters do not allow",
        "deepspeed": "GRPO generates with the policy inside its training step, which DeepSpeed's engine does not allow",
    },
    refused_instead=INSTEAD_OF_SHARDING_RL,
    footprint=footprint,
)
