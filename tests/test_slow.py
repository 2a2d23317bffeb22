"""The real model, SmolLM2-135M-Instruct from the packaged GGUF file (minutes on a CPU): pytest -m slow."""

from __future__ import annotations

import pytest
from conftest import runs_of

pytestmark = pytest.mark.slow


def test_quickstart_sft_learns_the_shipped_task(cli, mlflow_client):
    cli(
        "experiment=quickstart",
        "stage=sft",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "stage.limit_eval_batches=2",
        "checkpoint.every_n_steps=0",
        "tracking.log_model=false",
        timeout=1800,
    )
    (run,) = runs_of(mlflow_client, "quickstart", "sft")
    assert run.info.status == "FINISHED"
    assert int(run.data.params["model/parameters"]) == pytest.approx(134.5e6, rel=0.01)
    val = [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "val/loss")]
    assert len(val) >= 2 and val[-1] < val[0], val


def test_reduced_quickstart_loop_ppo_raises_the_gold_score_over_sft(cli, mlflow_client):
    """SFT, a reward model trained on its data, PPO against that reward model, and the evaluation of
    both policies on the same held-out prompts: PPO's responses score higher with the gold annotator,
    which PPO never saw (the quickstart loop cut to a few minutes of each stage)."""
    keep = ["experiment=quickstart", "checkpoint.every_n_steps=0"]
    cli(
        *keep,
        "stage=sft",
        "trainer.max_steps=24",
        "trainer.val_check_interval=24",
        "stage.num_samples=0",
        timeout=1800,
    )
    cli(
        *keep,
        "stage=rm",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "stage.gold_eval_prompts=0",
        timeout=1800,
    )
    cli(*keep, "stage=ppo", "trainer.max_steps=16", "trainer.val_check_interval=16", timeout=1800)
    cli(*keep, "stage=eval", "stage.num_prompts=96", timeout=1800)

    (sft,), (ppo,) = runs_of(mlflow_client, "quickstart", "sft"), runs_of(mlflow_client, "quickstart", "ppo")
    assert ppo.data.tags["rlhf.policy_from.run_id"] == sft.info.run_id
    (report,) = runs_of(mlflow_client, "quickstart", "eval")
    metrics = report.data.metrics
    assert report.data.tags["rlhf.eval.ppo.run_id"] == ppo.info.run_id
    sft_gold, ppo_gold = metrics["eval/sft/gold_mean"], metrics["eval/ppo/gold_mean"]
    assert ppo_gold > sft_gold, (ppo_gold, sft_gold)
    assert metrics["eval/ppo/win_rate_gold"] > 0.5
    assert report.data.tags["rlhf.eval.best_stage"] == "ppo"
