"""Throughput benchmark: a fixed workload through the real training path, with figures printed.

    python -m rlhf.bench stage=sft model=smollm2-135m          # batch 8 x 256 tokens
    python -m rlhf.bench stage=rm model=smollm2-135m stage.init_from=base
    python -m rlhf.bench stage=dpo model=smollm2-135m stage.init_from=base
    python -m rlhf.bench stage=ppo model=tiny stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward
    python -m rlhf.bench stage=grpo model=tiny stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward

It composes the same config as `python -m rlhf` (any override works), builds the stage exactly as a
run would, and trains bench.warmup + bench.steps steps with Lightning on a fixed workload: SFT,
bench.batch_size sequences of bench.length random tokens, every token trained; RM, that many pairs
of such sequences; DPO, that many pairs of two random responses after a shared random prompt; PPO, the
configured prompts with a rollout batch of bench.batch_size; GRPO, bench.batch_size prompts x
stage.group_size responses
(bench.synthetic=0 trains SFT and RM on the configured data instead). It prints throughput, peak
memory, the RL stages' time split, and model FLOPs utilisation (MFU): the step's matrix work (`FlopCount`)
per second over this machine's matmul rate in the precision in force (bf16 under bf16-mixed,
fp32 under 32-true; both rates are printed). The machine is shared and its rate drifts (single
products of the same size range over 1.5x within a minute), so the rate is sampled before, between
and after the timed steps (outside their timing): `mfu` divides by the median reading, the rate the
workload's own products met while it ran; `mfu_of_peak` by the highest reading, a burst the
workload cannot sustain. MLflow tracking is included (it is part of what a step costs); tracking=none
leaves it out. bench.profile=1 runs the last warm-up step (untimed; bench.warmup=2 or more makes
it a warm one) under torch.profiler and writes its operators (kernels on a GPU), most time first, to
profile.txt in the run's output_dir.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from rlhf.config import register_configs
from rlhf.config.precision import matmul_seconds
from rlhf.layout import config_dir
from rlhf.stages import stages

register_configs(stages())

# steps/warmup: timed and untimed steps; batch_size (x length): the workload; synthetic=0: real data;
# profile=1: the last warm-up step profiled.
SETTINGS = {"steps": 5, "warmup": 1, "batch_size": 8, "length": 256, "synthetic": 1, "profile": 0}


def matmul_dtype(precision: str | int) -> torch.dtype:
    """The dtype a run's matrix products compute in under Lightning's `precision`: its ceiling."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16") or precision == "transformer-engine-float16":
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def probe_size(
    seconds_of: Callable[[int], float], largest: int, budget: float = 0.05, smallest: int = 256
) -> int:
    """The size of the matrix product that samples a rate: the largest power-of-two multiple of
    `smallest`, up to `largest`, whose product takes at most `budget` seconds (`seconds_of(size)`),
    so that a slow arithmetic (bf16 emulated without bf16 instructions, 50x below fp32) is sampled
    in milliseconds rather than the minutes its 2048 x 2048 products would take."""
    size = smallest
    while size * 2 <= largest and seconds_of(size) * 8 <= budget:  # the next size costs 8x as much
        size *= 2
    return size


class MatmulRate(pl.Callback):
    """Samples this machine's matrix-multiply rate (FLOP/s of one size x size product) in fp32 and in
    bf16: a burst before and after the workload, and a pair of products after a timed step whenever
    `interval` seconds have passed since the last sample (after the step's timing ends: callbacks
    run in order). `in_force` is the dtype the run's products use, the ceiling its MFU is measured
    against: with bf16 arithmetic about 3x the fp32 rate on processors with AMX, so an fp32
    denominator would read a bf16 run's MFU above 1. Each dtype's product size is chosen once by
    `probe_size`, at most `size`."""

    def __init__(
        self, warmup: int, in_force: torch.dtype = torch.float32, size: int = 2048, interval: float = 2.0
    ):
        self.warmup, self.interval, self.in_force, self.largest = warmup, interval, in_force, size
        self.dtypes = list(dict.fromkeys([torch.float32, torch.bfloat16, in_force]))
        self.readings: dict[torch.dtype, list[float]] = {dtype: [] for dtype in self.dtypes}
        self.sizes: dict[torch.dtype, int] = {}
        self._last = 0.0

    def sample(self, repeats: int) -> None:
        for dtype in self.dtypes:
            if dtype not in self.sizes:
                seconds_of = lambda n, d=dtype: matmul_seconds(d, n, 1)[0]  # noqa: E731
                self.sizes[dtype] = probe_size(seconds_of, self.largest, smallest=min(256, self.largest))
            size = self.sizes[dtype]
            self.readings[dtype].extend(
                2 * size**3 / seconds for seconds in matmul_seconds(dtype, size, repeats)
            )
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup and time.perf_counter() - self._last >= self.interval:
            self.sample(2)

    def sustained(self, dtype: torch.dtype | None = None) -> float:
        return statistics.median(self.readings[dtype or self.in_force])

    def peak(self, dtype: torch.dtype | None = None) -> float:
        return max(self.readings[dtype or self.in_force])


@dataclass(frozen=True)
class FlopCount:
    """The matrix work of a training step, counted from its batch.

    Per token through the body's weight matrices: 2 FLOPs per weight forward, 2 for the gradient of
    its input, 2 more for the gradient of the weight when it trains (6 in full fine-tuning, about 4
    under LoRA). The LM head, when the stage uses one, costs the same per weight on trained tokens
    only. Attention's two products (scores and weighted values) cost 4 x width forward and 8 x width
    backward per attended (query, key) pair per layer, the pairs a causal or shared-prompt mask allows.
    """

    body: int
    body_trainable: int
    head: int
    head_trainable: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, model: torch.nn.Module, lm_head: bool) -> FlopCount:
        from rlhf.models import unwrap

        inner = unwrap(model)
        config = inner.config
        embedding = inner.get_input_embeddings().weight
        output = inner.get_output_embeddings() if lm_head else None
        head = [output.weight] if output is not None else []
        excluded = {id(embedding), *(id(p) for p in head)}
        body = [p for p in model.parameters() if id(p) not in excluded]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            body=sum(p.numel() for p in body),
            body_trainable=sum(p.numel() for p in body if p.requires_grad),
            head=sum(p.numel() for p in head),
            head_trainable=sum(p.numel() for p in head if p.requires_grad),
            layers=config.num_hidden_layers,
            attention_width=config.num_attention_heads * head_dim,
        )

    def step(self, batch: dict) -> float:
        tokens = count_tokens(batch)
        trained = float((batch["labels"] != -100).sum()) if "labels" in batch and self.head else 0.0
        return (
            (4 * self.body + 2 * self.body_trainable) * tokens
            + (4 * self.head + 2 * self.head_trainable) * trained
            + 12 * self.layers * self.attention_width * attended_pairs(batch)
        )


def attended_pairs(batch: dict) -> float:
    """(query, key) pairs the batch's attention computes: causal within each sequence, or as the
    shared-prompt `pair_mask` allows (padding excluded)."""
    real = batch["attention_mask"].bool()
    if "pair_mask" in batch:
        return float((batch["pair_mask"][:, 0] & real[:, :, None]).sum())
    lengths = real.sum(-1).double()
    return float((lengths * (lengths + 1) / 2).sum())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Times whole training steps after the warm-up ones, adding up each `counts[name](batch)`."""

    def __init__(self, warmup: int, counts: dict[str, Callable[[dict], float]]):
        self.warmup, self.counts = warmup, counts
        self.seconds, self.steps = 0.0, 0
        self.totals = dict.fromkeys(counts, 0.0)
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _synchronize(pl_module.device)  # a GPU runs behind the Python that queued its work
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            for name, count in self.counts.items():
                self.totals[name] += count(batch)

    def per_second(self, name: str) -> float:
        return self.totals[name] / self.seconds


class RLTimeSplit(pl.Callback):
    """Averages an RL stage's logged time split (generation, scoring, training) over the timed steps."""

    def __init__(self, warmup: int):
        self.warmup, self.totals, self.steps = warmup, {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1
            for key in ("time/generation_s", "time/scoring_s", "time/training_s"):
                self.totals[key] = self.totals.get(key, 0.0) + float(trainer.callback_metrics[key])

    def averages(self) -> dict[str, float]:
        return {k.replace("time/", ""): round(v / max(self.steps, 1), 3) for k, v in self.totals.items()}


class StepProfile(pl.Callback):
    """Profiles the training step that starts after `after` steps and writes its operators, most self
    time first (device time on a GPU, where the kernels are; CPU time elsewhere), as a table to `path`."""

    def __init__(self, after: int, path: str, rows: int = 30):
        self.after, self.path, self.rows = after, path, rows
        self._profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.after:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profiler is None:
            return
        _synchronize(pl_module.device)
        self._profiler.__exit__(None, None, None)
        sort = "self_device_time_total" if pl_module.device.type == "cuda" else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=sort, row_limit=self.rows)
        with open(self.path, "w") as out:
            out.write(f"training step {self.after + 1} (untimed), sorted by {sort}\n{table}\n")
        self._profiler = None


@dataclass
class Workload:
    """What a stage's benchmark trains on and counts."""

    unit: str  # what throughput counts: tokens, pairs, episodes
    count: Callable[[dict], float]
    flops: FlopCount | None  # None: no MFU (PPO mixes several models and generation)
    # What is trained on, for the printed figures; empty: the configured data or the synthetic batches.
    described: str = ""
    # Extra callbacks timing the stage's own parts, and the figures they add once training ends.
    callbacks: list[pl.Callback] = field(default_factory=list)
    figures: Callable[[], dict[str, float]] = dict


def random_ids(generator: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (length,), generator=generator).tolist()


def count_tokens(batch: dict) -> float:
    return float(batch["attention_mask"].sum()) if "attention_mask" in batch else 0.0


def estimated_memory(run, settings: dict[str, int]) -> float:
    """rlhf.memory's estimate (bytes per device) for the workload: a synthetic one's batch and
    length replace the stage's batch size and data.max_length."""
    import dataclasses

    from rlhf.hardware import device_memory
    from rlhf.memory import ModelShape, estimate_run
    from rlhf.models import load_config

    if settings["synthetic"] and not hasattr(run.stage, "rollout"):
        run = dataclasses.replace(
            run,
            stage=dataclasses.replace(run.stage, batch_size=settings["batch_size"]),
            data=dataclasses.replace(run.data, max_length=settings["length"]),
        )
    return estimate_run(run, ModelShape.from_config(load_config(run.model)), device_memory(run.trainer)).total


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _bench(cfg: DictConfig) -> None:
    from rlhf.__main__ import launch_info, quiet_libraries
    from rlhf.config import validate
    from rlhf.hardware import check
    from rlhf.runner import stage_trainer
    from rlhf.stages import get_stage, load
    from rlhf.tracking import peak_memory, recorded, resident_memory_mb, start_tracker

    quiet_libraries()
    settings = SETTINGS
    with open_dict(cfg):
        cfg.checkpoint.every_n_steps = 0
        cfg.trainer.max_steps = settings["warmup"] + settings["steps"]
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.enable_progress_bar = False
        cfg.tracking.run_name = f"bench {cfg.stage.name}-{cfg.model.name}"
        if "rollout" in cfg.stage:  # a stage that samples: its batch is a rollout batch
            cfg.stage.rollout.batch_size = settings["batch_size"]
    run = validate(cfg)
    check(get_stage(run.stage.name), run.trainer)
    rate = MatmulRate(settings["warmup"], matmul_dtype(run.trainer.get("precision", "32-true")))
    rate.sample(8)
    tracker = start_tracker(run, launch_info())
    stage = get_stage(run.stage.name)
    if stage.bench is None:
        sys.exit(f"rlhf.bench: error: stage={stage.name} has no benchmark workload")
    with recorded(tracker):
        # What the stage's models and steps add to the process, to set against the memory estimate.
        resident_before = resident_memory_mb()
        job = stage.build(run, tracker)
        workload = load(stage.bench)(job, run, settings)
        counts = {workload.unit: workload.count, "tokens": count_tokens}
        if workload.flops is not None:
            counts["flops"] = workload.flops.step
        timer = StepTimer(settings["warmup"], counts)
        callbacks: list[pl.Callback] = [timer, *workload.callbacks]
        profile_path = Path(run.output_dir) / "profile.txt"
        if settings["profile"]:
            if settings["warmup"] < 1:
                sys.exit(
                    "rlhf.bench: error: bench.profile=1 profiles a warm-up step; set bench.warmup=1 or more"
                )
            profile_path.parent.mkdir(parents=True, exist_ok=True)
            callbacks.insert(0, StepProfile(settings["warmup"] - 1, str(profile_path)))
        # The rate is sampled last, after the timer has stopped.
        trainer = stage_trainer(run, tracker, run.output_dir, job, [*callbacks, rate])
        trainer.fit(job.module, datamodule=job.datamodule)
        rate.sample(8)
        if workload.described:
            described = workload.described
        elif settings["synthetic"]:
            described = f"synthetic {settings['batch_size']} x {settings['length']} tokens"
        else:
            described = f"{run.data.name} data, batch {settings['batch_size']}"
        figures: dict = {
            "stage": run.stage.name,
            "model": run.model.name,
            "workload": described,
            "steps_timed": timer.steps,
            "step_time_s": round(timer.seconds / timer.steps, 3),
            f"{workload.unit}_per_s": round(timer.per_second(workload.unit), 2),
            "precision": str(run.trainer.get("precision")),
            # The rate in the dtype the run's products use, which MFU divides by; then both rates.
            "matmul_gflops": round(rate.sustained() / 1e9, 1),
            "matmul_gflops_peak": round(rate.peak() / 1e9, 1),
            "matmul_gflops_fp32": round(rate.sustained(torch.float32) / 1e9, 1),
            "matmul_gflops_bf16": round(rate.sustained(torch.bfloat16) / 1e9, 1),
        }
        if timer.totals["tokens"]:
            figures["tokens_per_s"] = round(timer.per_second("tokens"), 1)
        if workload.flops is not None:
            achieved = timer.per_second("flops")
            figures["model_gflops"] = round(achieved / 1e9, 1)
            figures["mfu"] = round(achieved / rate.sustained(), 3)
            figures["mfu_of_peak"] = round(achieved / rate.peak(), 3)
        figures.update(workload.figures())
        figures.update({k: round(v, 1) for k, v in peak_memory().items()})
        if settings["profile"] and profile_path.is_file():
            figures["profile"] = str(profile_path)
        figures["peak_rss_over_start_mb"] = round(figures["peak_rss_mb"] - resident_before, 1)
        figures["memory_estimate_mb"] = round(estimated_memory(run, settings) / 2**20, 1)
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
