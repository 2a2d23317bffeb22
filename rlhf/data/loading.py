"""Batches for Lightning: padding, a shuffling sampler that can resume mid-epoch, one DataModule.

Resuming a run must continue with exactly the batches the interrupted run would have seen. The
sampler's order depends only on (seed, epoch), and a callback tells it, at the start of an epoch,
how many samples the restored optimizer steps already consumed; Lightning restores the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False, multiple_of: int = 1) -> torch.Tensor:
    """Pad to the longest sequence of the batch (rounded up to `multiple_of`), on the right or left."""
    longest = max(len(s) for s in sequences)
    longest = math.ceil(longest / multiple_of) * multiple_of
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        if left:
            out[row, longest - len(seq) :] = torch.as_tensor(seq)
        else:
            out[row, : len(seq)] = torch.as_tensor(seq)
    return out


def attention_mask(sequences: Sequence[Sequence[int]], left: bool = False, multiple_of: int = 1) -> torch.Tensor:
    return pad([[1] * len(s) for s in sequences], 0, left=left, multiple_of=multiple_of)


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class ResumableSampler(Sampler[int]):
    """Shuffles by (seed, epoch), shards across data-parallel ranks, and can start part-way in."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch = 0
        self._skip = 0
        # Every rank gets the same number of samples: the permutation is cut to a multiple of world_size.
        self.per_rank = size // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first `samples` of this rank's share of the next epoch it starts."""
        self._skip = samples

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        yield from mine[skip:]

    def __len__(self) -> int:
        return self.per_rank


class ResumeDataPosition(pl.Callback):
    """At the start of an epoch restored mid-way, skip what the restored optimizer steps consumed.

    Checkpoints are written at optimizer-step boundaries, so the position in the epoch is
    (global_step - steps of earlier epochs) * accumulate_grad_batches batches.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        batch_size = getattr(loader, "batch_size", None)
        if not isinstance(sampler, ResumableSampler) or not batch_size:
            return
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        done = trainer.global_step - trainer.current_epoch * steps_per_epoch
        if done > 0:
            sampler.skip_next(done * trainer.accumulate_grad_batches * batch_size)


class ExamplesDataModule(pl.LightningDataModule):
    """Train / validation / test lists of prepared examples, batched by a stage's collate function."""

    def __init__(
        self,
        splits: dict[str, Sequence[Any]],
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.splits = splits
        self.collate = collate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        items = self.splits["train"]
        sampler = ResumableSampler(len(items), self.seed, rank=rank, world_size=world)
        return DataLoader(
            ListDataset(items),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._world()
        dataset = ListDataset(self.splits[split])
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
