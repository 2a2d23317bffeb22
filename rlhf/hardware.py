"""What the `hardware` group (trainer.accelerator, devices, strategy, precision) can run, and where.

`check` refuses, before any model loads, a stage and strategy that would not run correctly and an
accelerator this machine lacks; `device` is where a stage that builds no Trainer (eval) runs its
models, resolved by Lightning as a Trainer would.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.errors import ConfigError
from rlhf.memory import Devices

if TYPE_CHECKING:
    from rlhf.stages import Stage

# The sharded strategies' families. Which stage each refuses, and why, lives with the stage
# (`Stage.refused_strategies`).
SHARDED = ("fsdp", "deepspeed")
# The one trainer.strategy name of the fsdp family that runs: PyTorch's FSDP2 (rlhf.sharding).
FSDP2 = "fsdp"
INSTEAD = "hardware=gpu, or hardware=ddp trainer.accelerator=gpu for several GPUs"
# For the stages that generate inside their training step: replicas small enough to fit, since LoRA
# leaves one frozen base (also the reference) and small adapters per GPU.
INSTEAD_OF_SHARDING_RL = (
    "hardware=ddp trainer.accelerator=gpu model.lora.enabled=true (LoRA keeps one frozen base, which is "
    "also the reference, and small adapters on each GPU; docs/memory.md says what fits)"
)


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
        instead = stage.refused_instead or INSTEAD
        raise ConfigError(
            f"stage={stage.name} with trainer.strategy={strategy}: {refused[family]}; use {instead}"
        )
    if family == "fsdp" and str(strategy).lower() != FSDP2:
        raise ConfigError(
            f"trainer.strategy={strategy}: FSDP runs as trainer.strategy=fsdp (FSDP2, every block "
            "sharded over all devices); Lightning's other FSDP variants are not supported"
        )
    if family == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.strategy={strategy}: DeepSpeed is not installed; `pip install deepspeed`, or use hardware=gpu"
        )
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


def _local_devices(trainer: dict[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if str(devices).lstrip("-").isdigit() and int(devices) > 0:
        return int(devices)
    if _on_gpu(trainer):  # auto or -1: every visible GPU
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def device_count(trainer: dict[str, Any]) -> int:
    """The devices a run spans: trainer.devices on each of trainer.num_nodes machines."""
    return _local_devices(trainer) * int(trainer.get("num_nodes", 1) or 1)


def _on_gpu(trainer: dict[str, Any]) -> bool:
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def device_memory(trainer: dict[str, Any], meminfo: str = "/proc/meminfo") -> Devices:
    """The devices a run spans and the bytes one of its processes may use: the GPU's free memory, or
    on the CPU the memory available to new processes shared by the processes this machine runs."""
    count = device_count(trainer)
    if _on_gpu(trainer):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return Devices(count, "gpu", float(free), f"GPU {torch.cuda.get_device_name()} (free memory)")
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines() if ":" in line)
        available = float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # no /proc: the free pages
        available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    processes = _local_devices(trainer)
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return Devices(count, "cpu", available / processes, f"this machine (available memory{shared})")


def check_memory(run) -> None:
    """Log the memory estimate per device (rlhf.memory) and refuse, in one line naming what would make
    it fit, a run that would not fit; read from the model's config alone, before any weights load."""
    import logging

    from rlhf.memory import ModelShape, estimate_run, refusal, setting_of
    from rlhf.models import load_config
    from rlhf.tracking import is_rank_zero

    log = logging.getLogger(__name__)
    devices = device_memory(run.trainer)
    config = load_config(run.model)
    try:
        shape = ModelShape.from_config(config)
    except (TypeError, ValueError) as err:  # not a decoder with the usual config fields
        log.warning(
            "No memory estimate for %s (%s); memory_check=false silences this", type(config).__name__, err
        )
        return
    if is_rank_zero():
        setting = setting_of(run, devices.count, devices.accelerator)
        log.info(
            "Memory per device, estimated from the model's config (stage=%s, %s, %s, %d device(s)%s%s):",
            run.stage.name,
            setting.precision,
            setting.strategy or "one process per device",
            devices.count,
            ", LoRA" if setting.lora_rank else "",
            ", activation checkpointing" if setting.checkpointing else "",
        )
        for line in estimate_run(run, shape, devices).lines(devices.available, devices.described):
            log.info("  %s", line)
    problem = refusal(run, shape, devices)
    if problem is not None:
        raise ConfigError(problem)
