"""PPO end to end: lineage and observability, learning, resuming, and the other critic and LoRA set-ups."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import TESTS_DIR, runs_of
from test_sft import _start, _wait_for, history

# tests/ppo_rewards.py holds simple reward functions the CLI imports.
REWARDS = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}


def test_ppo_run_names_its_policy_and_reward_runs(pipeline):
    sft, rm, ppo = (pipeline.runs[s] for s in ("sft", "rm", "ppo"))
    assert ppo.info.status == "FINISHED"
    tags = ppo.data.tags
    assert tags["rlhf.policy_from"] == "latest" and tags["rlhf.policy_from.run_id"] == sft.info.run_id
    assert tags["rlhf.reward_from"] == "latest" and tags["rlhf.reward_from.run_id"] == rm.info.run_id
    assert ppo.data.params["stage.critic"] == "separate"


def test_ppo_logs_what_a_researcher_watches(pipeline):
    ppo = pipeline.runs["ppo"]
    expected = [
        "reward/score_raw", "reward/score", "reward/non_score", "reward/total", "reward/gold", "kl/mean", "kl/coef",
        "policy/entropy", "policy/clipfrac", "policy/approx_kl", "value/loss", "value/clipfrac",
        "value/explained_variance", "advantages/mean", "advantages/std", "response/length", "response/eos_share",
        "time/generation_s", "time/scoring_s", "time/training_s", "perf/episodes_per_s", "train/lr",
        "val/score_raw", "val/gold", "val/kl", "peak_rss_mb",
    ]
    missing = [key for key in expected if key not in ppo.data.metrics]
    assert not missing, missing
    # One value per PPO iteration: trainer.max_steps counts iterations, not optimizer updates.
    steps = [step for step, _ in history(pipeline.client, ppo.info.run_id, "reward/score_raw")]
    assert steps == list(range(12))
    assert ppo.data.metrics["ppo/updates"] == 4  # 2 epochs x 8 episodes / minibatches of 4
    table = json.loads(Path(pipeline.client.download_artifacts(ppo.info.run_id, "samples/train.json")).read_text())
    assert table["columns"] == ["step", "prompt", "response", "score"]
    assert {row[0] for row in table["data"]} == {0, 4, 8}


def test_ppo_saves_a_plain_causal_lm(pipeline):
    from transformers import AutoModelForCausalLM

    local = pipeline.client.download_artifacts(pipeline.runs["ppo"].info.run_id, "model")
    model = AutoModelForCausalLM.from_pretrained(local)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (pipeline.model_dir("ppo").parent / "value_model" / "config.json").is_file()


PPO = ["experiment=smoke", "stage=ppo", "stage.reward_from=fn:ppo_rewards.brevity", "tracking.log_model=false"]


def test_ppo_raises_a_simple_reward(pipeline, cli, mlflow_client):
    """Rewarding shorter text, the mean reward rises clearly within a few dozen iterations."""
    cli(*PPO, f"stage.policy_from={pipeline.model_dir('sft')}", "trainer.max_steps=30", "stage.lr=3e-3",
        "stage.kl_coef=0.01", "stage.ppo_epochs=4", env=REWARDS)
    (run,) = runs_of(mlflow_client, "smoke", "ppo")
    rewards = [v for _, v in history(mlflow_client, run.info.run_id, "reward/score_raw")]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2, rewards
    val = [v for _, v in history(mlflow_client, run.info.run_id, "val/score_raw")]
    assert val[-1] > val[0], val
    assert run.data.tags["rlhf.reward_from"] == "fn:ppo_rewards.brevity"


def test_killed_ppo_resumes_to_the_same_result(pipeline, tmp_path, cli, mlflow_client):
    """Policy, value model, optimizer, KL controller, reward statistics, data position and random
    generators come back from the checkpoint: the resumed run matches an uninterrupted one."""
    args = [*PPO, f"stage.policy_from={pipeline.model_dir('sft')}", "trainer.max_steps=6",
            "checkpoint.every_n_steps=3", "stage.kl_target=1.0"]
    assert_resume_matches(args, ("reward/score_raw", "kl/mean", "kl/coef"), tmp_path, cli, mlflow_client)


def assert_resume_matches(args, keys, tmp_path, cli, mlflow_client) -> None:
    """Runs `args` (6 steps, a checkpoint every 3) whole, and again killed after its step-3 checkpoint
    and resumed; each metric of `keys` must be the same at steps 3 to 5."""
    cli(*args, "tracking.experiment=whole", env=REWARDS)
    process = _start([*args, "tracking.experiment=cut"], tmp_path, env=REWARDS)
    _wait_for(lambda: any((tmp_path / "outputs").glob("*/*/checkpoints/step-000003.ckpt")), 600, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    cli(*args, "tracking.experiment=cut", "resume=true", env=REWARDS)
    (whole,) = runs_of(mlflow_client, "whole")
    (resumed,) = runs_of(mlflow_client, "cut")
    assert resumed.info.status == "FINISHED"
    for key in keys:
        expected = dict(history(mlflow_client, whole.info.run_id, key))
        got = dict(history(mlflow_client, resumed.info.run_id, key))
        assert max(expected) == max(got) == 5
        for step in range(3, 6):
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (key, step)


def test_shared_critic_and_lora(pipeline, cli, mlflow_client):
    """A value head on the policy, and LoRA with the adapters-off policy as the reference."""
    sft_dir = pipeline.model_dir("sft")
    local_model = ["model=tiny", "model.random_init=null", "model.gguf_file=null", f"model.name_or_path={sft_dir}"]
    cli("-m", *PPO, f"stage.policy_from={sft_dir}", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "stage.critic=shared,separate", "model.lora.enabled=true", *local_model, env=REWARDS)
    runs = runs_of(mlflow_client, "smoke", "ppo")
    assert [r.data.params["stage.critic"] for r in runs] == ["shared", "separate"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["model/trainable_parameters"] < run.data.metrics["model/parameters"]
        assert run.data.metrics["kl/mean"] != 0.0  # the adapters moved the policy away from the reference


@pytest.mark.distributed
def test_ppo_ddp_on_cpu(pipeline, cli, mlflow_client):
    cli(*PPO, f"stage.policy_from={pipeline.model_dir('sft')}", "trainer.max_steps=3", "hardware=ddp",
        "trainer.devices=2", env=REWARDS, timeout=900)
    (run,) = runs_of(mlflow_client, "smoke", "ppo")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perf/episodes_per_s"] > 0
