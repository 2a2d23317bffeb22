"""Which earlier run a stage starts from: `latest` said out loud, and pinned without copying ids."""

from __future__ import annotations

import logging
import time

import pytest

from rlhf.errors import LineageError
from rlhf.lineage import resolve_source
from rlhf.tracking import Tracker, open_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An experiment holding a pipeline (SFT, RM under one parent), then a later grid's SFT run, and
    the run that looks for them."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    client, uri, exp_id = open_store(None, str(tmp_path), "lineage")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def run(name: str, stage: str | None, parent: str | None = None, loss: float | None = None, **tags):
        created = client.create_run(exp_id, run_name=name)
        run_id = created.info.run_id
        for key, value in {"rlhf.stage": stage, "mlflow.parentRunId": parent, **tags}.items():
            if value is not None:
                client.set_tag(run_id, key, value)
        if loss is not None:
            client.log_metric(run_id, "val/loss", loss)
        if stage:
            client.log_artifacts(run_id, str(model), "model")
        client.set_terminated(run_id, "FINISHED")
        time.sleep(0.01)  # start times order the runs
        return run_id

    pipeline = run("pipeline sft>rm", None, **{"rlhf.multirun": "pipeline", "rlhf.sweep": "parent"})
    runs = {
        "pipeline_sft": run("sft-tiny-assistant", "sft", pipeline, loss=2.5),
        "pipeline_rm": run("rm-tiny-assistant", "rm", pipeline),
    }
    grid = run("lr×2 · sft", None, **{"rlhf.multirun": "sweep", "rlhf.sweep": "parent"})
    runs["grid_sft"] = run("lr=3e-4 · sft-tiny-assistant", "sft", grid, loss=10.4)
    current = client.create_run(exp_id, run_name="dpo-tiny-assistant").info.run_id
    return Tracker(client, current, exp_id, uri), runs


def test_latest_says_which_run_it_found(store, caplog):
    tracker, runs = store
    with caplog.at_level(logging.INFO, logger="rlhf.lineage"):
        source = resolve_source("latest", "stage.init_from", "sft", tracker)
    assert source.run_id == runs["grid_sft"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rlhf.lineage"]
    assert line.startswith("stage.init_from=latest: sft run 'lr=3e-4 · sft-tiny-assistant'")
    assert runs["grid_sft"] in line and "started 20" in line and "val/loss = 10.4" in line


def test_latest_pipeline_pins_the_newest_pipelines_run(store, caplog):
    tracker, runs = store
    with caplog.at_level(logging.INFO, logger="rlhf.lineage"):
        source = resolve_source("latest:pipeline", "stage.init_from", "sft", tracker)
    assert source.run_id == runs["pipeline_sft"]
    assert any("val/loss = 2.5" in r.getMessage() for r in caplog.records)
    assert resolve_source("latest:pipeline", "stage.reward_from", "rm", tracker).run_id == runs["pipeline_rm"]


def test_latest_pipeline_without_a_pipeline_says_what_to_run(store):
    tracker, _ = store
    with pytest.raises(
        LineageError,
        match=r"^stage.init_from=latest:pipeline: no pipeline with a finished ppo run.*stage=sft,rm",
    ):
        resolve_source("latest:pipeline", "stage.init_from", "ppo", tracker)


def test_a_run_is_pinned_by_its_name(store):
    tracker, runs = store
    assert (
        resolve_source("name:lr=3e-4 · sft-tiny-assistant", "stage.init_from", "sft", tracker).run_id
        == runs["grid_sft"]
    )
    with pytest.raises(
        LineageError, match=r"^stage.policy_from=name:rm-tiny-assistant: that run is a rm run; .* sft run"
    ):
        resolve_source("name:rm-tiny-assistant", "stage.policy_from", "sft", tracker)
    with pytest.raises(LineageError, match=r"^stage.init_from=name:nope: no finished run named 'nope'"):
        resolve_source("name:nope", "stage.init_from", "sft", tracker)
