"""Will it fit? The memory per device of a stage, estimated from the model's config alone.

Pure arithmetic on a `ModelShape` (read from a transformers config: no weights load), the stage's
`Footprint` (which models it holds and the passes it runs, described by the stage itself in its
descriptor) and the run's precision, strategy, LoRA and batch. The components, in bytes per device:

- weights: every model the stage holds, fp32 under 32-true and bf16-mixed (master weights), bf16
  under bf16-true; frozen scoring models that the stage stores in bf16 under bf16 precisions;
- gradients and AdamW's two moments: of the trained parameters only (LoRA: the adapters), in fp32
  except under bf16-true; bf16-mixed also keeps autocast's bf16 copies of the trained weights;
- activations: what a training pass saves for its backward pass, per layer per token (the tensors a
  Llama-style decoder layer keeps), or only each layer's input plus one layer's worth when
  activations are recomputed (model.gradient_checkpointing);
- logits: the vocabulary-sized output of the training pass, its log-softmax and their gradient;
- KV cache: keys and values of every layer for a generation batch.

Sharded strategies divide what they shard by the number of devices: FSDP shards weights, gradients
and optimizer state; DeepSpeed's ZeRO stage 1 the optimizer state, stage 2 gradients too, stage 3
all three. DDP replicates everything and adds a gradient-sized bucket for the all-reduce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf.config import RunConfig

GIB = 2**30
# Elements a Llama-style decoder layer saves for backward, per token, in units of the hidden size
# (H), the attention width (A = heads x head_dim), the key/value width (K) and the MLP width (I):
# the two norms' inputs and outputs, q, the expanded keys and values, the attention output and the
# o_proj input, the gate, up, activation and product of the MLP.
SAVED_H, SAVED_A, SAVED_K, SAVED_I = 4, 4, 2, 4
# The vocabulary head's loss never holds the whole (tokens x vocabulary) logits: rlhf.policy computes
# it in chunks of this many rows (two fp32 buffers of chunk x vocabulary at a time), and keeps a
# log-probability pass's softmax for its backward pass while it has at most SOFTMAX_KEPT elements.
LOSS_CHUNK = 1024
SOFTMAX_KEPT = 2**26
# What a process holds besides the tensors counted here: on the CPU the interpreter and libraries,
# the tokenizer and the data; on a GPU, cuBLAS workspaces and the allocator's reserve (the CUDA
# context is already outside the free memory the estimate is compared with).
RUNTIME = {"cpu": 0.7 * 2**30, "gpu": 0.25 * 2**30}
# What the estimate adds to the tensors for the allocator's fragmentation.
OVERHEAD = 0.10


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    # Gated MLPs (Llama's SwiGLU) have three matrices, GPT-2's and Pythia's two.
    mlp_matrices: int = 3

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its dict (config.json's keys)."""
        get = (
            config.get
            if isinstance(config, dict)
            else lambda key, default=None: getattr(config, key, default)
        )

        def first(*keys, default=None):
            return next((get(k) for k in keys if get(k) is not None), default)

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        gated = str(first("hidden_act", "activation_function", default="silu")) in ("silu", "swiglu")
        return cls(
            hidden=hidden,
            layers=int(first("num_hidden_layers", "n_layer")),
            heads=heads,
            kv_heads=int(first("num_key_value_heads", default=heads)),
            head_dim=int(first("head_dim", default=hidden // heads)),
            intermediate=int(first("intermediate_size", "n_inner", default=4 * hidden)),
            vocab=int(first("vocab_size")),
            tied=bool(first("tie_word_embeddings", default=True)),
            mlp_matrices=3 if gated else 2,
        )

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, a, k, i = self.hidden, self.attention_width, self.kv_width, self.intermediate
        mlp = [(h, i)] * (self.mlp_matrices - 1) + [(i, h)]
        return [(h, a), (h, k), (h, k), (a, h), *mlp]

    def parameters(self, lm_head: bool = True) -> int:
        """All parameters; a scalar-head model (reward, value) has a one-output head instead."""
        per_layer = sum(n * m for n, m in self.layer_linears()) + 2 * self.hidden
        embed = self.vocab * self.hidden
        head = (0 if self.tied else embed) if lm_head else self.hidden
        return self.layers * per_layer + embed + head + self.hidden

    def lora_parameters(self, r: int) -> int:
        """Adapters of rank r on every linear layer of the decoder (PEFT's all-linear)."""
        return self.layers * sum(r * (n + m) for n, m in self.layer_linears())

    def saved_per_token_layer(self) -> int:
        """Elements one layer saves for backward per token."""
        return (
            SAVED_H * self.hidden
            + SAVED_A * self.attention_width
            + SAVED_K * self.kv_width
            + SAVED_I * self.intermediate
        )


@dataclass(frozen=True)
class Held:
    """A model a stage keeps on the device."""

    role: str
    trained: bool
    # A one-output head (reward, value) instead of the vocabulary head.
    scalar: bool = False
    # Frozen and stored in bf16 under bf16 precisions (rlhf.models.store_frozen_in_bf16).
    bf16_when_mixed: bool = False


@dataclass(frozen=True)
class Pass:
    """A batch of `sequences` sequences of `length` tokens through the models named in `roles`."""

    sequences: int
    length: int
    roles: tuple[str, ...] = ("policy",)
    # Log-probabilities of the tokens (DPO, PPO, GRPO), whose softmax may be kept for backward,
    # rather than a summed cross-entropy (SFT).
    logprobs: bool = False
    # Tokens of each sequence that go through the vocabulary head (None: all; PPO: the response).
    head_length: int | None = None


@dataclass(frozen=True)
class Footprint:
    """What a stage holds and runs per device per step, from its config (Stage.footprint)."""

    models: tuple[Held, ...]
    # The largest pass with gradients (activations kept for backward).
    train: Pass | None = None
    # The largest generation batch (KV cache of prompt plus new tokens).
    generate: Pass | None = None
    # The stage key that sets `train.sequences`, which a smaller batch would change.
    batch_key: str | None = None


@dataclass(frozen=True)
class Setting:
    """The run's choices that change the memory, as plain values."""

    precision: str = "32-true"
    # None, "ddp", "fsdp" or "deepspeed_stage_<n>".
    strategy: str | None = None
    devices: int = 1
    # cpu or gpu: what the process holds besides tensors (RUNTIME).
    accelerator: str = "gpu"
    lora_rank: int | None = None
    checkpointing: bool = False

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision.endswith("-true") and self.precision[:2] in ("bf", "16") else 4

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision in ("32-true", "32", "64-true") else 2

    def shards(self, what: str) -> int:
        """By how many devices `what` (weights, gradients, optimizer) is divided."""
        name = self.strategy or ""
        if name.startswith("fsdp"):
            return self.devices
        if name.startswith("deepspeed"):
            level = int(name[-1]) if name[-1].isdigit() else 2
            needed = {"optimizer": 1, "gradients": 2, "weights": 3}[what]
            return self.devices if level >= needed else 1
        return 1


# Components that never peak together: the KV cache lives only while a batch is generated; the
# activations and the loss's logits until the backward pass has used them, while the gradients fill
# in during that pass (and are released by the step, rlhf.optim). The peak is the largest group.
GENERATION = ("kv cache",)
TRAINING = ("activations", "logits")
BACKWARD = ("gradients",)


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by component."""

    components: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        c = self.components
        groups = (GENERATION, TRAINING, BACKWARD)
        kept = sum(v for k, v in c.items() if not any(k in group for group in groups))
        return kept + max(sum(c.get(k, 0.0) for k in group) for group in groups)

    def lines(self, available: float | None = None, where: str = "") -> list[str]:
        out = [f"{name:<12} {value / GIB:9.2f} GiB" for name, value in self.components.items()]
        total = f"{'total':<12} {self.total / GIB:9.2f} GiB"
        if any(k in self.components for k in GENERATION + BACKWARD):
            total += " (kv cache, activations + logits and gradients at different times: the largest counts)"
        if available is not None:
            total += f"; {available / GIB:.2f} GiB on {where or 'the device'}"
        return [*out, total]


def estimate(shape: ModelShape, footprint: Footprint, setting: Setting) -> Estimate:
    """Peak memory per device of one step of a stage."""
    if footprint.train is None:  # nothing trains: no strategy wraps (or shards) the models
        setting = dataclasses.replace(setting, strategy=None)
    wb, ab = setting.weight_bytes, setting.activation_bytes
    bf16 = setting.precision.startswith("bf16")
    weights = trained = 0.0
    for model in footprint.models:
        n = shape.parameters(lm_head=not model.scalar)
        if setting.lora_rank and model.trained:
            # The base stays frozen; only the adapters (kept in fp32 by PEFT) and a scalar head train.
            adapters = shape.lora_parameters(setting.lora_rank) + (shape.hidden if model.scalar else 0)
            weights += n * wb + adapters * 4
            trained += adapters
            continue
        weights += n * (2 if model.bf16_when_mixed and bf16 else wb)
        if model.trained:
            trained += n
    grad_bytes = 2 if wb == 2 else 4
    components = {"weights": weights / setting.shards("weights")}
    if trained:
        components["gradients"] = trained * grad_bytes / setting.shards("gradients")
        components["optimizer"] = 2 * trained * grad_bytes / setting.shards("optimizer")
        if setting.precision == "bf16-mixed":
            components["bf16 copies"] = trained * 2 / setting.shards("weights")
        if (setting.strategy or "").startswith("ddp") and setting.devices > 1:
            components["ddp buckets"] = trained * grad_bytes
    if footprint.train is not None:
        tokens = footprint.train.sequences * footprint.train.length
        per_token_layer = shape.saved_per_token_layer()
        if setting.checkpointing:
            per_model = tokens * (shape.layers * shape.hidden + per_token_layer) * ab
        else:
            per_model = tokens * shape.layers * per_token_layer * ab
        components["activations"] = per_model * len(footprint.train.roles)
        heads = sum(1 for role in footprint.train.roles if not _held(footprint, role).scalar)
        if heads:
            # In fp32 whatever the precision.
            scored = footprint.train.sequences * (footprint.train.head_length or footprint.train.length)
            rows = 2 * min(scored, LOSS_CHUNK)
            if footprint.train.logprobs and scored * shape.vocab <= SOFTMAX_KEPT:
                rows += scored
            components["logits"] = heads * rows * shape.vocab * 4
    if footprint.generate is not None:
        g = footprint.generate
        components["kv cache"] = 2 * shape.layers * shape.kv_width * g.sequences * g.length * ab
    components["overhead"] = OVERHEAD * Estimate(components).total
    components["runtime"] = RUNTIME["cpu" if setting.accelerator == "cpu" else "gpu"]
    return Estimate(components)


def _held(footprint: Footprint, role: str) -> Held:
    return next(m for m in footprint.models if m.role == role)


# -- a run's estimate ---------------------------------------------------------------------------------


def setting_of(run: RunConfig, devices: int, accelerator: str) -> Setting:
    """The memory-relevant choices of a validated run on `devices` devices in all."""
    strategy = str(run.trainer.get("strategy") or "auto").lower()
    return Setting(
        precision=str(run.trainer.get("precision", "32-true")),
        strategy=None if strategy == "auto" else strategy,
        devices=devices,
        accelerator=accelerator,
        lora_rank=run.model.lora.r if run.model.lora.enabled else None,
        checkpointing=run.model.gradient_checkpointing,
    )


@dataclass(frozen=True)
class Devices:
    """Where a run goes: how many devices in all, which kind, and the bytes one process may use."""

    count: int
    accelerator: str
    available: float
    # What `available` is, for the messages ("GPU NVIDIA H200 (free)", ...).
    described: str = ""


def estimate_run(run: RunConfig, shape: ModelShape, devices: Devices) -> Estimate:
    from rlhf.stages import get_stage

    setting = setting_of(run, devices.count, devices.accelerator)
    return estimate(shape, get_stage(run.stage.name).footprint(run), setting)


def replaced(run: RunConfig, key: str, value: Any) -> RunConfig:
    """A copy of `run` with one dotted key replaced (model.lora.enabled, stage.batch_size, ...)."""
    group, _, name = key.partition(".")
    if group == "trainer":
        return dataclasses.replace(run, trainer={**run.trainer, name: value})
    if key == "model.lora.enabled":
        return dataclasses.replace(
            run, model=dataclasses.replace(run.model, lora=dataclasses.replace(run.model.lora, enabled=value))
        )
    return dataclasses.replace(run, **{group: dataclasses.replace(getattr(run, group), **{name: value})})


def remedies(run: RunConfig, shape: ModelShape, devices: Devices) -> tuple[list[str], list[str]]:
    """(the keys tried, the single changes that would bring the estimate under what the device has,
    as command-line overrides with their estimates)."""
    from rlhf.hardware import strategy_family
    from rlhf.stages import get_stage

    stage = get_stage(run.stage.name)
    tries: list[tuple[str, RunConfig]] = []
    if not run.model.lora.enabled:
        tries.append(("model.lora.enabled=true", replaced(run, "model.lora.enabled", True)))
    sharded = strategy_family(run.trainer.get("strategy")) == "fsdp"
    if devices.count > 1 and not sharded and "fsdp" not in stage.refused_strategies:
        tries.append(("hardware=fsdp", replaced(run, "trainer.strategy", "fsdp")))
    if not run.model.gradient_checkpointing:
        tries.append(
            ("model.gradient_checkpointing=true", replaced(run, "model.gradient_checkpointing", True))
        )
    precision = str(run.trainer.get("precision"))
    for other in ("bf16-mixed", "bf16-true"):
        if precision not in (other, "bf16-true"):
            tries.append((f"trainer.precision={other}", replaced(run, "trainer.precision", other)))
    key = stage.footprint(run).batch_key
    size = getattr(run.stage, key) // 2 if key else 0
    while size >= 1:  # the largest batch that fits
        smaller = replaced(run, f"stage.{key}", size)
        if estimate_run(smaller, shape, devices).total <= devices.available:
            tries.append((f"stage.{key}={size}", smaller))
            break
        size //= 2
    fits = []
    for override, changed in tries:
        total = estimate_run(changed, shape, devices).total
        if total <= devices.available:
            fits.append(f"{override} ({total / GIB:.1f} GiB)")
    tried = [override.partition("=")[0] for override, _ in tries]
    if key and f"stage.{key}" not in tried:
        tried.append(f"stage.{key}")
    return tried, fits


def refusal(run: RunConfig, shape: ModelShape, devices: Devices) -> str | None:
    """None if the run fits, else the one line that refuses it, naming what would make it fit."""
    total = estimate_run(run, shape, devices).total
    if total <= devices.available:
        return None
    tried, fixes = remedies(run, shape, devices)
    head = (
        f"memory: stage={run.stage.name} with model={run.model.name} needs about {total / GIB:.1f} GiB per device, "
        f"{devices.described or 'the device'} has {devices.available / GIB:.1f} GiB"
    )
    if fixes:
        advice = "; it would fit with " + ", or ".join(fixes)
    else:
        advice = f"; no single change of {', '.join(tried)} makes it fit: combine them or use more devices"
    return head + advice + " (memory_check=false runs it anyway)"
