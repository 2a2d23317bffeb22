"""Evaluation: compare policies on held-out prompts the way the field does.

Every policy answers the same prompts with the same sampling seed. Responses are scored by the
reward model of the lineage (or another), by the task's gold annotator when the data has one, and
by cheap automatic metrics: length, distinct-1/2, share ending with EOS, perplexity on the SFT test
split, and KL to the reference policy on the policy's own samples (exact at each position, from the
distribution actually sampled: top-k and top-p included). Win rates against the first
policy (the baseline) count a tie as half a win, (wins + ties / 2) / n, with confidence intervals;
rlhf.report names the best policy by the judge (stage.judge) and writes the report. Policies are
named by the stage of the run they come from (sft, ppo, a second PPO run ppo_2), in metrics
(eval/ppo/win_rate_gold) and in the report; their run ids are tags (rlhf.eval.ppo.run_id).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import hardware, models, plots, report, rl
from rlhf.config import ModelConfig, RolloutConfig, RunConfig
from rlhf.data.formats import prompt_text
from rlhf.data.prepare import CausalLMCollator, prepare_prompts, prepare_sft
from rlhf.data.sources import gold_annotator
from rlhf.data.tokenize import ChatRenderer
from rlhf.errors import ConfigError, LineageError
from rlhf.evaluation import distinct_n, mean
from rlhf.lineage import ModelSource, latest_finished_run, resolve_source
from rlhf.policy import Sampler, completion_loss, episode_inputs, sampling_logprobs
from rlhf.rewards import load_gold, load_reward
from rlhf.stages import StageJob, stages
from rlhf.stages.evaluate import STAGE, EvalStageConfig
from rlhf.tracking import TAG_PREFIX, Tracker

log = logging.getLogger(__name__)


@dataclass
class PolicyResult:
    # Its name in metrics and the report (see policy_roles).
    role: str
    source: ModelSource
    # The stage and id of the run the model comes from, however it was given; None for base weights
    # or a directory no run of the experiment wrote.
    stage: str | None = None
    run_id: str | None = None
    responses: list[str] = field(default_factory=list)
    # the sampled token ids, what the reward model scores when it shares the policy's tokenizer
    response_ids: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def policy_roles(names: Sequence[str]) -> list[str]:
    """Each policy's name in metrics, from its stage (or base, policy): the first of a name keeps it,
    later ones are numbered in order (ppo, ppo_2, ppo_3), so names are the same from one eval to the next."""
    seen: Counter[str] = Counter()
    roles = []
    for name in names:
        seen[name] += 1
        roles.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return roles


def _run_of_directory(tracker: Tracker, directory: str):
    """The newest finished run of the experiment whose output directory holds the model `directory`
    (<output_dir>/model, or <output_dir> itself), None if no run wrote it."""
    path = Path(directory).expanduser().resolve()
    for output_dir in ([path.parent] if path.name == "model" else []) + [path]:
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`{TAG_PREFIX}output_dir` = '{output_dir}' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0]
    return None


def _is_directory_spec(spec: str) -> bool:
    return spec != "base" and not spec.startswith(("latest", "name:", "runs:/", "fn:"))


def _model_spec(run) -> str:
    """How to load a run's model again: its logged `model` artifact, or its output directory when
    the run did not log the model (tracking.log_model=false)."""
    if run.data.params.get("tracking.log_model") == "False":
        return str(Path(run.data.tags[f"{TAG_PREFIX}output_dir"]) / "model")
    return f"runs:/{run.info.run_id}/model"


def _recorded_source(tracker: Tracker, run, key: str) -> tuple[str, str | None]:
    """(spec, run id) of the model a run started from under `key` (policy_from, reward_from, ...),
    as the run recorded it: the run id of a run-given source, or the run that wrote a directory-given one."""
    tags = run.data.tags
    run_id = tags.get(f"{TAG_PREFIX}{key}.run_id")
    if run_id:
        return f"runs:/{run_id}/model", run_id
    spec = tags.get(f"{TAG_PREFIX}{key}", "base")
    if not _is_directory_spec(spec):
        return spec, None
    writer = _run_of_directory(tracker, spec)
    return (_model_spec(writer), writer.info.run_id) if writer else (spec, None)


def _recorded_run(tracker: Tracker, source: ModelSource):
    """The run a resolved model source comes from, however it was given; None for base weights, with
    tracking off, or for a directory no run of the experiment wrote."""
    if not tracker.active or source.location is None:
        return None
    if source.run_id:
        return tracker.client.get_run(source.run_id)
    return _run_of_directory(tracker, source.location)


def _sft_key(stage) -> str:
    """The source key naming the SFT run a policy stage started from (policy_from, init_from)."""
    return next(k for k, upstream in stage.sources.items() if upstream == STAGE.sources["reference"])


def _newest_started_from(tracker: Tracker, stage, sft_run_id: str):
    """The newest finished run of `stage` that started from the SFT run, however it was given."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}stage` = '{stage.name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
    )
    return next((r for r in runs if _recorded_source(tracker, r, _sft_key(stage))[1] == sft_run_id), None)


def _lineage_defaults(stage: EvalStageConfig, tracker: Tracker) -> tuple[list[str], str, str]:
    """(policies, reward_from, reference) of the experiment's newest lineage: the SFT run that the
    newest finished policy run (of a stage whose descriptor says `evaluated`: PPO, DPO, GRPO) started
    from, then the newest finished run of each such stage that started from it; the reward model of
    the newest of them that had one (else the latest RM run); the SFT run as the KL reference. A run
    started from a directory is followed to the run that wrote it."""
    policies, reward_from, reference = stage.policies, stage.reward_from, stage.reference
    if policies is not None and "lineage" not in (reward_from, reference):
        return policies, reward_from, reference
    evaluated = [s for s in stages().values() if s.evaluated]
    names = "|".join(s.name for s in evaluated)
    if not tracker.active:
        raise LineageError(
            f"stage={STAGE.name} without stage.policies needs MLflow tracking to find the latest {names} run"
        )
    newest = [
        (s, r) for s in evaluated if (r := latest_finished_run(tracker.client, tracker.experiment_id, s.name))
    ]
    if not newest:
        raise LineageError(
            f"stage={STAGE.name}: no finished {names} run in this MLflow experiment to evaluate; run "
            f"`python -m rlhf stage=ppo` (or dpo, grpo) first, or set stage.policies=[...] (and stage.reward_from, "
            "stage.reference)"
        )
    head_stage, head = max(newest, key=lambda pair: pair[1].info.end_time or 0)
    parent_spec, parent = _recorded_source(tracker, head, _sft_key(head_stage))
    lineage = [head]
    if parent:
        lineage = [r for s in evaluated if (r := _newest_started_from(tracker, s, parent))]
        lineage.sort(key=lambda r: r.info.start_time or 0)
    if policies is None:
        policies = [parent_spec, *(_model_spec(r) for r in lineage)]
    if reward_from == "lineage":
        reward_from = "latest"  # no run of the lineage used a reward model (DPO alone)
        for r in sorted(lineage, key=lambda r: r.info.end_time or 0, reverse=True):
            if f"{TAG_PREFIX}reward_from" in r.data.tags or f"{TAG_PREFIX}reward_from.run_id" in r.data.tags:
                reward_from = _recorded_source(tracker, r, "reward_from")[0]
                break
    if reference == "lineage":
        reference = parent_spec
    return policies, reward_from, reference


def _judge(setting: str, has_gold: bool, prompts_path: str) -> str:
    """The judge that picks the best policy: stage.judge, auto meaning gold when the data has a gold annotator."""
    if setting == "auto":
        return "gold" if has_gold else "rm"
    if setting == "gold" and not has_gold:
        raise ConfigError(
            f"stage.judge=gold: the prompts ({prompts_path}) have no gold annotator; set "
            "data.gold_reward=module.function, or stage.judge=rm (or auto)"
        )
    return setting


def held_out_split(splits: dict, wanted: str, key: str, tracker: Tracker) -> str:
    """The split to evaluate on: `wanted`, or validation when the data has none such, said in the log
    and in a tag, since validation prompts may have steered training (its checkpoints, early stops)."""
    if wanted in splits:
        return wanted
    log.warning("%s has no %s split: evaluating on its validation split instead", key, wanted)
    tracker.set_tags({f"{TAG_PREFIX}eval.{key}.split": f"validation (no {wanted} split)"})
    return "validation"


def build(run: RunConfig, tracker: Tracker) -> StageJob:
    stage: EvalStageConfig = run.stage
    specs, reward_spec, reference_spec = _lineage_defaults(stage, tracker)
    # Keys double as tag names (rlhf.policies.0, ...), so they avoid MLflow's forbidden brackets.
    sources = [
        resolve_source(
            spec, f"stage.policies.{i}", STAGE.sources["policies"], tracker, STAGE.accepts["policies"]
        )
        for i, spec in enumerate(specs)
    ]
    reference = resolve_source(
        reference_spec, "stage.reference", STAGE.sources["reference"], tracker, STAGE.accepts["reference"]
    )
    gold_name = gold_annotator(run.data.gold_reward, run.data.prompts.path)
    judge = _judge(stage.judge, gold_name is not None, run.data.prompts.path)
    recorded = [_recorded_run(tracker, s) for s in sources]
    found = [r.data.tags.get(f"{TAG_PREFIX}stage") if r else None for r in recorded]
    names = [name or ("base" if s.location is None else "policy") for name, s in zip(found, sources)]
    results = [
        PolicyResult(role, source, name, r.info.run_id if r else None)
        for role, source, name, r in zip(policy_roles(names), sources, found, recorded)
    ]
    tracker.set_tags(
        {
            f"{TAG_PREFIX}eval.policies": " ".join(r.role for r in results),
            f"{TAG_PREFIX}eval.judge": judge,
            **{f"{TAG_PREFIX}eval.{r.role}.run_id": r.run_id for r in results},
            **{f"{TAG_PREFIX}eval.{r.role}.source": r.source.spec for r in results},
        }
    )
    tokenizer = models.load_tokenizer(run.model, sources[-1].location)
    renderer = ChatRenderer(tokenizer, run.data.chat_template)
    prompts_data = prepare_prompts(run.data, renderer, run.seed, stage.rollout.max_new_tokens)
    split = held_out_split(prompts_data.splits, stage.split, "data.prompts", tracker)
    items = prompts_data.splits[split][: stage.num_prompts]
    gold = load_gold(run.data.gold_reward, run.data.prompts.path)
    sft_test = None
    if stage.perplexity_examples:
        sft_data = prepare_sft(run.data, renderer, run.seed)
        sft_split = held_out_split(sft_data.splits, "test", "data.sft", tracker)
        sft_test = sft_data.splits[sft_split][: stage.perplexity_examples]
    rollout = stage.rollout
    about = {
        "Prompts": f"{len(items)} from the {split} split of {run.data.prompts.path}",
        "Sampling": f"temperature {rollout.temperature}, top-k {rollout.top_k or 'off'}, "
        f"top-p {rollout.top_p if rollout.top_p < 1 else 'off'}, at most {rollout.max_new_tokens} new tokens, "
        f"seed {run.seed} (the same draws for every policy)",
        "Baseline": results[0].role
        + (f" ({results[0].source.spec})" if results[0].source.spec != results[0].role else ""),
        "KL reference": reference.spec,
        "Reward model": reward_spec,
        "Gold annotator": gold_name or "none",
        "Judge of the best policy": f"{report.judge_name(judge)} (stage.judge={stage.judge})",
    }
    if tracker.active:
        about = {"Evaluation run": f"{tracker.run_id} (experiment {tracker.experiment_id})", **about}

    def finish(trainer, output_dir: Path) -> dict[str, float]:
        # No Trainer here: the models go where Lightning would put a Trainer's on this hardware.
        device = hardware.device(run.trainer)
        reference_model = (
            models.load_causal_lm(run.model, reference.location, seed=run.seed).to(device).eval()
        )
        for result in results:
            _sample_and_measure(
                result,
                items,
                run.model,
                stage.rollout,
                run.seed,
                tokenizer,
                reference_model,
                sft_test,
                gold,
                device,
            )
        del reference_model
        _score_with_reward(
            results,
            items,
            reward_spec,
            run.model,
            run.data.chat_template,
            stage.rollout.batch_size,
            tracker,
            tokenizer,
            device,
        )
        return _report(results, items, stage, judge, about, tracker, output_dir)

    return StageJob(None, None, finish)


@torch.no_grad()
def response_kl(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    rollout: RolloutConfig,
    pad_token_id: int,
    device,
) -> list[float]:
    """KL to the reference of each response, in nats: at each of its positions the exact KL between
    the distribution the policy sampled from (the rollout's temperature, top-k and top-p) and the
    reference's at the same temperature, summed over the response."""
    kl = []
    for start in range(0, len(responses), rollout.batch_size):
        answers = responses[start : start + rollout.batch_size]
        ids, mask, where, _ = episode_inputs(
            prompt_ids[start : start + rollout.batch_size], answers, pad_token_id, device
        )
        sampled = sampling_logprobs(
            policy, ids, mask, where, rollout.temperature, rollout.top_k, rollout.top_p
        )
        reference_logprobs = sampling_logprobs(reference, ids, mask, where, rollout.temperature)
        per_token = rl.kl_divergence(sampled, reference_logprobs)
        kl += [float(part.sum()) for part in torch.split(per_token, [len(a) for a in answers])]
    return kl


@torch.no_grad()
def _sample_and_measure(
    result,
    items,
    model: ModelConfig,
    rollout: RolloutConfig,
    seed: int,
    tokenizer,
    reference,
    sft_test,
    gold,
    device,
) -> None:
    policy = models.load_causal_lm(model, result.source.location, seed=seed).to(device).eval()
    sampler = Sampler.from_rollout(rollout, tokenizer, policy)
    prompt_ids = [i["prompt_ids"] for i in items]
    # The same seed for every policy: they answer with the same random draws.
    responses = sampler(policy, prompt_ids, seed=seed, batch_size=rollout.batch_size)
    result.responses = tokenizer.batch_decode(responses, skip_special_tokens=True)
    result.response_ids = responses
    result.kl = response_kl(policy, reference, prompt_ids, responses, rollout, tokenizer.pad_token_id, device)
    result.metrics.update(
        {
            "length": mean([float(len(r)) for r in responses]),
            "eos_share": mean([float(sampler.ended(r)) for r in responses]),
            "distinct_1": distinct_n(result.responses, 1),
            "distinct_2": distinct_n(result.responses, 2),
        }
    )
    if gold is not None:
        result.gold = [float(g) for g in gold([prompt_text(i["prompt"]) for i in items], result.responses)]
    if sft_test:
        collate = CausalLMCollator(tokenizer.pad_token_id)
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(sft_test), rollout.batch_size):
            batch = {
                k: v.to(device) for k, v in collate(sft_test[start : start + rollout.batch_size]).items()
            }
            loss, count = completion_loss(
                policy, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            loss_sum, tokens = loss_sum + float(loss), tokens + int(count)
        result.metrics["perplexity"] = math.exp(min(loss_sum / max(tokens, 1), 50.0))


def _score_with_reward(
    results,
    items,
    reward_spec: str,
    model: ModelConfig,
    chat_template: str,
    batch_size: int,
    tracker: Tracker,
    tokenizer,
    device,
) -> None:
    """Score every policy's responses with one reward: a model (with its own tokenizer and template) or a function."""
    key = "stage.reward_from"
    reward, _ = load_reward(
        reward_spec,
        key,
        model,
        chat_template,
        STAGE.sources.get("reward_from"),
        tracker,
        tokenizer,
        batch_size,
        STAGE.accepts["reward_from"],
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
            ids, mask, _, _ = episode_inputs(
                [i["prompt_ids"] for i in part],
                result.response_ids[start : start + batch_size],
                pad_token_id,
                device,
            )
            texts = result.responses[start : start + batch_size]
            scores = reward(ids, mask, [i["prompt"] for i in part], texts)
            result.rewards += [float(x) for x in scores.tolist()]


def _report(
    results: list[PolicyResult],
    items,
    stage: EvalStageConfig,
    judge: str,
    about: dict[str, str],
    tracker: Tracker,
    output_dir: Path,
) -> dict[str, float]:
    """Metrics, the side-by-side table, the plots and the report (Markdown, HTML, the run's
    description) of the measured policies; returns the metrics."""
    policies = [
        report.PolicyScores(
            r.role,
            {"rm": r.rewards, **({"gold": r.gold} if r.gold else {})},
            r.kl,
            r.metrics,
            r.stage,
            r.run_id,
            r.source.spec,
        )
        for r in results
    ]
    comparison = report.compare(policies, [i.get("slice") for i in items], judge, stage.confidence)
    metrics = report.metrics(comparison)
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    best = comparison.best
    if best is not None:
        tracker.set_tags(
            {
                f"{TAG_PREFIX}eval.best_role": best.role,
                f"{TAG_PREFIX}eval.best_stage": best.stage,
                f"{TAG_PREFIX}eval.best_run_id": best.run_id,
                f"{TAG_PREFIX}eval.best_clears": str(comparison.clears).lower(),
            }
        )

    table: dict[str, list] = {"prompt": [str(prompt_text(i["prompt"])) for i in items]}
    for result in results:
        table[f"{result.role} response"] = result.responses
        table[f"{result.role} reward"] = result.rewards
        if result.gold:
            table[f"{result.role} gold"] = result.gold
    tracker.log_table(table, "eval/comparison.json")
    output_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(table).to_csv(output_dir / "comparison.csv", index=False)

    images = _save_figures(comparison, output_dir / "plots")
    tracker.log_artifacts(output_dir / "plots", "plots")
    markdown = report.markdown(comparison, about, {caption: f"plots/{name}" for caption, name in images})
    page = report.html(
        comparison, about, {caption: (output_dir / "plots" / name).read_bytes() for caption, name in images}
    )
    (output_dir / "report.md").write_text(markdown)
    (output_dir / "report.html").write_text(page)
    tracker.log_text(markdown, "report.md")
    tracker.log_text(page, "report.html")
    # The run's description: MLflow shows it on the run's Overview.
    tracker.set_tags({"mlflow.note.content": report.summary(comparison, about)})

    for p in policies:
        prefix = f"eval/{p.role}/"
        log.info(
            "%s: %s",
            p.role,
            ", ".join(
                f"{k[len(prefix) :]} {v:.3g}"
                for k, v in sorted(metrics.items())
                if k.startswith(prefix) and k.count("/") == 2
            ),
        )
    for sentence in report.verdict(comparison):
        log.info("%s", sentence)
    log.info("Report: %s", output_dir / "report.html")
    return metrics


def figures(comparison: report.Comparison) -> list[tuple[str, str, object]]:
    """(caption, file name, figure) of each plot of the comparison, the policies named by role."""
    c, level = comparison, f"{comparison.confidence:.0%}"
    curves = {}
    for p in c.policies:
        means = c.means[p.role]
        gold = means.get("gold", report.Estimate(math.nan, math.nan, math.nan))
        curves[p.role] = curve = plots.KLCurve()
        curve.add(
            means["kl"].value,
            means["rm"].value,
            gold.value,
            kl_interval=means["kl"][1:],
            reward_interval=means["rm"][1:],
            gold_interval=gold[1:],
        )
    out = [
        (
            f"Mean scores against sqrt(KL to the reference), n = {c.n} prompts, {level} intervals",
            "reward_vs_sqrt_kl.png",
            plots.reward_vs_sqrt_kl(
                curves, f"Policies on the same n = {c.n} prompts: means with {level} intervals"
            ),
        )
    ]
    if c.win_rates:
        named = {
            role: {report.judge_name(j): w for j, w in judged.items()} for role, judged in c.win_rates.items()
        }
        out.append(
            (
                f"Win rates against {c.baseline.role}, n = {c.n} prompts, {level} intervals",
                "win_rates.png",
                plots.win_rates(named, c.baseline.role, c.confidence, c.n),
            )
        )
    return out


def _save_figures(comparison: report.Comparison, directory: Path) -> list[tuple[str, str]]:
    """The plots saved as PNG files in `directory`: (caption, file name) each."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    for caption, name, figure in figures(comparison):
        figure.savefig(directory / name, dpi=120)
        plots.close(figure)
        saved.append((caption, name))
    return saved
