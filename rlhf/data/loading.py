"""Batches for Lightning: padding, a shuffling sampler that can resume mid-epoch, one DataModule.

Resuming a run must continue with exactly the batches the interrupted run would have seen: the
sampler's order depends only on (seed, epoch), and the training loader's position in the epoch is
saved in every checkpoint. Batches are padded to their longest example, so the sampler can group
examples of similar length (on the shipped preference data a random batch of 8 pairs is 58% real
tokens, a length-grouped one 85%).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def pad(
    sequences: Sequence[Sequence[int]], value: int, left: bool = False, multiple_of: int = 1
) -> torch.Tensor:
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


def attention_mask(
    sequences: Sequence[Sequence[int]], left: bool = False, multiple_of: int = 1
) -> torch.Tensor:
    return pad([[1] * len(s) for s in sequences], 0, left=left, multiple_of=multiple_of)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


# Length grouping sorts windows of this many batches, as Hugging Face's group_by_length does.
GROUPING_WINDOW = 50


def group_by_length(
    order: list[int], lengths: Sequence[int], group: int, generator: torch.Generator
) -> list[int]:
    """`order` rearranged into runs of `group` indices of similar length, in a random order of runs.

    Windows of GROUPING_WINDOW runs of the shuffled order are sorted by length and cut into runs;
    the full runs of the whole epoch are then shuffled (long and short batches alternate as in plain
    shuffling) and a final partial run, if any, stays last so every other run remains a whole batch.
    """
    window = group * GROUPING_WINDOW
    runs = []
    for start in range(0, len(order), window):
        ordered = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        runs += [ordered[k : k + group] for k in range(0, len(ordered), group)]
    partial = [runs.pop()] if runs and len(runs[-1]) < group else []
    shuffled = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()] + partial
    return [index for run in shuffled for index in run]


class ResumableSampler(Sampler[int]):
    """Shuffles by (seed, epoch), shards across data-parallel ranks, and can start part-way in.

    With `lengths`, each global batch (batch_size examples on each of world_size ranks) holds
    examples of similar length, so less of it is padding (see group_by_length).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.lengths, self.batch_size = lengths, batch_size
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
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.batch_size * self.world_size, generator)
        else:
            order = list(range(self.size))
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        yield from mine[skip:]

    def __len__(self) -> int:
        return self.per_rank


class ResumableLoader(DataLoader):
    """A training DataLoader that knows its place in the epoch and can be told where to restart.

    Sized loaders are not prefetched by Lightning, so the count of batches handed out is exactly
    the count trained on. The DataModule saves `position()` in checkpoints (Lightning's own loader
    states are skipped when the loader was set up before the checkpoint was restored).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self):
        # A generator: this runs at the first batch, after Lightning has set the sampler's epoch.
        epoch = self.sampler.epoch
        start = self._resume_at[1] if self._resume_at and self._resume_at[0] == epoch else 0
        self._resume_at = None
        self.sampler.skip_next(start * self.batch_size)
        self._epoch, self._batches = epoch, start
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def position(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def resume_at(self, position: dict[str, int]) -> None:
        """Start the next iteration of that epoch after its first `batches` batches."""
        self._resume_at = (position["epoch"], position["batches"])


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
        group_by_length: bool = False,
    ):
        """group_by_length: training batches of examples of similar length, measured by the collate
        function's `length(example)` (see ResumableSampler)."""
        super().__init__()
        self.splits = splits
        self.group_by_length = group_by_length
        self.collate = collate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._train_loader: ResumableLoader | None = None
        self._restored_position: dict[str, int] | None = None

    def train_batches(self, world_size: int) -> int:
        """Training batches per epoch on each of `world_size` data-parallel ranks."""
        return math.ceil((len(self.splits["train"]) // world_size) / self.batch_size)

    def _generator(self) -> torch.Generator:
        # A DataLoader without its own generator draws from the global one each time it is
        # iterated; a resumed run iterates at other moments than an uninterrupted one, so sampling
        # (PPO's rollouts) would diverge.
        return torch.Generator().manual_seed(self.seed)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        items = self.splits["train"]
        lengths = [self.collate.length(item) for item in items] if self.group_by_length else None
        sampler = ResumableSampler(
            len(items), self.seed, rank=rank, world_size=world, lengths=lengths, batch_size=self.batch_size
        )
        self._train_loader = ResumableLoader(
            ListDataset(items),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
            generator=self._generator(),
        )
        if self._restored_position is not None:
            self._train_loader.resume_at(self._restored_position)
        return self._train_loader

    # Saved in and restored from Lightning checkpoints.
    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self._train_loader.position()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored_position = state.get("train_position")
        if self._train_loader is not None and self._restored_position is not None:
            self._train_loader.resume_at(self._restored_position)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._world()
        dataset = ListDataset(self.splits[split])
        sampler = (
            DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=self._generator(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def examples_datamodule(splits: dict, collate, stage, data, seed: int) -> ExamplesDataModule:
    """The DataModule of a stage trained on labelled examples (SFT, RM, DPO): its batch sizes from
    the stage's config node, loading and length grouping from the data's."""
    return ExamplesDataModule(
        splits,
        collate,
        batch_size=stage.batch_size,
        eval_batch_size=stage.eval_batch_size,
        seed=seed,
        num_workers=data.num_workers,
        group_by_length=data.group_by_length,
    )
