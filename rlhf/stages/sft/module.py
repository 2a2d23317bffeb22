"""Supervised fine-tuning: next-token loss on response tokens, prompt tokens masked."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytorch_lightning as pl
import torch

from rlhf import models, optim
from rlhf.config import RunConfig
from rlhf.data.formats import prompt_text
from rlhf.data.loading import examples_datamodule
from rlhf.data.prepare import CausalLMCollator, prepare_sft
from rlhf.data.tokenize import IGNORE_INDEX, ChatRenderer, encode_prompts
from rlhf.lineage import resolve_source
from rlhf.policy import Sampler, completion_loss
from rlhf.sharding import Sharded
from rlhf.stages import StageJob
from rlhf.stages.sft import STAGE, SFTStageConfig
from rlhf.tracking import Tracker
from rlhf.training import HeldOutSteps, Throughput, final_metrics, logs_this_step

log = logging.getLogger(__name__)


def trained_tokens_per_example(examples: list[dict]) -> float:
    """Mean count of the tokens an example adds to the loss (labelled next-token targets)."""
    return sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples) / max(
        1, len(examples)
    )


class SFTModule(Sharded, HeldOutSteps, pl.LightningModule):
    def __init__(self, model: torch.nn.Module, stage: SFTStageConfig, tokens_per_batch: float):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; training wants train mode
        self.stage = stage
        # The loss is the batch's token sum over the tokens an average batch holds, not over this
        # batch's own count: dividing by the batch's count weighs a token by its batch-mates, so
        # length-grouped batches would weigh every example equally (a long demonstration no more
        # than a short one) instead of every token, and the objective would depend on batching.
        self.tokens_per_batch = tokens_per_batch
        self._eval_sums: dict[str, torch.Tensor] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, tokens = self.call(
            "model", completion_loss, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        loss = loss_sum / self.tokens_per_batch
        if not logs_this_step(self.trainer):
            return loss
        # Shown per token of this batch, the same measure as val/loss.
        self.log(
            "train/loss", loss_sum.detach() / tokens.clamp(min=1), on_step=True, on_epoch=False, prog_bar=True
        )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        loss_sum, tokens = self.call(
            "model", completion_loss, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        self._eval_sums["loss"] = self._eval_sums.get("loss", 0) + loss_sum.detach()
        self._eval_sums["tokens"] = self._eval_sums.get("tokens", 0) + tokens

    def _has_eval(self, split: str) -> bool:
        return bool(self._eval_sums)

    def _eval_epoch_end(self, split: str, prefix: str) -> None:
        # Token-weighted over the whole split (and all ranks), not a mean of batch means.
        loss_sum = self.trainer.strategy.reduce(self._eval_sums["loss"].float(), reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._eval_sums["tokens"].float(), reduce_op="sum")
        self._eval_sums = {}
        loss = (loss_sum / tokens.clamp(min=1)).item()
        # Already reduced over ranks; sync_dist only keeps Lightning from warning.
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True)
        self.log(f"{prefix}/ppl", math.exp(min(loss, 50.0)), sync_dist=True)

    def configure_optimizers(self):
        return optim.configure(self.model.named_parameters(), self.stage, self.trainer)


def _count_tokens(batch: dict) -> dict[str, float]:
    return {
        "tokens": float(batch["attention_mask"].sum()),
        "trained_tokens": float((batch["labels"] != -100).sum()),
    }


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: SFTStageConfig = run.stage
    source = resolve_source(
        stage.init_from,
        "stage.init_from",
        STAGE.sources.get("init_from"),
        tracker,
        STAGE.accepts["init_from"],
    )
    tokenizer = models.load_tokenizer(run.model, source.location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    # Data before weights: a bad file fails in seconds, not after the model has loaded.
    data = prepare_sft(run.data, renderer, run.seed)
    tracker.log_constants(data.stats)
    model = models.load_causal_lm(run.model, source.location, seed=run.seed)
    if run.model.lora.enabled:
        model = models.apply_lora(model, run.model.lora, "CAUSAL_LM")
    tracker.log_constants(models.parameter_counts(model))
    module = SFTModule(model, stage, stage.batch_size * trained_tokens_per_example(data.splits["train"]))
    datamodule = examples_datamodule(
        data.splits, CausalLMCollator(tokenizer.pad_token_id), stage, run.data, run.seed
    )

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = final_metrics(trainer, module, datamodule, data.splits)
        module.gather_on_rank_zero()
        if trainer.is_global_zero:
            models.save_model(module.model, tokenizer, output_dir / "model")
            # On the stage's device: Lightning hands the trained model back on the CPU.
            _log_samples(
                module.model.to(trainer.strategy.root_device),
                tokenizer,
                renderer,
                data.prompts["validation"],
                data.references["validation"],
                stage,
                tracker,
            )
        return metrics

    return StageJob(module, datamodule, finish, callbacks=[Throughput(_count_tokens)])


def shown(text: str, limit: int = 120) -> str:
    """A generated response as a log line shows it: quoted, so an empty or blank one is seen as such,
    with long runs of one character counted (an untrained model's `..........` reads `'.' x 48`)."""
    if not text.strip():
        return f"(empty: {text!r})"
    runs = re.sub(r"(.)\1{7,}", lambda m: f"[{m.group(1)!r} x {len(m.group(0))}]", text)
    return repr(runs[:limit] + ("..." if len(runs) > limit else ""))


def _log_samples(
    model, tokenizer, renderer, prompts, references, stage: SFTStageConfig, tracker: Tracker
) -> None:
    """Greedy generations on a few validation prompts, next to the reference responses."""
    if stage.num_samples == 0 or not prompts:
        return
    prompts, references = prompts[: stage.num_samples], references[: stage.num_samples]
    prompt_ids = encode_prompts(renderer, prompts)
    responses = Sampler.of(tokenizer, model, stage.sample_max_new_tokens, greedy=True)(model, prompt_ids)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    as_str = [prompt_text(p) for p in prompts]
    refs = [prompt_text(r) for r in references]
    tracker.log_table({"prompt": as_str, "response": texts, "reference": refs}, "samples/validation.json")
    for prompt, text in zip(as_str, texts):
        log.info("sample | %s -> %s", prompt[:80], shown(text))


def bench_workload(job: StageJob, run: RunConfig, settings: dict[str, int]):
    """rlhf.bench's fixed workload for this stage."""
    from rlhf.bench import FlopCount, Workload, count_tokens, random_ids

    job.datamodule.batch_size = settings["batch_size"]
    if settings["synthetic"]:
        generator = torch.Generator().manual_seed(run.seed)
        vocab = job.module.model.config.vocab_size
        items = []
        for _ in range(settings["batch_size"]):
            ids = random_ids(generator, settings["length"], vocab)
            items.append({"input_ids": ids, "labels": [-100, *ids[1:]]})  # every token trained
        job.datamodule.splits["train"] = items * (run.trainer["max_steps"] + 1)
    return Workload("tokens", count_tokens, FlopCount.of(job.module.model, lm_head=True))
