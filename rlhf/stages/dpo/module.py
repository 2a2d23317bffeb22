"""Direct preference optimisation: the policy's log-ratio to a frozen reference as an implicit reward,
fitted to preference pairs with the losses of rlhf.preference.dpo_loss.

Pairs come through the reward model's data path (every preference format, a ranking's pairs batched
by record, chosen and rejected packed over their shared prompt), and each response's log-probability
is the sum over its own tokens (the prompt masked) from one forward pass of the batch. The reference
is the initial policy: a frozen copy, the policy with its LoRA adapters off, or (stage.precompute_ref)
its log-probabilities computed once before training and carried with the examples.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from rlhf import models, optim, rl
from rlhf.config import RunConfig
from rlhf.data.loading import examples_datamodule
from rlhf.data.prepare import (
    PairCollator,
    as_comparisons,
    count_pairs,
    group_comparisons,
    prepare_preferences,
)
from rlhf.data.tokenize import ChatRenderer, encode_prompts
from rlhf.lineage import resolve_source
from rlhf.policy import Sampler, episode_inputs, packs_pairs, response_logprobs, sequence_logprobs
from rlhf.preference import dpo_loss, preference_accuracy
from rlhf.rewards import load_gold
from rlhf.sharding import Sharded
from rlhf.stages import StageJob
from rlhf.stages.dpo import STAGE, DPOStageConfig
from rlhf.tracking import Tracker
from rlhf.training import HeldOutSteps, Throughput, final_metrics, logs_this_step

log = logging.getLogger(__name__)

# Per-pair values kept for a split's metrics: loss, implicit rewards, policy log-probabilities.
_COLUMNS = ("loss", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def pair_metrics(prefix: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics over pairs, from (P, 5) rows of _COLUMNS. A tie of the implicit rewards
    counts half an accurate pair (all pairs tie at the start, where the policy is the reference)."""
    loss, chosen, rejected, chosen_logp, rejected_logp = rows.float().unbind(1)
    return {
        f"{prefix}/loss": loss.mean(),
        f"{prefix}/rewards/chosen": chosen.mean(),
        f"{prefix}/rewards/rejected": rejected.mean(),
        f"{prefix}/rewards/margins": (chosen - rejected).mean(),
        f"{prefix}/rewards/accuracies": preference_accuracy(chosen, rejected),
        f"{prefix}/logps/chosen": chosen_logp.mean(),
        f"{prefix}/logps/rejected": rejected_logp.mean(),
    }


class DPOModule(Sharded, HeldOutSteps, pl.LightningModule):
    sharded = ("policy", "reference")

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        stage: DPOStageConfig,
        collate: PairCollator | None = None,
    ):
        """reference None: the policy with its LoRA adapters off, or with stage.precompute_ref the
        log-probabilities `collate` batches carry (computed in `setup`, before any checkpoint loads)."""
        super().__init__()
        # The reference is rebuilt from its source on resume, not stored in checkpoints.
        self.strict_loading = False
        self.policy = policy.train()  # from_pretrained returns eval mode; training wants train mode
        self.reference = reference
        self.stage = stage
        self.collate = collate
        # Log-probabilities of the same tokens must not change between the policy's and the
        # reference's passes: at the start the loss is then exactly log 2 (sigmoid).
        models.disable_dropout(policy)
        if reference is not None:
            models.disable_dropout(reference)
            reference.requires_grad_(False).eval()
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._precomputed = False

    # -- log-probabilities --------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(N,) summed log-probabilities of the batch's responses under the reference."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.reference is not None:
            return self.call("reference", sequence_logprobs, batch)
        if self.stage.precompute_ref:
            raise RuntimeError("stage.precompute_ref: the batch carries no reference log-probabilities")
        with self.policy.disable_adapter():
            return self.call("policy", sequence_logprobs, batch)

    def _pair_terms(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses (P,) and the (P, 5) rows of _COLUMNS."""
        policy = self.call("policy", sequence_logprobs, batch)
        reference = self.reference_logps(batch).to(policy.dtype)
        if self.stage.loss == "ipo":  # IPO compares per-token means, as TRL does
            lengths = torch.bincount(batch["target_response"], minlength=policy.shape[0]).clamp(min=1)
            policy, reference = policy / lengths, reference / lengths
        better, worse = batch["pair_index"].unbind(1)
        losses, chosen_reward, rejected_reward = dpo_loss(
            policy[better],
            policy[worse],
            reference[better],
            reference[worse],
            self.stage.beta,
            self.stage.loss,
            self.stage.label_smoothing,
        )
        rows = torch.stack(
            [
                losses.detach(),
                chosen_reward,
                rejected_reward,
                policy[better].detach(),
                policy[worse].detach(),
            ],
            dim=1,
        )
        return losses, rows

    # -- reference precomputation -------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint: the policy is still the initial one.
        if not self.stage.precompute_ref or self._precomputed or self.trainer.datamodule is None:
            return
        self._precomputed = True
        self.to(self.trainer.strategy.root_device)
        datamodule = self.trainer.datamodule
        # Under the precision the steps compute the policy's log-probabilities in (bf16-mixed:
        # autocast), so that at the start policy and reference agree and the loss is log 2.
        with self.trainer.precision_plugin.forward_context():
            for features in datamodule.splits.values():
                attach_reference_logps(
                    self.policy, self.collate, features, datamodule.eval_batch_size, self.device
                )
        log.info(
            "Reference log-probabilities computed for %d examples", sum(map(len, datamodule.splits.values()))
        )

    # -- steps --------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, rows = self._pair_terms(batch)
        loss = losses.mean()
        if logs_this_step(self.trainer):
            metrics = pair_metrics("train", rows)
            self.log_dict(metrics, on_step=True, on_epoch=False)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
            self.log(
                "acc",
                metrics["train/rewards/accuracies"],
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                logger=False,
            )
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        _, rows = self._pair_terms(batch)
        self._rows.setdefault(split, []).append(rows)

    def _eval_epoch_end(self, split: str, prefix: str) -> None:
        rows = torch.cat(self._rows.pop(split))
        rows = self.all_gather(rows).reshape(-1, len(_COLUMNS))  # every rank's pairs
        self.log_dict(pair_metrics(prefix, rows), sync_dist=True)

    def _has_eval(self, split: str) -> bool:
        return bool(self._rows.get(split))

    def configure_optimizers(self):
        return optim.configure(self.policy.named_parameters(), self.stage, self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")
        }


@torch.no_grad()
def attach_reference_logps(
    model: torch.nn.Module, collate: PairCollator, features: list[dict], batch_size: int, device: torch.device
) -> None:
    """Store each example's responses' summed log-probabilities under `model` in the example
    ("reference_logps", in the order of as_comparisons' responses), for the collator to carry."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logps = sequence_logprobs(model, batch).tolist()
            offset = 0
            for feature in chunk:
                count = len(as_comparisons(feature)["responses"])
                feature["reference_logps"] = logps[offset : offset + count]
                offset += count
    finally:
        model.train(was_training)


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: DPOStageConfig = run.stage
    source = resolve_source(
        stage.init_from, "stage.init_from", STAGE.sources["init_from"], tracker, STAGE.accepts["init_from"]
    )
    tokenizer = models.load_tokenizer(run.model, source.location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    gold = load_gold(run.data.gold_reward, run.data.preference.path)
    # Data before weights: a bad file fails in seconds, not after the model has loaded.
    data = prepare_preferences(run.data, renderer, run.seed)
    prompts = data.prompts  # before grouping: one per pair
    if stage.group_by_record:
        data.splits = {split: group_comparisons(features) for split, features in data.splits.items()}
    tracker.log_constants(data.stats)
    policy = models.load_causal_lm(run.model, source.location, seed=run.seed)
    reference = None
    if run.model.lora.enabled:
        policy = models.apply_lora(policy, run.model.lora, "CAUSAL_LM")
    elif not stage.precompute_ref:
        reference = models.load_causal_lm(run.model, source.location, seed=run.seed)
    tracker.log_constants(models.parameter_counts(policy))
    collate = PairCollator(
        tokenizer.pad_token_id, share_prefix=stage.share_prefix and packs_pairs(policy), response_tokens=True
    )
    module = DPOModule(policy, reference, stage, collate)
    datamodule = examples_datamodule(data.splits, collate, stage, run.data, run.seed)

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = final_metrics(trainer, module, datamodule, data.splits)
        module.gather_on_rank_zero()
        if not trainer.is_global_zero:
            return metrics
        models.save_model(module.policy, tokenizer, output_dir / "model")
        if stage.sample_prompts:
            held_out = list({str(p): p for p in prompts["validation"]}.values())[: stage.sample_prompts]
            # Lightning hands the trained model back on the CPU: sampling runs on the stage's device.
            module.to(trainer.strategy.root_device)
            extra = _sampled_kl(module, tokenizer, renderer, held_out, gold, run, source.location, tracker)
            tracker.log_metrics(extra, step=trainer.global_step)
            metrics.update(extra)
        return metrics

    return StageJob(module, datamodule, finish, callbacks=[Throughput(count_pairs)])


@torch.no_grad()
def _sampled_kl(
    module: DPOModule, tokenizer, renderer, prompts, gold, run: RunConfig, source_dir, tracker
) -> dict:
    """Responses of the trained policy to held-out prompts: the KL-to-reference estimate (the mean
    over responses of the k3 estimate summed over their tokens, unbiased for samples of the policy),
    the response length and, with a gold annotator, its score."""
    stage: DPOStageConfig = run.stage
    policy = module.policy
    policy.eval()
    prompt_ids = encode_prompts(renderer, prompts)
    responses = Sampler.of(tokenizer, policy, stage.sample_max_new_tokens)(policy, prompt_ids, seed=run.seed)
    device = module.device
    ids, mask, where, targets = episode_inputs(prompt_ids, responses, tokenizer.pad_token_id, device)
    logp, _ = response_logprobs(policy, ids, mask, where, targets, with_entropy=False)
    reference, context = module.reference, nullcontext()
    if reference is None and run.model.lora.enabled:
        reference, context = policy, policy.disable_adapter()
    elif reference is None:  # precomputed during training: load the initial policy again
        reference = models.load_causal_lm(run.model, source_dir, seed=run.seed).to(device).eval()
    with context:
        ref_logp, _ = response_logprobs(reference, ids, mask, where, targets, with_entropy=False)
    rows = where.nonzero()[:, 0]
    # k3 per token: unbiased for the KL like log pi - log ref, but never negative, so a few dozen
    # samples of a policy near its reference do not read as a negative KL.
    per_token = rl.kl_penalty(logp, ref_logp, "k3")
    kl = torch.zeros(len(responses), device=device).index_add(0, rows, per_token).cpu()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    table = {"prompt": [str(p) for p in prompts], "response": texts, "kl": kl.tolist()}
    out = {"val/kl": kl.mean().item(), "val/response_length": sum(map(len, responses)) / len(responses)}
    if gold is not None:
        scores = [float(s) for s in gold(prompts, texts)]
        table["gold"] = scores
        out["val/gold"] = sum(scores) / len(scores)
    tracker.log_table(table, "samples/validation.json")
    log.info("Samples of %d held-out prompts: KL to the reference %.3f", len(prompts), out["val/kl"])
    return out


def bench_workload(job: StageJob, run: RunConfig, settings: dict):
    """rlhf.bench's DPO workload: bench.batch_size pairs whose two responses of bench.length / 2
    random tokens follow a shared prompt of as many (bench.synthetic=0: the configured data). The
    matrix work counts the reference's forward pass when a reference model runs in the step."""
    from rlhf.bench import FlopCount, Workload, attended_pairs, count_tokens, random_ids

    @dataclass(frozen=True)
    class DPOFlopCount(FlopCount):
        reference: bool = True

        def step(self, batch: dict) -> float:
            tokens, trained, pairs = (
                count_tokens(batch),
                float(batch["target_index"].numel()),
                attended_pairs(batch),
            )
            flops = (
                (4 * self.body + 2 * self.body_trainable) * tokens
                + (4 * self.head + 2 * self.head_trainable) * trained
                + 12 * self.layers * self.attention_width * pairs
            )
            if self.reference:  # forward only
                flops += (
                    2 * self.body * tokens
                    + 2 * self.head * trained
                    + 4 * self.layers * self.attention_width * pairs
                )
            return flops

    module: DPOModule = job.module
    job.datamodule.batch_size = settings["batch_size"]
    if settings["synthetic"]:
        generator = torch.Generator().manual_seed(run.seed)
        vocab = models.unwrap(module.policy).config.vocab_size
        half = settings["length"] // 2
        items = []
        for _ in range(settings["batch_size"]):
            prompt = random_ids(generator, half, vocab)
            items.append(
                {
                    "chosen": prompt + random_ids(generator, settings["length"] - half, vocab),
                    "rejected": prompt + random_ids(generator, settings["length"] - half, vocab),
                    "margin": 0.0,
                    "prompt_length": half,
                }
            )
        job.datamodule.splits["train"] = items * (run.trainer["max_steps"] + 1)
    live_reference = not module.stage.precompute_ref
    flops = replace(DPOFlopCount.of(module.policy, lm_head=True), reference=live_reference)
    return Workload("pairs", lambda batch: float(batch["pair_index"].shape[0]), flops)
