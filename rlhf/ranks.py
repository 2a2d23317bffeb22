"""The processes of a data-parallel job: which one this is, starting them, and what rank 0 decides.

However a job is launched, its processes are joined into one process group at its start, before any
source is resolved: Lightning's launcher starts the other ranks when it runs alone (`python -m rlhf
hardware=ddp`), while torchrun, SLURM's srun and submitit start every rank themselves and Lightning
detects them. Rank 0 then decides what must be the same on every rank (model sources, the MLflow run,
the output directory, the resume point) and broadcasts it; nothing travels through the environment,
which only a child process of rank 0 would inherit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# Strategies whose ranks are whole processes running this program, started by Lightning's script
# launcher or by the cluster (spawn, fork and notebook variants run a function in children instead).
PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")
# Sampling seeds of different ranks are this far apart, so runs with nearby seeds draw apart too.
RANK_SEED_STRIDE = 1000

_solo = False


def _group() -> Any:
    """torch.distributed when its process group is up; torch is not imported for the answer."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank() -> int:
    """This process's global rank: from the process group once it is up, before that from the variables
    every launcher sets (torchrun RANK, SLURM SLURM_PROCID, Lightning's LOCAL_RANK and NODE_RANK)."""
    dist = _group()
    if dist is not None:
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return max(int(os.environ.get(var, "0")) for var in ("LOCAL_RANK", "NODE_RANK"))


def is_rank_zero() -> bool:
    """True in the process that records the run and decides for the others."""
    return rank() == 0


def _launches_processes(strategy: Any) -> bool:
    name = str(strategy or "auto").lower()
    if any(word in name for word in ("spawn", "fork", "notebook")):
        return False
    return name == "auto" or name.startswith(PROCESS_STRATEGIES)


def join(trainer: dict[str, Any]) -> None:
    """Start the job's other processes if nobody else has, and join the process group, as the
    configured Trainer would at fit: after this every rank runs the same code in step."""
    if _group() is not None or not _launches_processes(trainer.get("strategy")):
        return
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        fabric = Fabric(
            accelerator=trainer.get("accelerator", "auto"),
            devices=trainer.get("devices", "auto"),
            num_nodes=trainer.get("num_nodes", 1),
            # Only to start the processes and the group (gloo on CPU, NCCL on GPUs); the Trainer's own
            # strategy (ddp, fsdp, deepspeed) finds the group up and uses it.
            strategy="ddp",
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
        from rlhf.errors import trainer_error

        raise trainer_error(err, trainer) from None
    if fabric.world_size > 1:
        fabric.launch()


class RankZeroError(RuntimeError):
    """Rank 0 failed on something every rank waited for; the other ranks stop with its message."""


def share(compute: Callable[[], T]) -> T:
    """compute()'s result on rank 0, handed to every rank; its error raised on every rank. Without a
    process group (one process), or in a solo() block, each process computes its own."""
    dist = _group()
    if dist is None or _solo or dist.get_world_size() == 1:
        return compute()
    from rlhf.errors import UserError

    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = (True, compute())
        except UserError as err:  # plain to pickle, and the other ranks print the same one line
            failure, outcome[0] = err, (False, err)
        except BaseException as err:
            failure, outcome[0] = err, (False, RankZeroError(f"rank 0 failed: {type(err).__name__}: {err}"))
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@contextmanager
def solo() -> Iterator[None]:
    """A block rank 0 runs alone (a stage that trains nothing): share() asks no other rank."""
    global _solo
    previous, _solo = _solo, True
    try:
        yield
    finally:
        _solo = previous


def sampling_seed(seed: int, global_rank: int | None = None) -> int:
    """The seed of a rank's sampling generator: the run's seed, offset by the rank, so each rank draws
    its own responses (N ranks give N times the independent episodes) and a rerun draws them again."""
    return seed + RANK_SEED_STRIDE * (rank() if global_rank is None else global_rank)
