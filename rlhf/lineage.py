"""Where a run starts from: models of earlier runs (init_from and friends) and checkpoints to resume.

A model source is `base` (the model group's pretrained weights), a local directory,
`runs:/<run_id>/<artifact path>`, or `latest` (the newest finished run of the needed stage in the
same MLflow experiment). What was resolved is recorded as tags, so the UI shows SFT -> RM -> PPO.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlhf.errors import LineageError
from rlhf.ranks import share
from rlhf.tracking import TAG_PREFIX, Tracker

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


def latest_finished_run(client, experiment_id: str, stage: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}stage` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


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
    latest = spec == "latest" or spec.startswith("latest:")
    if (latest or spec.startswith("runs:/")) and not tracker.active:
        raise LineageError(f"{key}={spec} needs MLflow tracking (tracking=mlflow) to find earlier runs")
    if spec.startswith("latest:"):  # latest:<stage>: the newest finished run of that stage
        needed_stage = spec.split(":", 1)[1]
    if latest:
        if needed_stage is None:
            raise LineageError(
                f"{key}=latest: this stage has no earlier stage to start from; use base or a path"
            )
        run = latest_finished_run(tracker.client, tracker.experiment_id, needed_stage)
        if run is None:
            raise LineageError(
                f"{key}=latest: no finished {needed_stage} run in MLflow experiment "
                f"{tracker.experiment_id} ({tracker.uri}); run `python -m rlhf stage={needed_stage}` first "
                f"(same tracking.experiment) or set {key}=base"
            )
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
            "use base, latest, latest:<stage>, a directory or runs:/<run_id>/model"
        )
    return ModelSource(spec, str(path.resolve()))


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: str
    run_id: str | None
    output_dir: str


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


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
    if not path.is_file():
        raise LineageError(f"resume={text}: no such checkpoint file, run id, or `true`")
    if not zipfile.is_zipfile(
        path
    ):  # torch.save writes a zip archive; anything else fails deep in torch.load
        raise LineageError(
            f"resume={text}: not a checkpoint (a .ckpt file a run wrote under its checkpoints/)"
        )
    output_dir = path.parent.parent
    run_id = None
    if client is not None:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_PREFIX}output_dir` = '{output_dir}'", max_results=1
        )
        run_id = runs[0].info.run_id if runs else None
    return ResumePoint(str(path), run_id, str(output_dir))
