"""What the `hardware` group (trainer.accelerator, devices, strategy, precision) can run, and where.

`check` refuses, before any model loads, a stage and strategy that would not run correctly and an
accelerator this machine lacks; `device` is where a stage that builds no Trainer (eval) runs its
models, resolved by Lightning as a Trainer would.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from rlhf.errors import ConfigError

# Sharded strategies, and the stages refused under them with the reason. PPO generates with the
# policy inside its training step and several models share one optimizer: under FSDP's flat shards
# or DeepSpeed's engine that needs gathering code this project does not have. Lightning's FSDP
# precision refuses clipping by norm, and a rank-0 save of an FSDP model writes one shard, so SFT
# and RM are refused there too.
REFUSED = {
    "fsdp": {
        "sft": "Lightning's FSDP cannot clip gradients by norm and the saved model would be one shard",
        "rm": "Lightning's FSDP cannot clip gradients by norm and the saved model would be one shard",
        "ppo": "PPO generates with the policy inside its training step, which FSDP's sharded parameters do not allow",
    },
    "deepspeed": {
        "ppo": "PPO generates with the policy and steps several models inside its training step, which DeepSpeed's engine does not allow",
    },
}
INSTEAD = "hardware=gpu, or hardware=ddp trainer.accelerator=gpu for several GPUs"


def strategy_family(strategy: Any) -> str | None:
    """fsdp or deepspeed for the sharded strategies' registered names (fsdp_cpu_offload,
    deepspeed_stage_3, ...), else None."""
    name = str(strategy or "").lower()
    return next((family for family in REFUSED if name.startswith(family)), None)


def check(stage: str, trainer: dict[str, Any]) -> None:
    """ConfigError, one line, for a stage the strategy cannot run or hardware this machine lacks."""
    strategy = trainer.get("strategy", "auto")
    family = strategy_family(strategy)
    if family is not None and stage in REFUSED[family]:
        raise ConfigError(
            f"stage={stage} with trainer.strategy={strategy}: {REFUSED[family][stage]}; use {INSTEAD}"
        )
    if family == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"trainer.strategy={strategy}: DeepSpeed is not installed; `pip install deepspeed`, or use hardware=gpu")
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in ("auto", "cpu"):
        # Asked for explicitly: Lightning would fail on it only once the models are loaded, over many lines.
        try:
            device(trainer)
        except Exception as err:  # Lightning raises several types for an accelerator it cannot use
            message = " ".join(str(err).split())
            raise ConfigError(
                f"trainer.accelerator={accelerator}: not available on this machine ({message}); use hardware=cpu"
            ) from None


def device(trainer: dict[str, Any]):
    """The torch.device Lightning picks for the configured accelerator (one device of it)."""
    from lightning_fabric import Fabric

    return Fabric(accelerator=trainer.get("accelerator", "auto"), devices=1, strategy="auto").device
