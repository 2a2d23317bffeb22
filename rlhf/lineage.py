"""Where a run starts from: models of earlier runs (init_from and friends) and checkpoints to resume.

A model source is `base` (the model group's pretrained weights), a local directory,
`runs:/<run_id>/<artifact path>`, `latest` (the newest finished run of the needed stage in the
same MLflow experiment), `latest:<stage>`, `latest:pipeline` (the needed stage's newest finished run
inside the newest pipeline, `-m stage=sft,rm,...`, that has one) or `name:<run name>` (the newest
finished run of that name). What was resolved is logged, and recorded as tags, so the UI shows
SFT -> RM -> PPO.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlhf.errors import LineageError
from rlhf.ranks import share
from rlhf.tracking import TAG_PREFIX, Tracker

log = logging.getLogger(__name__)

PIPELINE = "pipeline"  # latest:pipeline
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ModelSource:
    spec: str
    location: str | None  # a local directory; None means the model group's base weights
    run_id: str | None = None

    def tags(self, key: str) -> dict[str, str | None]:
        return {tag_name(key): self.spec, f"{tag_name(key)}.run_id": self.run_id}


def tag_name(key: str) -> str:
    """The run tag recording the config key's source: stage.init_from -> rlhf.init_from,
    stage.policies.0 -> rlhf.policies.0."""
    return TAG_PREFIX + key.removeprefix("stage.")


def _local_artifact_dir(client, uri: str, run_id: str, artifact_path: str) -> str:
    """The run's artifact directory without copying it when the store is local, else a download."""
    run = client.get_run(run_id)
    root = run.info.artifact_uri
    parsed = urlparse(root)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path)) / artifact_path
        if not path.is_dir():
            raise LineageError(
                f"run {run_id} has no {artifact_path!r} artifact (was tracking.log_model off?)"
            )
        return str(path)
    from mlflow.artifacts import download_artifacts

    return download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=uri)


def newest_finished(client, experiment_id: str, condition: str):
    """The newest FINISHED run of the experiment that meets a search `condition`, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"{condition} and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def latest_finished_run(client, experiment_id: str, stage: str):
    return newest_finished(client, experiment_id, f"tags.`{TAG_PREFIX}stage` = '{stage}'")


def latest_pipeline_run(client, experiment_id: str, stage: str):
    """The newest finished `stage` run inside the newest pipeline parent run that has one, so that
    a later sweep's or single run's models are never picked up in place of the pipeline's."""
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}multirun` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    for parent in parents:
        condition = (
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{TAG_PREFIX}stage` = '{stage}'"
        )
        run = newest_finished(client, experiment_id, condition)
        if run is not None:
            return run
    return None


def named_run(client, experiment_id: str, name: str):
    """The newest finished run called `name`."""
    return newest_finished(client, experiment_id, f"attributes.run_name = '{name}'")


def describe_run(run) -> str:
    """A found run as a user recognises it: name, id, when it started, its stage's key metric."""
    from rlhf.stages import stages

    stage = run.data.tags.get(f"{TAG_PREFIX}stage", "")
    started = datetime.fromtimestamp((run.info.start_time or 0) / 1000).strftime("%Y-%m-%d %H:%M:%S")
    text = f"{stage} run {run.info.run_name!r} ({run.info.run_id}), started {started}"
    known = stages()
    metric = known[stage].objective[0] if stage in known else None
    if metric in run.data.metrics:
        text += f", {metric} = {run.data.metrics[metric]:.4g}"
    return text


def resolve_source(
    spec: str, key: str, needed_stage: str | None, tracker: Tracker, accepts: tuple[str, ...] = ()
) -> ModelSource:
    """Turn a configured source (key names it, e.g. stage.init_from) into a local directory, which
    must hold a model of one of the `accepts` kinds (rlhf.models.MODEL_KINDS; empty: any). Rank 0
    resolves it (only it records runs, and `latest` must name one run for all) and every rank gets its answer."""

    def resolved() -> ModelSource:
        source = _resolve(spec, key, needed_stage, tracker)
        if source.location is not None and accepts:
            check_kind(source, key, accepts)
        return source

    source = share(resolved)
    tracker.set_tags(source.tags(key))
    return source


def check_kind(source: ModelSource, key: str, accepts: tuple[str, ...]) -> None:
    """Refuse a model of the wrong kind: a language model as a reward model would get a fresh random
    head and train the policy against noise; a reward model as a policy would lose its head."""
    from rlhf.models import MODEL_KINDS, model_kind

    kind, architecture = model_kind(source.location)
    if kind is None or kind in accepts:
        return
    needed = " or ".join(MODEL_KINDS[k] for k in accepts)
    where = source.spec if source.spec == source.location else f"{source.spec} ({source.location})"
    raise LineageError(f"{key}={where} holds {MODEL_KINDS[kind]} ({architecture}); {key} needs {needed}")


def _resolve(spec: str, key: str, needed_stage: str | None, tracker: Tracker) -> ModelSource:
    if spec == "base":
        return ModelSource(spec, None)
    found = spec == "latest" or spec.startswith(("latest:", "name:"))
    if (found or spec.startswith("runs:/")) and not tracker.active:
        raise LineageError(f"{key}={spec} needs MLflow tracking (tracking=mlflow) to find earlier runs")
    if found:
        run = _find_run(spec, key, needed_stage, tracker)
        log.info("%s=%s: %s", key, spec, describe_run(run))
        return ModelSource(
            spec, _local_artifact_dir(tracker.client, tracker.uri, run.info.run_id, "model"), run.info.run_id
        )
    if spec.startswith("runs:/"):
        run_id, _, artifact_path = spec[len("runs:/") :].partition("/")
        from mlflow.exceptions import MlflowException

        try:
            location = _local_artifact_dir(tracker.client, tracker.uri, run_id, artifact_path or "model")
        except MlflowException as err:
            raise LineageError(f"{key}={spec}: {' '.join(str(err).split())}") from None
        return ModelSource(spec, location, run_id)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise LineageError(
            f"{key}={spec}: not a Hugging Face model directory (no config.json); "
            "use base, latest, latest:<stage>, latest:pipeline, name:<run name>, a directory or runs:/<run_id>/model"
        )
    return ModelSource(spec, str(path.resolve()))


def _find_run(spec: str, key: str, needed_stage: str | None, tracker: Tracker):
    """The finished run a `latest`, `latest:<stage>`, `latest:pipeline` or `name:<run name>` spec means."""
    where = f"MLflow experiment {tracker.experiment_id} ({tracker.uri})"
    if spec.startswith("name:"):
        name = spec[len("name:") :]
        if not name or "'" in name:
            raise LineageError(
                f"{key}={spec}: give a run name without quotes, as the MLflow runs list shows it"
            )
        run = named_run(tracker.client, tracker.experiment_id, name)
        if run is None:
            raise LineageError(f"{key}={spec}: no finished run named {name!r} in {where}")
        stage = run.data.tags.get(f"{TAG_PREFIX}stage")
        if needed_stage is not None and stage != needed_stage:
            raise LineageError(f"{key}={spec}: that run is a {stage} run; {key} needs a {needed_stage} run")
        return run
    qualifier = spec.partition(":")[2]
    if qualifier and qualifier != PIPELINE:  # latest:<stage>: the newest finished run of that stage
        needed_stage = qualifier
    if needed_stage is None:
        raise LineageError(f"{key}={spec}: this stage has no earlier stage to start from; use base or a path")
    if qualifier == PIPELINE:
        run = latest_pipeline_run(tracker.client, tracker.experiment_id, needed_stage)
        if run is None:
            raise LineageError(
                f"{key}={spec}: no pipeline with a finished {needed_stage} run in {where}; run one first, "
                f"e.g. `python -m rlhf -m stage=sft,rm` (same tracking.experiment), or use {key}=latest"
            )
        return run
    run = latest_finished_run(tracker.client, tracker.experiment_id, needed_stage)
    if run is None:
        raise LineageError(
            f"{key}={spec}: no finished {needed_stage} run in {where}; run `python -m rlhf stage={needed_stage}` "
            f"first (same tracking.experiment) or set {key}=base"
        )
    return run


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: str
    run_id: str | None
    output_dir: str


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_checkpoint(path: Path) -> bool:
    """A file torch.save wrote (a zip archive), or a sharded run's directory: each rank's shards and
    the rest of the state in meta.pt (Lightning's ModelParallelStrategy)."""
    if path.is_dir():
        return zipfile.is_zipfile(path / "meta.pt")
    return zipfile.is_zipfile(path)


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    found = sorted(checkpoint_dir(output_dir).glob("step-*.ckpt"))
    return found[-1] if found else None


def find_resume_point(resume: object, stage: str, client, experiment_id: str | None) -> ResumePoint:
    """resume=true: the newest unfinished run of this stage with a checkpoint; or a run id; or a path."""
    if resume is True or str(resume).lower() == "true":
        if client is None:
            raise LineageError("resume=true needs MLflow tracking to find the interrupted run")
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_PREFIX}stage` = '{stage}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        for run in runs:
            output_dir = run.data.tags.get(f"{TAG_PREFIX}output_dir")
            if output_dir and (ckpt := newest_checkpoint(output_dir)):
                return ResumePoint(str(ckpt), run.info.run_id, output_dir)
        raise LineageError(
            f"resume=true: no unfinished {stage} run with a checkpoint in MLflow experiment {experiment_id}; "
            "start one without resume"
        )
    text = str(resume)
    if RUN_ID_PATTERN.match(text):
        if client is None:
            raise LineageError(f"resume={text} needs MLflow tracking")
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(text)
        except MlflowException:
            raise LineageError(
                f"resume={text}: no run with this id in the MLflow store ({client.tracking_uri}); "
                "give one of its run ids, a checkpoint file, or `true`"
            ) from None
        output_dir = run.data.tags.get(f"{TAG_PREFIX}output_dir", "")
        ckpt = newest_checkpoint(output_dir) if output_dir else None
        if ckpt is None:
            raise LineageError(f"resume={text}: run has no checkpoint under {checkpoint_dir(output_dir)}")
        return ResumePoint(str(ckpt), text, output_dir)
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise LineageError(f"resume={text}: no such checkpoint file, run id, or `true`")
    if not is_checkpoint(path):  # anything else fails deep in torch.load
        raise LineageError(
            f"resume={text}: not a checkpoint (a .ckpt file, or the .ckpt directory of a sharded "
            "run, that a run wrote under its checkpoints/)"
        )
    output_dir = path.parent.parent
    run_id = None
    if client is not None:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_PREFIX}output_dir` = '{output_dir}'", max_results=1
        )
        run_id = runs[0].info.run_id if runs else None
    return ResumePoint(str(path), run_id, str(output_dir))
