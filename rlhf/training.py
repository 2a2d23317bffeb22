"""The Lightning Trainer of a run and the callbacks every stage shares."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from rlhf.config import RunConfig
from rlhf.data.loading import ResumeDataPosition
from rlhf.lineage import checkpoint_dir
from rlhf.tracking import Tracker


class Throughput(pl.Callback):
    """Logs how much work a second of training does (tokens/s, pairs/s, ...), over a sliding window.

    `count(batch)` returns the units of a batch, e.g. {"tokens": 812}; the first batch (warm-up)
    is left out.
    """

    def __init__(self, count: Callable[[Any], dict[str, float]], window: int = 20):
        self.count = count
        self.window: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)
        self._start = 0.0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == 1:
            return
        self.window.append((time.perf_counter() - self._start, self.count(batch)))
        seconds = sum(t for t, _ in self.window)
        totals: dict[str, float] = {}
        for _, counts in self.window:
            for unit, n in counts.items():
                totals[unit] = totals.get(unit, 0.0) + n
        for unit, n in totals.items():
            pl_module.log(f"perf/{unit}_per_s", n / seconds, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("perf/step_time_s", seconds / len(self.window), on_step=True, on_epoch=False, rank_zero_only=True)


class RandomState(pl.Callback):
    """Saves and restores the random generators with each checkpoint, so a resumed run draws the same
    dropout masks and samples as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


def build_trainer(run: RunConfig, tracker: Tracker, output_dir: str | Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    every = run.checkpoint.every_n_steps
    extra: list[pl.Callback] = [ResumeDataPosition(), RandomState()]
    if every > 0:
        # Numbered files, the older deleted after the newer is written: a kill mid-write never
        # destroys the only checkpoint.
        extra.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir(output_dir),
                filename="step-{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=every,
                save_top_k=1,
                monitor=None,
                save_last=False,
            )
        )
    return pl.Trainer(
        **run.trainer,
        logger=tracker.lightning_logger(),
        callbacks=[*callbacks, *extra],
        default_root_dir=str(output_dir),
        enable_checkpointing=every > 0,
        use_distributed_sampler=False,  # our sampler shards by rank itself, and can resume
    )
