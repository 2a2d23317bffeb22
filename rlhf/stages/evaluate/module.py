"""Evaluation: compare policies on held-out prompts the way the field does.

Every policy answers the same prompts with the same sampling seed. Responses are scored by the
reward model of the lineage (or another), by the task's gold annotator when the data has one, and
by cheap automatic metrics: length, distinct-1/2, share ending with EOS, perplexity on the SFT test
split, and KL to the reference policy on the policy's own samples. Win rates against the first
policy (the baseline) count a tie as half a win, (wins + ties / 2) / n, with Wilson intervals; wins,
ties and losses are logged too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import hardware, models, plots, rl
from rlhf.config import ModelConfig, RolloutConfig, RunConfig
from rlhf.data.formats import prompt_text
from rlhf.data.prepare import CausalLMCollator, prepare_prompts, prepare_sft
from rlhf.data.tokenize import ChatRenderer
from rlhf.errors import LineageError
from rlhf.evaluation import WinRate, distinct_n, mean, win_rate
from rlhf.lineage import ModelSource, latest_finished_run, resolve_source
from rlhf.policy import Sampler, completion_loss, episode_inputs, response_logprobs
from rlhf.rewards import load_gold, load_reward
from rlhf.stages import StageJob, stages
from rlhf.stages.evaluate import STAGE, EvalStageConfig
from rlhf.tracking import TAG_PREFIX, Tracker

log = logging.getLogger(__name__)


@dataclass
class PolicyResult:
    label: str
    source: ModelSource
    responses: list[str] = field(default_factory=list)
    # the sampled token ids, what the reward model scores when it shares the policy's tokenizer
    response_ids: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _lineage_defaults(stage: EvalStageConfig, tracker: Tracker) -> tuple[list[str], str, str]:
    """(policies, reward_from, reference) of the experiment's newest lineage: the SFT run that the
    newest finished policy run (of a stage whose descriptor says `evaluated`: PPO, DPO, GRPO) started
    from, then the newest finished run of each such stage that started from it; the reward model of
    the newest of them that had one (else the latest RM run); the SFT run as the KL reference."""
    policies, reward_from, reference = stage.policies, stage.reward_from, stage.reference
    if policies is not None and "lineage" not in (reward_from, reference):
        return policies, reward_from, reference
    evaluated = [s for s in stages().values() if s.evaluated]
    names = "|".join(s.name for s in evaluated)
    if not tracker.active:
        raise LineageError(f"stage={STAGE.name} without stage.policies needs MLflow tracking to find the latest {names} run")
    newest = [(s, r) for s in evaluated if (r := latest_finished_run(tracker.client, tracker.experiment_id, s.name))]
    if not newest:
        raise LineageError(
            f"stage={STAGE.name}: no finished {names} run in this MLflow experiment to evaluate; run "
            f"`python -m rlhf stage=ppo` (or dpo, grpo) first, or set stage.policies=[...] (and stage.reward_from, "
            "stage.reference)"
        )
    head_stage, head = max(newest, key=lambda pair: pair[1].info.end_time or 0)
    parent = head.data.tags.get(_sft_tag(head_stage))
    lineage = [head]
    if parent:
        lineage = [r for s in evaluated if (r := _newest_started_from(tracker, s, parent))]
        lineage.sort(key=lambda r: r.info.start_time or 0)
    parent_spec = f"runs:/{parent}/model" if parent else "base"
    if policies is None:
        policies = [parent_spec, *(f"runs:/{r.info.run_id}/model" for r in lineage)]
    if reward_from == "lineage":
        reward_from = "latest"  # no run of the lineage used a reward model (DPO alone)
        for r in sorted(lineage, key=lambda r: r.info.end_time or 0, reverse=True):
            tags = r.data.tags
            if tags.get(f"{TAG_PREFIX}reward_from.run_id") or tags.get(f"{TAG_PREFIX}reward_from"):
                reward_run = tags.get(f"{TAG_PREFIX}reward_from.run_id")
                reward_from = f"runs:/{reward_run}/model" if reward_run else tags[f"{TAG_PREFIX}reward_from"]
                break
    if reference == "lineage":
        reference = parent_spec
    return policies, reward_from, reference


def _sft_tag(stage) -> str:
    """The tag holding the run id of the SFT run a policy stage started from (policy_from, init_from)."""
    key = next(k for k, upstream in stage.sources.items() if upstream == STAGE.sources["reference"])
    return f"{TAG_PREFIX}{key}.run_id"


def _newest_started_from(tracker: Tracker, stage, sft_run_id: str):
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}stage` = '{stage.name}' and attributes.status = 'FINISHED' "
        f"and tags.`{_sft_tag(stage)}` = '{sft_run_id}'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _label(source: ModelSource, tracker: Tracker, index: int) -> str:
    if source.run_id and tracker.active:
        stage = tracker.client.get_run(source.run_id).data.tags.get(f"{TAG_PREFIX}stage", "run")
        return f"{index}-{stage}-{source.run_id[:8]}"
    if source.location is None:
        return f"{index}-base"
    return f"{index}-{Path(source.location).name}"


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: EvalStageConfig = run.stage
    specs, reward_spec, reference_spec = _lineage_defaults(stage, tracker)
    # Keys double as tag names (rlhf.policies.0, ...), so they avoid MLflow's forbidden brackets.
    sources = [resolve_source(spec, f"stage.policies.{i}", STAGE.sources["policies"], tracker) for i, spec in enumerate(specs)]
    reference = resolve_source(reference_spec, "stage.reference", STAGE.sources["reference"], tracker)
    tokenizer = models.load_tokenizer(run.model, sources[-1].location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    prompts_data = prepare_prompts(run.data, renderer, run.seed, stage.rollout.max_new_tokens)
    split = stage.split if stage.split in prompts_data.splits else "validation"
    items = prompts_data.splits[split][: stage.num_prompts]
    gold = load_gold(run.data.gold_reward, run.data.prompts.path)
    sft_test = None
    if stage.perplexity_examples:
        sft_data = prepare_sft(run.data, renderer, run.seed)
        sft_test = (sft_data.splits.get("test") or sft_data.splits["validation"])[: stage.perplexity_examples]
    results = [PolicyResult(_label(s, tracker, i), s) for i, s in enumerate(sources)]
    tracker.set_tags({f"{TAG_PREFIX}eval.policies": " ".join(r.label for r in results)})

    def finish(trainer, output_dir: Path) -> dict[str, float]:
        # No Trainer here: the models go where Lightning would put a Trainer's on this hardware.
        device = hardware.device(run.trainer)
        reference_model = models.load_causal_lm(run.model, reference.location, seed=run.seed).to(device).eval()
        for result in results:
            _sample_and_measure(
                result, items, run.model, stage.rollout, run.seed, tokenizer, reference_model, sft_test, gold, device
            )
        del reference_model
        _score_with_reward(
            results, items, reward_spec, run.model, run.data.chat_template, stage.rollout.batch_size, tracker,
            tokenizer, device,
        )
        return _report(results, items, stage, gold is not None, tracker, output_dir)

    return StageJob(None, None, finish)


@torch.no_grad()
def _sample_and_measure(
    result, items, model: ModelConfig, rollout: RolloutConfig, seed: int, tokenizer, reference, sft_test, gold, device
) -> None:
    policy = models.load_causal_lm(model, result.source.location, seed=seed).to(device).eval()
    sampler = Sampler.from_rollout(rollout, tokenizer, policy)
    # The same seed for every policy: they answer with the same random draws.
    responses = sampler(policy, [i["prompt_ids"] for i in items], seed=seed, batch_size=rollout.batch_size)
    result.responses = tokenizer.batch_decode(responses, skip_special_tokens=True)
    result.response_ids = responses
    kl = []
    for start in range(0, len(items), rollout.batch_size):
        answers = responses[start : start + rollout.batch_size]
        prompts = [i["prompt_ids"] for i in items[start : start + rollout.batch_size]]
        ids, mask, where, targets = episode_inputs(prompts, answers, tokenizer.pad_token_id, device)
        temperature = rollout.temperature
        own, _ = response_logprobs(policy, ids, mask, where, targets, temperature, with_entropy=False)
        ref, _ = response_logprobs(reference, ids, mask, where, targets, temperature, with_entropy=False)
        lengths = [len(a) for a in answers]
        # k3 per token: unbiased, and never negative for a policy close to its reference.
        for per_response in torch.split(rl.kl_penalty(own, ref, "k3"), lengths):
            kl.append(float(per_response.sum()))
    result.metrics.update(
        {
            "kl": mean(kl),
            "sqrt_kl": math.sqrt(max(mean(kl), 0.0)),
            "length": mean([float(len(r)) for r in responses]),
            "eos_share": mean([float(sampler.ended(r)) for r in responses]),
            "distinct_1": distinct_n(result.responses, 1),
            "distinct_2": distinct_n(result.responses, 2),
        }
    )
    if gold is not None:
        result.gold = [float(g) for g in gold([prompt_text(i["prompt"]) for i in items], result.responses)]
        result.metrics["gold_mean"] = mean(result.gold)
    if sft_test:
        collate = CausalLMCollator(tokenizer.pad_token_id)
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(sft_test), rollout.batch_size):
            batch = {k: v.to(device) for k, v in collate(sft_test[start : start + rollout.batch_size]).items()}
            loss, count = completion_loss(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
            loss_sum, tokens = loss_sum + float(loss), tokens + int(count)
        result.metrics["perplexity"] = math.exp(min(loss_sum / max(tokens, 1), 50.0))


def _score_with_reward(
    results, items, reward_spec: str, model: ModelConfig, chat_template: str, batch_size: int, tracker: Tracker,
    tokenizer, device,
) -> None:
    """Score every policy's responses with one reward: a model (with its own tokenizer and template) or a function."""
    key = "stage.reward_from"
    reward, _ = load_reward(
        reward_spec, key, model, chat_template, STAGE.sources.get("reward_from"), tracker, tokenizer, batch_size
    )
    if reward.model is not None:
        reward.model.to(device)
    score_responses(results, items, reward, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def score_responses(results, items, reward, pad_token_id: int, batch_size: int) -> None:
    """Rewards of every policy's responses, computed as PPO computes them: a reward model sharing the
    policy's tokenizer scores the sampled token ids, so a response cut off at max_new_tokens is scored
    cut off (re-rendering its text would close the turn with EOS); otherwise the texts are scored."""
    device = reward.model.device if reward.model is not None else torch.device("cpu")
    for result in results:
        result.rewards = []
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            ids, mask, _, _ = episode_inputs([i["prompt_ids"] for i in part], result.response_ids[start : start + batch_size], pad_token_id, device)
            texts = result.responses[start : start + batch_size]
            scores = reward(ids, mask, [i["prompt"] for i in part], texts)
            result.rewards += [float(x) for x in scores.tolist()]
        result.metrics["reward_mean"] = mean(result.rewards)


def _by_slice(results, items, confidence: float, has_gold: bool) -> dict[str, float]:
    """Per slice of the prompts (a shipped task's category): each policy's mean scores and its
    win rates against the baseline, so what a judge can check and what it cannot are read apart."""
    # (judge, the name of its mean score, the PolicyResult field holding its scores)
    judges = [("rm", "reward_mean", "rewards")] + ([("gold", "gold_mean", "gold")] if has_gold else [])
    baseline, out = results[0], {}
    for name in sorted({i["slice"] for i in items if "slice" in i}):
        rows = [k for k, item in enumerate(items) if item.get("slice") == name]
        for judge, score_name, field_name in judges:
            base = [getattr(baseline, field_name)[k] for k in rows]
            for result in results:
                scores = [getattr(result, field_name)[k] for k in rows]
                out[f"eval/{result.label}/{score_name}/{name}"] = mean(scores)
                if result is not baseline:
                    outcome = win_rate(scores, base, confidence)
                    prefix = f"eval/{result.label}/win_rate_{judge}/{name}"
                    out.update({prefix: outcome.rate, f"{prefix}_low": outcome.low, f"{prefix}_high": outcome.high})
    return out


def _report(results, items, stage: EvalStageConfig, has_gold: bool, tracker: Tracker, output_dir: Path) -> dict[str, float]:
    baseline = results[0]
    metrics: dict[str, float] = {}
    wins: dict[str, dict[str, WinRate]] = {}
    for result in results:
        for key, value in result.metrics.items():
            metrics[f"eval/{result.label}/{key}"] = value
        if result is baseline:
            continue
        judged = {"rm": win_rate(result.rewards, baseline.rewards, stage.confidence)}
        if has_gold:
            judged["gold"] = win_rate(result.gold, baseline.gold, stage.confidence)
        wins[result.label] = judged
        for judge, outcome in judged.items():
            prefix = f"eval/{result.label}/win_rate_{judge}"
            metrics.update({prefix: outcome.rate, f"{prefix}_low": outcome.low, f"{prefix}_high": outcome.high})
            metrics.update({f"eval/{result.label}/{name}_{judge}": float(getattr(outcome, name))
                            for name in ("wins", "ties", "losses")})
    metrics.update(_by_slice(results, items, stage.confidence, has_gold))
    if wins:  # the last policy against the baseline, under names a sweep can optimise
        last = wins[results[-1].label]
        metrics.update({f"eval/win_rate_{judge}": outcome.rate for judge, outcome in last.items()})
    finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    tracker.log_metrics(finite)

    table: dict[str, list] = {"prompt": [str(prompt_text(i["prompt"])) for i in items]}
    for result in results:
        table[f"{result.label} response"] = result.responses
        table[f"{result.label} reward"] = result.rewards
        if has_gold:
            table[f"{result.label} gold"] = result.gold
    tracker.log_table(table, "eval/comparison.json")
    output_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(table).to_csv(output_dir / "comparison.csv", index=False)
    curves = {}
    for result in results:
        curves[result.label] = plots.KLCurve()
        curves[result.label].add(result.metrics["kl"], result.metrics["reward_mean"],
                                 result.metrics.get("gold_mean", float("nan")))
    figure = plots.reward_vs_sqrt_kl(curves, f"Policies against {results[0].label}")
    tracker.log_figure(figure, "plots/reward_vs_sqrt_kl.png")
    plots.close(figure)
    if wins:
        figure = plots.win_rates(wins, baseline.label, stage.confidence)
        tracker.log_figure(figure, "plots/win_rates.png")
        plots.close(figure)
    for result in results:
        line = ", ".join(f"{k} {v:.3g}" for k, v in sorted(result.metrics.items()))
        log.info("%s: %s", result.label, line)
    for label, judged in wins.items():
        for judge, w in judged.items():
            log.info("%s vs %s by %s: win rate %.2f [%.2f, %.2f] (%d wins, %d ties, %d losses)",
                     label, baseline.label, judge, w.rate, w.low, w.high, w.wins, w.ties, w.losses)
    for key in sorted(k for k in metrics if "/win_rate_" in k and k.count("/") == 3 and not k.endswith(("_low", "_high"))):
        log.info("%s %.2f [%.2f, %.2f]", key, metrics[key], metrics[f"{key}_low"], metrics[f"{key}_high"])
    return metrics
