"""Runs one launched stage: resume point, MLflow run, the stage's parts, Lightning's fit, outputs, final status."""

from __future__ import annotations

import logging
import signal
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl

from rlhf import ranks
from rlhf.config import RunConfig
from rlhf.errors import ConfigError
from rlhf.hardware import check_memory
from rlhf.lineage import ResumePoint, find_resume_point
from rlhf.stages import Stage, StageJob, get_stage
from rlhf.sweeps import objective
from rlhf.tracking import (
    Launch,
    open_store,
    peak_memory,
    print_summary,
    recorded,
    start_tracker,
)
from rlhf.training import build_trainer, validate_final, validate_initial

log = logging.getLogger(__name__)


def _resume_point(run: RunConfig, launch: Launch) -> ResumePoint | None:
    if run.resume in (None, False) or str(run.resume).lower() in ("false", "none", "null", ""):
        return None
    client, exp_id = None, None
    if run.tracking.enabled:
        client, _, exp_id = open_store(run.tracking.uri, launch.launch_dir, run.tracking.experiment)
    return find_resume_point(run.resume, run.stage.name, client, exp_id)


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an output_dir that cannot hold the model before anything loads: found only when the
    model is saved, it would cost the whole training."""
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"is inside {existing}, a file"
        raise ConfigError(f"output_dir={output_dir} {where}, not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"output_dir={output_dir}: cannot be written ({err.strerror or err})") from None


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stage_trainer(
    run: RunConfig,
    tracker,
    output_dir: str | Path,
    job: StageJob,
    extra_callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """The Lightning Trainer for a stage's job, built from the run's trainer and checkpoint settings."""
    return build_trainer(
        run.trainer,
        tracker,
        output_dir,
        [*job.callbacks, *extra_callbacks],
        checkpoint_every=run.checkpoint.every_n_steps,
        limit_eval_batches=getattr(run.stage, "limit_eval_batches", None),
        batches_per_epoch=getattr(job.datamodule, "train_batches", None),
        manual_optimization=not job.module.automatic_optimization,
    )


def execute(run: RunConfig, launch: Launch) -> float | None:
    """Train the configured stage; return the metric a sweep optimises (None if it was not produced)."""
    stage = get_stage(run.stage.name)
    ranks.join(run.trainer)
    if not stage.trains and not ranks.is_rank_zero():
        return None  # rank 0 runs it alone; this rank goes on to the next job of a pipeline
    # Weights initialise alike on every rank; sampling draws per rank (rlhf.ranks.sampling_seed).
    pl.seed_everything(run.seed, workers=True, verbose=False)
    with ranks.solo() if not stage.trains else nullcontext():
        return _execute(run, launch, stage)


def _execute(run: RunConfig, launch: Launch, stage: Stage) -> float | None:
    # Rank 0 decides where the run resumes and writes; a rank's own Hydra output directory (its own
    # timestamp under torchrun or srun) would differ.
    resume = ranks.share(lambda: _resume_point(run, launch))
    tracker = start_tracker(run, launch, resume.run_id if resume else None)
    run.output_dir = ranks.share(lambda: resume.output_dir if resume else run.output_dir)
    output_dir = Path(run.output_dir)
    if ranks.is_rank_zero():
        # `kill` (SIGTERM) ends a run like Ctrl-C: recorded as KILLED, checkpoints kept.
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    with recorded(tracker):
        if run.memory_check:
            check_memory(run)
        if resume:
            log.info("Resuming from %s", resume.checkpoint)
            tracker.set_tags({"rlhf.resumed_from": resume.checkpoint})
        _check_output_dir(output_dir)
        job = stage.build(run, tracker)
        if job.module is None:  # nothing to train (eval)
            metrics = job.finish(None, output_dir)
            tracker.log_metrics(peak_memory())
            primary = ranks.is_rank_zero()
        else:
            trainer = stage_trainer(run, tracker, output_dir, job)
            if run.validate_before_training and not resume:
                validate_initial(trainer, job.module, job.datamodule)
            trainer.fit(
                job.module, datamodule=job.datamodule, ckpt_path=resume.checkpoint if resume else None
            )
            validate_final(trainer, job.module, job.datamodule)
            metrics = job.finish(trainer, output_dir)
            primary = trainer.is_global_zero
            if primary:
                tracker.log_metrics(peak_memory(), step=trainer.global_step)
                if run.tracking.log_model and (output_dir / "model").is_dir():
                    tracker.log_artifacts(output_dir / "model", "model")
    if primary:
        if (output_dir / "model").is_dir():
            log.info("Model saved to %s", output_dir / "model")
        print_summary(tracker)
    return _optimized(metrics, objective(run.stage.name, run.optimized_metric)[0])


def _optimized(metrics: dict[str, float], name: str) -> float | None:
    if name in metrics:
        return metrics[name]
    log.warning("optimized_metric %r was not produced; known: %s", name, ", ".join(sorted(metrics)))
    return None
