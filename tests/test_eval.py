"""The evaluation stage: win-rate and interval maths, diversity, the report of the smoke pipeline, the
lineage it follows, and the KL it measures."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
from conftest import PIPELINE_STAGES, TESTS_DIR, runs_of, stage_config
from test_sft import history

from rlhf.evaluation import distinct_n, tie_split_interval, wilson_interval, win_rate

# ---------------------------------------------------------------------------------------------------------
# The maths, against hand-computed values


def test_wilson_interval_matches_hand_computation():
    # 8 of 10 at 95%: z = 1.95996, centre = (0.8 + z²/20) / (1 + z²/10), half = z·sqrt(0.016 + z²/400) / (1 + z²/10)
    low, high = wilson_interval(8, 10, 0.95)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # Unlike the normal approximation it stays inside [0, 1] and has width at 0 and n successes.
    low, high = wilson_interval(0, 5)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.4345, abs=1e-4)
    low, high = wilson_interval(5, 5)
    assert low == pytest.approx(0.5655, abs=1e-4) and high == pytest.approx(1.0, abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_narrows_with_more_trials_and_widens_with_confidence():
    assert (
        wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0]
        < wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0]
    )
    narrow, wide = wilson_interval(30, 50, 0.8), wilson_interval(30, 50, 0.99)
    assert wide[0] < narrow[0] < 0.6 < narrow[1] < wide[1]


def test_win_rate_counts_a_tie_as_half_a_win():
    outcome = win_rate([1.0, 2.0, 3.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0, 5.0])
    assert (outcome.wins, outcome.ties, outcome.losses) == (2, 2, 1)
    assert outcome.rate == pytest.approx(0.6)  # (2 + 2 / 2) / 5
    # Outcomes 1, 1, 1/2, 1/2, 0: variance (2 + 2/4) / 5 - 0.6² = 0.14; z = 1.95996,
    # centre (0.6 + z²/10) / (1 + z²/5) = 0.5566, half z·sqrt(0.14/5 + z²/100) / (1 + z²/5) = 0.2856
    assert (outcome.low, outcome.high) == pytest.approx((0.2710, 0.8422), abs=1e-4)
    assert win_rate([1.0, 1.05], [1.0, 1.0], tie_tolerance=0.1).ties == 2


def test_mostly_ties_read_near_a_half_not_as_the_decided_share():
    candidate = [1.0] * 3 + [0.0] + [0.5] * 96  # 3 wins, 1 loss, 96 ties
    outcome = win_rate(candidate, [0.5] * 100)
    assert (outcome.wins, outcome.ties, outcome.losses) == (3, 96, 1)
    assert outcome.rate == pytest.approx(0.51)  # (3 + 48) / 100, not 3 / 4
    assert outcome.low < 0.51 < outcome.high


def test_win_rate_of_identical_scores_is_a_half():
    outcome = win_rate([0.3, 0.3], [0.3, 0.3])
    assert outcome.ties == 2 and outcome.rate == 0.5
    assert (outcome.low, outcome.high) == pytest.approx(tie_split_interval(0, 2, 0))
    assert outcome.low < 0.5 < outcome.high  # all ties still leave room either way
    assert math.isnan(win_rate([], []).rate)


def test_without_ties_the_win_rate_interval_is_wilsons():
    outcome = win_rate([1.0] * 8 + [0.0] * 2, [0.0] * 8 + [1.0] * 2)
    assert (outcome.low, outcome.high) == pytest.approx(wilson_interval(8, 10))


def _coverage(p_win: float, p_tie: float, n: int, draws: int, interval) -> float:
    """Share of simulated evaluations of n pairs whose interval holds the true win rate."""
    rng = random.Random(0)
    truth, covered = p_win + p_tie / 2, 0
    for _ in range(draws):
        outcomes = rng.choices(("win", "tie", "loss"), weights=(p_win, p_tie, 1 - p_win - p_tie), k=n)
        low, high = interval(outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"))
        covered += low <= truth <= high
    return covered / draws


@pytest.mark.parametrize("p_win", [0.25, 0.3])
def test_win_rate_interval_covers_at_its_nominal_level_with_many_ties(p_win):
    # 60% ties, n = 64: a 95% interval must hold the true rate about 95% of the time; Wilson's over
    # wins + ties / 2 successes holds it nearly always, so real gains read as chance.
    def ours(wins, ties, losses):
        outcome = win_rate([1.0] * wins + [0.0] * (ties + losses), [0.0] * (wins + ties) + [1.0] * losses)
        return outcome.low, outcome.high

    assert 0.93 <= _coverage(p_win, 0.6, 64, 2000, ours) <= 0.97
    assert _coverage(p_win, 0.6, 64, 2000, lambda w, t, _: wilson_interval(w + t / 2, 64)) > 0.99


def test_win_rate_needs_paired_scores():
    with pytest.raises(ValueError, match="3 candidate scores but 2 baseline"):
        win_rate([1, 2, 3], [1, 2])


def test_distinct_n_counts_unique_ngrams_over_all_responses():
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)  # a b a a b
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n(["one two three", "four five"], 1) == 1.0
    assert distinct_n(["x", ""], 2) == 0.0  # no bigrams at all


# ---------------------------------------------------------------------------------------------------------
# The report of the shared smoke pipeline (sft, rm, ppo, dpo, grpo, eval)

PER_POLICY = (
    "reward_mean",
    "gold_mean",
    "kl",
    "length",
    "eos_share",
    "distinct_1",
    "distinct_2",
    "perplexity",
)


@pytest.fixture(scope="module")
def report(pipeline):
    return pipeline.client, pipeline.runs


def test_eval_names_the_runs_it_evaluated(report):
    _, runs = report
    evaluation = runs["eval"]
    assert evaluation.info.status == "FINISHED"
    tags = evaluation.data.tags
    # By default the newest lineage: the SFT parent (baseline), then the PPO, DPO and GRPO runs that
    # started from it in the order they ran, judged by the reward model of the lineage's RL runs.
    for index, stage in enumerate(("sft", "ppo", "dpo", "grpo")):
        assert tags[f"rlhf.policies.{index}.run_id"] == runs[stage].info.run_id, stage
    assert tags["rlhf.reward_from.run_id"] == runs["rm"].info.run_id
    assert tags["rlhf.reference.run_id"] == runs["sft"].info.run_id
    # Each policy is named by its stage; the run behind each name is a tag.
    assert tags["rlhf.eval.policies"] == "sft ppo dpo grpo"
    for stage in ("sft", "ppo", "dpo", "grpo"):
        assert tags[f"rlhf.eval.{stage}.run_id"] == runs[stage].info.run_id, stage
    assert tags["rlhf.eval.judge"] == "gold"  # the shipped task has a gold annotator


def test_lineage_tags_chain_every_stage_to_its_start(report):
    _, runs = report
    sft, rm = runs["sft"].info.run_id, runs["rm"].info.run_id
    assert runs["rm"].data.tags["rlhf.init_from.run_id"] == sft
    assert runs["dpo"].data.tags["rlhf.init_from.run_id"] == sft
    for stage in ("ppo", "grpo"):
        assert runs[stage].data.tags["rlhf.policy_from.run_id"] == sft
        assert runs[stage].data.tags["rlhf.reward_from.run_id"] == rm


def test_eval_logs_metrics_per_policy_and_win_rates(report):
    _, runs = report
    metrics = runs["eval"].data.metrics
    sft_label, *trained = "sft", "ppo", "dpo", "grpo"
    # Named by role, so the same names every time: no run ids in them.
    assert not [key for key in metrics if re.search(r"[0-9a-f]{8}", key)]
    for label in (sft_label, *trained):
        missing = [key for key in PER_POLICY if f"eval/{label}/{key}" not in metrics]
        assert not missing, (label, missing)
    assert metrics[f"eval/{sft_label}/kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the SFT policy
    for label in trained:
        assert metrics[f"eval/{label}/kl"] > 0
        assert 0 <= metrics[f"eval/{label}/distinct_1"] <= 1
        for judge in ("rm", "gold"):
            prefix = f"eval/{label}/win_rate_{judge}"
            counts = [metrics[f"eval/{label}/{name}_{judge}"] for name in ("wins", "ties", "losses")]
            assert sum(counts) == 16
            assert metrics[prefix] == pytest.approx((counts[0] + counts[1] / 2) / 16)
            assert metrics[f"{prefix}_low"] <= metrics[prefix] <= metrics[f"{prefix}_high"]
    assert "eval/best/win_rate" in metrics  # the name a sweep optimises


def test_eval_logs_a_side_by_side_table_and_plots(report):
    client, runs = report
    run_id = runs["eval"].info.run_id
    labels = ["sft", "ppo", "dpo", "grpo"]
    table = json.loads(Path(client.download_artifacts(run_id, "eval/comparison.json")).read_text())
    assert table["columns"][0] == "prompt"
    for label in labels:
        assert {f"{label} response", f"{label} reward", f"{label} gold"} <= set(table["columns"])
    assert len(table["data"]) == 16  # experiment=smoke evaluates 16 held-out prompts
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/reward_vs_sqrt_kl.png", "plots/win_rates.png"} <= plots
    assert Path(client.download_artifacts(run_id, "plots/win_rates.png")).read_bytes().startswith(b"\x89PNG")


def test_eval_names_the_best_policy_in_tags_metrics_report_and_description(report):
    """The best policy by the judge (gold here): the highest gold win rate against SFT, the baseline
    counting 0.5; its values again under eval/best/, its run in tags, the report and the run's Overview."""
    client, runs = report
    evaluation = runs["eval"]
    metrics, tags = evaluation.data.metrics, evaluation.data.tags
    rates = {
        "sft": 0.5,
        **{stage: metrics[f"eval/{stage}/win_rate_gold"] for stage in ("ppo", "dpo", "grpo")},
    }
    best = tags["rlhf.eval.best_stage"]
    assert rates[best] == max(rates.values())
    assert tags["rlhf.eval.best_role"] == best
    assert tags["rlhf.eval.best_run_id"] == runs[best].info.run_id
    assert metrics["eval/best/win_rate"] == rates[best]
    assert metrics["eval/best/gold_mean"] == metrics[f"eval/{best}/gold_mean"]
    assert (
        metrics["eval/best/vs_runner_up_low"]
        <= metrics["eval/best/vs_runner_up"]
        <= metrics["eval/best/vs_runner_up_high"]
    )
    assert tags["rlhf.eval.best_clears"] in ("true", "false")
    note = tags["mlflow.note.content"]
    assert note.startswith(f"**Best by the gold annotator: {best}")
    assert "clearly best" in note and "report.html" in note
    for stage in ("sft", "ppo", "dpo", "grpo"):
        assert f"| {stage} |" in note or f"| **{stage}** |" in note
    text = Path(client.download_artifacts(evaluation.info.run_id, "report.md")).read_text()
    assert f"Best by the gold annotator: {best}" in text and "## Policies" in text
    assert f"| **{best}** | {best} | {runs[best].info.run_id[:8]} |" in text
    assert "n = 16 prompts" in text
    page = Path(client.download_artifacts(evaluation.info.run_id, "report.html")).read_text()
    assert page.startswith("<!doctype html>") and page.count('src="data:image/png;base64,') == 2


def test_pipeline_sweep_is_judged_by_its_last_stage(pipeline):
    """The pipeline's parent records the evaluation's best policy as its best run."""
    parent_id = pipeline.runs["eval"].data.tags["mlflow.parentRunId"]
    parent = pipeline.client.get_run(parent_id)
    assert parent.data.params["sweep.optimized_metric"] == "eval/best/win_rate"
    assert parent.info.run_name.startswith("pipeline")
    assert parent.data.tags["rlhf.multirun"] == "pipeline"
    assert parent.data.tags["rlhf.pipeline"] == "sft>rm>ppo>dpo>grpo>eval"
    assert parent.data.params["sweep.name"] == "pipeline"
    results = json.loads(
        Path(pipeline.client.download_artifacts(parent_id, "sweep/results.json")).read_text()
    )
    assert [row["stage"] for row in results["runs"]][0] == "eval"  # the judged stage's run comes first
    assert sorted(row["stage"] for row in results["runs"]) == sorted(PIPELINE_STAGES)
    evaluation = pipeline.runs["eval"]
    best = evaluation.data.tags["rlhf.eval.best_stage"]
    assert parent.data.tags["rlhf.best_run_id"] == pipeline.runs[best].info.run_id
    assert parent.data.metrics["best/eval/best/win_rate"] == evaluation.data.metrics["eval/best/win_rate"]


# ---------------------------------------------------------------------------------------------------------
# Policies named explicitly, and what goes wrong

PPO_REWARDS = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
SAME_TWICE = [
    "experiment=smoke",
    "stage=eval",
    "stage.policies=[base,base]",
    "stage.reference=base",
    "stage.reward_from=fn:rlhf.tasks.assistant.gold_reward",
    "stage.num_prompts=8",
    "stage.perplexity_examples=0",
]


def test_a_policy_against_itself_ties_everywhere_at_zero_kl(tmp_path, cli, mlflow_client):
    """The same seed draws the same responses for every policy, so a policy against itself always ties."""
    cli(*SAME_TWICE)
    (run,) = runs_of(mlflow_client, "smoke", "eval")
    metrics = run.data.metrics
    first, second = run.data.tags["rlhf.eval.policies"].split()
    assert (first, second) == ("base", "base_2")  # the same stage twice: numbered
    assert metrics[f"eval/{second}/ties_rm"] == 8 and metrics[f"eval/{second}/ties_gold"] == 8
    assert metrics[f"eval/{second}/win_rate_rm"] == 0.5  # all ties: half a win each
    assert run.data.tags["rlhf.eval.best_role"] == "base"  # nothing beats the baseline
    assert metrics[f"eval/{first}/kl"] == metrics[f"eval/{second}/kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[f"eval/{first}/reward_mean"] == metrics[f"eval/{second}/reward_mean"]
    assert run.data.tags["rlhf.policies.0"] == "base"


def test_eval_without_a_ppo_run_says_what_to_run(tmp_path, cli, mlflow_client):
    result = cli("experiment=smoke", "stage=eval", check=False)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("rlhf: error:")]
    assert (
        "no finished dpo|grpo|ppo run" in line
        and "python -m rlhf stage=ppo" in line
        and "stage.policies" in line
    )
    (run,) = runs_of(mlflow_client, "smoke", "eval")
    assert run.info.status == "FAILED"


def test_eval_rejects_an_impossible_value_before_loading(tmp_path, cli):
    result = cli("experiment=smoke", "stage=eval", "stage.confidence=1.5", check=False)
    assert result.returncode == 2
    assert "stage.confidence" in result.stderr and "must be in (0, 1)" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# The gold annotator belongs to the shipped task's data


def test_gold_annotator_follows_the_data_source(compose):
    from rlhf.config import validate
    from rlhf.data.sources import gold_annotator

    task = validate(compose(["tracking=none"])).data
    assert gold_annotator(task.gold_reward, task.prompts.path) == "rlhf.tasks.assistant.gold_reward"
    assert gold_annotator(task.gold_reward, task.preference.path) == "rlhf.tasks.assistant.gold_reward"
    own = validate(compose(["tracking=none", "data.prompts.path=my/prompts.jsonl"])).data
    assert gold_annotator(own.gold_reward, own.prompts.path) is None  # it has never seen these prompts
    chosen = validate(
        compose(
            ["tracking=none", "data.prompts.path=my/prompts.jsonl", "data.gold_reward=ppo_rewards.brevity"]
        )
    ).data
    assert (
        gold_annotator(chosen.gold_reward, chosen.prompts.path) == "ppo_rewards.brevity"
    )  # the user's choice
    off = validate(compose(["tracking=none", "data.gold_reward=null"])).data
    assert gold_annotator(off.gold_reward, off.prompts.path) is None


@pytest.mark.slow
def test_eval_on_the_users_prompts_reports_no_gold(tmp_path, cli, mlflow_client):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(12)))
    own = [f"data.prompts.path={prompts}", "data.prompts.eval_split=null", "data.prompts.test_split=null"]
    cli(*SAME_TWICE, *own, "stage.reward_from=fn:ppo_rewards.brevity", env=PPO_REWARDS)
    (run,) = runs_of(mlflow_client, "smoke", "eval")
    assert run.data.tags["rlhf.eval.judge"] == "rm"  # no gold annotator: the reward decides
    assert run.data.metrics["eval/best/win_rate"] == run.data.metrics["eval/base_2/win_rate_rm"] == 0.5
    assert not [key for key in run.data.metrics if "gold" in key]


# ---------------------------------------------------------------------------------------------------------
# Evaluation scores what PPO optimised


def test_a_cut_off_response_scores_the_same_in_eval_as_in_ppo(tiny_model_config, tokenizer):
    """PPO scores the sampled ids; evaluation must too, not the re-rendered text, whose chat template
    closes a response cut off at max_new_tokens with EOS as if it had finished."""
    import torch

    from rlhf.data.tokenize import ChatRenderer, encode_prompts
    from rlhf.lineage import ModelSource
    from rlhf.models import load_scalar_model
    from rlhf.rewards import ModelReward
    from rlhf.rollout import Rollout
    from rlhf.stages.evaluate.module import PolicyResult, score_responses

    renderer = ChatRenderer(tokenizer)
    prompts = ["What is 2 + 3?", "Name the capital city of Kenya."]
    items = [{"prompt": p, "prompt_ids": ids} for p, ids in zip(prompts, encode_prompts(renderer, prompts))]
    cut_off = tokenizer("The capital of Kenya", add_special_tokens=False)["input_ids"]  # no EOS
    finished = tokenizer("5.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    responses = [finished, cut_off]
    model = load_scalar_model(tiny_model_config, None, tokenizer.pad_token_id, seed=3).eval()
    reward = ModelReward(model, tokenizer, renderer, same_tokens=True)
    texts = reward.decode(responses)

    # PPO: the rollout's episode layout, scored as rlhf.stages.ppo scores it
    from rlhf.data.loading import attention_mask, pad

    prompt_ids = [i["prompt_ids"] for i in items]
    episode = Rollout(
        pad(prompt_ids, tokenizer.pad_token_id, left=True),
        attention_mask(prompt_ids, left=True),
        pad(responses, tokenizer.pad_token_id),
        attention_mask(responses),
        *([None] * 7),
    )
    ids, mask, _ = episode.sequences()
    ppo_scores = reward(ids, mask, prompts, texts)

    result = PolicyResult("base", ModelSource("base", None), responses=texts, response_ids=responses)
    score_responses([result], items, reward, tokenizer.pad_token_id, batch_size=1)
    torch.testing.assert_close(torch.tensor(result.rewards), ppo_scores, atol=1e-5, rtol=0)
    # the text path reads the cut-off response as finished and scores it differently
    from_text = reward.score_texts(prompts, texts)
    assert from_text[1] != pytest.approx(result.rewards[1], abs=1e-4)
    assert from_text[0] == pytest.approx(result.rewards[0], abs=1e-4)


def test_rm_and_gold_scores_are_reported_against_sqrt_kl(report):
    """Over-optimisation, measured: every RL run's validations, the report's policies and the
    pipeline's parent run each hold reward-model and gold scores against sqrt(KL)."""
    client, runs = report
    metrics = runs["eval"].data.metrics
    for label in ("sft", "ppo", "dpo", "grpo"):
        assert metrics[f"eval/{label}/sqrt_kl"] == pytest.approx(max(metrics[f"eval/{label}/kl"], 0.0) ** 0.5)
    for stage in ("ppo", "grpo"):
        run_id = runs[stage].info.run_id
        roots = dict(history(client, run_id, "val/sqrt_kl"))
        kls = dict(history(client, run_id, "val/kl"))
        assert roots and roots.keys() == kls.keys(), stage
        for step, root in roots.items():
            assert root == pytest.approx(max(kls[step], 0.0) ** 0.5, rel=1e-4, abs=1e-6), (stage, step)
        assert "plots/reward_vs_sqrt_kl.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
    parent_id = runs["eval"].data.tags["mlflow.parentRunId"]
    figure = Path(client.download_artifacts(parent_id, "plots/reward_vs_sqrt_kl.png"))
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_eval_reports_each_category_of_the_task_apart(report, pipeline):
    """The shipped task's prompts carry their category: scores and win rates per category, whose
    prompt-weighted means give back the overall ones."""
    _, runs = report
    metrics = runs["eval"].data.metrics
    labels = ["sft", "ppo", "dpo", "grpo"]
    table = json.loads(
        Path(pipeline.client.download_artifacts(runs["eval"].info.run_id, "eval/comparison.json")).read_text()
    )
    from rlhf.tasks.assistant import parse_prompt

    counts = {}
    for row in table["data"]:
        category = parse_prompt(row[0]).category
        counts[category] = counts.get(category, 0) + 1
    assert len(counts) >= 2
    for label in labels:
        for judge, name in (("gold", "gold_mean"), ("rm", "reward_mean")):
            per = {c: metrics[f"eval/{label}/{name}/{c}"] for c in counts}
            overall = sum(per[c] * n for c, n in counts.items()) / sum(counts.values())
            assert overall == pytest.approx(metrics[f"eval/{label}/{name}"], rel=1e-6, abs=1e-6), (
                label,
                judge,
            )
    for label in labels[1:]:
        for category in counts:
            rate = metrics[f"eval/{label}/win_rate_gold/{category}"]
            assert (
                metrics[f"eval/{label}/win_rate_gold/{category}_low"]
                <= rate
                <= metrics[f"eval/{label}/win_rate_gold/{category}_high"]
            )
    assert not any(f"eval/{labels[0]}/win_rate" in key for key in metrics)


# ---------------------------------------------------------------------------------------------------------
# The judge of the best policy


def test_judge_is_a_checked_stage_key(compose):
    from rlhf.config import validate
    from rlhf.errors import ConfigError
    from rlhf.stages.evaluate.module import _judge

    assert validate(compose(["stage=eval", "tracking=none"])).stage.judge == "auto"
    with pytest.raises(ConfigError, match=r"stage.judge: must be one of auto, gold, rm, got 'human'"):
        validate(compose(["stage=eval", "tracking=none", "stage.judge=human"]))
    assert (_judge("auto", True, "p"), _judge("auto", False, "p"), _judge("rm", True, "p")) == (
        "gold",
        "rm",
        "rm",
    )
    with pytest.raises(
        ConfigError, match=r"stage.judge=gold: the prompts \(my.jsonl\) have no gold annotator"
    ):
        _judge("gold", False, "my.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Lineage: runs chained by directory are followed to the runs that wrote the directories


def _finished_run(client, experiment_id: str, tags: dict, params: dict | None = None) -> str:
    from mlflow.entities import Param, RunTag

    run_id = client.create_run(experiment_id).info.run_id
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _model_dir(path: Path) -> Path:
    (path / "model").mkdir(parents=True)
    (path / "model" / "config.json").write_text("{}")
    return path / "model"


@pytest.mark.parametrize("log_model", [True, False])
def test_lineage_follows_sources_given_as_directories(tmp_path, monkeypatch, log_model):
    """SFT, RM and PPO chained by directory (a relative one too), then the default evaluation: the
    baseline and reference are the SFT run and the reward the RM run, not the base weights; a policy
    given as a directory is the run that wrote it."""
    from conftest import stage_config, store_uri

    from rlhf.lineage import ModelSource
    from rlhf.stages.evaluate.module import _lineage_defaults, _recorded_run
    from rlhf.tracking import Tracker, open_store

    monkeypatch.chdir(tmp_path)
    client, uri, exp = open_store(store_uri(tmp_path), str(tmp_path), "chained")
    params = {"tracking.log_model": str(log_model)}
    sft_dir, rm_dir, _ = (
        _model_dir(tmp_path / "sft"),
        _model_dir(tmp_path / "rm"),
        _model_dir(tmp_path / "ppo"),
    )
    other = _finished_run(
        client, exp, {"rlhf.stage": "sft", "rlhf.output_dir": str(tmp_path / "other")}, params
    )
    sft = _finished_run(client, exp, {"rlhf.stage": "sft", "rlhf.output_dir": str(tmp_path / "sft")}, params)
    rm = _finished_run(
        client,
        exp,
        {"rlhf.stage": "rm", "rlhf.output_dir": str(tmp_path / "rm"), "rlhf.init_from": str(sft_dir)},
        params,
    )
    _finished_run(
        client,
        exp,
        {
            "rlhf.stage": "dpo",
            "rlhf.output_dir": str(tmp_path / "dpo"),
            "rlhf.init_from": "latest",
            "rlhf.init_from.run_id": other,
        },
        params,
    )
    ppo = _finished_run(
        client,
        exp,
        {
            "rlhf.stage": "ppo",
            "rlhf.output_dir": str(tmp_path / "ppo"),
            "rlhf.policy_from": "sft/model",
            "rlhf.reward_from": str(rm_dir),
        },
        params,
    )
    tracker = Tracker(client, client.create_run(exp).info.run_id, exp, uri)
    stage = stage_config("eval", policies=None, reward_from="lineage", reference="lineage")

    policies, reward_from, reference = _lineage_defaults(stage, tracker)

    def spec(run_id: str, name: str) -> str:
        return f"runs:/{run_id}/model" if log_model else str(tmp_path / name / "model")

    assert policies == [spec(sft, "sft"), spec(ppo, "ppo")]  # the DPO run started from another SFT run
    assert reward_from == spec(rm, "rm") and reference == spec(sft, "sft")
    found = _recorded_run(tracker, ModelSource("sft/model", str(sft_dir)))
    assert found.info.run_id == sft and found.data.tags["rlhf.stage"] == "sft"
    assert _recorded_run(tracker, ModelSource("base", None)) is None
    assert _recorded_run(tracker, ModelSource("elsewhere", str(_model_dir(tmp_path / "elsewhere")))) is None


@pytest.mark.slow
def test_eval_after_stages_chained_by_directory_compares_the_lineage(tmp_path, cli, mlflow_client):
    """The whole way: SFT, RM and PPO each given the previous one's directory, then `stage=eval`."""
    cli("experiment=smoke", "stage=sft", "output_dir=sft")
    cli(
        "experiment=smoke",
        "stage=rm",
        "stage.init_from=sft/model",
        "output_dir=rm",
        "stage.gold_eval_prompts=0",
    )
    cli(
        "experiment=smoke",
        "stage=ppo",
        "stage.policy_from=sft/model",
        "stage.reward_from=rm/model",
        "output_dir=ppo",
    )
    cli("experiment=smoke", "stage=eval", "stage.num_prompts=8", "stage.perplexity_examples=0")
    runs = {stage: runs_of(mlflow_client, "smoke", stage)[0] for stage in ("sft", "rm", "ppo", "eval")}
    tags, metrics = runs["eval"].data.tags, runs["eval"].data.metrics
    assert tags["rlhf.eval.policies"] == "sft ppo"
    assert tags["rlhf.eval.sft.run_id"] == tags["rlhf.reference.run_id"] == runs["sft"].info.run_id
    assert tags["rlhf.eval.ppo.run_id"] == runs["ppo"].info.run_id
    assert tags["rlhf.reward_from.run_id"] == runs["rm"].info.run_id
    assert metrics["eval/sft/kl"] == pytest.approx(0.0, abs=1e-5) and metrics["eval/ppo/kl"] > 0
    assert "eval/ppo/win_rate_gold" in metrics


# ---------------------------------------------------------------------------------------------------------
# KL of what was sampled


def test_eval_kl_is_of_the_distribution_sampled_with_top_k_and_top_p(tiny_model_config, tokenizer):
    """With top-k the policy samples from its k likeliest tokens, renormalised: the KL to the reference
    is that distribution's, exact at each position, so a policy against itself is no longer at 0."""
    import dataclasses

    import torch

    from rlhf.data.tokenize import ChatRenderer, encode_prompts
    from rlhf.models import load_causal_lm
    from rlhf.policy import Sampler, episode_inputs, sampling_logprobs
    from rlhf.stages.evaluate.module import response_kl

    policy = load_causal_lm(tiny_model_config, None, seed=1).eval()
    reference = load_causal_lm(tiny_model_config, None, seed=2).eval()
    prompts = encode_prompts(ChatRenderer(tokenizer), ["What is 2 + 3?", "Name a colour.", "Say hello."])
    rollout = dataclasses.replace(
        stage_config("eval").rollout, batch_size=2, max_new_tokens=5, temperature=0.7, top_k=4, top_p=1.0
    )
    responses = Sampler.from_rollout(rollout, tokenizer, policy)(policy, prompts, seed=0)

    def expected(model, other, k: int) -> list[float]:
        """Summed per position: sum over the k likeliest tokens of p (log p - log q), p renormalised over them."""
        out = []
        with torch.no_grad():
            for prompt, response in zip(prompts, responses):
                ids = torch.tensor([prompt + response])
                at = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
                own = model(input_ids=ids).logits[0, at] / rollout.temperature
                ref = torch.log_softmax(other(input_ids=ids).logits[0, at] / rollout.temperature, -1)
                top, index = own.topk(k, dim=-1)
                p = torch.softmax(top, -1)
                out.append(float((p * (p.log() - ref.gather(-1, index))).sum()))
        return out

    pad = tokenizer.pad_token_id
    kl = response_kl(policy, reference, prompts, responses, rollout, pad, "cpu")
    assert kl == pytest.approx(expected(policy, reference, 4), rel=1e-4, abs=1e-5)
    itself = response_kl(policy, policy, prompts, responses, rollout, pad, "cpu")
    assert itself == pytest.approx(expected(policy, policy, 4), rel=1e-4, abs=1e-5)
    assert min(itself) > 1.0  # what cutting the tail off the distribution costs, 5 tokens of a random model
    full = dataclasses.replace(rollout, top_k=0)
    assert response_kl(policy, policy, prompts, responses, full, pad, "cpu") == pytest.approx(
        [0.0] * 3, abs=1e-5
    )
    # Every sampled token lies in the distribution scored, top-p's nucleus included.
    nucleus = dataclasses.replace(rollout, top_k=0, top_p=0.5)
    sampled = Sampler.from_rollout(nucleus, tokenizer, policy)(policy, prompts, seed=0)
    ids, mask, where, targets = episode_inputs(prompts, sampled, pad)
    with torch.no_grad():
        logprobs = sampling_logprobs(policy, ids, mask, where, nucleus.temperature, 0, 0.5)
    assert torch.isfinite(logprobs.gather(-1, targets[:, None])).all()
    assert torch.isinf(logprobs).any(dim=-1).all()  # and the tail is cut off at every position
    assert min(response_kl(policy, policy, prompts, sampled, nucleus, pad, "cpu")) > 0


def test_missing_test_split_falls_back_to_validation_loudly(caplog):
    from rlhf.stages.evaluate.module import held_out_split
    from rlhf.tracking import SilentTracker

    class Tags(SilentTracker):
        def __init__(self):
            super().__init__()
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    tracker = Tags()
    assert (
        held_out_split({"train": [], "validation": [], "test": []}, "test", "data.prompts", tracker) == "test"
    )
    assert tracker.tags == {}
    with caplog.at_level("WARNING"):
        assert (
            held_out_split({"train": [], "validation": []}, "test", "data.prompts", tracker) == "validation"
        )
    assert "data.prompts has no test split" in caplog.text
    assert tracker.tags == {"rlhf.eval.data.prompts.split": "validation (no test split)"}
