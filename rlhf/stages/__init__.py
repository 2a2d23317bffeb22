"""The stages a run can be, one package each, and the one table that describes them.

A stage is a subpackage of rlhf.stages whose `__init__` defines its config schema and `STAGE`, its
descriptor, and whose `module` holds the training code, imported only when the stage runs. The entry
point, validation, sweeps, lineage and the benchmark all read the descriptors: adding a stage touches
its package, its YAML (conf/stage/<name>.yaml) and its tests.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from rlhf.config import RunConfig
    from rlhf.memory import Footprint
    from rlhf.tracking import Tracker


@dataclass(frozen=True)
class Stage:
    # stage.name, the option of the stage group.
    name: str
    # Its config dataclass, registered in Hydra's ConfigStore as schema/stage/<name>.
    schema: type
    # "rlhf.stages.ppo.module:build", imported only when the stage runs.
    builder: str
    # Config key -> the stage whose newest finished run `latest` finds, e.g. {"policy_from": "sft"}.
    sources: dict[str, str]
    # Config key -> the kinds of model (rlhf.models.MODEL_KINDS) a source given there may be, e.g.
    # {"reward_from": ("reward_model",)}: a model of another kind is refused, not silently adapted.
    accepts: dict[str, tuple[str, ...]]
    # Default metric a sweep optimises and its direction, e.g. ("val/loss", "minimize").
    objective: tuple[str, str]
    # "module:function" giving the rlhf.bench workload, None if not benchmarked.
    bench: str | None = None
    # Metrics a sweep parent's results table shows beside the objective (those a run lacks stay blank).
    key_metrics: tuple[str, ...] = ()
    # Whether its model is a policy that stage=eval compares with the SFT run it started from.
    evaluated: bool = False
    # Sharded strategy families (fsdp, deepspeed) this stage cannot run under, with the reason.
    refused_strategies: dict[str, str] = field(default_factory=dict)
    # Whether it trains with a Lightning Trainer (every rank of a data-parallel job takes part);
    # a stage that does not runs on rank 0 alone.
    trains: bool = True
    # What to run instead of a refused strategy (None: rlhf.hardware.INSTEAD, one GPU or DDP).
    refused_instead: str | None = None
    # The models it holds and the passes it runs per device, for the memory estimate (rlhf.memory).
    footprint: Callable[[RunConfig], Footprint] | None = None

    def build(self, run: RunConfig, tracker: Tracker) -> StageJob:
        return load(self.builder)(run, tracker)


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


def load(target: str) -> Callable:
    """The function a "package.module:function" string names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def stages() -> dict[str, Stage]:
    """Every stage, by name: the subpackages of rlhf.stages, each exposing STAGE."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.ispkg:
            stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
            found[stage.name] = stage
    return found


def get_stage(name: str) -> Stage:
    from rlhf.errors import ConfigError

    known = stages()
    if name not in known:
        raise ConfigError(f"stage.name: unknown stage {name!r}; choose one of {', '.join(known)}")
    return known[name]
