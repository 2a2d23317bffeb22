"""Fully sharded data parallel (`trainer.strategy=fsdp`): PyTorch's FSDP2 through Lightning's
ModelParallelStrategy.

Each decoder layer is one unit and the weights outside the layers (embeddings, final norm, head)
another (`Root`), each sharded over every process, so a process holds 1/N of the weights, gradients
and optimizer state, and gathers a unit's weights only while it computes with it. Lightning's strategy starts the ranks, builds the device mesh, and saves and loads
sharded checkpoints (one directory, each rank writing its shards); the LightningModule applies the
sharding in `configure_model`, which `Sharded` provides for the stages that train with Lightning's
own loop (SFT, RM, DPO).

FSDP2 keeps its parameters as DTensors, so gradient clipping by norm (`trainer.gradient_clip_val`,
through Lightning's precision plugin) computes the norm of the whole model's gradient across ranks,
as one process would. Under bf16-mixed the sharded fp32 weights are cast by autocast as elsewhere;
the weights, not only their products, stay fp32.

A sharded model cannot run on one rank alone, and its state dict holds shards: when training ends,
`gather_on_rank_zero` assembles every sharded model's full weights on rank 0 (all ranks take part)
into a plain copy, which saves one Hugging Face directory and samples there as an unsharded model
would.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def lightning_strategy(strategy: Any, world_size: int) -> Any:
    """The Lightning strategy for trainer.strategy: FSDP2 sharded over all `world_size` processes
    (data parallel only: one tensor-parallel rank each) for `fsdp`, else the setting unchanged."""
    from rlhf.hardware import FSDP2

    if str(strategy).lower() != FSDP2:
        return strategy
    from pytorch_lightning.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True
    )


def blocks(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes, the decoder
    layers), each sharded as one unit: its weights are gathered together for its forward pass. A
    model that names none is sharded as one unit, its Root."""
    from rlhf.models import unwrap

    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    return (m for m in model.modules() if type(m).__name__ in names)


class Root(torch.nn.Module):
    """The unit that shards a model's weights outside its blocks (embeddings, final norm, head).

    Its forward runs any function of the model. The project's losses call a model's body and head
    separately (the head's matrix product is fused into the loss), which a call of the sharded model
    itself would not allow: FSDP gathers a unit's weights, and reduces their gradients after the
    backward pass, only around the unit's own forward call. Run through this unit, such a function
    finds every weight gathered and every gradient reduced.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, function, *args, **kwargs):
        return function(self.model, *args, **kwargs)


def shard(model: torch.nn.Module, mesh: DeviceMesh) -> Root:
    """Shard `model` in place over `mesh`: each block, then the rest (embeddings, head) in the Root
    returned, through which every computation with the model must run."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    root = Root(model)
    fully_shard(root, mesh=mesh)
    return root


def meta_replica(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules whose parameters are empty (on the meta device, so it costs no
    memory) and whose buffers are real: the shape a full state dict is later loaded into. Parameters
    shared between modules (tied embeddings) stay shared."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def filled(replica: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`replica` (a meta_replica) holding the tensors of a full state dict as its weights."""
    from rlhf.models import unwrap

    replica.load_state_dict(state_dict, assign=True)
    config = getattr(unwrap(replica), "config", None)
    if getattr(config, "tie_word_embeddings", False):
        unwrap(replica).tie_weights()  # loading assigns each key its own tensor
    return replica


def full_weights(model: torch.nn.Module, replica: torch.nn.Module) -> torch.nn.Module | None:
    """Assemble a sharded model's full weights (every rank must call this) into `replica` on rank 0,
    on the CPU; None on the other ranks."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return filled(replica, full) if dist.get_rank() == 0 else None


class Sharded:
    """Shards the LightningModule's models named in `sharded` when Lightning runs it under FSDP
    (ModelParallelStrategy gives it a device mesh); under any other strategy it does nothing.
    Put before pl.LightningModule among the bases."""

    sharded: tuple[str, ...] = ("model",)
    # Per sharded model: the Root every computation runs through, and its replica for the full
    # weights. None until configure_model has run under FSDP (and again once gathered: empty).
    _shards: dict[str, tuple[Root, torch.nn.Module]] | None = None

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or self._shards is not None:  # not sharded, or sharded already (validate, then fit)
            return
        self._shards = {}
        for name in self.sharded:
            model = getattr(self, name)
            if model is not None:
                replica = meta_replica(model)  # before sharding: the plain modules
                self._shards[name] = (shard(model, mesh["data_parallel"]), replica)

    def call(self, name: str, function, *args, **kwargs):
        """function(<the model named `name`>, *args, **kwargs), through its Root when it is sharded."""
        if self._shards and name in self._shards:
            return self._shards[name][0](function, *args, **kwargs)
        return function(getattr(self, name), *args, **kwargs)

    def gather_on_rank_zero(self) -> None:
        """Replace each sharded model by a plain one with its full weights on rank 0, so that it
        saves and samples there; every rank must call this. Nothing happens when nothing is sharded."""
        if not self._shards:
            return
        for name, (_, replica) in self._shards.items():
            full = full_weights(getattr(self, name), replica)
            if full is not None:
                setattr(self, name, full)
        self._shards = {}
