"""The processes of a data-parallel job: what rank 0 decides reaches the other ranks however they were
started (Lightning's launcher, torchrun, SLURM), and each rank samples its own episodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import OFFLINE, TESTS_DIR, THREADS, runs_of

from rlhf import ranks

DDP = ("hardware=ddp", "trainer.devices=2")


def _ddp_script(script: str, out, timeout: float = 600) -> list[dict]:
    env = {
        **os.environ,
        **OFFLINE,
        **THREADS,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / script), str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_rank_comes_from_whichever_launcher_started_the_process(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert ranks.rank() == 0 and ranks.is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun starts every task itself
    assert ranks.rank() == 3 and not ranks.is_rank_zero()
    monkeypatch.setenv("RANK", "1")  # torchrun
    assert ranks.rank() == 1
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child started by Lightning's launcher
    assert ranks.rank() == 1


def test_without_a_process_group_each_process_decides_for_itself():
    assert ranks.share(lambda: "mine") == "mine"
    assert ranks.sampling_seed(7, 0) == 7 and ranks.sampling_seed(7, 1) != ranks.sampling_seed(7, 0)


@pytest.mark.distributed
def test_two_ranks_draw_different_responses_and_a_rerun_draws_the_same(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    runs = [_ddp_script("ddp_sampling.py", first), _ddp_script("ddp_sampling.py", second)]
    for rank0, rank1 in runs:
        assert rank0["weights"] == rank1["weights"], "training starts from the same weights on every rank"
        assert rank0["responses"] != rank1["responses"], "both ranks drew the same episodes"
    assert runs[0] == runs[1], "a rerun with the same seed draws other responses"


@pytest.mark.slow
@pytest.mark.distributed
def test_the_whole_pipeline_runs_data_parallel(cli, mlflow_client):
    """Rank 1 runs the multirun Lightning restarted for it; it learns each stage's sources from rank 0."""
    cli(
        "-m",
        "experiment=smoke",
        "stage=sft,rm,ppo,dpo,grpo,eval",
        *DDP,
        "tracking.log_model=true",
        timeout=1800,
    )
    runs = [r for r in runs_of(mlflow_client, "smoke") if r.data.tags.get("rlhf.sweep") != "parent"]
    assert [r.data.tags["rlhf.stage"] for r in runs] == ["sft", "rm", "ppo", "dpo", "grpo", "eval"]
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert runs[-1].data.tags["rlhf.eval.policies"].split() == ["sft", "ppo", "dpo", "grpo"]
    assert len([r for r in runs_of(mlflow_client, "smoke") if r.data.tags.get("rlhf.sweep") == "parent"]) == 1


def _torchrun(cli_dir, *args: str) -> None:
    env = {
        **os.environ,
        **OFFLINE,
        **THREADS,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhf", *args]
    result = subprocess.run(command, cwd=cli_dir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.distributed
def test_torchrun_starts_every_rank_and_records_one_run_each(tmp_path, mlflow_client):
    """torchrun starts both ranks itself (nothing inherited from rank 0): SFT, then PPO from it."""
    _torchrun(tmp_path, "experiment=smoke", "stage=sft", *DDP, "trainer.max_steps=4")
    _torchrun(
        tmp_path,
        "experiment=smoke",
        "stage=ppo",
        *DDP,
        "trainer.max_steps=2",
        "stage.reward_from=fn:ppo_rewards.brevity",
        "tracking.log_model=false",
    )
    sft, ppo = runs_of(mlflow_client, "smoke", "sft"), runs_of(mlflow_client, "smoke", "ppo")
    assert len(sft) == 1 and len(ppo) == 1, (len(sft), len(ppo))
    assert sft[0].info.status == ppo[0].info.status == "FINISHED"
    assert ppo[0].data.tags["rlhf.policy_from.run_id"] == sft[0].info.run_id
    assert ppo[0].data.metrics["perf/episodes_per_s"] > 0


@pytest.mark.distributed
def test_the_slurm_launcher_composes_and_submits_through_submitit(tmp_path, mlflow_client):
    """The shipped conf/hydra/launcher/slurm.yaml, its job pickled and run by submitit (its local
    executor standing in for sbatch: tests/slurm_local.py)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {
        **os.environ,
        **OFFLINE,
        **THREADS,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        str(TESTS_DIR / "slurm_local.py"),
        "-m",
        "experiment=smoke",
        "stage=sft",
        "trainer.max_steps=2",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.sweep.dir=multirun",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Submitit 'slurm' sweep" in result.stdout + result.stderr, "the SLURM launcher did not run"
    assert list((tmp_path / "multirun" / ".submitit").glob("*/*_log.out")), "no job went through submitit"
    (run,) = runs_of(mlflow_client, "smoke", "sft")
    assert run.info.status == "FINISHED"
