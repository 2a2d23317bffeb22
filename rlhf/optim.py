"""Optimiser and learning-rate schedule shared by the stages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from pytorch_lightning.core.optimizer import do_nothing_closure

from rlhf.config import StageConfig


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float
) -> list[dict]:
    """Trainable parameters split so that biases and norm weights (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


# Precisions whose gradients a GradScaler scales (fp16 mixed): Lightning cannot clip a fused
# optimizer's gradients there, since the fused step unscales them itself.
SCALED_PRECISIONS = ("16-mixed", "16")


def adamw(groups: list[dict], stage: StageConfig, precision: str | int) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)`; the fused kernel (CPU and GPU) is about 4x faster than foreach
    on the CPU, which matters when the optimizer step is a quarter of a small model's step, and it
    needs no temporary copies of the parameters' size (foreach's peak memory adds one or two).

    Fused everywhere but under fp16 mixed precision (`precision` is the trainer's). Lightning refuses
    to clip a fused optimizer under any mixed precision, because a fused step can unscale a
    GradScaler's gradients; bf16 mixed precision has no scaler, so the optimizer says it does no
    unscaling and clipping works as in fp32.
    """
    fused = str(precision) not in SCALED_PRECISIONS
    optimizer = torch.optim.AdamW(
        groups, lr=stage.lr, betas=tuple(stage.adam_betas), eps=stage.adam_eps, fused=fused
    )
    if fused and str(precision).startswith("bf16"):
        optimizer._step_supports_amp_scaling = False
    optimizer.register_step_post_hook(release_gradients)
    return optimizer


def release_gradients(optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
    """Drop the gradients as soon as a step has used them. Lightning clears them only before the next
    backward pass, so they would stay alive through the next forward pass and add 4 bytes per trained
    parameter to the activations at the step's peak memory (PPO, which steps once per minibatch, has
    its policy's and critic's). Gradient accumulation is unaffected: nothing steps in between."""
    optimizer.zero_grad(set_to_none=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, total_steps: int) -> dict:
    """A Lightning lr_scheduler config stepping every optimizer step."""
    warmup = int(stage.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, stage.scheduler, stage.min_lr_ratio)
    )
    return {"scheduler": schedule, "interval": "step", "frequency": 1}


def configure(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], stage: StageConfig, trainer
) -> dict:
    """configure_optimizers' answer for a stage training `named_parameters`: AdamW (fused as the
    trainer's precision allows) and the stage's schedule over the run's optimizer steps."""
    optimizer = adamw(param_groups(named_parameters, stage.weight_decay, stage.lr), stage, trainer.precision)
    return {"optimizer": optimizer, "lr_scheduler": scheduler(optimizer, stage, total_steps(trainer))}


def total_steps(trainer) -> int:
    """Optimizer steps the run will take: max_steps when set (without loading the data early)."""
    return int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)


@contextmanager
def counted_once(optimizer):
    """Lightning counts a manual-optimisation step (global_step: trainer.max_steps, checkpoints,
    resume) at each LightningOptimizer.step(); an RL iteration takes a varying number of them. Inside
    the block the steps run uncounted, and the block counts as one step, however many it took."""
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = do_nothing_closure
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after
    before()
    after()
