"""PPO against a reward model (or a reward function), with a KL penalty to the frozen initial policy.

One training step is one PPO iteration: sample responses to a batch of prompts (KV-cached, left
padded), score them (reference log-probabilities, values, reward) in no-grad passes, turn scores and
KL into per-token rewards and GAE advantages (rlhf.rl), then several epochs of clipped policy and
value updates on minibatches. The maths lives in rlhf.rl; this module only orchestrates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from rlhf import models, optim, rl
from rlhf.config import RunConfig
from rlhf.data.loading import position_ids
from rlhf.errors import ConfigError
from rlhf.policy import Sampler, response_logprobs
from rlhf.rollout import RLModule, Rollout, load_rl_setup, prompt_datamodule
from rlhf.rollout import scatter as _scatter
from rlhf.scalar import fold_normalisation, fp32_head, token_scores
from rlhf.stages import StageJob
from rlhf.stages.ppo import STAGE, PPOStageConfig
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


class PPOModule(RLModule):
    stage: PPOStageConfig

    def __init__(self, *args, value_model: torch.nn.Module | None, **kwargs):
        """RLModule's arguments, and the separate value model (None: the shared critic, a value head
        on the policy)."""
        super().__init__(*args, **kwargs)
        self.value_model = value_model
        hidden = models.unwrap(self.policy).config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1) if value_model is None else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.kl_ctl = rl.KLController(self.stage.kl_coef, self.stage.kl_target, self.stage.kl_horizon)
        if value_model is not None:
            models.disable_dropout(value_model)

    # -- forward passes -----------------------------------------------------------------------------

    def _policy_pass(self, ids, mask, where, targets, with_entropy: bool):
        """Log-probabilities and entropy (zeros unless with_entropy) of the response tokens (N,), and
        with a shared critic the values there (N,), from one pass of the policy's backbone."""
        temperature = self.stage.rollout.temperature
        if self.value_head is None:
            logp, entropy = response_logprobs(
                self.policy, ids, mask, where, targets, temperature, with_entropy=with_entropy
            )
            return logp, entropy, None
        inner = models.unwrap(self.policy)
        hidden = inner.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state
        logp, entropy = response_logprobs(
            self.policy, ids, mask, where, targets, temperature, hidden=hidden, with_entropy=with_entropy
        )
        return logp, entropy, fp32_head(self.value_head, hidden[where]).squeeze(-1)

    def _values(self, ids, mask, where) -> torch.Tensor:
        return token_scores(self.value_model, ids, mask)[where]

    # -- rollout ------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: dict, training: bool = True) -> tuple[Rollout, dict[str, float], list[str]]:
        """Sample, score and turn into advantages; `training=False` (validation) changes no statistics."""
        stage = self.stage
        episode, stats, texts = self.sample(batch, training)
        start = time.perf_counter()
        response_mask = episode.response_mask
        values = episode.values
        if values is None:
            with self._precision_context():
                values = _scatter(self._values(*episode.sequences()), response_mask)
        stats["time/scoring_s"] += time.perf_counter() - start
        scores, kl = episode.scores, episode.kl
        rewards, non_score = rl.token_rewards(scores, kl, response_mask, self.kl_ctl.value)
        advantages, returns = rl.gae(rewards, values, response_mask, stage.gamma, stage.lam)
        # Logged before whitening, which makes the mean 0 by construction.
        advantages_mean = rl.masked_mean(advantages, response_mask).item()
        advantages_std = rl.masked_var(advantages, response_mask).sqrt().item()
        if stage.whiten_advantages:
            advantages = rl.whiten(advantages, response_mask)
        episode = dataclasses.replace(episode, values=values, advantages=advantages, returns=returns)
        kl_sum = kl.sum(-1)
        stats.update(
            {
                "reward/non_score": non_score.sum(-1).mean().item(),
                "reward/total": (scores - self.kl_ctl.value * kl_sum).mean().item(),
                "kl/coef": self.kl_ctl.value,
                "advantages/mean": advantages_mean,
                "advantages/std": advantages_std,
                "value/explained_variance": rl.explained_variance(values, returns, response_mask).item(),
            }
        )
        return episode, stats, texts

    # -- optimisation -------------------------------------------------------------------------------

    def _update(self, episode: Rollout, optimizer) -> dict[str, float]:
        """ppo_epochs passes over the rollout in shuffled minibatches, stopping early on a KL bound."""
        stage = self.stage
        # Summed on the device: one host synchronisation per iteration for these metrics, not one per
        # minibatch and metric, which on a GPU would stall the queue of every step.
        totals: dict[str, torch.Tensor] = {}
        updates, epochs_run = 0, 0
        size = episode.query.shape[0]
        stopped = False
        for _ in range(stage.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(size, device=episode.query.device)
            for start in range(0, size, stage.minibatch_size):
                part = episode.select(order[start : start + stage.minibatch_size])
                ids, mask, where = part.sequences()
                targets = part.response[part.response_mask.bool()]
                logprobs, entropy, shared_values = self._policy_pass(
                    ids, mask, where, targets, with_entropy=stage.entropy_coef > 0
                )
                values = shared_values if shared_values is not None else self._values(ids, mask, where)
                logprobs, entropy = (
                    _scatter(logprobs, part.response_mask),
                    _scatter(entropy, part.response_mask),
                )
                values = _scatter(values, part.response_mask)
                pg_loss, pg_stats = rl.policy_loss(
                    logprobs, part.logprobs, part.advantages, part.response_mask, stage.clip_range
                )
                # Decided on the mean over ranks, so all stop together: a rank that stepped on alone
                # would wait in its gradient all-reduce for ranks that never join it.
                if (
                    stage.max_approx_kl is not None
                    and self._mean_over_ranks(pg_stats["approx_kl"]) > stage.max_approx_kl
                ):
                    stopped = True
                    break
                vf_loss, vf_stats = rl.value_loss(
                    values, part.values, part.returns, part.response_mask, stage.value_clip_range
                )
                mean_entropy = rl.masked_mean(entropy, part.response_mask)
                loss = pg_loss + stage.vf_coef * vf_loss - stage.entropy_coef * mean_entropy
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                # Through the strategy and precision plugin (loss scaling, unscaling before the
                # clipping in on_before_optimizer_step); counted as steps by training_step, not here.
                optimizer.step()
                updates += 1
                for key, value in {
                    "policy/loss": pg_loss,
                    "policy/clipfrac": pg_stats["clipfrac"],
                    "policy/approx_kl": pg_stats["approx_kl"],
                    "value/loss": vf_loss,
                    "value/clipfrac": vf_stats["clipfrac"],
                }.items():
                    value = value.detach().float()
                    totals[key] = totals[key] + value if key in totals else value
            if stopped:
                break
        optimizer.zero_grad(set_to_none=True)
        means = (torch.stack(list(totals.values())) / max(updates, 1)).tolist() if totals else []
        out = dict(zip(totals, means))
        out.update(
            {
                "ppo/updates": float(updates),
                "ppo/epochs": float(epochs_run),
                "ppo/early_stopped": float(stopped),
            }
        )
        return out

    def _end_iteration(self, stats: dict[str, float], episodes: int) -> None:
        # One coefficient on every rank, from the KL of all ranks' episodes; logged and checkpointed as is.
        for key in ("kl/mean", "kl/penalty"):
            stats[key] = self._mean_over_ranks(torch.tensor(stats[key], device=self.device))
        # adapted on the KL the penalty applies, so the coefficient answers its own estimate
        self.kl_ctl.update(stats["kl/penalty"], episodes)

    def configure_optimizers(self):
        stage = self.stage
        critic = self.value_head if self.value_model is None else self.value_model
        groups = optim.param_groups(self.policy.named_parameters(), stage.weight_decay, stage.lr)
        groups += optim.param_groups(
            critic.named_parameters(), stage.weight_decay, stage.critic_lr or stage.lr
        )
        optimizer = optim.adamw(groups, stage, self.trainer.precision)
        return {
            "optimizer": optimizer,
            "lr_scheduler": optim.scheduler(optimizer, stage, optim.total_steps(self.trainer)),
        }

    # -- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {
            "kl_controller": self.kl_ctl.state_dict(),
            "running_reward": self.running.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_ctl.load_state_dict(checkpoint["ppo"]["kl_controller"])
        self.running.load_state_dict(checkpoint["ppo"]["running_reward"])


def load_critic(
    model_cfg,
    reward_location: str | None,
    policy_location: str | None,
    pad_token_id: int,
    seed: int,
    reward_stats: tuple[float, float] | None,
    reward_norm: str,
) -> torch.nn.Module:
    """The separate value model: the reward model (or, for a reward function, the policy with a new
    head). Started from a reward model whose scores PPO normalises with its stored statistics, the
    normalisation is folded into its head, so its first values are on the scale of the returns."""
    value_model = models.load_scalar_model(
        model_cfg, reward_location or policy_location, pad_token_id, seed=seed
    )
    if (
        reward_location is not None
        and reward_stats is not None
        and rl.resolve_reward_norm(reward_norm, True) == "model"
    ):
        mean, std = reward_stats
        fold_normalisation(value_model, mean, max(std, 1e-8))  # as _normalise divides
    if model_cfg.lora.enabled:
        value_model = models.apply_lora(value_model, model_cfg.lora, "SEQ_CLS")
    return value_model


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: PPOStageConfig = run.stage
    setup = load_rl_setup(run, tracker, STAGE.sources, STAGE.accepts)
    tokenizer, policy, reward, reward_location = (
        setup.tokenizer,
        setup.policy,
        setup.reward,
        setup.reward_location,
    )
    reward_stats = setup.reward_stats
    value_model = None
    if stage.critic == "separate":
        if reward.model is not None and not reward.same_tokens:
            raise ConfigError(
                "stage.critic=separate: the value model would start from the reward model, whose tokenizer "
                "differs from the policy's; use stage.critic=shared"
            )
        value_model = load_critic(
            run.model,
            reward_location,
            setup.policy_location,
            tokenizer.pad_token_id,
            run.seed,
            reward_stats,
            stage.reward_norm,
        )
    tracker.log_constants(models.parameter_counts(policy, value_model))
    module = PPOModule(
        policy,
        setup.reference,
        reward,
        stage,
        value_model=value_model,
        sampler=Sampler.from_rollout(stage.rollout, tokenizer, policy),
        max_grad_norm=run.trainer.get("gradient_clip_val"),
        reward_stats=reward_stats,
        gold=setup.gold,
        tracker=tracker,
        seed=run.seed,
    )
    datamodule = prompt_datamodule(run, setup.data)

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            models.save_model(module.policy, tokenizer, output_dir / "model")
            if module.value_model is not None:
                models.save_model(module.value_model, tokenizer, output_dir / "value_model")
        return metrics

    return StageJob(module, datamodule, finish, callbacks=[])


def bench_workload(job: StageJob, run: RunConfig, settings: dict[str, int]):
    """rlhf.bench's fixed workload for this stage: the configured prompts, a rollout batch of
    bench.batch_size, and the time split between generation, scoring and training."""
    from rlhf.bench import RLTimeSplit, Workload

    split = RLTimeSplit(settings["warmup"])
    described = f"{run.data.name} prompts, rollout batch {settings['batch_size']}"
    return Workload(
        "episodes", lambda batch: float(len(batch["prompt_ids"])), None, described, [split], split.averages
    )
