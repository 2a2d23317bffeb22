"""What the RL stages (PPO, GRPO) share: sampling episodes from the policy and scoring them, the
reward normalisation, and the set-up of policy, reference, reward and prompts from the config.

An RL stage's module extends `RLModule`, which holds the policy, the frozen reference and the reward
and turns a batch of prompts into scored episodes (`sample`); the stage adds what it does with them
(advantages, updates). Its `build` starts from `load_rl_setup`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any

import pytorch_lightning as pl
import torch

from rlhf import models, optim, plots, ranks, rl
from rlhf.config import RunConfig
from rlhf.data.loading import ExamplesDataModule
from rlhf.data.mix import mix_by_category
from rlhf.data.prepare import Prepared, prepare_prompts
from rlhf.data.tokenize import ChatRenderer
from rlhf.lineage import resolve_source
from rlhf.policy import Sampler, join_prompt_response, pad_episodes, response_logprobs
from rlhf.rewards import RewardSource, load_gold, load_reward
from rlhf.tracking import Tracker


@dataclass
class Rollout:
    """A batch of episodes. query (B, P) is left-padded, response (B, R) right-padded; the masks are 1
    on real tokens (a response's up to and including its first EOS). values and returns are None for
    a stage without a critic."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor | None
    returns: torch.Tensor | None

    def select(self, index: torch.Tensor) -> Rollout:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{name: None if t is None else t[index] for name, t in tensors.items()})

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, where) of prompt + response (see join_prompt_response)."""
        return join_prompt_response(self.query, self.query_mask, self.response, self.response_mask)


def scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values listed in the order of mask's true positions, put back into a zero (B, R) tensor."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask.bool()] = flat
    return out


class PromptCollator:
    def __call__(self, items: list[dict]) -> dict:
        return {"prompt_ids": [i["prompt_ids"] for i in items], "prompts": [i["prompt"] for i in items]}


class RLModule(pl.LightningModule):
    """The policy, its frozen reference and the reward, and the episodes they make.

    `stage` is the stage's config, an OnPolicyStageConfig (rlhf.config.schema): this class reads
    only the keys every on-policy stage has.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        reward: RewardSource,
        stage,
        sampler: Sampler,
        max_grad_norm: float | None,
        reward_stats: tuple[float, float] | None,
        gold=None,
        tracker: Tracker | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        # Frozen models are rebuilt from their sources on resume, not stored in checkpoints.
        self.strict_loading = False
        self.policy = policy
        self.reference = reference  # None: the policy with its LoRA adapters disabled
        self.reward = reward
        # Registered, so Lightning moves the reward model to the device with the others; frozen and
        # left out of checkpoints like the reference.
        self.reward_model = reward.model
        self.stage = stage
        self.sampler = sampler
        self.seed = seed
        # Sampling draws made so far, which seed the next (see _sampling_generator).
        self._draws = self._validation_draws = 0
        self.pad_token_id, self.eos_token_ids = sampler.pad_token_id, sampler.eos_token_ids
        self.max_grad_norm = max_grad_norm
        self.reward_stats = reward_stats
        self.running = rl.RunningMoments()
        # The validations' mean scores against sqrt(KL): the run's own over-optimisation curve.
        self.kl_curve = plots.KLCurve()
        self.gold = gold
        self.tracker = tracker
        for frozen in (reference, getattr(reward, "model", None)):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        for model in (policy, reference, getattr(reward, "model", None)):
            if model is not None:
                models.disable_dropout(model)

    def _sampling_generator(self, training: bool) -> torch.Generator:
        """This rank's own random numbers for one draw: the ranks draw different episodes, reproducibly,
        while training's random state stays the same on all ranks. A training draw is seeded from
        (seed, rank, how many training draws came before): every rank makes the same number, and the
        count in the checkpoint resumes sampling exactly where it stopped. A validation draw is seeded
        from (seed, rank, step, its batch), so validations never shift the training draws."""
        base = ranks.sampling_seed(self.seed) * 1_000_003
        if training:
            seed, self._draws = base + self._draws, self._draws + 1
        else:
            seed, self._validation_draws = (
                base + 7_919 * (self.global_step + 1) * 1_000_003 + self._validation_draws,
                self._validation_draws + 1,
            )
        return torch.Generator(self.device).manual_seed(seed % 2**63)

    # -- forward passes -----------------------------------------------------------------------------

    def _policy_pass(self, ids, mask, where, targets, with_entropy: bool):
        """Log-probabilities and entropy (zeros unless with_entropy) of the response tokens (N,), and
        values there (N,) when the stage computes them in the same pass (None here)."""
        logp, entropy = response_logprobs(
            self.policy, ids, mask, where, targets, self.stage.rollout.temperature, with_entropy=with_entropy
        )
        return logp, entropy, None

    def _reference_logprobs(self, ids, mask, where, targets) -> torch.Tensor:
        context = self.policy.disable_adapter() if self.reference is None else nullcontext()
        with context:
            logp, _ = response_logprobs(
                self.reference or self.policy,
                ids,
                mask,
                where,
                targets,
                self.stage.rollout.temperature,
                with_entropy=False,
            )
        return logp

    # -- episodes -----------------------------------------------------------------------------------

    def _precision_context(self):
        """The trainer's autocast (bf16-mixed: bf16 matmuls): the rollout's log-probabilities must be
        computed exactly as the update's, or the first update's ratio is not 1."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()

    @torch.no_grad()
    def sample(self, batch: dict, training: bool = True) -> tuple[Rollout, dict[str, float], list[str]]:
        """One response per prompt of `batch`, scored (see _sample), under the trainer's precision."""
        with self._precision_context():
            return self._sample(batch, training)

    def _sample(self, batch: dict, training: bool) -> tuple[Rollout, dict[str, float], list[str]]:
        """One response per prompt of `batch`, scored: log-probabilities of policy and reference,
        the reward (normalised, clipped, EOS-penalised) and the per-token KL. The episodes have no
        advantages yet (and values only from a policy pass that computes them); `training=False`
        (validation) changes no statistics."""
        stage, timings = self.stage, {}
        start = time.perf_counter()
        responses = self.sampler(
            self.policy, batch["prompt_ids"], generator=self._sampling_generator(training)
        )
        timings["time/generation_s"] = time.perf_counter() - start
        start = time.perf_counter()
        device = self.device
        query, query_mask, response, response_mask = pad_episodes(
            batch["prompt_ids"], responses, self.pad_token_id, device
        )
        partial = Rollout(query, query_mask, response, response_mask, *([None] * 7))
        ids, mask, where = partial.sequences()
        targets = response[response_mask.bool()]
        logprobs, entropy, values = self._policy_pass(ids, mask, where, targets, with_entropy=True)
        logprobs = scatter(logprobs, response_mask)
        ref_logprobs = scatter(self._reference_logprobs(ids, mask, where, targets), response_mask)
        values = scatter(values, response_mask) if values is not None else None
        texts = self.reward.decode(responses)
        raw = self.reward(ids, mask, batch["prompts"], texts).to(device).float()
        timings["time/scoring_s"] = time.perf_counter() - start

        ended = torch.tensor([self.sampler.ended(r) for r in responses], device=device)
        scores = self._normalise(
            rl.penalise_missing_eos(raw, ended, stage.missing_eos_penalty), update=training
        )
        kl = rl.kl_penalty(logprobs, ref_logprobs, stage.kl_estimator) * response_mask
        # What is shown and plotted is k3, never negative: k1's sum over a few samples of a policy near
        # its reference often is, and sqrt_kl would put such a policy at the origin.
        shown_kl = rl.kl_penalty(logprobs, ref_logprobs, "k3") * response_mask
        episode = Rollout(
            query, query_mask, response, response_mask, logprobs, ref_logprobs, values, scores, kl, None, None
        )
        stats = {
            "reward/score_raw": raw.mean().item(),
            "reward/score": scores.mean().item(),
            "kl/mean": shown_kl.sum(-1).mean().item(),
            # the KL as stage.kl_estimator estimates it, the one the penalty applies
            "kl/penalty": kl.sum(-1).mean().item(),
            "response/length": response_mask.sum(-1).float().mean().item(),
            "policy/entropy": entropy.mean().item(),
            "response/eos_share": ended.float().mean().item(),
            **timings,
        }
        if self.gold is not None:
            stats["reward/gold"] = float(sum(self.gold(batch["prompts"], texts)) / len(texts))
        self._last_samples = (batch["prompts"], texts, raw.tolist())
        return episode, stats, texts

    def _normalise(self, raw: torch.Tensor, update: bool) -> torch.Tensor:
        mode = rl.resolve_reward_norm(self.stage.reward_norm, self.reward_stats is not None)
        if mode == "model":
            if self.reward_stats is None:
                raise ValueError("stage.reward_norm=model needs a reward model with stored statistics")
            mean, std = self.reward_stats
            scores = (raw - mean) / max(std, 1e-8)
        elif mode == "running":
            if update:
                gathered = self.all_gather(raw).reshape(-1) if self._trainer is not None else raw
                self.running.update(gathered)
            scores = (raw - self.running.mean) / self.running.std
        else:
            scores = raw
        if self.stage.reward_clip is not None:
            scores = scores.clamp(-self.stage.reward_clip, self.stage.reward_clip)
        return scores

    # -- optimisation -------------------------------------------------------------------------------

    def rollout(self, batch: dict, training: bool = True) -> tuple[Rollout, dict[str, float], list[str]]:
        """Episodes with advantages (the stage's own): sample, then what the stage adds."""
        raise NotImplementedError

    def _update(self, episode: Rollout, optimizer) -> dict[str, float]:
        """The stage's optimizer steps on one rollout batch; returns what to log."""
        raise NotImplementedError

    def _end_iteration(self, stats: dict[str, float], episodes: int) -> None:
        """After an iteration's updates (PPO: the adaptive KL coefficient)."""

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One iteration: a rollout batch, the stage's updates on it, counted as one trainer step
        however many optimizer steps they take (trainer.max_steps counts iterations)."""
        optimizer = self.optimizers()
        iteration = self.global_step  # before this iteration is counted
        step_start = time.perf_counter()
        episode, stats, _ = self.rollout(batch)
        start = time.perf_counter()
        with optim.counted_once(optimizer):
            stats.update(self._update(episode, optimizer))
        stats["time/training_s"] = time.perf_counter() - start
        self.lr_schedulers().step()
        episodes = episode.query.shape[0] * self.trainer.world_size
        self._end_iteration(stats, episodes)
        elapsed = time.perf_counter() - step_start
        stats["perf/episodes_per_s"] = episodes / elapsed
        stats["perf/step_time_s"] = elapsed
        stats["train/lr"] = optimizer.param_groups[0]["lr"]
        self._log_iteration(stats, iteration)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        return float(self.trainer.strategy.reduce(value.detach().clone().float(), reduce_op="mean"))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called by the precision plugin after it unscales the gradients, before each inner step.
        if self.max_grad_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if not k.startswith(("reference.", "reward_model."))
        }
        checkpoint["kl_curve"] = dataclasses.asdict(self.kl_curve)
        checkpoint["sampling_draws"] = self._draws

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_curve = plots.KLCurve(**checkpoint.get("kl_curve", {}))
        self._draws = checkpoint.get("sampling_draws", 0)

    # -- logging ------------------------------------------------------------------------------------

    def _log_iteration(self, stats: dict[str, float], iteration: int) -> None:
        """An iteration's statistics, and every stage.log_samples_every iterations its samples table."""
        self.log_dict(stats, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log(
            "reward",
            stats["reward/score_raw"],
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )
        self.log("kl", stats["kl/mean"], prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        every = self.stage.log_samples_every
        if every and self.tracker is not None and iteration % every == 0 and self.trainer.is_global_zero:
            prompts, texts, scores = self._last_samples
            self.tracker.log_table(
                {
                    "step": [iteration] * len(texts),
                    "prompt": [str(p) for p in prompts],
                    "response": texts,
                    "score": scores,
                },
                "samples/train.json",
            )

    # Validation samples from its own copy of the random state: training draws the same samples
    # whether or not a validation ran, so a run resumed from a checkpoint taken just before one
    # (checkpoints are written before the validation of the same step) continues as it would have.
    def on_validation_epoch_start(self) -> None:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self._random_state = torch.random.fork_rng(devices=devices)
        self._random_state.__enter__()
        self._validation_draws = 0

        # (KL, reward-model score, gold score, episodes) summed over the validation's batches
        self._validation_sums = torch.zeros(4, dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        self._random_state.__exit__(None, None, None)
        if self.trainer.sanity_checking:
            return
        sums = self.trainer.strategy.reduce(self._validation_sums.to(self.device), reduce_op="sum").cpu()
        kl, reward, gold = (sums[:3] / sums[3].clamp(min=1)).tolist()
        self.kl_curve.add(kl, reward, gold if self.gold is not None else float("nan"))
        self.log("val/sqrt_kl", self.kl_curve.sqrt_kl[-1], on_step=False, on_epoch=True, rank_zero_only=True)
        if self.tracker is not None and self.trainer.is_global_zero:
            figure = plots.reward_vs_sqrt_kl(
                {"validation": self.kl_curve}, f"Validations up to iteration {self.global_step}"
            )
            self.tracker.log_figure(figure, "plots/reward_vs_sqrt_kl.png")
            plots.close(figure)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        episode, stats, _ = self.sample(batch, training=False)
        size = episode.query.shape[0]
        names = {
            "reward/score_raw": "val/score_raw",
            "reward/gold": "val/gold",
            "kl/mean": "val/kl",
            "response/length": "val/response_length",
            "response/eos_share": "val/eos_share",
        }
        for key, name in names.items():
            if key in stats:
                self.log(name, stats[key], on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        measured = [stats["kl/mean"], stats["reward/score_raw"], stats.get("reward/gold", 0.0), 1.0]
        self._validation_sums += torch.tensor(measured, dtype=torch.float64) * size


@dataclass
class RLSetup:
    """What an RL stage starts from, loaded as its config says."""

    tokenizer: Any
    # The starting policy (with LoRA adapters when model.lora is on) and where it came from.
    policy: torch.nn.Module
    policy_location: str | None
    # A frozen copy of the starting policy; None with LoRA (the policy with its adapters off).
    reference: torch.nn.Module | None
    reward: RewardSource
    # The reward model's directory (None for a function) and its stored score statistics.
    reward_location: str | None
    reward_stats: tuple[float, float] | None
    # Tokenised prompts by split.
    data: Prepared
    # The data's gold annotator, when it has one.
    gold: Callable | None


def load_rl_setup(
    run: RunConfig, tracker: Tracker, sources: dict[str, str], accepts: dict[str, tuple[str, ...]]
) -> RLSetup:
    """Policy (stage.policy_from), reference, reward (stage.reward_from), prompts and gold annotator;
    `sources` and `accepts` are the stage descriptor's: which stage's run `latest` finds for each,
    and which kinds of model each may be."""
    stage = run.stage
    policy_source = resolve_source(
        stage.policy_from, "stage.policy_from", sources["policy_from"], tracker, accepts["policy_from"]
    )
    tokenizer = models.load_tokenizer(run.model, policy_source.location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    gold = load_gold(run.data.gold_reward, run.data.prompts.path)
    reward, reward_location = load_reward(
        stage.reward_from,
        "stage.reward_from",
        run.model,
        run.data.chat_template,
        sources["reward_from"],
        tracker,
        tokenizer,
        accepts=accepts["reward_from"],
    )
    data = prepare_prompts(run.data, renderer, run.seed, stage.rollout.max_new_tokens)
    data.splits["train"] = mix_by_category(data.splits["train"], run.data.prompt_mix, run.seed)
    data.prompts["train"] = [item["prompt"] for item in data.splits["train"]]
    tracker.log_constants(data.stats)

    policy = models.load_causal_lm(run.model, policy_source.location, seed=run.seed)
    reference = None
    if run.model.lora.enabled:
        policy = models.apply_lora(policy, run.model.lora, "CAUSAL_LM")
    else:
        reference = models.load_causal_lm(run.model, policy_source.location, seed=run.seed)
    if reward.model is not None and str(run.trainer.get("precision")).startswith("bf16"):
        models.store_frozen_in_bf16(reward.model)
    reward_stats = None
    if reward.model is not None:
        config = models.unwrap(reward.model).config
        reward_stats = (config.reward_mean, config.reward_std) if hasattr(config, "reward_mean") else None
    return RLSetup(
        tokenizer,
        policy,
        policy_source.location,
        reference,
        reward,
        reward_location,
        reward_stats,
        data,
        gold,
    )


def prompt_datamodule(run: RunConfig, data: Prepared) -> ExamplesDataModule:
    """Batches of stage.rollout.batch_size prompts per device (validation: stage.eval_batch_size)."""
    return ExamplesDataModule(
        data.splits,
        PromptCollator(),
        batch_size=run.stage.rollout.batch_size,
        eval_batch_size=run.stage.eval_batch_size,
        seed=run.seed,
        num_workers=run.data.num_workers,
    )
