"""PPO against a reward model (or a reward function), with a KL penalty to the frozen initial policy.

One training step is one PPO iteration: sample responses to a batch of prompts (KV-cached, left
padded), score them (reference log-probabilities, values, reward) in no-grad passes, turn scores and
KL into per-token rewards and GAE advantages (rlhf.rl), then several epochs of clipped policy and
value updates on minibatches. The maths lives in rlhf.rl; this module only orchestrates.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import pytorch_lightning as pl
import torch

from rlhf import models, optim, rl
from rlhf.config import PPOStageConfig, RunConfig
from rlhf.data.loading import ExamplesDataModule, attention_mask, pad, position_ids
from rlhf.data.prepare import prepare_prompts
from rlhf.data.tokenize import ChatRenderer
from rlhf.errors import ConfigError
from rlhf.lineage import resolve_source
from rlhf.policy import eos_ids, generate, join_prompt_response, response_logprobs
from rlhf.rewards import RewardSource, load_function, load_reward
from rlhf.scalar import fp32_head, token_scores
from rlhf.stages import StageJob
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """A batch of episodes. query (B, P) is left-padded, response (B, R) right-padded; the masks are 1
    on real tokens (a response's up to and including its first EOS)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, where) of prompt + response (see join_prompt_response)."""
        return join_prompt_response(self.query, self.query_mask, self.response, self.response_mask)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: log-probabilities of the same tokens must not change between passes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(models.unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values listed in the order of mask's true positions, put back into a zero (B, R) tensor."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask.bool()] = flat
    return out


class PPOModule(pl.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        value_model: torch.nn.Module | None,
        reward: RewardSource,
        stage: PPOStageConfig,
        pad_token_id: int,
        eos_token_ids: list[int],
        max_grad_norm: float | None,
        reward_stats: tuple[float, float] | None,
        gold=None,
        tracker: Tracker | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        # Frozen models are rebuilt from their sources on resume, not stored in checkpoints.
        self.strict_loading = False
        self.policy = policy
        self.reference = reference  # None: the policy with its LoRA adapters disabled
        self.value_model = value_model  # None: the shared critic, a value head on the policy
        hidden = models.unwrap(policy).config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1) if value_model is None else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.reward = reward
        self.stage = stage
        self.pad_token_id, self.eos_token_ids = pad_token_id, eos_token_ids
        self.max_grad_norm = max_grad_norm
        self.reward_stats = reward_stats
        self.running = rl.RunningMoments()
        self.kl_ctl = rl.KLController(stage.kl_coef, stage.kl_target, stage.kl_horizon)
        self.gold = gold
        self.tracker = tracker
        for frozen in (reference, getattr(reward, "model", None)):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        for model in (policy, reference, value_model, getattr(reward, "model", None)):
            if model is not None:
                disable_dropout(model)

    # -- forward passes -----------------------------------------------------------------------------

    def _policy_pass(self, ids, mask, where, targets, with_entropy: bool):
        """Log-probabilities and entropy (zeros unless with_entropy) of the response tokens (N,), and
        with a shared critic the values there (N,), from one pass of the policy's backbone."""
        temperature = self.stage.rollout.temperature
        if self.value_head is None:
            logp, entropy = response_logprobs(self.policy, ids, mask, where, targets, temperature, with_entropy=with_entropy)
            return logp, entropy, None
        inner = models.unwrap(self.policy)
        hidden = inner.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state
        logp, entropy = response_logprobs(
            self.policy, ids, mask, where, targets, temperature, hidden=hidden, with_entropy=with_entropy
        )
        return logp, entropy, fp32_head(self.value_head, hidden[where]).squeeze(-1)

    def _reference_logprobs(self, ids, mask, where, targets) -> torch.Tensor:
        context = self.policy.disable_adapter() if self.reference is None else nullcontext()
        with context:
            logp, _ = response_logprobs(
                self.reference or self.policy, ids, mask, where, targets, self.stage.rollout.temperature, with_entropy=False
            )
        return logp

    def _values(self, ids, mask, where) -> torch.Tensor:
        return token_scores(self.value_model, ids, mask)[where]

    # -- rollout ------------------------------------------------------------------------------------

    def _precision_context(self):
        """The trainer's autocast (bf16-mixed: bf16 matmuls): the rollout's log-probabilities must be
        computed exactly as the update's, or the first update's ratio is not 1."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()

    @torch.no_grad()
    def rollout(self, batch: dict, training: bool = True) -> tuple[Rollout, dict[str, float], list[str]]:
        """Sample, score and turn into advantages; `training=False` (validation) changes no statistics."""
        with self._precision_context():
            return self._rollout(batch, training)

    def _rollout(self, batch: dict, training: bool) -> tuple[Rollout, dict[str, float], list[str]]:
        stage, timings = self.stage, {}
        start = time.perf_counter()
        responses = generate(
            self.policy,
            batch["prompt_ids"],
            pad_token_id=self.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            max_new_tokens=stage.rollout.max_new_tokens,
            temperature=stage.rollout.temperature,
            top_k=stage.rollout.top_k,
            top_p=stage.rollout.top_p,
        )
        timings["time/generation_s"] = time.perf_counter() - start
        start = time.perf_counter()
        device = self.device
        query = pad(batch["prompt_ids"], self.pad_token_id, left=True).to(device)
        query_mask = attention_mask(batch["prompt_ids"], left=True).to(device)
        response = pad(responses, self.pad_token_id).to(device)
        response_mask = attention_mask(responses).to(device)
        partial = Rollout(query, query_mask, response, response_mask, *([None] * 7))
        ids, mask, where = partial.sequences()
        targets = response[response_mask.bool()]
        logprobs, entropy, values = self._policy_pass(ids, mask, where, targets, with_entropy=True)
        logprobs = _scatter(logprobs, response_mask)
        ref_logprobs = _scatter(self._reference_logprobs(ids, mask, where, targets), response_mask)
        values = _scatter(values if values is not None else self._values(ids, mask, where), response_mask)
        texts = self.reward.decode(responses)
        raw = self.reward(ids, mask, batch["prompts"], texts).to(device).float()
        timings["time/scoring_s"] = time.perf_counter() - start

        ended = torch.tensor([bool(r) and r[-1] in self.eos_token_ids for r in responses], device=device)
        scores = self._normalise(raw, update=training)
        if stage.missing_eos_penalty is not None:
            scores = scores + (~ended).float() * stage.missing_eos_penalty
        kl = rl.kl_penalty(logprobs, ref_logprobs, stage.kl_estimator) * response_mask
        rewards, non_score = rl.token_rewards(scores, kl, response_mask, self.kl_ctl.value)
        advantages, returns = rl.gae(rewards, values, response_mask, stage.gamma, stage.lam)
        if stage.whiten_advantages:
            advantages = rl.whiten(advantages, response_mask)
        episode = Rollout(query, query_mask, response, response_mask, logprobs, ref_logprobs, values, scores, kl,
                          advantages, returns)
        kl_sum = kl.sum(-1)
        stats = {
            "reward/score_raw": raw.mean().item(),
            "reward/score": scores.mean().item(),
            "reward/non_score": non_score.sum(-1).mean().item(),
            "reward/total": (scores - self.kl_ctl.value * kl_sum).mean().item(),
            "kl/mean": kl_sum.mean().item(),
            "kl/coef": self.kl_ctl.value,
            "response/length": response_mask.sum(-1).float().mean().item(),
            "policy/entropy": entropy.mean().item(),
            "response/eos_share": ended.float().mean().item(),
            "advantages/mean": rl.masked_mean(advantages, response_mask).item(),
            "advantages/std": rl.masked_var(advantages, response_mask).sqrt().item(),
            "value/explained_variance": rl.explained_variance(values, returns, response_mask).item(),
            **timings,
        }
        if self.gold is not None:
            stats["reward/gold"] = float(sum(self.gold(batch["prompts"], texts)) / len(texts))
        self._last_samples = (batch["prompts"], texts, raw.tolist())
        return episode, stats, texts

    def _normalise(self, raw: torch.Tensor, update: bool) -> torch.Tensor:
        mode = self.stage.reward_norm
        if mode == "auto":
            mode = "model" if self.reward_stats is not None else "running"
        if mode == "model":
            if self.reward_stats is None:
                raise ValueError("stage.reward_norm=model needs a reward model with stored statistics")
            mean, std = self.reward_stats
            scores = (raw - mean) / max(std, 1e-8)
        elif mode == "running":
            if update:
                self.running.update(self.all_gather(raw).reshape(-1))
            scores = (raw - self.running.mean) / self.running.std
        else:
            scores = raw
        if self.stage.reward_clip is not None:
            scores = scores.clamp(-self.stage.reward_clip, self.stage.reward_clip)
        return scores

    # -- optimisation -------------------------------------------------------------------------------

    def _update(self, episode: Rollout, optimizer) -> dict[str, float]:
        """ppo_epochs passes over the rollout in shuffled minibatches, stopping early on a KL bound."""
        stage = self.stage
        totals: dict[str, float] = {}
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
                with self._precision_context():
                    logprobs, entropy, shared_values = self._policy_pass(
                        ids, mask, where, targets, with_entropy=stage.entropy_coef > 0
                    )
                    values = shared_values if shared_values is not None else self._values(ids, mask, where)
                logprobs, entropy = _scatter(logprobs, part.response_mask), _scatter(entropy, part.response_mask)
                values = _scatter(values, part.response_mask)
                pg_loss, pg_stats = rl.policy_loss(logprobs, part.logprobs, part.advantages, part.response_mask, stage.clip_range)
                if stage.max_approx_kl is not None and pg_stats["approx_kl"].item() > stage.max_approx_kl:
                    stopped = True
                    break
                vf_loss, vf_stats = rl.value_loss(values, part.values, part.returns, part.response_mask, stage.value_clip_range)
                mean_entropy = rl.masked_mean(entropy, part.response_mask)
                loss = pg_loss + stage.vf_coef * vf_loss - stage.entropy_coef * mean_entropy
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], self.max_grad_norm
                    )
                # The inner updates go to the torch optimizer itself; Lightning counts one step per PPO
                # iteration (see training_step), so trainer.max_steps counts PPO iterations.
                optimizer.optimizer.step()
                updates += 1
                for key, value in {
                    "policy/loss": pg_loss.item(),
                    "policy/clipfrac": pg_stats["clipfrac"].item(),
                    "policy/approx_kl": pg_stats["approx_kl"].item(),
                    "value/loss": vf_loss.item(),
                    "value/clipfrac": vf_stats["clipfrac"].item(),
                }.items():
                    totals[key] = totals.get(key, 0.0) + value
            if stopped:
                break
        optimizer.zero_grad(set_to_none=True)
        out = {k: v / max(updates, 1) for k, v in totals.items()}
        out.update({"ppo/updates": float(updates), "ppo/epochs": float(epochs_run), "ppo/early_stopped": float(stopped)})
        return out

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizer = self.optimizers()
        iteration = self.global_step  # before this iteration's bookkeeping step counts it
        step_start = time.perf_counter()
        episode, stats, _ = self.rollout(batch)
        start = time.perf_counter()
        stats.update(self._update(episode, optimizer))
        stats["time/training_s"] = time.perf_counter() - start
        # The bookkeeping step: no parameter has a gradient now, so AdamW changes nothing, but
        # Lightning counts the PPO iteration (global_step, checkpoints, max_steps).
        optimizer.step()
        self.lr_schedulers().step()
        episodes = episode.query.shape[0] * self.trainer.world_size
        self.kl_ctl.update(stats["kl/mean"], episodes)
        elapsed = time.perf_counter() - step_start
        stats["perf/episodes_per_s"] = episodes / elapsed
        stats["perf/step_time_s"] = elapsed
        stats["train/lr"] = optimizer.param_groups[0]["lr"]
        self.log_dict(stats, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("reward", stats["reward/score_raw"], prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self.log("kl", stats["kl/mean"], prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        every = self.stage.log_samples_every
        if every and self.tracker is not None and iteration % every == 0 and self.trainer.is_global_zero:
            prompts, texts, scores = self._last_samples
            self.tracker.log_table(
                {"step": [iteration] * len(texts), "prompt": [str(p) for p in prompts], "response": texts, "score": scores},
                "samples/train.json",
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        episode, stats, _ = self.rollout(batch, training=False)
        size = episode.query.shape[0]
        names = {"reward/score_raw": "val/score_raw", "reward/gold": "val/gold", "kl/mean": "val/kl",
                 "response/length": "val/response_length", "response/eos_share": "val/eos_share"}
        for key, name in names.items():
            if key in stats:
                self.log(name, stats[key], on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        stage = self.stage
        critic = self.value_head if self.value_model is None else self.value_model
        groups = optim.param_groups(self.policy.named_parameters(), stage.weight_decay, stage.lr)
        groups += optim.param_groups(critic.named_parameters(), stage.weight_decay, stage.critic_lr or stage.lr)
        optimizer = optim.adamw(groups, stage, self.trainer.precision)
        return {"optimizer": optimizer, "lr_scheduler": optim.scheduler(optimizer, stage, optim.total_steps(self.trainer))}

    # -- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(("reference.", "reward."))
        }
        checkpoint["ppo"] = {"kl_controller": self.kl_ctl.state_dict(), "running_reward": self.running.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.load_state_dict(checkpoint["ppo"]["kl_controller"])
        self.running.load_state_dict(checkpoint["ppo"]["running_reward"])


class PromptCollator:
    def __call__(self, items: list[dict]) -> dict:
        return {"prompt_ids": [i["prompt_ids"] for i in items], "prompts": [i["prompt"] for i in items]}


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: PPOStageConfig = run.stage
    policy_source = resolve_source(stage.policy_from, "stage.policy_from", "sft", tracker)
    tokenizer = models.load_tokenizer(run.model, policy_source.location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    gold = load_function(run.data.gold_reward, "data.gold_reward") if run.data.gold_reward else None
    reward, reward_location = load_reward(stage.reward_from, "stage.reward_from", run, tracker, tokenizer)
    if reward.model is not None and str(run.trainer.get("precision")).startswith("bf16"):
        models.store_frozen_in_bf16(reward.model)
    data = prepare_prompts(run.data, renderer, run.seed, stage.rollout.max_new_tokens)
    tracker.log_metrics(data.stats)

    policy = models.load_causal_lm(run.model, policy_source.location, seed=run.seed)
    reference = None
    if run.model.lora.enabled:
        policy = models.apply_lora(policy, run.model.lora, "CAUSAL_LM")
    else:
        reference = models.load_causal_lm(run.model, policy_source.location, seed=run.seed)
    reward_stats = None
    if reward.model is not None:
        config = models.unwrap(reward.model).config
        reward_stats = (config.reward_mean, config.reward_std) if hasattr(config, "reward_mean") else None
    value_model = None
    if stage.critic == "separate":
        if reward.model is not None and not reward.same_tokens:
            raise ConfigError(
                "stage.critic=separate: the value model would start from the reward model, whose tokenizer "
                "differs from the policy's; use stage.critic=shared"
            )
        critic_from = reward_location or policy_source.location
        value_model = models.load_scalar_model(run.model, critic_from, tokenizer.pad_token_id, seed=run.seed)
        if run.model.lora.enabled:
            value_model = models.apply_lora(value_model, run.model.lora, "SEQ_CLS")
    tracker.log_metrics(
        {
            "model/parameters": models.count_parameters(policy),
            "model/trainable_parameters": models.count_parameters(policy, trainable_only=True)
            + (models.count_parameters(value_model, trainable_only=True) if value_model is not None else 0),
        }
    )
    module = PPOModule(
        policy,
        reference,
        value_model,
        reward,
        stage,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=eos_ids(tokenizer, policy),
        max_grad_norm=run.trainer.get("gradient_clip_val"),
        reward_stats=reward_stats,
        gold=gold,
        tracker=tracker,
    )
    datamodule = ExamplesDataModule(
        data.splits,
        PromptCollator(),
        batch_size=stage.rollout.batch_size,
        eval_batch_size=stage.eval_batch_size,
        seed=run.seed,
        num_workers=run.data.num_workers,
    )

    def finish(trainer: pl.Trainer, output_dir: Path) -> dict[str, float]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            models.save_model(module.policy, tokenizer, output_dir / "model")
            if module.value_model is not None:
                models.save_model(module.value_model, tokenizer, output_dir / "value_model")
        return metrics

    return StageJob(module, datamodule, finish, callbacks=[])
