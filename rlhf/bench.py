"""Throughput benchmark: a fixed workload through the real training path, with figures printed.

    python -m rlhf.bench stage=sft model=smollm2-135m          # batch 8 x 256 tokens, fp32
    python -m rlhf.bench stage=sft model=tiny bench.steps=20

It composes the same config as `python -m rlhf` (any override works), builds the stage exactly as a
run would, replaces the training data by a fixed synthetic workload (bench.batch_size sequences of
bench.length tokens, every token trained), trains bench.warmup + bench.steps optimizer steps with
Lightning, and prints throughput, peak memory and model FLOPs utilisation: 6 x parameters x
tokens/s over this machine's fp32 matmul rate, measured in the same process. MLflow tracking is
included (it is part of what a step costs); use tracking=none to leave it out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from rlhf.config import register_configs

log = logging.getLogger("rlhf.bench")
register_configs()


def matmul_rate(size: int = 2048, repeats: int = 8) -> float:
    """This machine's fp32 matrix-multiply rate in FLOP/s (best of `repeats`, after a warm-up)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


@dataclass
class Timing:
    seconds: float = 0.0
    units: float = 0.0
    steps: int = 0


class StepTimer(pl.Callback):
    """Times whole optimizer steps after the warm-up ones."""

    def __init__(self, warmup: int, count):
        self.warmup, self.count, self.timing = warmup, count, Timing()
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.timing.seconds += time.perf_counter() - self._start
            self.timing.units += self.count(batch)
            self.timing.steps += 1


def _synthetic_sft(batch_size: int, length: int, vocab: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batch_size):
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return items


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _bench(cfg: DictConfig) -> None:
    from rlhf.__main__ import job_info, quiet_libraries
    from rlhf.config import validate
    from rlhf.models import count_parameters
    from rlhf.stages import get_stage
    from rlhf.tracking import peak_memory, recorded, start_tracker
    from rlhf.training import build_trainer

    quiet_libraries()
    settings = SETTINGS
    with open_dict(cfg):
        cfg.checkpoint.every_n_steps = 0
        cfg.trainer.max_steps = settings["warmup"] + settings["steps"]
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_progress_bar = False
        cfg.tracking.run_name = f"bench {cfg.stage.name}-{cfg.model.name}"
    run = validate(cfg)
    rate = matmul_rate()
    tracker = start_tracker(run, job_info())
    with recorded(tracker):
        job = get_stage(run.stage.name)(run, tracker)
        module, datamodule = job.module, job.datamodule
        vocab = module.model.config.vocab_size
        if settings["synthetic"]:
            datamodule.splits["train"] = _synthetic_sft(settings["batch_size"], settings["length"], vocab, run.seed) * (
                run.trainer["max_steps"] + 1
            )
        datamodule.batch_size = settings["batch_size"]
        timer = StepTimer(settings["warmup"], lambda batch: float(batch["attention_mask"].sum()))
        trained = StepTimer(settings["warmup"], lambda batch: float((batch["labels"] != -100).sum()))
        trainer = build_trainer(run, tracker, run.output_dir, [*job.callbacks, timer, trained])
        trainer.fit(module, datamodule=datamodule)
        timing = timer.timing
        params = count_parameters(module.model)
        tokens_per_s = timing.units / timing.seconds
        figures = {
            "stage": run.stage.name,
            "model": run.model.name,
            "parameters": params,
            "workload": f"synthetic {settings['batch_size']}x{settings['length']}"
            if settings["synthetic"]
            else f"{run.data.name} data, batch {settings['batch_size']}",
            "steps_timed": timing.steps,
            "step_time_s": round(timing.seconds / timing.steps, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "trained_tokens_per_s": round(trained.timing.units / trained.timing.seconds, 1),
            "matmul_gflops": round(rate / 1e9, 1),
            "mfu": round(6 * params * tokens_per_s / rate, 3),
            **{k: round(v, 1) for k, v in peak_memory().items()},
        }
        tracker.log_metrics({f"bench/{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
    print(json.dumps(figures, indent=2), file=sys.stdout)


# steps/warmup: timed and untimed optimizer steps; batch_size x length: the synthetic workload;
# synthetic=0 trains on the configured data instead (its own lengths, prompts masked).
SETTINGS = {"steps": 5, "warmup": 1, "batch_size": 8, "length": 256, "synthetic": 1}


def main() -> None:
    # bench.<key>=<value> arguments are the benchmark's own; everything else goes to Hydra.
    rest = []
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if key.startswith("bench.") and sep:
            name = key[len("bench.") :]
            if name not in SETTINGS:
                sys.exit(f"rlhf.bench: error: {key}: unknown; choose from bench.{', bench.'.join(SETTINGS)}")
            SETTINGS[name] = int(value)
        else:
            rest.append(arg)
    sys.argv[1:] = rest
    _bench()


if __name__ == "__main__":
    main()
