"""Reward modelling: a scalar head on the LM, Bradley-Terry loss on preference pairs.

Chosen and rejected responses of a batch go through the model in one forward pass. The saved model
is an AutoModelForSequenceClassification with one label that scores text exactly as in training, and
carries the reward statistics (config.reward_mean, config.reward_std) PPO normalises rewards with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from rlhf import models, optim, plots
from rlhf.config import RunConfig
from rlhf.data.formats import prompt_text
from rlhf.data.loading import attention_mask, examples_datamodule, pad
from rlhf.data.prepare import PairCollator, Prepared, count_pairs, group_comparisons, prepare_preferences
from rlhf.data.tokenize import ChatRenderer, encode_prompts
from rlhf.lineage import resolve_source
from rlhf.policy import Sampler
from rlhf.preference import bradley_terry, gold_order_agreement, pair_weights, preference_accuracy
from rlhf.rewards import FunctionReward, load_gold
from rlhf.scalar import pair_scores, sequence_scores, supports_attention_masks
from rlhf.sharding import Sharded
from rlhf.stages import StageJob
from rlhf.stages.rm import STAGE, RMStageConfig
from rlhf.tracking import Tracker
from rlhf.training import HeldOutSteps, Throughput, final_metrics, logs_this_step

log = logging.getLogger(__name__)


class RewardModule(Sharded, HeldOutSteps, pl.LightningModule):
    def __init__(self, model: torch.nn.Module, stage: RMStageConfig, slice_names: list[str] | None = None):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; training wants train mode
        self.stage = stage
        # Held-out metrics are also reported per slice (the features' "slice" indexes these names).
        self.slice_names = slice_names or []
        self._scores: dict[str, list[torch.Tensor]] = {}
        # The last evaluation's scores per split: (chosen, rejected) as numpy arrays.
        self.last_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _pair_scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.call("model", pair_scores, batch)

    def _loss(
        self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, weight=None
    ) -> torch.Tensor:
        margin = margin if self.stage.use_margin else None
        return bradley_terry(chosen, rejected, margin, self.stage.center_rewards, weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self._pair_scores(batch)
        loss = self._loss(chosen, rejected, batch["margin"], batch.get("weight"))
        if not logs_this_step(self.trainer):
            return loss
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log(
            "train/accuracy",
            preference_accuracy(chosen, rejected),
            on_step=True,
            on_epoch=False,
            prog_bar=True,
        )
        self.log("train/margin", (chosen - rejected).mean(), on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        chosen, rejected = self._pair_scores(batch)
        gold_order = batch.get("gold_order", torch.zeros_like(batch["margin"]))
        slice_index = batch.get("slice", torch.full_like(batch["margin"], -1))
        store = self._scores.setdefault(split, [])
        weight = batch.get("weight", torch.ones_like(batch["margin"]))
        store.append(
            torch.stack([chosen, rejected, batch["margin"], gold_order, slice_index, weight], dim=1).detach()
        )

    def _eval_epoch_end(self, split: str, prefix: str) -> None:
        rows = torch.cat(self._scores.pop(split, [torch.empty(0, 6, device=self.device)]))
        rows = self.all_gather(rows).reshape(-1, 6)  # every rank's pairs
        chosen, rejected, margin, gold_order, slice_index, weight = rows.unbind(1)
        both = torch.cat([chosen, rejected])
        metrics = {
            f"{prefix}/loss": self._loss(chosen, rejected, margin, weight),
            f"{prefix}/margin": (chosen - rejected).mean(),
            f"{prefix}/reward_mean": both.mean(),
            f"{prefix}/reward_std": both.std(),
            **_ordering_metrics(prefix, "", chosen, rejected, gold_order),
        }
        for index, name in enumerate(self.slice_names):
            of_slice = slice_index == index
            if of_slice.any():
                metrics.update(
                    _ordering_metrics(
                        prefix, f"/{name}", chosen[of_slice], rejected[of_slice], gold_order[of_slice]
                    )
                )
        self.log_dict({k: v.float() for k, v in metrics.items()}, prog_bar=False, sync_dist=True)
        self.last_scores[split] = (chosen.float().cpu().numpy(), rejected.float().cpu().numpy())

    def _has_eval(self, split: str) -> bool:
        return bool(self._scores.get(split))

    def configure_optimizers(self):
        return optim.configure(self.model.named_parameters(), self.stage, self.trainer)


def _ordering_metrics(prefix: str, suffix: str, chosen, rejected, gold_order) -> dict[str, torch.Tensor]:
    """Label accuracy; with a gold ordering also the gold accuracy and its label-noise ceiling."""
    metrics = {f"{prefix}/accuracy{suffix}": preference_accuracy(chosen, rejected)}
    gold = gold_order_agreement(chosen, rejected, gold_order)
    if gold is not None:
        metrics[f"{prefix}/gold_accuracy{suffix}"], metrics[f"{prefix}/label_gold_agreement{suffix}"] = gold
    return metrics


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: RMStageConfig = run.stage
    source = resolve_source(
        stage.init_from, "stage.init_from", STAGE.sources["init_from"], tracker, STAGE.accepts["init_from"]
    )
    tokenizer = models.load_tokenizer(run.model, source.location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    annotator = load_gold(run.data.gold_reward, run.data.preference.path)
    gold = FunctionReward(annotator, tokenizer) if annotator else None
    data = prepare_preferences(run.data, renderer, run.seed)
    for features in data.splits.values():
        for feature, weight in zip(
            features, pair_weights([f["record"] for f in features], stage.pair_weighting)
        ):
            feature["weight"] = weight
    if gold is not None:
        _attach_gold_order(data, gold)
    if stage.group_by_record:
        data.splits = {split: group_comparisons(features) for split, features in data.splits.items()}
    tracker.log_constants(data.stats)
    model = models.load_scalar_model(run.model, source.location, tokenizer.pad_token_id, seed=run.seed)
    if run.model.lora.enabled:
        model = models.apply_lora(model, run.model.lora, "SEQ_CLS")
    tracker.log_constants(models.parameter_counts(model))
    module = RewardModule(model, stage, data.slice_names)
    collate = PairCollator(
        tokenizer.pad_token_id, share_prefix=stage.share_prefix and supports_attention_masks(model)
    )
    datamodule = examples_datamodule(data.splits, collate, stage, run.data, run.seed)

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = final_metrics(trainer, module, datamodule, data.splits)
        module.gather_on_rank_zero()
        if not trainer.is_global_zero:
            return metrics
        chosen, rejected = module.last_scores["validation"]
        both = np.concatenate([chosen, rejected])
        stats = {
            "reward_mean": float(both.mean()),
            "reward_std": float(both.std()),
            "pairs": int(len(chosen)),
        }
        inner = models.unwrap(module.model)
        inner.config.reward_mean, inner.config.reward_std = stats["reward_mean"], stats["reward_std"]
        model_dir = models.save_model(module.model, tokenizer, output_dir / "model")
        (model_dir / "reward_stats.json").write_text(json.dumps({**stats, "split": "validation"}, indent=2))
        split = "test" if "test" in module.last_scores else "validation"
        extra = _log_calibration(module.last_scores[split], split, stage.calibration_bins, tracker)
        if gold is not None and stage.gold_eval_prompts:
            prompts = data.prompts.get("test") or data.prompts["validation"]
            # Lightning hands the trained model back on the CPU: both models go to the stage's device.
            device = trainer.strategy.root_device
            policy = models.load_causal_lm(run.model, source.location, seed=run.seed).to(device)
            extra.update(
                _gold_agreement(
                    module.model.to(device),
                    policy,
                    tokenizer,
                    renderer,
                    prompts,
                    gold,
                    stage,
                    run.seed,
                    tracker,
                )
            )
        tracker.log_metrics(extra, step=trainer.global_step)
        return {**metrics, **extra}

    return StageJob(module, datamodule, finish, callbacks=[Throughput(count_pairs)])


def _attach_gold_order(data: Prepared, gold: FunctionReward) -> None:
    """Mark each held-out pair with the gold annotator's order of its two responses, so evaluation
    reports accuracy against the gold ordering beside accuracy against the (noisy) labels."""
    for split in ("validation", "test"):
        if split not in data.splits:
            continue
        prompts = data.prompts[split]
        chosen, rejected = zip(*data.references[split])
        order = np.sign(np.subtract(gold.score_texts(prompts, chosen), gold.score_texts(prompts, rejected)))
        for feature, sign in zip(data.splits[split], order.tolist(), strict=True):
            feature["gold_order"] = sign


def _log_calibration(
    scores: tuple[np.ndarray, np.ndarray], split: str, bins: int, tracker: Tracker
) -> dict[str, float]:
    chosen, rejected = scores
    table = plots.calibration_table(chosen, rejected, bins)
    ece = plots.expected_calibration_error(table)
    for name, figure in (
        ("calibration", plots.calibration_figure(table, f"Calibration on {split} pairs (ECE {ece:.3f})")),
        ("reward_histogram", plots.reward_histogram(chosen, rejected, f"Rewards on {split} pairs")),
    ):
        tracker.log_figure(figure, f"plots/{name}.png")
        plots.close(figure)
    tracker.log_table(table, f"plots/calibration_{split}.json")
    return {f"{'test' if split == 'test' else 'val'}/calibration_error": ece}


@torch.no_grad()
def _gold_agreement(
    reward_model, policy, tokenizer, renderer, prompts, gold, stage: RMStageConfig, seed: int, tracker
) -> dict[str, float]:
    """Sample two fresh responses per held-out prompt from the policy the reward model started from,
    and count how often the reward model orders them as the gold annotator does (both models on one
    device)."""
    prompts = prompts[: stage.gold_eval_prompts]
    policy.eval()
    prompt_ids = encode_prompts(renderer, prompts)
    doubled = [ids for ids in prompt_ids for _ in range(2)]
    responses = Sampler.of(tokenizer, policy, stage.gold_eval_max_new_tokens)(policy, doubled, seed=seed)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    as_str = [prompt_text(p) for p in prompts for _ in range(2)]
    gold_scores = np.asarray(gold.score_texts(as_str, texts), dtype=float)
    sequences = [p + r for p, r in zip(doubled, responses)]
    device = policy.device
    reward_model.eval()
    ids, mask = pad(sequences, tokenizer.pad_token_id).to(device), attention_mask(sequences).to(device)
    rm_scores = sequence_scores(reward_model, ids, mask).float().cpu().numpy()
    gold_diff = gold_scores[0::2] - gold_scores[1::2]
    rm_diff = rm_scores[0::2] - rm_scores[1::2]
    decided = gold_diff != 0
    agreement = (
        float((np.sign(gold_diff[decided]) == np.sign(rm_diff[decided])).mean())
        if decided.any()
        else float("nan")
    )
    tracker.log_table(
        {"prompt": as_str, "response": texts, "gold": gold_scores.tolist(), "reward": rm_scores.tolist()},
        "samples/gold_agreement.json",
    )
    log.info(
        "Reward model agrees with the gold annotator on %.0f%% of %d fresh pairs",
        100 * agreement,
        int(decided.sum()),
    )
    return {
        "gold/agreement": agreement,
        "gold/pairs": float(decided.sum()),
        "gold/policy_mean": float(gold_scores.mean()),
    }


def bench_workload(job: StageJob, run: RunConfig, settings: dict[str, int]):
    """rlhf.bench's fixed workload for this stage."""
    from rlhf.bench import FlopCount, Workload, random_ids
    from rlhf.models import unwrap

    model = unwrap(job.module.model)
    job.datamodule.batch_size = settings["batch_size"]
    if settings["synthetic"]:
        generator = torch.Generator().manual_seed(run.seed)
        vocab = model.config.vocab_size
        items = [
            {
                "chosen": random_ids(generator, settings["length"], vocab),
                "rejected": random_ids(generator, settings["length"], vocab),
                "margin": 0.0,
            }
            for _ in range(settings["batch_size"])
        ]
        job.datamodule.splits["train"] = items * (run.trainer["max_steps"] + 1)
    flops = FlopCount.of(job.module.model, lm_head=False)
    return Workload("pairs", lambda batch: float(batch["margin"].shape[0]), flops)
