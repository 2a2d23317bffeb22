"""Hyperparameter sweeps in MLflow: one parent run per Hydra multirun, the jobs as its children.

A Hydra callback (registered in rlhf/conf/config.yaml) opens the parent run when a multirun starts
and records the sweep's definition; every job's run carries `mlflow.parentRunId`, so the MLflow UI
nests the jobs under it and the compare view lines them up by their swept params. When the sweep
ends, the parent gets the best value of the optimised metric, the best run and its swept params.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


# The metric each stage returns to a sweeper by default, and which way is better.
OBJECTIVES = {
    "sft": ("val/loss", "minimize"),
    "rm": ("val/accuracy", "maximize"),
    "ppo": ("val/score_raw", "maximize"),
    "dpo": ("val/rewards/accuracies", "maximize"),
    "eval": ("eval/win_rate_rm", "maximize"),
}


def objective(stage: str, optimized_metric: str | None, direction: str | None = None) -> tuple[str, str]:
    """(metric, direction) of a sweep: the configured metric or the stage's default."""
    default_metric, default_direction = OBJECTIVES.get(stage, ("val/loss", "minimize"))
    metric = optimized_metric or default_metric
    if direction is None:
        direction = default_direction if metric == default_metric else ("minimize" if "loss" in metric else "maximize")
    return metric, direction


def _swept_keys(overrides: list[str], sweeper_params: dict) -> list[str]:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "," in o.split("=", 1)[-1] or "(" in o]
    return sorted(set(keys) | set(sweeper_params))


def _last_swept_stage(overrides: list[str]) -> str | None:
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "stage" and "," in value:
            return value.split(",")[-1].strip()
    return None


class SweepTracking(Callback):
    """Opens and closes the MLflow parent run of a multirun."""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.client: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rlhf.tracking import (
            SWEEP_PARENT_ENV,
            TAG_PREFIX,
            connect,
            experiment_id,
            git_commit,
            tracking_uri,
        )

        if not config.tracking.enabled:
            return
        hydra = config.hydra
        uri = tracking_uri(config.tracking.uri, hydra.runtime.cwd)
        self.client = connect(uri)
        exp_id = experiment_id(self.client, config.tracking.experiment, uri)
        overrides = list(hydra.overrides.task)
        params = hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        name = hydra.runtime.choices.get("sweep") or "sweep"
        created = self.client.create_run(exp_id, run_name=f"{name}: {' '.join(overrides)}"[:250])
        self.parent = created.info.run_id
        sweeper = str(hydra.sweeper.get("_target_", "")).rsplit(".", 1)[-1]
        launcher = str(hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        self.swept = _swept_keys(overrides, params)
        # A pipeline (stage=sft,rm,ppo) is judged by its last stage: metrics of different stages do not compare.
        self.judged_stage = _last_swept_stage(overrides) or str(config.stage.name)
        metric, direction = objective(self.judged_stage, config.get("optimized_metric"), hydra.sweeper.get("direction"))
        self.metric, self.direction = metric, direction
        from mlflow.entities import Param, RunTag

        self.client.log_batch(
            self.parent,
            params=[
                Param("sweep.name", name),
                Param("sweep.sweeper", sweeper),
                Param("sweep.launcher", launcher),
                Param("sweep.optimized_metric", metric),
                Param("sweep.direction", direction),
                Param("sweep.swept", ", ".join(self.swept)[:6000]),
            ],
            tags=[
                RunTag(f"{TAG_PREFIX}sweep", "parent"),
                RunTag(f"{TAG_PREFIX}sweep_dir", str(hydra.sweep.dir)),
                RunTag(f"{TAG_PREFIX}overrides", " ".join(overrides)),
                RunTag("mlflow.source.git.commit", git_commit() or ""),
            ],
        )
        definition = {"overrides": overrides, "sweeper": OmegaConf.to_container(hydra.sweeper, resolve=False)}
        self.client.log_text(self.parent, yaml.safe_dump(definition, sort_keys=False), "sweep/definition.yaml")
        os.environ[SWEEP_PARENT_ENV] = self.parent
        # A job that fails stops Hydra's sweep before on_multirun_end: the parent must not stay RUNNING.
        atexit.register(self._close, "FAILED")
        log.info("Sweep parent run %s", self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        from rlhf.tracking import SWEEP_PARENT_ENV

        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(SWEEP_PARENT_ENV, None)
        try:
            self._summarise(parent)
        finally:
            import mlflow

            mlflow.flush_async_logging()
            self.client.set_terminated(parent, status)

    def _summarise(self, parent: str) -> None:
        from mlflow.entities import Metric, Param, RunTag

        from rlhf.tracking import TAG_PREFIX

        run = self.client.get_run(parent)
        children = self.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10000
        )
        finished = [c for c in children if c.info.status == "FINISHED"]
        metrics = [Metric("sweep/jobs", len(children), 0, 0), Metric("sweep/jobs_finished", len(finished), 0, 0)]
        scored = [
            (c.data.metrics[self.metric], c)
            for c in finished
            if self.metric in c.data.metrics
            and not math.isnan(c.data.metrics[self.metric])
            and c.data.tags.get(f"{TAG_PREFIX}stage") == self.judged_stage
        ]
        params, tags = [], []
        if scored:
            pick = max if self.direction == "maximize" else min
            best_value, best = pick(scored, key=lambda item: item[0])
            metrics.append(Metric(f"best/{self.metric}", best_value, 0, 0))
            tags.append(RunTag("rlhf.best_run_id", best.info.run_id))
            params = [Param(f"best.{k}", best.data.params[k]) for k in self.swept if k in best.data.params]
            log.info("Best %s = %.4g (run %s)", self.metric, best_value, best.info.run_id)
        self.client.log_batch(parent, metrics=metrics, params=params, tags=tags)
