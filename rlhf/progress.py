"""Progress: a bar with a terminal, log lines at a steady interval without one.

Under nohup, SLURM or CI the bar's carriage-return updates never reach the log as lines, so a long
run looks silent until it ends. There, a line with the step, loss, rate and time left is logged every
RLHF_PROGRESS_EVERY seconds (30 by default). With a terminal, Lightning's bar counts to where training
really stops (trainer.max_steps ends most runs inside an epoch, where Lightning's bar counts to the
epoch's end) and leaves out the logger's version, which means nothing to a user.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import pytorch_lightning as pl

from rlhf.errors import ConfigError

log = logging.getLogger(__name__)

INTERVAL_ENV = "RLHF_PROGRESS_EVERY"
DEFAULT_INTERVAL_S = 30.0


def has_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


def interval_seconds() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{INTERVAL_ENV}: must be a number of seconds >= 0, got {raw!r}")
    return value


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(step: int, total: int | None, loss: float | None, rate: float | None) -> str:
    """ "step 12/24 (50%), loss 1.234, 2.10 steps/s, 6 s left" (parts without a value left out)."""
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if rate:
        parts.append(f"{rate:.3g} steps/s")
        if total:
            parts.append(f"{format_duration(max(total - step, 0) / rate)} left")
    return ", ".join(parts)


class ProgressLog(pl.Callback):
    """Logs a progress line every `interval` seconds of training, and one when training ends."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last_time = 0.0
        self._last_step = 0
        self._started = 0.0
        self._start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last_time = time.monotonic()
        self._start_step = self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last_time >= self.interval and trainer.is_global_zero:
            self._log(
                trainer, now, (trainer.global_step - self._last_step) / max(now - self._last_time, 1e-9)
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and trainer.global_step != self._last_step:
            self._log(trainer, now, (trainer.global_step - self._start_step) / max(now - self._started, 1e-9))

    def _log(self, trainer: pl.Trainer, now: float, rate: float) -> None:
        log.info(
            "%s",
            progress_line(trainer.global_step, _total_steps(trainer), _loss(trainer.callback_metrics), rate),
        )
        self._last_time, self._last_step = now, trainer.global_step


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # an iterable dataset without a length
        return None
    return int(total) if total != float("inf") else None


def _loss(metrics: dict[str, Any]) -> float | None:
    names = [k for k in metrics if k.startswith("train") and k.endswith("loss")]
    if not names:
        return None
    name = "train/loss" if "train/loss" in names else sorted(names)[0]
    return float(metrics[name])


def batches_this_epoch(
    epoch_batches: int | float, max_steps: int, global_step: int, accumulate: int
) -> int | float:
    """The training batches the current epoch will run: all of them, unless max_steps ends it first."""
    if max_steps is None or max_steps < 0:
        return epoch_batches
    return min(epoch_batches, max(max_steps - global_step, 0) * accumulate)


def _step_bar() -> type:
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
    from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class StepProgressBar(base):
        _epoch_start_step: int | None = None

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # The bar's total is read again when it is redrawn after a validation: count from here.
            self._epoch_start_step = trainer.global_step
            super().on_train_epoch_start(trainer, pl_module)

        @property
        def total_train_batches(self) -> int | float:
            trainer = self.trainer
            start = trainer.global_step if self._epoch_start_step is None else self._epoch_start_step
            return batches_this_epoch(
                trainer.num_training_batches, trainer.max_steps, start, trainer.accumulate_grad_batches
            )

        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return StepProgressBar


def progress_callbacks(trainer_args: dict[str, Any]) -> list[pl.Callback]:
    """With a terminal, the bar that counts to where training stops; without one, turn the bar off in
    `trainer_args` and return the logging callback."""
    if not trainer_args.get("enable_progress_bar", True):
        return []
    if has_terminal():
        return [_step_bar()()]
    trainer_args["enable_progress_bar"] = False
    return [ProgressLog(interval_seconds())]
