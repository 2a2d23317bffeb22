"""Every run is an MLflow run: params, tags, metrics, artifacts, model, and an honest final status.

Metrics go in batches through MLflow's asynchronous queue (a synchronous call costs ~18 ms on the
default sqlite store, more than a training step of a small model). Only the first process of a
data-parallel job records anything; the others receive its run id (rlhf.ranks) and stay silent.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import RunConfig, to_container
from rlhf.ranks import is_rank_zero, share

log = logging.getLogger(__name__)

SWEEP_PARENT_ENV = "RLHF_SWEEP_PARENT_RUN_ID"  # set by rlhf.sweeps for the jobs of a multirun
SWEPT_ENV = "RLHF_SWEPT_KEYS"  # set by rlhf.sweeps: the keys a multirun varies, comma-separated
TAG_PREFIX = "rlhf."
MAX_PARAM_LENGTH = 6000
# Config keys that are where a run lives, not how it was set up: tags, so the compare view does not
# line runs up by a directory that differs for every run.
PATH_KEYS = {"output_dir": f"{TAG_PREFIX}output_dir", "tracking.uri": f"{TAG_PREFIX}tracking_uri"}


@dataclass
class Launch:
    """How this process was launched, as Hydra knows it, in plain values (read once, at the entry point).
    Not to be confused with a stage's StageJob, the Lightning parts it hands the runner."""

    output_dir: str
    launch_dir: str
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    multirun: bool = False
    sweep_dir: str | None = None
    job_num: int | None = None
    command: str = ""


def tracking_uri(configured: str | None, launch_dir: str) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(launch_dir).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"stage.lr": "5e-05", ...}; lists are kept whole as one value."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def _plain(value: float) -> str:
    """A count as a count (256, not 256.0)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def resident_memory_mb() -> float:
    """This process's resident memory now, in MiB (0 where /proc is not readable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_name(run: RunConfig, launch: Launch) -> str:
    if run.tracking.run_name:
        return run.tracking.run_name
    from rlhf.locations import label

    extra = []
    for key, value in _named_overrides(launch):
        # A loaded directory or file already names the run.
        if key == "model.name_or_path" and run.model.name == label(value):
            continue
        if key.startswith("data.") and key.endswith(".path") and label(value) in run.data.name.split("+"):
            continue
        extra.append((key, f"{key.split('.')[-1]}={value}"))
    base = f"{run.stage.name}-{run.model.name}-{run.data.name}"
    # The MLflow runs list cuts names off: a sweep's job leads with what its sweep varies.
    swept = _swept_keys(launch)
    varied = [text for key, text in extra if key in swept]
    rest = [text for key, text in extra if key not in swept]
    lead = [" ".join(varied), "·"] if varied else []
    return " ".join([*lead, base, *rest])[:250]


def _named_overrides(launch: Launch) -> list[tuple[str, str]]:
    """(key, value) of the overrides that distinguish a run (not the groups its name already says)."""
    skip = ("stage=", "model=", "data=", "experiment=", "sweep=", "tracking", "hydra", "resume=")
    return [
        # Hydra hands a job its overrides escaped (latest\:pipeline); a name shows them as typed.
        (key.lstrip("+"), re.sub(r"\\(.)", r"\1", value))
        for key, _, value in (o.partition("=") for o in launch.overrides if not o.startswith(skip))
    ]


def _swept_keys(launch: Launch) -> set[str]:
    return set(filter(None, os.environ.get(SWEPT_ENV, "").split(","))) if launch.multirun else set()


def _varied(launch: Launch) -> str:
    """What this job of a sweep sets its swept keys to ("r=4 lr=1e-3"), empty outside a sweep."""
    swept = _swept_keys(launch)
    return " ".join(
        f"{key.split('.')[-1]}={value}" for key, value in _named_overrides(launch) if key in swept
    )


class Tracker:
    """The MLflow run of this job. Every method is a no-op where nothing should be recorded."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri

    @property
    def active(self) -> bool:
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[start : start + 100])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_constants(self, values: Mapping[str, float]) -> None:
        """Numbers fixed for the whole run (data counts, parameter counts) as params: as metrics they
        would be one-bar charts; as params they are columns to compare runs by. A resumed run
        re-counts them: those already recorded are kept (a param cannot change)."""
        known = self.params()
        self.log_params({k: _plain(v) for k, v in values.items() if k[:250] not in known})

    def params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.params)

    def end(self, status: str) -> None:
        import mlflow

        mlflow.flush_async_logging()
        self.client.set_terminated(self.run_id, status)


class SilentTracker(Tracker):
    """Stands in where nothing is recorded: tracking off, or a data-parallel rank other than 0."""

    def __init__(self, run_id: str | None = None):
        super().__init__(None, run_id or "", "", "")

    @property
    def active(self) -> bool:
        return False

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        pass

    def log_constants(self, values: Mapping[str, float]) -> None:
        pass

    def params(self) -> dict[str, str]:
        return {}

    def end(self, status: str) -> None:
        pass


def connect(uri: str) -> Any:
    """An MlflowClient; the first use of a new sqlite store is serialised (its schema is created then)."""
    from mlflow.tracking import MlflowClient

    # MLflow announces schema creation and migrations at INFO on stderr; our log says what matters.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    db = _sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates the schema while we hold the lock
    return client


def experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    db = _sqlite_path(uri)
    # Artifacts next to the database, not relative to whichever directory a later process runs in.
    location = (db.parent / "mlartifacts").resolve().as_uri() if db else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created by a parallel job in the meantime
        return client.get_experiment_by_name(name).experiment_id


def open_store(configured_uri: str | None, launch_dir: str, experiment: str) -> tuple[Any, str, str]:
    """(client, uri, experiment id) of the MLflow store runs are recorded in: the one way in."""
    uri = tracking_uri(configured_uri, launch_dir)
    try:
        client = connect(uri)
        return client, uri, experiment_id(client, experiment, uri)
    except Exception as err:  # any failure to open or write the store is about where it is
        from rlhf.errors import ConfigError

        if configured_uri:
            given = f"tracking.uri={configured_uri}"
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            given = f"MLFLOW_TRACKING_URI={uri}"
        else:
            given = f"tracking.uri (default {uri})"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{given}: cannot open the MLflow store: {reason}") from None


def start_tracker(run: RunConfig, launch: Launch, resume_run_id: str | None = None) -> Tracker:
    """Create (or reopen, when resuming) the job's MLflow run and record what defines it, on rank 0;
    the other ranks get a silent tracker with its run id."""
    if not run.tracking.enabled:
        return SilentTracker()
    opened: list[Tracker] = []

    def open_on_rank_zero() -> str:
        opened.append(_open_run(run, launch, resume_run_id))
        return opened[0].run_id

    run_id = share(open_on_rank_zero)
    return opened[0] if opened else SilentTracker(run_id)


def _open_run(run: RunConfig, launch: Launch, resume_run_id: str | None) -> Tracker:
    client, uri, exp_id = open_store(run.tracking.uri, launch.launch_dir, run.tracking.experiment)
    config = to_container(run)
    params = flatten(config)
    for key in PATH_KEYS:
        params.pop(key, None)
    tags = {
        f"{TAG_PREFIX}stage": run.stage.name,
        f"{TAG_PREFIX}model": run.model.name,
        f"{TAG_PREFIX}data": run.data.name,
        f"{TAG_PREFIX}experiment": launch.choices.get("experiment"),
        f"{TAG_PREFIX}hardware": launch.choices.get("hardware"),
        f"{TAG_PREFIX}output_dir": str(Path(run.output_dir).resolve()),
        PATH_KEYS["tracking.uri"]: uri,
        f"{TAG_PREFIX}command": launch.command,
        f"{TAG_PREFIX}overrides": " ".join(launch.overrides),
        f"{TAG_PREFIX}sweep_dir": launch.sweep_dir,
        f"{TAG_PREFIX}job_num": launch.job_num,
        # Nests the run under its sweep's parent run in the MLflow UI.
        "mlflow.parentRunId": os.environ.get(SWEEP_PARENT_ENV) if launch.multirun else None,
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": "python -m rlhf",
        **run.tracking.tags,
    }
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        tracker = Tracker(client, resume_run_id, exp_id, uri)
        old = tracker.params()
        changed = {k: v for k, v in params.items() if k in old and old[k] != v}
        tracker.log_params({k: v for k, v in params.items() if k not in old})
        tags[f"{TAG_PREFIX}resumed"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if changed:
            tags[f"{TAG_PREFIX}resume.changed"] = " ".join(f"{k}={v}" for k, v in changed.items())
        tags.pop(f"{TAG_PREFIX}output_dir")  # checkpoints and model stay where the run began
        tracker.set_tags(tags)
    else:
        created = client.create_run(exp_id, run_name=run_name(run, launch))
        tracker = Tracker(client, created.info.run_id, exp_id, uri)
        tracker.log_params(params)
        tracker.set_tags(tags)
        tracker.log_text(yaml.safe_dump(config, sort_keys=False), "config/config.yaml")
        tracker.log_text(yaml.safe_dump({"overrides": launch.overrides}), "config/overrides.yaml")
    return tracker


@contextmanager
def recorded(tracker: Tracker) -> Iterator[Tracker]:
    """FINISHED when the block completes, KILLED on Ctrl-C, FAILED (with the error as a tag) otherwise."""
    try:
        yield tracker
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into SystemExit(1)
        tracker.set_tags({f"{TAG_PREFIX}error": f"interrupted ({type(err).__name__})"})
        tracker.end("KILLED")
        raise
    except BaseException as err:
        message = " ".join(str(err).split()) or type(err).__name__
        tracker.set_tags({f"{TAG_PREFIX}error": f"{type(err).__name__}: {message}"})
        tracker.end("FAILED")
        raise
    else:
        tracker.end("FINISHED")


def print_summary(tracker: Tracker, stream: Any = sys.stderr) -> None:
    if not tracker.active:
        return
    db = _sqlite_path(tracker.uri)
    store = shlex.quote(tracker.uri) if db is None else f"sqlite:///{db}"
    print(
        f"MLflow run {tracker.run_id} (experiment {tracker.experiment_id})\n"
        f"  compare runs:  mlflow ui --backend-store-uri {store}\n"
        f"  then open      http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}",
        file=stream,
    )


def record_rejected(raw: Mapping[str, Any], launch: Launch, error: Exception) -> None:
    """Leave a FAILED run for a config rejected before training, so a sweep shows what was refused."""
    tracking = raw.get("tracking") or {}
    if not tracking.get("enabled", True) or not is_rank_zero():
        return
    from rlhf.errors import UserError

    try:
        client, uri, exp_id = open_store(
            tracking.get("uri"), launch.launch_dir, str(tracking.get("experiment") or "rlhf")
        )
    except UserError:  # no store to record in: the config's own error is the one to report
        return
    stage = str((raw.get("stage") or {}).get("name", launch.choices.get("stage", "?")))
    model = str((raw.get("model") or {}).get("name", launch.choices.get("model", "?")))
    varied = _varied(launch)
    name = f"{varied} · rejected {stage}-{model}" if varied else f"rejected {stage}-{model}"
    created = client.create_run(exp_id, run_name=name[:250])
    tracker = Tracker(client, created.info.run_id, exp_id, uri)
    tracker.set_tags(
        {
            f"{TAG_PREFIX}stage": stage,
            f"{TAG_PREFIX}model": model,
            f"{TAG_PREFIX}command": launch.command,
            f"{TAG_PREFIX}overrides": " ".join(launch.overrides),
            f"{TAG_PREFIX}job_num": launch.job_num,
            f"{TAG_PREFIX}error": f"{type(error).__name__}: {error}",
            # A sweep's rejected job belongs to the sweep, like the jobs that ran.
            "mlflow.parentRunId": os.environ.get(SWEEP_PARENT_ENV) if launch.multirun else None,
        }
    )
    tracker.end("FAILED")
