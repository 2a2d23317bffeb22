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
    assert run.data.metrics["model/parameters"] == pytest.approx(134.5e6, rel=0.01)
    val = [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "val/loss")]
    assert len(val) >= 2 and val[-1] < val[0], val
