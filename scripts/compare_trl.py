"""Training throughput and memory of Hugging Face TRL on the workloads of `python -m rlhf.bench`.

Each workload runs TRL's own trainer (SFTTrainer, RewardTrainer, DPOTrainer, TRL's PPO trainer,
GRPOTrainer) in a subprocess of its own on the same model and data as rlhf.bench with
`model=smollm2-135m bench.synthetic=0`, with the settings rlhf.bench uses: the stage's config
(conf/stage/<stage>.yaml: learning rate, beta, epochs, ...; conf/data/assistant.yaml: lengths and chat
template; conf/config.yaml: gradient clipping 1.0), a batch of rlhf.bench's SETTINGS["batch_size"]
(8), fused AdamW as rlhf/optim.py builds it, no gradient checkpointing, and no logging integration,
saving or evaluation.

- Model: SmolLM2-135M-Instruct as the Hugging Face directory this project converts its packaged GGUF
  into once (rlhf.models.base_location; the tokenizer and its pad token as rlhf.models.load_tokenizer
  gives them). --model-dir takes any other Hugging Face directory (e.g. for a quick check).
- Data: the shipped offline task (written once by rlhf.tasks.assistant.materialize, seed 0, noise
  0.1, into the project's cache): SFT sft/train.jsonl as prompt-completion, RM and DPO
  pairs/train.jsonl as preference pairs with an explicit prompt, PPO and GRPO prompts/train.jsonl.
  The examples are those the project's own preparation keeps (rlhf.data.prepare), rendered with the
  tokenizer's chat template by rlhf.data.tokenize.ChatRenderer exactly as the project renders them,
  handed to TRL as plain text (TRL tokenizes them, capped at data.max_length, 192), and taken in
  the order the project's sampler draws them (seed 0; SFT, RM and DPO length-grouped as
  data.group_by_length=true does): each step trains on the examples of rlhf.bench's step, and the RL
  stages start from the same prompts.
- SFT: batch 8 examples, loss on completion tokens only. RM: 8 pairs per batch, a scalar head
  (AutoModelForSequenceClassification, num_labels=1). DPO: 8 pairs, beta 0.1, sigmoid loss, a
  reference model. PPO: rollout batch 8, 4 PPO epochs, minibatches of stage.minibatch_size (4), so 8
  optimizer steps an iteration, temperature stage.rollout.temperature (0.7), 32 new tokens, a separate
  value model and a reward model, both SmolLM2 with a new scalar head. GRPO: 8 prompts x 4 responses,
  one optimizer step over minibatches of 8, the task's gold annotator as the reward function.

Per workload it prints the TRL version, the precision (and the mixed precision accelerate applied),
the median seconds per optimizer step over the timed steps (after the warm-up steps; a
TrainerCallback's on_step_begin to on_step_end, or for PPO, whose trainer has no on_step_begin, one
on_step_end to the next: whole iterations), the throughput in rlhf.bench's unit (SFT: tokens/s,
all non-padding tokens as rlhf.bench counts them, with the trained (completion) tokens beside;
RM and DPO: pairs/s; PPO and GRPO: episodes/s), summed units over summed timed seconds as
rlhf.bench computes it, and the subprocess's peak resident memory (getrusage ru_maxrss: peak_rss_mb
in MiB as rlhf.bench prints it, peak_rss_gb in GiB). A table, then one JSON line per workload.

TRL in its own virtual environment beside the project's packages (torch and transformers unchanged):

    python -m venv --system-site-packages trl-venv
    trl-venv/bin/pip install --no-deps trl==1.16.0

    trl-venv/bin/python scripts/compare_trl.py --precision fp32
    trl-venv/bin/python scripts/compare_trl.py --precision bf16
    trl-venv/bin/python scripts/compare_trl.py --precision bf16 --only sft,dpo --steps 10
    trl-venv/bin/python scripts/compare_trl.py --bench-commands --precision bf16   # rlhf.bench's side

TRL's PPO trainer left trl in 1.13 (1.10-1.12 ship it as trl.experimental.ppo); with a TRL that lacks
it the PPO row says so and is skipped. For PPO figures, a second environment with TRL 1.12.0:

    python -m venv --system-site-packages trl112-venv
    trl112-venv/bin/pip install --no-deps trl==1.12.0
    trl112-venv/bin/python scripts/compare_trl.py --only ppo --precision fp32

A quick check on the CPU, in a minute or two (what CI runs): --tiny trains model=tiny's random
2-layer shrink of SmolLM2 (its weights written once from the config into the cache), a batch of 4,
one timed step and no warm-up unless given. Without TRL installed, each workload still prepares the
project's side (config, tokenizer, the examples in the project's order) and its row says that TRL is
missing; the run then passes:

    python scripts/compare_trl.py --tiny --only sft,rm,dpo,ppo,grpo

The same workloads through this project (--bench-commands prints them with --steps/--warmup and the
converted model's directory filled in; precision 32-true for fp32, bf16-mixed for bf16; tracking=none
since the TRL runs log nothing):

    python -m rlhf.bench stage=sft model=smollm2-135m bench.synthetic=0 trainer.precision=32-true tracking=none
    python -m rlhf.bench stage=rm model=smollm2-135m bench.synthetic=0 trainer.precision=32-true tracking=none stage.init_from=base
    python -m rlhf.bench stage=dpo model=smollm2-135m bench.synthetic=0 trainer.precision=32-true tracking=none stage.init_from=base
    python -m rlhf.bench stage=ppo model=smollm2-135m bench.synthetic=0 trainer.precision=32-true tracking=none stage.policy_from=base stage.reward_from=<converted SmolLM2 directory>
    python -m rlhf.bench stage=grpo model=smollm2-135m bench.synthetic=0 trainer.precision=32-true tracking=none stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward

Not identical by construction: the project scores a pair's chosen and rejected responses in one
sequence over their shared prompt (stage.share_prefix=true; `--set stage.share_prefix=false` runs
both sides with two full sequences per pair, as TRL does, and keeps the batches equal), computes the LM head only on trained tokens,
stores PPO's frozen reward model in bf16 under bf16-mixed, stops PPO's epochs early on a KL bound
and clips PPO's gradients (TRL's PPO trainer does neither), and normalises rewards; sampled responses
(PPO, GRPO) differ, and so their lengths; each side's step time includes its own per-step metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
UNITS = {"sft": "tokens", "rm": "pairs", "dpo": "pairs", "ppo": "episodes", "grpo": "episodes"}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # this script's name -> Lightning's
RESULT_PREFIX = "COMPARE_TRL_RESULT "
# TRL's PPO trainer: trl.experimental.ppo in TRL 1.10-1.12, trl.PPOTrainer before.
PPO_NOTE = "TRL's PPO trainer is not in this TRL (it shipped up to 1.12.0, as trl.experimental.ppo)"


def bench_batch_size() -> int:
    """rlhf.bench's batch size. Read by the driver and passed to the workers, which then need not import
    rlhf.bench and Lightning, whose memory would count in their peak RSS."""
    from rlhf.bench import SETTINGS

    return SETTINGS["batch_size"]


# -- the project's side: config, model directory, data ---------------------------------------------


def project_run(stage: str, precision: str, batch_size: int, extra: list[str] | None = None):
    """The validated config rlhf.bench composes for `stage` (model=smollm2-135m, the bench's batch),
    with the `extra` overrides (--set)."""
    from hydra import compose, initialize_config_dir

    from rlhf.config import register_configs, validate
    from rlhf.layout import config_dir
    from rlhf.stages import stages

    register_configs(stages())
    overrides = [
        f"stage={stage}",
        "model=smollm2-135m",
        "tracking=none",
        f"trainer.precision={PRECISIONS[precision]}",
        f"output_dir={tempfile.gettempdir()}/compare_trl",
    ]
    if stage in ("ppo", "grpo"):  # rlhf.bench sets the rollout batch to its batch size
        overrides.append(f"stage.rollout.batch_size={batch_size}")
    overrides += extra or []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return validate(cfg)


def model_directory(run, override: str | None) -> str:
    """--model-dir, else the Hugging Face directory the project converts SmolLM2's GGUF into (once)."""
    if override:
        return str(Path(override).expanduser().resolve())
    from rlhf.models import base_location

    return base_location(run.model)


def project_order(run, count: int, batch_size: int, lengths: list[int] | None) -> list[int]:
    """The order in which the project's training loader draws `count` examples: its sampler (rlhf.data.
    loading.ResumableSampler) with the run's seed, length-grouped when `lengths` are given."""
    from rlhf.data.loading import ResumableSampler

    return list(ResumableSampler(count, run.seed, lengths=lengths, batch_size=batch_size))


def sft_rows(run, renderer, batch_size: int) -> list[dict]:
    """The project's SFT training examples (rlhf.data.prepare: read, filtered, truncated as a run
    does) as prompt-completion text, in the order rlhf.bench trains on them."""
    from rlhf.data.prepare import prepare_sft

    prepared = prepare_sft(run.data, renderer, run.seed)
    items = prepared.splits["train"]
    lengths = [len(item["input_ids"]) for item in items] if run.data.group_by_length else None
    prompts, completions = prepared.prompts["train"], prepared.references["train"]
    return [
        {"prompt": renderer.prompt(prompts[k]), "completion": renderer.response(prompts[k], completions[k])}
        for k in project_order(run, len(items), batch_size, lengths)
    ]


def preference_rows(run, renderer, batch_size: int, pad_token_id: int, share_prefix: bool) -> list[dict]:
    """The project's preference pairs as prompt/chosen/rejected text, in the order rlhf.bench trains on
    them: its examples are records (stage.group_by_record; one pair each in the shipped pairs), grouped
    by the length PairCollator gives them (`share_prefix`: the layout the project's collator uses)."""
    from rlhf.data.prepare import PairCollator, group_comparisons, prepare_preferences

    prepared = prepare_preferences(run.data, renderer, run.seed)
    features = prepared.splits["train"]
    if run.stage.group_by_record:
        items = group_comparisons(features)
        records: dict[int, list[int]] = {}
        for k, feature in enumerate(features):  # group_comparisons keeps the records' first-seen order
            records.setdefault(feature["record"], []).append(k)
        members = list(records.values())
    else:
        items, members = features, [[k] for k in range(len(features))]
    collate = PairCollator(pad_token_id, share_prefix=share_prefix, response_tokens=run.stage.name == "dpo")
    lengths = [collate.length(item) for item in items] if run.data.group_by_length else None
    prompts, references = prepared.prompts["train"], prepared.references["train"]
    return [
        {
            "prompt": renderer.prompt(prompts[k]),
            "chosen": renderer.response(prompts[k], references[k][0]),
            "rejected": renderer.response(prompts[k], references[k][1]),
        }
        for g in project_order(run, len(items), batch_size, lengths)
        for k in members[g]
    ]


def prompt_items(run, renderer) -> list[dict]:
    """The project's RL prompts ({prompt, prompt_ids}), in the order its prompt loader draws them."""
    from rlhf.data.prepare import prepare_prompts

    stage = run.stage
    items = prepare_prompts(run.data, renderer, run.seed, stage.rollout.max_new_tokens).splits["train"]
    return [items[k] for k in project_order(run, len(items), stage.rollout.batch_size, None)]


def bench_commands(args) -> list[str]:
    """The `python -m rlhf.bench` commands of the same workloads."""
    base = "python -m rlhf.bench stage={stage} model=smollm2-135m bench.synthetic=0"
    precision, model_dir = args.precision, args.model_dir
    common = f"bench.steps={args.steps} bench.warmup={args.warmup} trainer.precision={PRECISIONS[precision]} tracking=none"
    extra = {"sft": "", "rm": "stage.init_from=base", "dpo": "stage.init_from=base"}
    if args.batch_size != bench_batch_size():
        common += f" bench.batch_size={args.batch_size}"
    if "ppo" in args.only:
        directory = model_dir or model_directory(
            project_run("ppo", precision, args.batch_size, args.set), None
        )
        extra["ppo"] = f"stage.policy_from=base stage.reward_from={directory}"
    extra["grpo"] = "stage.policy_from=base stage.reward_from=fn:rlhf.tasks.assistant.gold_reward"
    if model_dir:  # the same directory as the policy too
        for stage in ("sft", "rm", "dpo"):
            extra[stage] = f"stage.init_from={model_dir}"
        for stage in ("ppo", "grpo"):
            extra[stage] = extra[stage].replace("policy_from=base", f"policy_from={model_dir}")
    sets = " ".join(args.set)
    return [
        " ".join(filter(None, [base.format(stage=stage), common, extra[stage], sets])) for stage in args.only
    ]


# -- timing ------------------------------------------------------------------------------------------


def step_timer(warmup: int, counts: dict, whole_iterations: bool = False, per_step: dict | None = None):
    """A TrainerCallback timing optimizer steps after the first `warmup`: on_step_begin to on_step_end,
    or with `whole_iterations` (a trainer without on_step_begin) from one on_step_end (or the start of
    training) to the next. `counts` is a dict the wrapped compute_loss adds the step's units to;
    `per_step`, units every step has (a trainer whose batches are not seen: PPO's rollouts)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.totals: dict[str, float] = {}
            self.mixed_precision = None
            self._start = 0.0

        def _begin(self):
            counts.clear()
            counts.update(per_step or {})
            self._start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if whole_iterations:
                self._begin()

        def on_step_begin(self, args, state, control, **kwargs):
            if not whole_iterations:
                self._begin()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self._start
            if state.global_step > warmup:
                self.seconds.append(elapsed)
                for name, value in counts.items():
                    self.totals[name] = self.totals.get(name, 0.0) + value
            if whole_iterations:
                self._begin()

    return StepTimer()


def counting(trainer, counts: dict, count) -> None:
    """Wrap trainer.compute_loss so that every micro-batch it sees adds count(inputs) to `counts`."""
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        for name, value in count(inputs).items():
            counts[name] = counts.get(name, 0.0) + float(value)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss


# -- TRL's side ----------------------------------------------------------------------------------------


def training_arguments(run, args, output_dir: str, total_steps: int) -> dict:
    """TrainingArguments shared by the trainers: the stage's optimiser and schedule, the trainer's
    clipping and precision, nothing logged, saved or evaluated."""
    stage = run.stage
    schedule: dict = {"lr_scheduler_type": "constant"}
    if stage.scheduler == "cosine":
        schedule = {
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": stage.min_lr_ratio},
        }
    elif stage.scheduler == "linear":
        schedule = {"lr_scheduler_type": "linear"}  # to 0; the shipped linear schedules end at 0 too
    return dict(
        output_dir=output_dir,
        max_steps=total_steps,
        learning_rate=stage.lr,
        weight_decay=stage.weight_decay,
        adam_beta1=stage.adam_betas[0],
        adam_beta2=stage.adam_betas[1],
        adam_epsilon=stage.adam_eps,
        optim="adamw_torch_fused",
        max_grad_norm=float(run.trainer.get("gradient_clip_val") or 0.0),
        warmup_steps=int(stage.warmup_ratio * total_steps),  # as rlhf.optim.scheduler rounds it
        gradient_checkpointing=run.model.gradient_checkpointing,
        bf16=args.precision == "bf16",
        fp16=False,
        use_cpu=True,
        seed=run.seed,
        data_seed=run.seed,
        dataloader_num_workers=run.data.num_workers,
        train_sampling_strategy="sequential",  # the examples come in the project's order
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        **schedule,
    )


def load_policy(directory: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def load_scalar(directory: str, pad_token_id: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_token_id
    return model


def build_sft(run, args, directory, tokenizer, renderer, common: dict, counts: dict):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = sft_rows(run, renderer, args.batch_size)
    config = SFTConfig(
        **common,
        per_device_train_batch_size=args.batch_size,
        max_length=run.data.max_length,
        completion_only_loss=True,
        packing=False,
        shuffle_dataset=False,
    )
    model = load_policy(directory)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    counting(
        trainer,
        counts,
        lambda b: {
            "tokens": b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel(),
            "trained_tokens": (b["labels"] != -100).sum(),
        },
    )
    return trainer, len(rows)


def pair_counts(batch) -> dict:
    # TRL stacks a batch's chosen sequences, then its rejected ones.
    return {"pairs": batch["input_ids"].shape[0] // 2, "tokens": batch["attention_mask"].sum()}


def build_rm(run, args, directory, tokenizer, renderer, common: dict, counts: dict):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.scalar import supports_attention_masks

    model = load_scalar(directory, tokenizer.pad_token_id)
    share_prefix = run.stage.share_prefix and supports_attention_masks(model)  # as rlhf's RM stage decides
    rows = preference_rows(run, renderer, args.batch_size, tokenizer.pad_token_id, share_prefix)
    config = RewardConfig(
        **common,
        per_device_train_batch_size=args.batch_size,
        max_length=run.data.max_length,
        center_rewards_coefficient=run.stage.center_rewards or None,
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    counting(trainer, counts, pair_counts)
    return trainer, len(rows)


def build_dpo(run, args, directory, tokenizer, renderer, common: dict, counts: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf.policy import packs_pairs

    stage = run.stage
    model = load_policy(directory)
    share_prefix = stage.share_prefix and packs_pairs(model)  # as rlhf's DPO stage decides
    rows = preference_rows(run, renderer, args.batch_size, tokenizer.pad_token_id, share_prefix)
    config = DPOConfig(
        **common,
        per_device_train_batch_size=args.batch_size,
        max_length=run.data.max_length,
        beta=stage.beta,
        loss_type=[stage.loss],
        label_smoothing=stage.label_smoothing,
        precompute_ref_log_probs=stage.precompute_ref,
    )
    # No ref_model: TRL builds the reference from the policy's directory (its default).
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    counting(trainer, counts, pair_counts)
    return trainer, len(rows)


def build_grpo(run, args, directory, tokenizer, renderer, common: dict, counts: dict):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.tasks.assistant import gold_reward as gold

    stage = run.stage
    rows = [
        {"prompt": renderer.prompt(item["prompt"]), "question": item["prompt"]}
        for item in prompt_items(run, renderer)
    ]

    def gold_reward(prompts, completions, question, **kwargs):
        return gold(list(question), list(completions))

    episodes = stage.rollout.batch_size * stage.group_size
    if episodes % stage.minibatch_size:
        raise SystemExit(f"grpo: {episodes} episodes do not split into minibatches of {stage.minibatch_size}")
    config = GRPOConfig(
        **common,
        per_device_train_batch_size=stage.minibatch_size,
        gradient_accumulation_steps=episodes // stage.minibatch_size,  # one optimizer step an iteration
        num_generations=stage.group_size,
        max_completion_length=stage.rollout.max_new_tokens,
        temperature=stage.rollout.temperature,
        top_p=1.0,
        top_k=0,
        beta=stage.kl_coef,
        num_iterations=stage.ppo_epochs,
        epsilon=stage.clip_range,
        scale_rewards="group" if stage.advantage == "grpo" else "batch",
        shuffle_dataset=False,  # the prompts are in the project's order already
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=load_policy(directory),
        reward_funcs=gold_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    counting(
        trainer,
        counts,
        lambda b: {
            "episodes": b["completion_ids"].shape[0],
            "tokens": b["prompt_mask"].sum() + b["completion_mask"].sum(),
        },
    )
    return trainer, len(rows)


def ppo_classes():
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        try:
            from trl import PPOConfig, PPOTrainer
        except ImportError:
            return None
    return PPOConfig, PPOTrainer


def build_ppo(run, args, directory, tokenizer, renderer, common: dict, counts: dict):
    from datasets import Dataset
    from torch.utils.data import DataLoader

    PPOConfig, PPOTrainer = ppo_classes()
    stage = run.stage
    rollout = stage.rollout.batch_size
    if rollout % stage.minibatch_size:
        raise SystemExit(
            f"ppo: a rollout batch of {rollout} does not split into minibatches of {stage.minibatch_size}"
        )
    tokenizer.padding_side = "left"  # prompts are left-padded for generation
    data = Dataset.from_list([{"input_ids": item["prompt_ids"]} for item in prompt_items(run, renderer)])
    total = common.pop("max_steps")  # PPO counts episodes
    config = PPOConfig(
        **common,
        # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps; each of its
        # num_mini_batches minibatches is one micro-batch and one optimizer step (as rlhf's PPO steps).
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // stage.minibatch_size,
        local_rollout_forward_batch_size=rollout,
        total_episodes=rollout * total,
        num_ppo_epochs=stage.ppo_epochs,
        response_length=stage.rollout.max_new_tokens,
        temperature=stage.rollout.temperature,
        stop_token="eos",
        missing_eos_penalty=stage.missing_eos_penalty,
        kl_coef=stage.kl_coef,
        kl_estimator=stage.kl_estimator,
        cliprange=stage.clip_range,
        cliprange_value=stage.value_clip_range,
        vf_coef=stage.vf_coef,
        gamma=stage.gamma,
        lam=stage.lam,
        whiten_rewards=False,
        num_sample_generations=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=load_policy(directory),
        ref_model=load_policy(directory),
        reward_model=load_scalar(directory, tokenizer.pad_token_id),
        value_model=load_scalar(directory, tokenizer.pad_token_id),
        train_dataset=data,
    )
    # TRL's PPO trainer shuffles its prompts; take them in the project's order instead.
    loader = DataLoader(
        data, batch_size=rollout, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
    )
    trainer.dataloader = trainer.accelerator.prepare(loader)
    return trainer, len(data)


BUILDERS = {"sft": build_sft, "rm": build_rm, "dpo": build_dpo, "ppo": build_ppo, "grpo": build_grpo}


def describe(run, batch_size: int) -> str:
    """The workload in rlhf.bench's words."""
    stage = run.stage
    if stage.name == "ppo":
        return f"{run.data.name} prompts, rollout batch {stage.rollout.batch_size}"
    if stage.name == "grpo":
        return f"{run.data.name} prompts, {stage.rollout.batch_size} prompts x {stage.group_size} responses"
    return f"{run.data.name} data, batch {batch_size}"


def project_side(args) -> dict:
    """Without TRL: the project's side of the workload alone (config, tokenizer, the examples in the
    order rlhf.bench trains on them), so that this script's own code still runs, and a row saying so."""
    from rlhf.data.tokenize import ChatRenderer
    from rlhf.models import load_tokenizer

    stage = args.worker
    run = project_run(stage, args.precision, args.batch_size, args.set)
    tokenizer = load_tokenizer(run.model, model_directory(run, args.model_dir))
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    if stage == "sft":
        examples = sft_rows(run, renderer, args.batch_size)
    elif stage in ("rm", "dpo"):
        examples = preference_rows(
            run, renderer, args.batch_size, tokenizer.pad_token_id, run.stage.share_prefix
        )
    else:
        examples = prompt_items(run, renderer)
    return {
        "framework": "trl",
        "stage": stage,
        "precision": args.precision,
        "skipped": f"TRL is not installed (pip install --no-deps trl); {len(examples)} examples prepared",
        "examples": len(examples),
    }


def worker(args) -> dict:
    """Train one workload with TRL in this process and return its figures."""
    if importlib.util.find_spec("trl") is None:
        return project_side(args)
    import torch
    import transformers
    import trl

    from rlhf.data.tokenize import ChatRenderer
    from rlhf.models import load_tokenizer

    stage = args.worker
    base = {"framework": "trl", "trl_version": trl.__version__, "stage": stage, "precision": args.precision}
    if stage == "ppo" and ppo_classes() is None:
        return {**base, "skipped": f"{PPO_NOTE}: TRL {trl.__version__}"}
    if args.precision == "bf16":  # read by accelerate, also by the Accelerator TRL's PPO trainer makes itself
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    run = project_run(stage, args.precision, args.batch_size, args.set)
    directory = model_directory(run, args.model_dir)
    tokenizer = load_tokenizer(run.model, directory)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    total = args.warmup + args.steps
    counts: dict = {}
    with tempfile.TemporaryDirectory(prefix="compare_trl-") as output_dir:
        common = training_arguments(run, args, output_dir, total)
        trainer, examples = BUILDERS[stage](run, args, directory, tokenizer, renderer, common, counts)
        if stage == "ppo":  # whole iterations of a rollout batch of episodes each
            timer = step_timer(args.warmup, counts, True, {"episodes": float(trainer.args.batch_size)})
        else:
            timer = step_timer(args.warmup, counts)
        trainer.add_callback(timer)
        # TRL's own filters (e.g. RewardTrainer drops sequences over max_length) would shift the batches.
        dropped = examples - len(trainer.train_dataset)
        trainer.train()
    figures_note = {"examples_dropped_by_trl": dropped} if dropped else {}
    if not timer.seconds:
        raise SystemExit(f"{stage}: no timed steps (warm-up {args.warmup}, steps {args.steps})")
    unit = UNITS[stage]
    seconds = sum(timer.seconds)
    figures = {
        **base,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "model": "smollm2-135m" if not args.model_dir else directory,
        "workload": describe(run, args.batch_size),
        "warmup_steps": args.warmup,
        "steps_timed": len(timer.seconds),
        "step_time_median_s": round(statistics.median(timer.seconds), 3),
        "step_time_mean_s": round(seconds / len(timer.seconds), 3),
        f"{unit}_per_s": round(timer.totals.get(unit, 0.0) / seconds, 2),
    }
    if unit != "tokens" and "tokens" in timer.totals:
        figures["tokens_per_s"] = round(timer.totals["tokens"] / seconds, 1)
    if "trained_tokens" in timer.totals:
        figures["trained_tokens_per_s"] = round(timer.totals["trained_tokens"] / seconds, 1)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    figures["peak_rss_mb"] = round(peak_kib / 1024, 1)
    figures["peak_rss_gb"] = round(peak_kib / 1024**2, 2)
    figures["torch_threads"] = torch.get_num_threads()
    figures.update(figures_note)
    return figures


# -- the driver ------------------------------------------------------------------------------------------


def run_workload(stage: str, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        stage,
        "--precision",
        args.precision,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.model_dir:
        command += ["--model-dir", args.model_dir]
    for override in args.set:
        command += ["--set", override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[compare_trl] {stage}: running ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((done.stdout + "\n" + done.stderr).strip().splitlines()[-40:])
    print(f"[compare_trl] {stage}: failed (exit {done.returncode}); last lines:\n{tail}", file=sys.stderr)
    return {
        "framework": "trl",
        "stage": stage,
        "precision": args.precision,
        "error": f"exit {done.returncode}",
    }


def table(results: list[dict]) -> str:
    header = ("stage", "trl", "precision", "s/step (median)", "throughput", "peak RSS GB")
    rows = []
    for r in results:
        if "skipped" in r or "error" in r:
            rows.append(
                (
                    r["stage"],
                    r.get("trl_version", "?"),
                    r["precision"],
                    "-",
                    r.get("skipped") or r["error"],
                    "-",
                )
            )
            continue
        unit = UNITS[r["stage"]]
        rows.append(
            (
                r["stage"],
                r["trl_version"],
                f"{r['precision']} ({r['mixed_precision']})",
                f"{r['step_time_median_s']:.3f}",
                f"{r[f'{unit}_per_s']:.2f} {unit}/s",
                f"{r['peak_rss_gb']:.2f}",
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="fp32, or bf16 mixed precision (TrainingArguments bf16=True; rlhf: bf16-mixed)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps (rlhf.bench: bench.steps; 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (rlhf.bench: bench.warmup; 1)"
    )
    parser.add_argument(
        "--only", default="sft,rm,dpo,ppo", help=f"comma-separated workloads of {','.join(STAGES)}"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="SFT examples, RM/DPO pairs per step (default: rlhf.bench's SETTINGS['batch_size'])",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="a Hugging Face directory instead of the converted SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a project config override for both sides (Hydra syntax, repeatable), e.g. "
        "stage.share_prefix=false (with --only rm,dpo: every selected stage must have the key); "
        "--bench-commands adds it to rlhf.bench's commands",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="model=tiny's random weights, batch 4, 1 step, no warm-up: a quick check on the CPU",
    )
    parser.add_argument(
        "--bench-commands",
        action="store_true",
        help="print the matching `python -m rlhf.bench` commands and exit",
    )
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown workload {unknown[0]!r}; choose from {','.join(STAGES)}")
    if args.tiny and not args.worker:
        defaults = {"steps": 1, "warmup": 0, "batch_size": 4}
        args.model_dir = args.model_dir or tiny_model_dir()
    else:
        defaults = {"steps": 5, "warmup": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.batch_size is None:
        args.batch_size = bench_batch_size()
    return args


def tiny_model_dir() -> str:
    """model=tiny's random weights (seed 0) as a Hugging Face directory, written once into the cache."""
    from hydra import compose, initialize_config_dir

    from rlhf.config import register_configs, validate
    from rlhf.layout import config_dir
    from rlhf.models import cache_root, load_causal_lm, load_tokenizer, save_model
    from rlhf.stages import stages

    register_configs(stages())
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        run = validate(compose("config", overrides=["model=tiny", "tracking=none", "output_dir=/tmp/unused"]))
    target = cache_root() / "compare_trl-tiny"
    if not (target / "config.json").is_file():
        save_model(load_causal_lm(run.model, seed=0), load_tokenizer(run.model), target)
    return str(target)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return
    if args.bench_commands:
        print("\n".join(bench_commands(args)))
        return
    results = [run_workload(stage, args) for stage in args.only]
    print(table(results))
    print()
    for result in results:
        print(json.dumps(result))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
