"""What the `hardware` group (trainer.accelerator, devices, strategy, precision) can run, and where.

`check` refuses, before any model loads, a stage and strategy that would not run correctly and an
accelerator this machine lacks; `device` is where a stage that builds no Trainer (eval) runs its
models, resolved by Lightning as a Trainer would.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.stages import Stage

# The sharded strategies' families. Which stage each refuses, and why, lives with the stage
# (`Stage.refused_strategies`).
SHARDED = ("fsdp", "deepspeed")
# Lightning's FSDP precision refuses clipping by norm, and a rank-0 save of an FSDP model writes one
# shard: a reason shared by the stages that train one model with Lightning's own loop.
FSDP_CANNOT_CLIP_OR_SAVE = "Lightning's FSDP cannot clip gradients by norm and the saved model would be one shard"
INSTEAD = "hardware=gpu, or hardware=ddp trainer.accelerator=gpu for several GPUs"


def strategy_family(strategy: Any) -> str | None:
    """fsdp or deepspeed for the sharded strategies' registered names (fsdp_cpu_offload,
    deepspeed_stage_3, ...), else None."""
    name = str(strategy or "").lower()
    return next((family for family in SHARDED if name.startswith(family)), None)


def check(stage: Stage, trainer: dict[str, Any]) -> None:
    """ConfigError, one line, for a stage (its descriptor) the strategy cannot run or hardware this machine lacks."""
    strategy = trainer.get("strategy", "auto")
    family = strategy_family(strategy)
    refused = stage.refused_strategies
    if family is not None and family in refused:
        raise ConfigError(f"stage={stage.name} with trainer.strategy={strategy}: {refused[family]}; use {INSTEAD}")
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
