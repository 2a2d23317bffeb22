"""GRPO and its critic-free relatives: one training step is one iteration.

Each prompt of the batch is sampled stage.group_size times (the KV-cached sampler of rlhf.rollout,
the prompt repeated), the episodes scored as PPO scores them (reference log-probabilities, reward,
its normalisation and EOS handling), and the group's rewards are each other's baseline
(rlhf.rl.critic_free_advantages). Then stage.ppo_epochs optimizer steps of the clipped surrogate
over the whole batch, with the KL to the reference in the reward or as a k3 term of the loss. No
value model. Prompts, not samples, are split between ranks, so every group is whole on one rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytorch_lightning as pl
import torch

from rlhf import models, optim, rl
from rlhf.config import RunConfig
from rlhf.policy import Sampler
from rlhf.rollout import RLModule, Rollout, load_rl_setup, prompt_datamodule, scatter
from rlhf.stages import StageJob
from rlhf.stages.grpo import STAGE, GRPOStageConfig
from rlhf.tracking import Tracker


class GRPOModule(RLModule):
    stage: GRPOStageConfig

    @torch.no_grad()
    def rollout(self, batch: dict, training: bool = True) -> tuple[Rollout, dict[str, float], list[str]]:
        """group_size scored responses per prompt, with their advantages."""
        stage, group = self.stage, self.stage.group_size
        # The responses to one prompt are neighbours: rows [g * G, (g + 1) * G) are a group.
        repeated = {
            key: [item for item in batch[key] for _ in range(group)] for key in ("prompt_ids", "prompts")
        }
        episode, stats, texts = self.sample(repeated, training)
        mask = episode.response_mask
        kl = episode.kl if stage.kl_in == "reward" else None
        advantages = rl.critic_free_advantages(
            episode.scores, mask, stage.advantage, group, kl, stage.kl_coef
        )
        episode = dataclasses.replace(episode, advantages=advantages)
        spread = episode.scores.view(-1, group).std(-1) if group > 1 else torch.zeros(1)
        equal = rl.equal_groups(episode.scores, group) if group > 1 else torch.ones(1, dtype=torch.bool)
        stats.update(
            {
                "kl/coef": stage.kl_coef,
                "reward/total": (episode.scores - stage.kl_coef * episode.kl.sum(-1)).mean().item(),
                # Groups whose responses all scored the same teach nothing: grpo and rloo give them exactly
                # 0, by the same test that counts them here.
                "reward/group_std": spread.mean().item(),
                "reward/equal_groups": equal.float().mean().item(),
                "advantages/mean": rl.masked_mean(advantages, mask).item(),
                "advantages/std": rl.masked_var(advantages, mask).sqrt().item(),
            }
        )
        return episode, stats, texts

    def _update(self, episode: Rollout, optimizer) -> dict[str, float]:
        """stage.ppo_epochs optimizer steps over the whole rollout batch, each summing the gradients
        of passes of stage.minibatch_size episodes. A pass's loss is weighted by its share of the
        batch (of tokens or of responses, as stage.loss_average), so the passes of an epoch add up
        to the loss of the batch whatever their sizes."""
        stage = self.stage
        size = episode.query.shape[0]
        tokens = episode.response_mask.sum()
        # Summed on the device and read once an iteration: a read per pass and metric would wait for
        # the GPU's queue to drain every time.
        totals: dict[str, torch.Tensor] = {}
        for _ in range(stage.ppo_epochs):
            for start in range(0, size, stage.minibatch_size):
                part = episode.select(
                    torch.arange(start, min(start + stage.minibatch_size, size), device=tokens.device)
                )
                ids, mask, where = part.sequences()
                targets = part.response[part.response_mask.bool()]
                logprobs, _, _ = self._policy_pass(ids, mask, where, targets, with_entropy=False)
                logprobs = scatter(logprobs, part.response_mask)
                pg_loss, pg_stats = rl.policy_loss(
                    logprobs,
                    part.logprobs,
                    part.advantages,
                    part.response_mask,
                    stage.clip_range,
                    stage.loss_average,
                )
                loss, parts = pg_loss, {"policy/loss": pg_loss.detach()}
                if stage.kl_in == "loss":
                    kl = rl.kl_penalty(logprobs, part.ref_logprobs, "k3")
                    kl_loss = rl.masked_average(kl, part.response_mask, stage.loss_average)
                    loss = loss + stage.kl_coef * kl_loss
                    parts["kl/loss"] = kl_loss.detach()
                if stage.loss_average == "token":
                    share = part.response_mask.sum() / tokens
                else:
                    share = part.query.shape[0] / size
                self.manual_backward(loss * share)
                parts.update(
                    {
                        "policy/clipfrac": pg_stats["clipfrac"],
                        "policy/approx_kl": pg_stats["approx_kl"],
                        "policy/ratio": pg_stats["ratio"],
                    }
                )
                for key, value in parts.items():
                    value = (value * share).detach().float() / stage.ppo_epochs
                    totals[key] = totals[key] + value if key in totals else value
            # Through the precision plugin, which unscales, and clipping in on_before_optimizer_step;
            # counted as one trainer step per iteration by training_step.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return dict(zip(totals, torch.stack(list(totals.values())).tolist())) if totals else {}

    def configure_optimizers(self):
        return optim.configure(self.policy.named_parameters(), self.stage, self.trainer)

    # -- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo"] = {"running_reward": self.running.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.running.load_state_dict(checkpoint["grpo"]["running_reward"])


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    setup = load_rl_setup(run, tracker, STAGE.sources, STAGE.accepts)
    policy, tokenizer = setup.policy, setup.tokenizer
    tracker.log_constants(models.parameter_counts(policy))
    module = GRPOModule(
        policy,
        setup.reference,
        setup.reward,
        run.stage,
        sampler=Sampler.from_rollout(run.stage.rollout, tokenizer, policy),
        max_grad_norm=run.trainer.get("gradient_clip_val"),
        reward_stats=setup.reward_stats,
        gold=setup.gold,
        tracker=tracker,
        seed=run.seed,
    )

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            models.save_model(module.policy, tokenizer, output_dir / "model")
        return metrics

    return StageJob(module, prompt_datamodule(run, setup.data), finish, callbacks=[])


def bench_workload(job: StageJob, run: RunConfig, settings: dict[str, int]):
    """rlhf.bench's fixed workload for this stage: the configured prompts, bench.batch_size prompts
    sampled group_size times each, and the time split between generation, scoring and training."""
    from rlhf.bench import RLTimeSplit, Workload

    group = run.stage.group_size
    split = RLTimeSplit(settings["warmup"])
    described = f"{run.data.name} prompts, {settings['batch_size']} prompts x {group} responses"
    return Workload(
        "episodes",
        lambda batch: float(len(batch["prompt_ids"]) * group),
        None,
        described,
        [split],
        split.averages,
    )
