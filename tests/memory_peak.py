"""Measured peak memory of a stage's training against rlhf.memory's estimate, in a fresh process.

    python tests/memory_peak.py stage=sft model=tiny [overrides...]

Builds the stage as a run would, trains it on rlhf.bench's fixed workload (bench sizes: batch 8,
length 256; PPO and GRPO a rollout batch of 8) for two steps (the second holds the optimizer state
the first made), and prints JSON: the resident memory before the stage was built, the process's
peak, and the estimate for that workload (which counts the process's own runtime too).
A process of its own, so that the peak is this workload's alone.
"""

from __future__ import annotations

import json
import sys
import tempfile

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from rlhf.bench import SETTINGS, estimated_memory
from rlhf.config import register_configs, validate
from rlhf.layout import config_dir
from rlhf.runner import stage_trainer
from rlhf.stages import get_stage, load
from rlhf.tracking import SilentTracker, peak_memory, resident_memory_mb


def main(overrides: list[str]) -> None:
    from rlhf.stages import stages

    register_configs(stages())
    settings = dict(SETTINGS, steps=1, warmup=1)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tempfile.mkdtemp()}", "tracking=none", *overrides])
    with open_dict(cfg):
        cfg.checkpoint.every_n_steps = 0
        cfg.trainer.max_steps = settings["warmup"] + settings["steps"]
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_progress_bar = False
        if "rollout" in cfg.stage:
            cfg.stage.rollout.batch_size = settings["batch_size"]
    run = validate(cfg)
    tracker = SilentTracker()
    stage = get_stage(run.stage.name)
    before = resident_memory_mb()
    job = stage.build(run, tracker)
    workload = load(stage.bench)(job, run, settings)
    trainer = stage_trainer(run, tracker, run.output_dir, job, workload.callbacks)
    trainer.fit(job.module, datamodule=job.datamodule)
    peak = peak_memory()["peak_rss_mb"]
    print(
        json.dumps(
            {"before_mb": before, "peak_mb": peak, "estimate_mb": estimated_memory(run, settings) / 2**20}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
