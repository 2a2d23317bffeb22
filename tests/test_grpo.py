"""GRPO: the critic-free advantage estimators against values worked out by hand, its config, and the
stage end to end (learning a simple reward, resuming, KL in the loss or in the reward)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import count_host_reads, runs_of
from test_ppo import REWARDS, assert_resume_matches
from test_sft import history

from rlhf import rl


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), atol=1e-6, rtol=0)


# -- advantage estimators ---------------------------------------------------------------------------

# Two groups of three responses: rewards 1, 2, 3 and 4, 4, 4.
SCORES = [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]


def test_grpo_baseline_by_hand():
    # group 1: mean 2, unbiased std sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1 -> (r - 2) / (1 + 1e-6)
    # group 2: all equal: std 0 -> 0 / 1e-6 = 0, not NaN
    got = rl.grpo_baseline(t(SCORES), group_size=3)
    close(got, [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    assert not torch.isnan(got).any()


def test_rloo_baseline_by_hand():
    # r_i - mean of the other two: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; 4 - 4 = 0
    close(rl.rloo_baseline(t(SCORES), group_size=3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])


def test_rloo_of_a_pair_is_the_difference():
    close(rl.rloo_baseline(t([5.0, 2.0]), group_size=2), [3.0, -3.0])


def test_reinforce_pp_is_normalised_over_the_batch():
    # One token per response, KL in the loss: the advantages are the scores whitened over the batch.
    # mean 3, unbiased var ((4 + 1 + 0 + 1 + 1 + 1) / 5) = 1.6 -> (r - 3) / sqrt(1.6 + 1e-8)
    mask = torch.ones(6, 1, dtype=torch.float64)
    got = rl.critic_free_advantages(t(SCORES), mask, "reinforce_pp", group_size=3)
    expected = [(s - 3.0) / math.sqrt(1.6 + 1e-8) for s in SCORES]
    close(got.squeeze(-1), expected)


@pytest.mark.parametrize("estimator", sorted(rl.ADVANTAGE_ESTIMATORS))
def test_equal_rewards_give_zero_advantage_and_no_nan(estimator):
    mask = t([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    got = rl.critic_free_advantages(t([0.7, 0.7, 0.7, 0.7]), mask, estimator, group_size=2)
    assert not torch.isnan(got).any()
    close(got, [[0.0] * 3] * 4)


@pytest.mark.parametrize("baseline", [rl.grpo_baseline, rl.rloo_baseline])
def test_equal_float32_scores_give_exactly_zero_advantage(baseline):
    # G = 8 copies of one normal-scale score: the float32 mean is often a rounding step off, and
    # dividing by a std near 1e-7 used to give the whole group an advantage of one sign.
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    scores = values.repeat_interleave(8)
    assert torch.equal(baseline(scores, group_size=8), torch.zeros_like(scores))
    assert rl.equal_groups(scores, group_size=8).all()


@pytest.mark.parametrize("baseline", [rl.grpo_baseline, rl.rloo_baseline])
def test_saturated_binary_groups_give_zero_and_informative_ones_do_not(baseline):
    # Binary rewards normalised over the batch: all-right and all-wrong groups teach nothing.
    raw = torch.tensor([1.0] * 8 + [0.0] * 8 + [1.0, 0.0] * 4)
    scores = (raw - raw.mean()) / raw.std()
    got = baseline(scores, group_size=8).view(3, 8)
    assert torch.equal(got[:2], torch.zeros(2, 8))
    assert (got[2].abs() > 0.1).all()
    assert rl.equal_groups(scores, group_size=8).tolist() == [True, True, False]


def test_scores_a_few_rounding_steps_apart_are_not_pushed_to_plus_minus_one():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0]) + torch.tensor([0.0, 1.0, 2.0, 3.0]) * 1.2e-7
    torch.testing.assert_close(rl.grpo_baseline(scores, group_size=4), torch.zeros(4), atol=0, rtol=0)


def test_kl_in_the_loss_gives_every_token_its_sequence_advantage():
    mask = t([[1, 1, 0], [1, 1, 1]])
    got = rl.critic_free_advantages(t([1.0, 3.0]), mask, "rloo", group_size=2)
    close(got, [[-2.0, -2.0, 0.0], [2.0, 2.0, 2.0]])


def test_kl_in_the_reward_sums_the_penalties_to_the_end():
    # rloo advantages -2, 2; per-token rewards -0.5 * KL plus the advantage on the last real token;
    # each token's advantage is the sum of the rewards from it to the end.
    mask = t([[1, 1, 0], [1, 1, 1]])
    kl = t([[0.2, 0.4, 9.0], [0.2, -0.2, 0.6]]) * mask
    got = rl.critic_free_advantages(t([1.0, 3.0]), mask, "rloo", group_size=2, kl=kl, kl_coef=0.5)
    # row 0: rewards [-0.1, -0.2 - 2] -> [-2.3, -2.2]
    # row 1: rewards [-0.1, 0.1, -0.3 + 2] -> [1.7, 1.8, 1.7]
    close(got, [[-2.3, -2.2, 0.0], [1.7, 1.8, 1.7]])


def test_advantage_estimators_match_the_config_choices():
    from rlhf.stages.grpo import ADVANTAGES

    assert set(ADVANTAGES) == set(rl.ADVANTAGE_ESTIMATORS)


def test_sequence_average_weighs_every_response_the_same():
    values, mask = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]]), t([[1, 1, 1], [1, 0, 0]])
    close(rl.masked_average(values, mask, "token"), 7 / 4)  # (1 + 1 + 1 + 4) / 4 tokens
    close(rl.masked_average(values, mask, "sequence"), 2.5)  # (1 + 4) / 2 responses


# -- config -----------------------------------------------------------------------------------------


def test_grpo_config_composes_and_validates(compose):
    from rlhf.config import validate

    run = validate(compose(["stage=grpo", "tracking=none"]))
    assert (run.stage.group_size, run.stage.advantage, run.stage.kl_in, run.stage.ppo_epochs) == (
        4,
        "grpo",
        "loss",
        1,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage.advantage=ppo", "stage.advantage: must be one of grpo, rloo, reinforce_pp"),
        ("stage.group_size=1", "stage.group_size: must be >= 2 for stage.advantage=grpo"),
        ("stage.kl_in=both", "stage.kl_in: must be one of reward, loss"),
        ("stage.loss_average=batch", "stage.loss_average: must be one of token, sequence"),
        ("stage.rollout.temperature=0", "stage.rollout.temperature: must be > 0"),
    ],
)
def test_grpo_config_rejects_bad_values(compose, override, message):
    from rlhf.config import validate
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(compose(["stage=grpo", "tracking=none", override]))


def test_a_group_of_one_is_fine_for_reinforce_pp(compose):
    from rlhf.config import validate

    validate(compose(["stage=grpo", "tracking=none", "stage.group_size=1", "stage.advantage=reinforce_pp"]))


# -- the stage end to end ---------------------------------------------------------------------------

# The tiny random policy and a reward for short text (tests/ppo_rewards.py): no earlier run needed.
GRPO = [
    "experiment=smoke",
    "stage=grpo",
    "stage.reward_from=fn:ppo_rewards.brevity",
    "tracking.log_model=false",
]
BASE = [*GRPO, "stage.policy_from=base"]


def test_grpo_raises_a_simple_reward_and_logs_what_ppo_logs(pipeline, cli, mlflow_client):
    """Rewarding shorter text, the mean reward of the smoke SFT policy rises clearly within 20
    iterations of 4 x 4 episodes; 4 optimizer steps an iteration, and still one logged step
    (trainer.max_steps) per iteration."""
    cli(
        *GRPO,
        f"stage.policy_from={pipeline.model_dir('sft')}",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "stage.lr=3e-3",
        "stage.kl_coef=0.01",
        "stage.ppo_epochs=4",
        "checkpoint.every_n_steps=0",
        env=REWARDS,
    )
    (run,) = runs_of(mlflow_client, "smoke", "grpo")
    steps, rewards = zip(*history(mlflow_client, run.info.run_id, "reward/score_raw"))
    assert list(steps) == list(range(20))
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    val = [v for _, v in history(mlflow_client, run.info.run_id, "val/score_raw")]
    assert val[-1] > val[0], val
    assert run.data.tags["rlhf.reward_from"] == "fn:ppo_rewards.brevity"
    expected = [
        "reward/score_raw",
        "reward/score",
        "reward/total",
        "reward/gold",
        "reward/group_std",
        "reward/equal_groups",
        "kl/mean",
        "kl/coef",
        "kl/loss",
        "policy/entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/loss",
        "advantages/mean",
        "advantages/std",
        "response/length",
        "response/eos_share",
        "time/generation_s",
        "time/scoring_s",
        "time/training_s",
        "perf/episodes_per_s",
        "train/lr",
        "val/score_raw",
        "val/gold",
        "val/kl",
        "peak_rss_mb",
    ]
    missing = [key for key in expected if key not in run.data.metrics]
    assert not missing, missing
    # From the second epoch on the policy has moved: the ratio is clipped somewhere.
    assert max(v for _, v in history(mlflow_client, run.info.run_id, "policy/clipfrac")) > 0


def test_kl_in_the_loss_or_in_the_reward(cli, mlflow_client):
    """Both places of the KL run, with the other estimators and the sequence-level average."""
    cli(
        "-m",
        *BASE,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "checkpoint.every_n_steps=0",
        "stage.kl_in=loss,reward",
        "stage.advantage=rloo",
        "stage.loss_average=sequence",
        "stage.minibatch_size=6",
        env=REWARDS,
    )
    runs = runs_of(mlflow_client, "smoke", "grpo")
    assert [r.data.params["stage.kl_in"] for r in runs] == ["loss", "reward"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert math.isfinite(run.data.metrics["policy/loss"]) and "val/score_raw" in run.data.metrics
    assert "kl/loss" in runs[0].data.metrics and "kl/loss" not in runs[1].data.metrics


def test_killed_grpo_resumes_to_the_same_result(tmp_path, cli, mlflow_client):
    """Policy, optimizer, running reward statistics, data position and random generators come back from
    the checkpoint: the resumed run matches an uninterrupted one (two optimizer steps an iteration)."""
    args = [
        *BASE,
        "trainer.max_steps=6",
        "checkpoint.every_n_steps=3",
        "trainer.val_check_interval=3",
        "stage.ppo_epochs=2",
        "stage.advantage=reinforce_pp",
        "stage.kl_in=reward",
    ]
    assert_resume_matches(
        args, ("reward/score_raw", "reward/score", "kl/mean", "policy/loss"), tmp_path, cli, mlflow_client
    )


@pytest.mark.distributed
def test_grpo_ddp_on_cpu(cli, mlflow_client):
    """Two ranks, each sampling whole groups for its own prompts."""
    cli(*BASE, "trainer.max_steps=3", "hardware=ddp", "trainer.devices=2", env=REWARDS, timeout=900)
    (run,) = runs_of(mlflow_client, "smoke", "grpo")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perf/episodes_per_s"] > 0


def test_bench_runs_the_grpo_workload(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import OFFLINE, THREADS

    args = [
        "stage=grpo",
        "experiment=smoke",
        "stage.policy_from=base",
        "stage.reward_from=fn:ppo_rewards.brevity",
        "bench.steps=2",
        "bench.batch_size=2",
        "tracking=none",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.bench", *args],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE, **THREADS, **REWARDS},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["workload"].endswith("2 prompts x 4 responses")
    assert figures["steps_timed"] == 2 and figures["episodes_per_s"] > 0 and figures["training_s"] > 0


def test_the_update_synchronises_with_the_host_once_and_logs_the_same_metrics(
    tiny_model_config, tokenizer, monkeypatch
):
    """The metrics of an iteration's passes are summed on the device and read once; with one pass an
    epoch (the whole batch, share 1) the logged loss is the mean of the epochs' losses."""
    import dataclasses

    from conftest import stage_config
    from test_ppo import _fit_one_iteration, _length_reward

    from rlhf.models import load_causal_lm
    from rlhf.policy import Sampler
    from rlhf.rewards import FunctionReward
    from rlhf.stages.grpo.module import GRPOModule

    losses = []
    original = rl.policy_loss

    def recording(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss, stats

    monkeypatch.setattr(rl, "policy_loss", recording)
    rollout = dataclasses.replace(
        stage_config("grpo").rollout, batch_size=4, max_new_tokens=6, temperature=0.7
    )
    stage = stage_config(
        "grpo", rollout=rollout, batch_size=4, group_size=2, minibatch_size=8, ppo_epochs=2, lr=1e-2
    )
    policy = load_causal_lm(tiny_model_config, None, seed=0)
    module = GRPOModule(policy, load_causal_lm(tiny_model_config, None, seed=0),
                        FunctionReward(_length_reward, tokenizer), stage,
                        sampler=Sampler.from_rollout(rollout, tokenizer, policy), max_grad_norm=None, reward_stats=None)  # fmt: skip
    reads = count_host_reads(monkeypatch, module)
    logged = _fit_one_iteration(module, tokenizer)
    assert reads == ["tolist"] and len(losses) == 2
    assert logged["policy/loss"] == pytest.approx(sum(loss.item() for loss in losses) / 2, rel=1e-5, abs=1e-7)
