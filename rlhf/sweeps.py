"""Hyperparameter sweeps in MLflow: one parent run per Hydra multirun, the jobs as its children.

A Hydra callback (registered in conf/config.yaml) opens the parent run when a multirun starts
and records the sweep's definition; every job's run carries `mlflow.parentRunId`, so the MLflow UI
nests the jobs under it and the compare view lines them up by their swept params. When the sweep
ends, the parent gets the best value of the optimised metric, the best run and its swept params.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from rlhf.plots import KLCurve

log = logging.getLogger(__name__)


def objective(stage: str, optimized_metric: str | None, direction: str | None = None) -> tuple[str, str]:
    """(metric, direction) of a sweep: the configured metric or the stage's default."""
    from rlhf.stages import stages

    known = stages()
    default_metric, default_direction = known[stage].objective if stage in known else ("val/loss", "minimize")
    metric = optimized_metric or default_metric
    if direction is None:
        direction = (
            default_direction
            if metric == default_metric
            else ("minimize" if "loss" in metric else "maximize")
        )
    return metric, direction


def _swept(overrides: list[str], sweeper_params: dict) -> dict[str, str]:
    """Swept key -> its values as written: the command line's lists and searches, then the sweeper's."""
    swept = {}
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value or "(" in value:
            swept[key.lstrip("+~")] = value
    swept.update({key: str(value) for key, value in sweeper_params.items()})
    return swept


def _swept_keys(overrides: list[str], sweeper_params: dict) -> list[str]:
    return sorted(_swept(overrides, sweeper_params))


# The MLflow runs list cuts names off after about 30 characters: a parent's name leads with what varies.
NAME_WIDTH = 30


def _short(key: str, value: str, compact: bool) -> str:
    name = key.rsplit(".", 1)[-1]
    if not compact:
        return f"{name}={value}"
    if "(" not in value:
        return f"{name}×{len(value.split(','))}"
    bounds = re.search(r"(?:interval|range)\(\s*([^,\s]+)\s*,\s*([^,)\s]+)", value)
    return f"{name}∈[{bounds.group(1)},{bounds.group(2)}]" if bounds else f"{name}=…"


def parent_name(
    overrides: list[str], sweeper_params: dict, sweep: str | None, stage: str
) -> tuple[str, str | None]:
    """(name of a multirun's parent run, its pipeline `sft>rm>ppo` or None). A multirun over stages
    only is a pipeline, named by its stages in order; any other leads with the swept keys and values
    (counted, when listing them would not fit), then the named sweep, the pipeline or the stage."""
    swept = _swept(overrides, sweeper_params)
    stages = swept.pop("stage", None)
    pipeline = ">".join(part.strip() for part in stages.split(",")) if stages and "(" not in stages else None
    what = f"pipeline {pipeline}" if pipeline else (sweep or stage)
    if not swept:
        return what, pipeline
    for compact in (False, True):
        name = f"{' '.join(_short(k, v, compact) for k, v in swept.items())} · {what}"
        if len(name) <= NAME_WIDTH:
            break
    return name, pipeline


def _last_swept_stage(overrides: list[str]) -> str | None:
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "stage" and "," in value:
            return value.split(",")[-1].strip()
    return None


# The metrics of an RL or DPO run's validations that place it on the reward-against-sqrt(KL) plot.
CURVE_METRICS = ("val/sqrt_kl", "val/kl", "val/score_raw", "val/gold")


def validation_curve(histories: dict[str, list]) -> KLCurve:
    """An RL run's validations as (KL, reward-model score, gold score) points, from the MLflow
    histories of val/sqrt_kl, val/score_raw and val/gold (gold absent: NaN). A validation's values
    share one timestamp; its step alone does not tell a validation before training from the one
    after the first iteration (Lightning logs both at step 0)."""
    from rlhf import plots

    by_time = {key: {(m.step, m.timestamp): m.value for m in histories.get(key, [])} for key in CURVE_METRICS}
    # DPO samples once, at the end, and logs only the KL itself (and no reward model's score).
    kls = {when: root**2 for when, root in by_time["val/sqrt_kl"].items()} or by_time["val/kl"]
    curve = plots.KLCurve()
    for when, kl in sorted(kls.items()):
        curve.add(kl, by_time["val/score_raw"].get(when, math.nan), by_time["val/gold"].get(when, math.nan))
    return curve


def results(children: list, swept: list[str], metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per child run: its name, status, varied values, the objective, its stage's own objective
    and key metrics; scored rows best first, then the rest (failed, rejected, other stages) in launch order."""
    from rlhf.stages import stages
    from rlhf.tracking import TAG_PREFIX

    known = stages()
    rows = []
    for child in sorted(children, key=lambda c: c.info.start_time or 0):
        tags, params, values = child.data.tags, child.data.params, child.data.metrics
        stage = tags.get(f"{TAG_PREFIX}stage", "")
        row: dict[str, Any] = {
            "run": child.info.run_name,
            "run_id": child.info.run_id,
            "status": child.info.status,
        }
        # The stage is a tag (a pipeline varies it); other swept keys are params, or groups' names.
        row.update(
            {key: stage if key == "stage" else params.get(key, params.get(f"{key}.name")) for key in swept}
        )
        # A pipeline's stages are judged by one objective: each row also shows its own stage's.
        own = (known[stage].objective[0], *known[stage].key_metrics) if stage in known else ()
        for key in dict.fromkeys((metric, *own)):
            value = values.get(key)
            row[key] = None if value is None or math.isnan(value) else value
        if tags.get(f"{TAG_PREFIX}error"):
            row["error"] = tags[f"{TAG_PREFIX}error"]
        rows.append(row)
    scored = [r for r in rows if r[metric] is not None]
    scored.sort(key=lambda r: r[metric], reverse=direction == "maximize")
    return scored + [r for r in rows if r not in scored]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def results_markdown(title: str, rows: list[dict[str, Any]], metric: str, direction: str) -> str:
    """The results table as Markdown, for the parent run's description (the MLflow run page's Overview)."""
    from rlhf.report import Table, markdown_table

    columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("run_id", "error")))
    table = Table(title, columns, [[_cell(row.get(k)) for k in columns] for row in rows])
    best = "highest" if direction == "maximize" else "lowest"
    lines = [
        f"### {title}",
        "",
        f"Sorted by `{metric}`, {best} first; {len(rows)} runs.",
        "",
        markdown_table(table),
    ]
    lines += [f"- {row['run']}: {row['error']}" for row in rows if row.get("error")]
    return "\n".join(lines)


def _failure(children: list) -> str:
    """Why a multirun stopped: the first failed job's error, which its run holds."""
    from rlhf.tracking import TAG_PREFIX

    for child in sorted(children, key=lambda c: c.info.start_time or 0):
        if child.info.status in ("FAILED", "KILLED"):
            error = child.data.tags.get(f"{TAG_PREFIX}error", child.info.status.lower())
            return f"job {child.data.tags.get(f'{TAG_PREFIX}job_num', '?')} ({child.info.run_name}): {error}"
    return "the sweep stopped before its jobs recorded a run (see the terminal's output)"


class SweepTracking(Callback):
    """Opens and closes the MLflow parent run of a multirun."""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.client: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rlhf.ranks import is_rank_zero
        from rlhf.tracking import (
            SWEEP_PARENT_ENV,
            SWEPT_ENV,
            TAG_PREFIX,
            git_commit,
            open_store,
        )

        # The other ranks of a data-parallel pipeline run the same multirun (Lightning restarts the
        # command line for them, torchrun and srun start it on each): one parent run, rank 0's.
        if not config.tracking.enabled or not is_rank_zero():
            return
        hydra = config.hydra
        self.client, _, exp_id = open_store(
            config.tracking.uri, hydra.runtime.cwd, config.tracking.experiment
        )
        overrides = list(hydra.overrides.task)
        params = hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        run_name, pipeline = parent_name(
            overrides, params, hydra.runtime.choices.get("sweep"), str(config.stage.name)
        )
        self.swept = _swept_keys(overrides, params)
        is_pipeline = bool(pipeline) and len(self.swept) == 1
        # A named sweep by its name; a pipeline, or a grid typed on the command line, by what it is.
        name = hydra.runtime.choices.get("sweep") or ("pipeline" if is_pipeline else "command line")
        created = self.client.create_run(exp_id, run_name=run_name[:250])
        self.parent, self.name = created.info.run_id, run_name
        sweeper = str(hydra.sweeper.get("_target_", "")).rsplit(".", 1)[-1]
        launcher = str(hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        # A pipeline (stage=sft,rm,ppo) is judged by its last stage: metrics of different stages do not compare.
        self.judged_stage = _last_swept_stage(overrides) or str(config.stage.name)
        metric, direction = objective(
            self.judged_stage, config.get("optimized_metric"), hydra.sweeper.get("direction")
        )
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
                # A pipeline runs different stages in order; a sweep varies one stage's settings.
                RunTag(f"{TAG_PREFIX}multirun", "pipeline" if is_pipeline else "sweep"),
                *([RunTag(f"{TAG_PREFIX}pipeline", pipeline)] if pipeline else []),
                RunTag(f"{TAG_PREFIX}sweep_dir", str(hydra.sweep.dir)),
                RunTag(f"{TAG_PREFIX}overrides", " ".join(overrides)),
                RunTag("mlflow.source.git.commit", git_commit() or ""),
            ],
        )
        definition = {"overrides": overrides, "sweeper": OmegaConf.to_container(hydra.sweeper, resolve=False)}
        self.client.log_text(
            self.parent, yaml.safe_dump(definition, sort_keys=False), "sweep/definition.yaml"
        )
        os.environ[SWEEP_PARENT_ENV] = self.parent
        os.environ[SWEPT_ENV] = ",".join(self.swept)
        # A job that fails stops Hydra's sweep before on_multirun_end: the parent must not stay RUNNING.
        atexit.register(self._close, "FAILED")
        log.info("Sweep parent run %s", self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        from rlhf.tracking import SWEEP_PARENT_ENV, SWEPT_ENV

        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(SWEEP_PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        try:
            self._summarise(parent, failed=status != "FINISHED")
        finally:
            import mlflow

            mlflow.flush_async_logging()
            self.client.set_terminated(parent, status)

    def _summarise(self, parent: str, failed: bool = False) -> None:
        from mlflow.entities import Metric, Param, RunTag

        from rlhf.tracking import TAG_PREFIX

        run = self.client.get_run(parent)
        children = self.client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
            max_results=10000,
        )
        finished = [c for c in children if c.info.status == "FINISHED"]
        metrics = [
            Metric("sweep/jobs", len(children), 0, 0),
            Metric("sweep/jobs_finished", len(finished), 0, 0),
        ]
        scored = [
            (c.data.metrics[self.metric], c)
            for c in finished
            if self.metric in c.data.metrics
            and not math.isnan(c.data.metrics[self.metric])
            and c.data.tags.get(f"{TAG_PREFIX}stage") == self.judged_stage
        ]
        params, tags = [], []
        if failed:
            tags.append(RunTag(f"{TAG_PREFIX}error", _failure(children)))
        if scored:
            pick = max if self.direction == "maximize" else min
            best_value, best = pick(scored, key=lambda item: item[0])
            metrics.append(Metric(f"best/{self.metric}", best_value, 0, 0))
            # An evaluation's value is that of the best policy it compared: that policy's run is the best.
            best_id = best.data.tags.get(f"{TAG_PREFIX}eval.best_run_id", best.info.run_id)
            tags.append(RunTag("rlhf.best_run_id", best_id))
            params = [Param(f"best.{k}", best.data.params[k]) for k in self.swept if k in best.data.params]
            log.info("Best %s = %.4g (run %s)", self.metric, best_value, best_id)
        if children:
            rows = results(children, self.swept, self.metric, self.direction)
            title = f"Results of {self.name}"
            tags.append(
                RunTag("mlflow.note.content", results_markdown(title, rows, self.metric, self.direction))
            )
            document = {"metric": self.metric, "direction": self.direction, "swept": self.swept, "runs": rows}
            self.client.log_text(
                parent, json.dumps(document, indent=1, allow_nan=False, default=str), "sweep/results.json"
            )
        self.client.log_batch(parent, metrics=metrics, params=params, tags=tags)
        self._plot_kl_curves(parent, finished)

    def _plot_kl_curves(self, parent: str, children: list) -> None:
        """One plot of every RL child's validation curve (reward-model and gold score against
        sqrt(KL)): across a sweep of KL coefficients, the over-optimisation curve of Gao et al."""
        from rlhf import plots

        curves = {}
        for child in sorted(children, key=lambda c: c.info.start_time or 0):
            if "val/sqrt_kl" not in child.data.metrics and "val/kl" not in child.data.metrics:
                continue
            curve = validation_curve(
                {key: self.client.get_metric_history(child.info.run_id, key) for key in CURVE_METRICS}
            )
            params = child.data.params
            label = " ".join(
                f"{k.rsplit('.', 1)[-1]}={params.get(k, params.get(f'{k}.name', '?'))}" for k in self.swept
            )
            if not label or label in curves:
                label = f"{label} {child.info.run_name}".strip()
            curves[label] = curve
        if curves:
            figure = plots.reward_vs_sqrt_kl(curves, f"Validation curves of {self.name}")
            self.client.log_figure(parent, figure, "plots/reward_vs_sqrt_kl.png")
            plots.close(figure)
