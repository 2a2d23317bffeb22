"""The stages a run can be: a closed set, looked up by `stage.name`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from rlhf.config import RunConfig
    from rlhf.tracking import Tracker


@dataclass
class StageJob:
    """What a stage hands the runner: the Lightning parts, and what to do once training ends."""

    # None for a stage that trains nothing (eval): the runner only calls finish.
    module: pl.LightningModule | None
    datamodule: pl.LightningDataModule | None
    # Called after fit on every process (trainer None without training): saves the model (rank 0)
    # and returns final metrics.
    finish: Callable[[pl.Trainer | None, Path], dict[str, float]]
    callbacks: list[pl.Callback] = field(default_factory=list)


Builder = Callable[["RunConfig", "Tracker"], StageJob]


def _sft(run: RunConfig, tracker: Tracker) -> StageJob:
    from rlhf.stages import sft

    return sft.build(run, tracker)


def _rm(run: RunConfig, tracker: Tracker) -> StageJob:
    from rlhf.stages import rm

    return rm.build(run, tracker)


def _ppo(run: RunConfig, tracker: Tracker) -> StageJob:
    from rlhf.stages import ppo

    return ppo.build(run, tracker)


def _dpo(run: RunConfig, tracker: Tracker) -> StageJob:
    from rlhf.stages.dpo import module

    return module.build(run, tracker)


def _eval(run: RunConfig, tracker: Tracker) -> StageJob:
    from rlhf.stages import eval as evaluation

    return evaluation.build(run, tracker)


STAGES: dict[str, Builder] = {"sft": _sft, "rm": _rm, "ppo": _ppo, "dpo": _dpo, "eval": _eval}


def get_stage(name: str) -> Builder:
    from rlhf.errors import ConfigError

    if name not in STAGES:
        raise ConfigError(f"stage.name: unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]
