"""Sweeps: a grid, Optuna, parallel jobs, one MLflow parent per sweep, the server's view, the notebook."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import OFFLINE, run_cli, store_uri

FAST = ["experiment=smoke", "checkpoint.every_n_steps=0", "trainer.val_check_interval=4"]


def children_of(client, parent) -> list:
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def parents_in(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`rlhf.sweep` = 'parent'")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 x 2 grid over the SFT learning rate and step budget."""
    from mlflow.tracking import MlflowClient

    directory = tmp_path_factory.mktemp("grid")
    result = run_cli(["-m", *FAST, "stage.num_samples=0", "stage.lr=1e-3,3e-3", "trainer.max_steps=2,4"], directory)
    assert result.returncode == 0, result.stderr[-4000:]
    return directory, MlflowClient(tracking_uri=store_uri(directory))


def test_grid_lands_four_children_under_one_parent(grid):
    _, client = grid
    (parent,) = parents_in(client, "smoke")
    children = children_of(client, parent)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["stage.lr"], c.data.params["trainer.max_steps"]) for c in children}
    assert combos == {("0.001", "2"), ("0.001", "4"), ("0.003", "2"), ("0.003", "4")}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.optimized_metric"] == "val/loss"
    assert parent.data.params["sweep.swept"] == "stage.lr, trainer.max_steps"
    assert parent.info.run_name == "lr×2 max_steps×2 · sft" and parent.data.tags["rlhf.multirun"] == "sweep"
    assert parent.data.metrics["sweep/jobs_finished"] == 4
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert parent.data.tags["rlhf.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best.data.metrics["val/loss"])
    assert parent.data.params["best.stage.lr"] == best.data.params["stage.lr"]
    definition = client.download_artifacts(parent.info.run_id, "sweep/definition.yaml")
    assert "stage.lr=1e-3,3e-3" in Path(definition).read_text()


def test_optuna_sweep_records_the_best_trial(tmp_path, cli, mlflow_client):
    """Reward models from the pretrained weights, on the task's 1-5 ratings with the rating gap as margin."""
    cli("-m", "sweep=rm_lr_optuna", *FAST, "stage.init_from=base", "hydra.sweeper.n_trials=3",
        "data.preference.path=task:assistant/ratings", "stage.use_margin=true",
        "trainer.max_steps=4", "stage.gold_eval_prompts=0", "tracking.log_model=false")
    (parent,) = parents_in(mlflow_client, "smoke")
    children = children_of(mlflow_client, parent)
    assert len(children) == 3 and len({c.data.params["stage.lr"] for c in children}) == 3
    assert parent.data.params["sweep.sweeper"] == "OptunaSweeper"
    assert parent.data.params["sweep.direction"] == "maximize"
    top = max(c.data.metrics["val/accuracy"] for c in children)
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(top)
    # Trials may tie on accuracy; the recorded best is one of the tied trials.
    assert parent.data.params["best.stage.lr"] in {
        c.data.params["stage.lr"] for c in children if c.data.metrics["val/accuracy"] == pytest.approx(top)}
    results = next(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    assert "best_value" in results.read_text()
    for child in children:
        assert child.data.tags["rlhf.init_from"] == "base"
        assert child.data.metrics["data/preference_train_examples"] > 256  # 256 rows of ratings, several pairs each


def test_parallel_jobs_all_land_in_one_sqlite_store(tmp_path, cli, mlflow_client):
    """joblib runs jobs in parallel processes; none of their writes to the new sqlite store is lost."""
    cli("-m", *FAST, "stage.lr=1e-3,2e-3", "trainer.max_steps=4", "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2", "tracking.log_model=false")
    (parent,) = parents_in(mlflow_client, "smoke")
    children = children_of(mlflow_client, parent)
    assert sorted(c.data.params["stage.lr"] for c in children) == ["0.001", "0.002"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(mlflow_client.get_metric_history(child.info.run_id, "train/loss")) >= 2


def test_slurm_launcher_and_every_sweep_compose(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.layout import config_dir, sweeps_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 240
        for sweep in sorted(p.stem for p in sweeps_dir().glob("*.yaml")):
            cfg = hydra_compose("config", overrides=[f"sweep={sweep}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.params, sweep


def test_overoptimization_sweep_runs_ppo_from_small_to_large_kl_judged_by_gold():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import register_configs
    from rlhf.layout import config_dir
    from rlhf.stages import stages
    from rlhf.sweeps import objective

    register_configs(stages())
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["sweep=overoptimization", "experiment=quickstart"],
                            return_hydra_config=True)
    assert cfg.stage.name == "ppo" and cfg.trainer.val_check_interval == 8
    assert cfg.trainer.max_steps == 48  # twice the quickstart's PPO length, validated 6 times
    assert cfg.validate_before_training  # and once before, so every curve starts at sqrt(KL) = 0
    coefficients = [float(v) for v in str(cfg.hydra.sweeper.params["stage.kl_coef"]).split(",")]
    assert coefficients == sorted(coefficients) and coefficients[0] == 0.0 and coefficients[-1] >= 0.2
    assert objective("ppo", cfg.optimized_metric) == ("val/gold", "maximize")


def test_sweep_curves_keep_a_validation_before_training_apart_from_the_first_iterations():
    """Validated before training and after every iteration, a run logs two validations at step 0;
    the parent's plot draws both points, each with its own scores."""
    from mlflow.entities import Metric

    from rlhf.sweeps import validation_curve

    def history(key, *points):
        return [Metric(key, value, timestamp, step) for step, timestamp, value in points]

    curve = validation_curve({
        "val/sqrt_kl": history("val/sqrt_kl", (0, 100, 0.0), (0, 200, 0.5), (1, 300, 1.0)),
        "val/score_raw": history("val/score_raw", (0, 100, 1.0), (0, 200, 1.5), (1, 300, 2.0)),
    })
    assert curve.sqrt_kl == pytest.approx([0.0, 0.5, 1.0])
    assert curve.reward == pytest.approx([1.0, 1.5, 2.0])
    assert all(math.isnan(g) for g in curve.gold)  # no gold annotator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, endpoint: str, **query) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_shows_the_sweep(grid):
    """`mlflow server` on the sweep's store: the parent, its children, their params, metrics and models."""
    directory, _ = grid
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(directory),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **OFFLINE},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="smoke")["experiment"]
        parents = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]], "filter": "tags.`rlhf.sweep` = 'parent'"})["runs"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]], "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})["runs"]
        assert len(children) == 4
        for child in children:
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            metrics = {m["key"] for m in child["data"]["metrics"]}
            assert {"stage.lr", "trainer.max_steps"} <= params.keys()
            assert {"train/loss", "val/loss"} <= metrics
            listed = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=child["info"]["run_id"], path="model")
            assert "model/model.safetensors" in {f["path"] for f in listed["files"]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_runs_notebook_executes_from_the_launch_directory_without_settings(grid):
    """As a user runs it: `jupyter nbconvert --execute notebooks/compare_runs.ipynb` from where the runs were
    launched, nothing set. The kernel starts in notebooks/; the store is found, none is created."""
    import nbformat

    directory, _ = grid
    source = Path(__file__).parents[1] / "notebooks" / "compare_runs.ipynb"
    stray = source.parent / "mlflow.db"
    existed = stray.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "MLFLOW_TRACKING"))}
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(source),
         "--output-dir", str(directory / "executed"), "--ExecutePreprocessor.timeout=300"],
        cwd=directory, env={**env, "PWD": str(directory)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert stray.exists() == existed, "the notebook created a store beside itself"
    notebook = nbformat.read(directory / "executed" / source.name, as_version=4)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert f"sqlite:///{directory.resolve() / 'mlflow.db'}" in text
    assert "experiment 'smoke': 4 runs of sweep" in text and "metric: val/loss" in text
    # The table shows what varied, not the paths that differ between any two runs.
    assert "stage.lr" in text and "trainer.max_steps" in text and "output_dir" not in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1


# ---------------------------------------------------------------------------------------------------------
# Parent run names: what a row of the MLflow runs list shows before it is cut off


def test_a_multirun_over_stages_is_named_as_a_pipeline_in_order():
    from rlhf.sweeps import parent_name

    assert parent_name(["experiment=smoke", "stage=sft,rm,ppo,eval"], {}, None, "sft") == (
        "pipeline sft>rm>ppo>eval",
        "sft>rm>ppo>eval",
    )


def test_a_sweep_parent_leads_with_what_varies_and_stays_short():
    from rlhf.sweeps import parent_name

    name, pipeline = parent_name(["stage=ppo", "stage.kl_coef=0.01,0.05"], {}, None, "ppo")
    assert (name, pipeline) == ("kl_coef=0.01,0.05 · ppo", None)
    # A named sweep's grid: too long to list, so the values are counted.
    name, _ = parent_name([], {"stage.kl_coef": "0.01,0.05,0.2", "stage.lr": "1e-6,3e-6,1e-5"}, "ppo_kl", "ppo")
    assert name == "kl_coef×3 lr×3 · ppo_kl" and len(name) <= 30
    name, _ = parent_name([], {"stage.lr": "tag(log, interval(1e-6, 1e-3))"}, "rm_lr_optuna", "rm")
    assert name == "lr∈[1e-6,1e-3] · rm_lr_optuna"
    # Pipelines swept over a setting say both.
    assert parent_name(["stage=sft,rm", "seed=0,1"], {}, None, "sft") == ("seed=0,1 · pipeline sft>rm", "sft>rm")
