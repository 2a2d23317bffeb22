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
from conftest import OFFLINE, run_cli, runs_of, store_uri

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
    result = run_cli(
        ["-m", *FAST, "stage.num_samples=0", "stage.lr=1e-3,3e-3", "trainer.max_steps=2,4"], directory
    )
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
    assert parent.data.params["sweep.name"] == "command line"
    # The runs list cuts names off: a child leads with its values of what the sweep varies.
    assert {c.info.run_name.split(" · ")[0] for c in children} == {
        "lr=0.001 max_steps=2",
        "lr=0.001 max_steps=4",
        "lr=0.003 max_steps=2",
        "lr=0.003 max_steps=4",
    }
    assert all(c.info.run_name.split(" · ")[1].startswith("sft-tiny-assistant") for c in children)


def test_grid_parent_holds_its_childrens_results_sorted_by_the_objective(grid):
    _, client = grid
    (parent,) = parents_in(client, "smoke")
    losses = sorted(c.data.metrics["val/loss"] for c in children_of(client, parent))
    results = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "sweep/results.json")).read_text()
    )
    assert results["metric"] == "val/loss" and results["swept"] == ["stage.lr", "trainer.max_steps"]
    assert [row["val/loss"] for row in results["runs"]] == pytest.approx(losses)
    assert {(row["stage.lr"], row["trainer.max_steps"]) for row in results["runs"]} == {
        ("0.001", "2"),
        ("0.001", "4"),
        ("0.003", "2"),
        ("0.003", "4"),
    }
    assert all("val/ppl" in row and row["status"] == "FINISHED" for row in results["runs"])
    # The same table on the parent's Overview page, best first.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("### Results of lr×2 max_steps×2 · sft") and "lowest first" in note
    header, _, *rows = [line for line in note.splitlines() if line.startswith("|")]
    assert header.split(" | ")[:5] == ["| run", "status", "stage.lr", "trainer.max_steps", "val/loss"]
    assert [float(row.split(" | ")[4]) for row in rows] == pytest.approx(losses, rel=1e-3)


def test_a_rejected_job_nests_under_its_failed_sweep_which_says_why(cli, mlflow_client):
    """Job 0's config is refused before anything loads: the sweep stops, and its parent says why."""
    result = cli("-m", *FAST, "stage.lr=-1,1e-3", check=False)
    assert result.returncode == 2 and "rlhf: error: stage.lr" in result.stderr
    runs = runs_of(mlflow_client, "smoke")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # no orphan
    (rejected,) = children_of(mlflow_client, parent)
    assert parent.info.status == "FAILED" and rejected.info.status == "FAILED"
    assert rejected.info.run_name == "lr=-1 · rejected sft-tiny"
    assert parent.data.metrics["sweep/jobs"] == 1 and parent.data.metrics["sweep/jobs_finished"] == 0
    assert parent.data.tags["rlhf.error"].startswith(
        "job 0 (lr=-1 · rejected sft-tiny): ConfigError: stage.lr"
    )
    assert "rejected" in parent.data.tags["mlflow.note.content"]


def test_every_named_sweep_composes_and_validates_with_the_smoke_preset(compose):
    """Every job of every sweep in sweeps/ (the first value of each swept key) is a valid smoke run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import validate
    from rlhf.layout import config_dir, sweeps_dir

    for sweep in sorted(p.stem for p in sweeps_dir().glob("*.yaml")):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            swept = hydra_compose(
                "config", [f"sweep={sweep}", "experiment=smoke"], return_hydra_config=True
            ).hydra.sweeper.params
        first = [
            f"{key}={str(values).split(',')[0]}" for key, values in swept.items() if "(" not in str(values)
        ]
        run = validate(compose([f"sweep={sweep}", "experiment=smoke", "tracking=none", *first]))
        assert run.model.name == "tiny" and run.tracking.experiment == "smoke", sweep


@pytest.mark.slow
def test_a_named_sweep_runs_with_the_smoke_preset(cli, mlflow_client):
    """sft_lora_rank on the tiny random model: LoRA over random weights is a legitimate smoke test."""
    cli(
        "-m",
        "sweep=sft_lora_rank",
        "experiment=smoke",
        "model.lora.r=4,8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "checkpoint.every_n_steps=0",
        "tracking.log_model=false",
    )
    (parent,) = parents_in(mlflow_client, "smoke")
    children = children_of(mlflow_client, parent)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.name"] == "sft_lora_rank"
    assert sorted(c.info.run_name.partition(" ")[0] for c in children) == ["r=4", "r=8"]
    assert all(
        c.info.run_name.startswith(("r=4 · sft-tiny-assistant", "r=8 · sft-tiny-assistant")) for c in children
    )
    assert all(c.info.status == "FINISHED" for c in children)


def test_optuna_sweep_records_the_best_trial(tmp_path, cli, mlflow_client):
    """Reward models from the pretrained weights, on the task's 1-5 ratings with the rating gap as margin."""
    cli(
        "-m",
        "sweep=rm_lr_optuna",
        *FAST,
        "stage.init_from=base",
        "hydra.sweeper.n_trials=3",
        "data.preference.path=task:assistant/ratings",
        "stage.use_margin=true",
        "trainer.max_steps=4",
        "stage.gold_eval_prompts=0",
        "tracking.log_model=false",
    )
    (parent,) = parents_in(mlflow_client, "smoke")
    children = children_of(mlflow_client, parent)
    assert len(children) == 3 and len({c.data.params["stage.lr"] for c in children}) == 3
    assert parent.data.params["sweep.sweeper"] == "OptunaSweeper"
    assert parent.data.params["sweep.direction"] == "maximize"
    top = max(c.data.metrics["val/accuracy"] for c in children)
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(top)
    # Trials may tie on accuracy; the recorded best is one of the tied trials.
    assert parent.data.params["best.stage.lr"] in {
        c.data.params["stage.lr"] for c in children if c.data.metrics["val/accuracy"] == pytest.approx(top)
    }
    results = next(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    assert "best_value" in results.read_text()
    for child in children:
        assert child.data.tags["rlhf.init_from"] == "base"
        assert (
            int(child.data.params["data/preference_train_examples"]) > 256
        )  # 256 rows of ratings, several pairs each


def test_parallel_jobs_all_land_in_one_sqlite_store(tmp_path, cli, mlflow_client):
    """joblib runs jobs in parallel processes; none of their writes to the new sqlite store is lost."""
    cli(
        "-m",
        *FAST,
        "stage.lr=1e-3,2e-3",
        "trainer.max_steps=4",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "tracking.log_model=false",
    )
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
        cfg = hydra_compose(
            "config", overrides=["sweep=overoptimization", "experiment=quickstart"], return_hydra_config=True
        )
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

    curve = validation_curve(
        {
            "val/sqrt_kl": history("val/sqrt_kl", (0, 100, 0.0), (0, 200, 0.5), (1, 300, 1.0)),
            "val/score_raw": history("val/score_raw", (0, 100, 1.0), (0, 200, 1.5), (1, 300, 2.0)),
        }
    )
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
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri(directory),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **OFFLINE},
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
        parents = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`rlhf.sweep` = 'parent'"},
        )["runs"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {
                "experiment_ids": [exp["experiment_id"]],
                "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
            },
        )["runs"]
        assert len(children) == 4
        for child in children:
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            metrics = {m["key"] for m in child["data"]["metrics"]}
            assert {"stage.lr", "trainer.max_steps"} <= params.keys()
            assert {"train/loss", "val/loss"} <= metrics
            listed = _get(
                base, "/api/2.0/mlflow/artifacts/list", run_id=child["info"]["run_id"], path="model"
            )
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
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            str(source),
            "--output-dir",
            str(directory / "executed"),
            "--ExecutePreprocessor.timeout=300",
        ],
        cwd=directory,
        env={**env, "PWD": str(directory)},
        capture_output=True,
        text=True,
        timeout=600,
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
    name, _ = parent_name(
        [], {"stage.kl_coef": "0.01,0.05,0.2", "stage.lr": "1e-6,3e-6,1e-5"}, "ppo_kl", "ppo"
    )
    assert name == "kl_coef×3 lr×3 · ppo_kl" and len(name) <= 30
    name, _ = parent_name([], {"stage.lr": "tag(log, interval(1e-6, 1e-3))"}, "rm_lr_optuna", "rm")
    assert name == "lr∈[1e-6,1e-3] · rm_lr_optuna"
    # Pipelines swept over a setting say both.
    assert parent_name(["stage=sft,rm", "seed=0,1"], {}, None, "sft") == (
        "seed=0,1 · pipeline sft>rm",
        "sft>rm",
    )


# ---------------------------------------------------------------------------------------------------------
# Child run names and the parent's results, from the runs MLflow returns


def _launch(overrides):
    from rlhf.tracking import Launch

    return Launch(output_dir="o", launch_dir=".", overrides=overrides, multirun=True)


def test_a_sweep_job_leads_with_what_its_sweep_varies(monkeypatch):
    from types import SimpleNamespace as NS

    from rlhf.tracking import SWEPT_ENV, run_name

    run = NS(
        tracking=NS(run_name=None), stage=NS(name="dpo"), model=NS(name="tiny"), data=NS(name="assistant")
    )
    monkeypatch.setenv(SWEPT_ENV, "stage.beta")
    name = run_name(run, _launch(["sweep=dpo_beta", "experiment=smoke", "stage.beta=0.01", "seed=3"]))
    assert name == "beta=0.01 · dpo-tiny-assistant seed=3"
    escaped = run_name(run, _launch(["stage.beta=0.01", "stage.init_from=latest\\:pipeline"]))
    assert escaped == "beta=0.01 · dpo-tiny-assistant init_from=latest:pipeline"
    monkeypatch.setenv(SWEPT_ENV, "stage")  # a pipeline: its stage is the name's own first word
    assert run_name(run, _launch(["stage=dpo", "seed=3"])) == "dpo-tiny-assistant seed=3"


def _child(name, status, params, metrics, stage="sft", **tags):
    from types import SimpleNamespace as NS

    return NS(
        info=NS(run_name=name, run_id=name, status=status, start_time=len(name)),
        data=NS(params=params, metrics=metrics, tags={"rlhf.stage": stage, **tags}),
    )


def test_results_of_a_pipeline_show_each_stage_by_its_own_objective_too():
    from rlhf.sweeps import results

    children = [
        _child("s", "FINISHED", {}, {"val/loss": 2.0, "val/ppl": 7.4}, "sft"),
        _child("ee", "FINISHED", {}, {"eval/best/win_rate": 0.6}, "eval"),
    ]
    rows = results(children, ["stage"], "eval/best/win_rate", "maximize")
    assert [(r["run"], r["stage"]) for r in rows] == [("ee", "eval"), ("s", "sft")]
    assert rows[1]["val/loss"] == 2.0 and rows[1]["eval/best/win_rate"] is None


def test_results_put_the_best_first_and_the_unscored_last():
    from rlhf.sweeps import results, results_markdown

    children = [
        _child(
            "a", "FINISHED", {"stage.beta": "0.1"}, {"val/rewards/accuracies": 0.6, "val/gold": 0.3}, "dpo"
        ),
        _child("bb", "FAILED", {"stage.beta": "1.0"}, {}, "dpo", **{"rlhf.error": "RuntimeError: nan loss"}),
        _child(
            "ccc",
            "FINISHED",
            {"stage.beta": "0.01"},
            {"val/rewards/accuracies": 0.8, "val/kl": math.nan},
            "dpo",
        ),
    ]
    rows = results(children, ["stage.beta"], "val/rewards/accuracies", "maximize")
    assert [r["run"] for r in rows] == ["ccc", "a", "bb"]
    assert rows[0] == {
        "run": "ccc",
        "run_id": "ccc",
        "status": "FINISHED",
        "stage.beta": "0.01",
        "val/rewards/accuracies": 0.8,
        "val/gold": None,
        "val/kl": None,
        "val/loss": None,
    }
    assert rows[2]["error"] == "RuntimeError: nan loss"
    json.dumps(rows, allow_nan=False)  # NaN is blank, so the artifact is strict JSON
    text = results_markdown("Results of beta×3 · dpo_beta", rows, "val/rewards/accuracies", "maximize")
    assert "| ccc | FINISHED | 0.01 | 0.8 |" in text and "- bb: RuntimeError: nan loss" in text


def test_dpo_runs_join_the_parents_curves_on_the_gold_panel():
    """DPO logs its KL and gold score once, at the end, and has no reward model."""
    from mlflow.entities import Metric

    from rlhf import plots
    from rlhf.sweeps import validation_curve

    curve = validation_curve(
        {"val/kl": [Metric("val/kl", 4.0, 100, 24)], "val/gold": [Metric("val/gold", 0.4, 100, 24)]}
    )
    assert curve.sqrt_kl == [2.0] and curve.gold == [0.4] and math.isnan(curve.reward[0])
    figure = plots.reward_vs_sqrt_kl({"beta=0.1": curve}, "Validation curves of beta×3 · dpo_beta")
    assert [ax.get_title() for ax in figure.axes] == ["gold score vs sqrt(KL)"]
    assert figure._suptitle.get_text() == "Validation curves of beta×3 · dpo_beta"
    plots.close(figure)
