"""The Lightning Trainer of a run and the callbacks every stage shares."""

from __future__ import annotations

import functools
import logging
import math
import random
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from rlhf.hardware import device_count
from rlhf.lineage import checkpoint_dir
from rlhf.progress import progress_callbacks
from rlhf.sharding import lightning_strategy
from rlhf.tracking import Tracker


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to our run; the run's status is ours to set, not Lightning's."""

    def log_hyperparams(self, params: Any) -> None:  # the whole config is logged at the start
        return None

    def finalize(self, status: str = "success") -> None:
        import mlflow

        mlflow.flush_async_logging()


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the values logged in this training step reach the loggers (every
    trainer.log_every_n_steps steps and the last). A step's self.log calls cost about as much as a
    small model's step, so per-step values are logged only then; Lightning's own LearningRateMonitor
    asks the same question the same way."""
    return trainer._logger_connector.should_update_logs


class Throughput(pl.Callback):
    """Logs how much work a second of training does (tokens/s, pairs/s, ...), over a sliding window.

    `count(batch)` returns the units of a batch, e.g. {"tokens": 812}; the first batch (warm-up)
    is left out.
    """

    def __init__(self, count: Callable[[Any], dict[str, float]], window: int = 20):
        self.count = count
        self.window: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)
        self._start = 0.0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == 1:
            return
        self.window.append((time.perf_counter() - self._start, self.count(batch)))
        if not logs_this_step(trainer):
            return
        seconds = sum(t for t, _ in self.window)
        totals: dict[str, float] = {}
        for _, counts in self.window:
            for unit, n in counts.items():
                totals[unit] = totals.get(unit, 0.0) + n
        for unit, n in totals.items():
            pl_module.log(
                f"perf/{unit}_per_s", n / seconds, on_step=True, on_epoch=False, rank_zero_only=True
            )
        pl_module.log(
            "perf/step_time_s", seconds / len(self.window), on_step=True, on_epoch=False, rank_zero_only=True
        )


class FiniteGuard(pl.Callback):
    """Stops a run whose training loss or gradient norm is not finite: its weights then mean
    nothing, so the run must fail rather than save them for the next stage to start from.

    The values are checked on their device and the first non-finite one is remembered there; the host
    reads that record only when the step's values are logged anyway (a sync already), before a
    checkpoint is written and when training ends, so a diverged run never saves its weights. Under a
    gradient scaler (16-bit mixed precision) non-finite gradients are expected and the step is
    skipped by the scaler, so only the loss is checked there.
    """

    METRICS = ("training loss", "gradient norm")

    def __init__(self) -> None:
        self._step = 0
        self._first: torch.Tensor | None = None  # (step, metric index, value); step 0: none yet

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step + 1  # the optimizer step this batch counts towards

    def _watch(self, value: torch.Tensor, metric: int) -> None:
        if hasattr(value, "full_tensor"):  # a DTensor (FSDP): the whole model's value, on every rank
            value = value.full_tensor()
        value = value.detach().float().reshape(())
        if self._first is None:
            self._first = torch.zeros(3, device=value.device)
        # Filled on the device: a tensor built from host values would be copied there, a sync.
        full = functools.partial(torch.full, (), device=value.device)
        seen = torch.stack([full(float(self._step)), full(float(metric)), value])
        record = ~torch.isfinite(value) & (self._first[0] == 0)
        self._first = torch.where(record, seen, self._first)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._watch(torch.nn.utils.get_total_norm(grads), 1)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # Also reached through manual_backward, so the RL stages' losses are watched too.
        self._watch(loss, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if logs_this_step(trainer):
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        """Raise if any process has seen a non-finite value. Every process checks at the same points
        and they agree on the earliest step, so all stop together (one stopping alone would leave
        the others waiting in their next collective)."""
        first = self._first if self._first is not None else torch.zeros(3, device=pl_module.device)
        step = torch.where(first[0] > 0, first[0], torch.full_like(first[0], math.inf)).reshape(1)
        earliest = float(trainer.strategy.reduce(step, reduce_op="min"))
        if math.isinf(earliest):
            return
        from rlhf.errors import DivergedError

        own_step, metric, value = first.tolist()
        what = (
            f"the {self.METRICS[int(metric)]} was {value}"
            if own_step == earliest
            else "another process saw a non-finite value"
        )
        raise DivergedError(
            f"training diverged at step {int(earliest)}: {what}; no model was saved "
            "(lower stage.lr, or clip gradients with trainer.gradient_clip_val)"
        )


class HeldOutSteps:
    """Validation and test steps of a stage that gathers values over a split and reports them at the
    epoch's end. The stage defines `_eval_step(batch, split)`, `_has_eval(split)` and
    `_eval_epoch_end(split, prefix)`; put before pl.LightningModule among the bases."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "validation")

    def on_validation_epoch_end(self) -> None:
        if self._has_eval("validation"):
            self._eval_epoch_end("validation", "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        if self._has_eval("test"):
            self._eval_epoch_end("test", "test")


def final_metrics(trainer: pl.Trainer, module: pl.LightningModule, datamodule, splits) -> dict[str, float]:
    """The values the run logged last, and the test split's (evaluated now) when the data has one."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "test" in splits:
        for result in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    return metrics


class LastValidation(pl.Callback):
    """Remembers the step of the latest validation, so the runner can validate the final weights."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _validates(trainer: pl.Trainer, datamodule: pl.LightningDataModule) -> bool:
    return trainer.limit_val_batches != 0 and hasattr(datamodule, "val_dataloader")


def validate_initial(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule
) -> None:
    """Validate the starting weights, logged at step 0, before training begins."""
    if _validates(trainer, datamodule):
        trainer.validate(module, datamodule=datamodule, verbose=False)


def validate_final(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule
) -> None:
    """Validate the final weights unless the last validation already ran at the final step."""
    last = next((c for c in trainer.callbacks if isinstance(c, LastValidation)), None)
    if _validates(trainer, datamodule) and last is not None and last.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


class DurableMetrics(pl.Callback):
    """Metrics are queued asynchronously; writing them out with each checkpoint means a killed run
    keeps every metric up to the point it resumes from."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        import mlflow

        mlflow.flush_async_logging()


class RandomState(pl.Callback):
    """Saves and restores the random generators with each checkpoint, so a resumed run draws the same
    dropout masks and samples as an uninterrupted one."""

    # Plain lists and tensors only: checkpoints are read back with torch.load(weights_only=True).
    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])


def _quiet_lightning() -> None:
    # The DataModule restores the position in the epoch itself (see rlhf.data.loading).
    warnings.filterwarnings(
        "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
    )
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # PPO checkpoints after its iteration's updates, which is the state to resume from.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def release_freed_memory() -> None:
    """Have glibc's malloc give freed blocks of 1 MiB and more back to the system at once.

    Tensors are allocated with malloc; by default blocks under a threshold that grows up to 32 MiB
    come from the heap, and freed heap space is kept by the process. A training step frees gigabytes
    of activations of mixed sizes, and what the heap keeps between steps (measured: 0.5-0.7 GB on
    SmolLM2-135M SFT) adds to the next step's peak. A fixed threshold maps such blocks separately and
    unmaps them when freed; the cost, fresh pages for each, is small next to a step's arithmetic.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:  # glibc only; other C libraries manage memory their own way
        m_mmap_threshold = -3
        mallopt(m_mmap_threshold, 1 << 20)


def build_trainer(
    trainer: Mapping[str, Any],
    tracker: Tracker,
    output_dir: str | Path,
    callbacks: list[pl.Callback],
    *,
    checkpoint_every: int,
    limit_eval_batches: int | None = None,
    batches_per_epoch: Callable[[int], int] | None = None,
    manual_optimization: bool = False,
) -> pl.Trainer:
    """The Trainer for the config's `trainer` node, a resumable checkpoint every `checkpoint_every`
    steps (0: none); `batches_per_epoch(world_size)` sizes the epochs of a step budget.

    A stage that optimises manually (PPO) clips gradients itself and takes one step per batch.
    """
    _quiet_lightning()
    release_freed_memory()
    every = checkpoint_every
    extra: list[pl.Callback] = [FiniteGuard(), RandomState(), DurableMetrics(), LastValidation()]
    if every > 0:
        # Numbered files, the older deleted after the newer is written: a kill mid-write never
        # destroys the only checkpoint.
        extra.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir(output_dir),
                filename="step-{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=every,
                save_top_k=1,
                monitor=None,
                save_last=False,
            )
        )
    trainer_args = dict(trainer)
    extra += progress_callbacks(trainer_args)
    if limit_eval_batches is not None:
        trainer_args.setdefault("limit_val_batches", limit_eval_batches)
    if manual_optimization:
        trainer_args.pop("gradient_clip_val", None)
        if trainer_args.pop("accumulate_grad_batches", 1) != 1:
            from rlhf.errors import ConfigError

            raise ConfigError(
                "trainer.accumulate_grad_batches: PPO takes stage.minibatch_size instead; leave it at 1"
            )
    interval = trainer_args.get("val_check_interval")
    if (
        isinstance(interval, int)
        and not isinstance(interval, bool)
        and batches_per_epoch is not None
        and "check_val_every_n_epoch" not in trainer_args
        and interval > batches_per_epoch(device_count(trainer_args))
    ):
        # A small data set's epoch is shorter than the interval: count it across epochs instead
        # (Lightning refuses an interval longer than an epoch otherwise).
        trainer_args["check_val_every_n_epoch"] = None
    if trainer_args.get("max_epochs") is None:
        # One epoch by default; with a step budget, as many epochs as it takes.
        steps = trainer_args.get("max_steps") or -1
        if steps > 0 and batches_per_epoch is not None:
            batches = max(1, batches_per_epoch(device_count(trainer_args)))
            accumulate = int(trainer_args.get("accumulate_grad_batches", 1))
            trainer_args["max_epochs"] = math.ceil(steps * accumulate / batches)
        else:
            trainer_args["max_epochs"] = -1 if steps > 0 else 1
    trainer_args["strategy"] = lightning_strategy(
        trainer_args.get("strategy", "auto"), device_count(trainer_args)
    )
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(
            **trainer_args,
            logger=RunLogger(tracking_uri=tracker.uri, run_id=tracker.run_id, synchronous=False)
            if tracker.active
            else False,
            callbacks=[*callbacks, *extra],
            default_root_dir=str(output_dir),
            enable_checkpointing=every > 0,
            use_distributed_sampler=False,  # our sampler shards by rank itself, and can resume
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
        from rlhf.errors import trainer_error

        raise trainer_error(err, trainer_args) from None
