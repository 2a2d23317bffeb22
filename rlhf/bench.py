"""Throughput benchmark: a fixed workload through the real training path, with figures printed.

    python -m rlhf.bench stage=sft model=smollm2-135m          # batch 8 x 256 tokens, fp32
    python -m rlhf.bench stage=rm model=smollm2-135m stage.init_from=base
    python -m rlhf.bench stage=ppo model=tiny stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward

It composes the same config as `python -m rlhf` (any override works), builds the stage exactly as a
run would, and trains bench.warmup + bench.steps steps with Lightning on a fixed workload: SFT,
bench.batch_size sequences of bench.length random tokens, every token trained; RM, that many pairs
of such sequences; PPO, the configured prompts with a rollout batch of bench.batch_size
(bench.synthetic=0 trains SFT and RM on the configured data instead). It prints throughput, peak
memory, PPO's time split, and model FLOPs utilisation: 6 x parameters x tokens/s over this
machine's fp32 matmul rate, measured in the same process before and after the workload (the higher
of the two: a shared machine's rate drifts, and a single low reading would inflate the utilisation).
MLflow tracking is included (it is part of what a step costs); tracking=none leaves it out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from rlhf.config import register_configs

register_configs()

# steps/warmup: timed and untimed steps; batch_size (x length): the workload; synthetic=0: real data.
SETTINGS = {"steps": 5, "warmup": 1, "batch_size": 8, "length": 256, "synthetic": 1}


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
    """Times whole training steps after the warm-up ones, counting `count(batch)` units."""

    def __init__(self, warmup: int, count: Callable[[dict], float]):
        self.warmup, self.count, self.timing = warmup, count, Timing()
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.timing.seconds += time.perf_counter() - self._start
            self.timing.units += self.count(batch)
            self.timing.steps += 1


class PPOTimeSplit(pl.Callback):
    """Averages PPO's logged time split (generation, scoring, training) over the timed steps."""

    def __init__(self, warmup: int):
        self.warmup, self.totals, self.steps = warmup, {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1
            for key in ("time/generation_s", "time/scoring_s", "time/training_s"):
                self.totals[key] = self.totals.get(key, 0.0) + float(trainer.callback_metrics[key])

    def averages(self) -> dict[str, float]:
        return {k.replace("time/", ""): round(v / max(self.steps, 1), 3) for k, v in self.totals.items()}


@dataclass
class Workload:
    """What a stage's benchmark trains on and counts."""

    unit: str  # what throughput counts: tokens, pairs, episodes
    count: Callable[[dict], float]
    # Parameters doing matrix work per token (for MFU); None: no MFU (PPO mixes several models).
    flop_parameters: int | None


def _random_ids(generator: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (length,), generator=generator).tolist()


def _sft_workload(job, run, settings) -> Workload:
    from rlhf.models import count_parameters

    if settings["synthetic"]:
        generator = torch.Generator().manual_seed(run.seed)
        vocab = job.module.model.config.vocab_size
        items = []
        for _ in range(settings["batch_size"]):
            ids = _random_ids(generator, settings["length"], vocab)
            items.append({"input_ids": ids, "labels": [-100, *ids[1:]]})  # every token trained
        job.datamodule.splits["train"] = items * (run.trainer["max_steps"] + 1)
    return Workload("tokens", _tokens, count_parameters(job.module.model))


def _rm_workload(job, run, settings) -> Workload:
    from rlhf.models import count_parameters, unwrap

    model = unwrap(job.module.model)
    if settings["synthetic"]:
        generator = torch.Generator().manual_seed(run.seed)
        vocab = model.config.vocab_size
        items = [
            {
                "chosen": _random_ids(generator, settings["length"], vocab),
                "rejected": _random_ids(generator, settings["length"], vocab),
                "margin": 0.0,
            }
            for _ in range(settings["batch_size"])
        ]
        job.datamodule.splits["train"] = items * (run.trainer["max_steps"] + 1)
    # The backbone without its embedding lookup, which does no matrix work.
    matrix_parameters = count_parameters(model) - model.get_input_embeddings().weight.numel()
    return Workload("pairs", lambda batch: float(batch["margin"].shape[0]), matrix_parameters)


def _ppo_workload(job, run, settings) -> Workload:
    return Workload("episodes", lambda batch: float(len(batch["prompt_ids"])), None)


WORKLOADS = {"sft": _sft_workload, "rm": _rm_workload, "ppo": _ppo_workload}


def _tokens(batch: dict) -> float:
    return float(batch["attention_mask"].sum()) if "attention_mask" in batch else 0.0


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _bench(cfg: DictConfig) -> None:
    from rlhf.__main__ import job_info, quiet_libraries
    from rlhf.config import validate
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
        if cfg.stage.name == "ppo":
            cfg.stage.rollout.batch_size = settings["batch_size"]
    run = validate(cfg)
    rate_before = matmul_rate()
    tracker = start_tracker(run, job_info())
    with recorded(tracker):
        job = get_stage(run.stage.name)(run, tracker)
        workload = WORKLOADS[run.stage.name](job, run, settings)
        if run.stage.name != "ppo":
            job.datamodule.batch_size = settings["batch_size"]
        timer = StepTimer(settings["warmup"], workload.count)
        tokens = StepTimer(settings["warmup"], _tokens)
        split = PPOTimeSplit(settings["warmup"])
        callbacks = [*job.callbacks, timer, tokens] + ([split] if run.stage.name == "ppo" else [])
        trainer = build_trainer(
            run, tracker, run.output_dir, callbacks, manual_optimization=not job.module.automatic_optimization
        )
        trainer.fit(job.module, datamodule=job.datamodule)
        rate = max(rate_before, matmul_rate())
        timing = timer.timing
        if run.stage.name == "ppo":
            described = f"{run.data.name} prompts, rollout batch {settings['batch_size']}"
        elif settings["synthetic"]:
            described = f"synthetic {settings['batch_size']} x {settings['length']} tokens"
        else:
            described = f"{run.data.name} data, batch {settings['batch_size']}"
        figures: dict = {
            "stage": run.stage.name,
            "model": run.model.name,
            "workload": described,
            "steps_timed": timing.steps,
            "step_time_s": round(timing.seconds / timing.steps, 3),
            f"{workload.unit}_per_s": round(timing.units / timing.seconds, 2),
            "matmul_gflops": round(rate / 1e9, 1),
        }
        if tokens.timing.units:
            figures["tokens_per_s"] = round(tokens.timing.units / tokens.timing.seconds, 1)
        if workload.flop_parameters is not None:
            figures["flop_parameters"] = workload.flop_parameters
            figures["mfu"] = round(6 * workload.flop_parameters * figures["tokens_per_s"] / rate, 3)
        if run.stage.name == "ppo":
            figures.update(split.averages())
        figures.update({k: round(v, 1) for k, v in peak_memory().items()})
        tracker.log_metrics({f"bench/{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
    print(json.dumps(figures, indent=2), file=sys.stdout)


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
