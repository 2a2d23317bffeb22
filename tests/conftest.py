"""Shared fixtures: composing configs, running the CLI in a scratch directory, reading its MLflow store.

Tests never touch the network: hub access is switched off for every test and for the processes they
start. Converted models and generated task data are cached in the usual cache (~/.cache/rlhf), so the
one-off GGUF conversion is paid once per machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Under pytest-xdist (-n N) the workers share the cores: each worker and the runs it starts get an
# equal share of threads instead of all of them each, which would oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = {}
if _WORKERS > 1:
    THREADS = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // _WORKERS))}
    os.environ.update(THREADS)

# Fixtures that run a whole pipeline or sweep once and are read by many tests: their tests go to one
# xdist worker (--dist loadgroup), so the fixture is not built again in every worker.
SHARED_FIXTURES = ("pipeline", "grid", "rejected")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))
                break


@pytest.fixture(scope="session")
def compose():
    """compose(["stage=sft", ...]) -> the DictConfig Hydra would hand the entry point."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlhf.config import register_configs

    register_configs()

    def _compose(overrides: list[str] | None = None):
        with initialize_config_module("rlhf.conf", version_base="1.3"):
            return hydra_compose("config", overrides=["output_dir=/tmp/rlhf-test-unused", *(overrides or [])])

    return _compose


@pytest.fixture(scope="session")
def tiny_model_config(compose):
    from rlhf.config import validate

    return validate(compose(["model=tiny", "tracking=none"])).model


@pytest.fixture(scope="session")
def tokenizer(tiny_model_config):
    """The SmolLM2 tokenizer (real vocabulary and chat template)."""
    from rlhf.models import load_tokenizer

    return load_tokenizer(tiny_model_config)


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m rlhf <args>` in `cwd`; its output is kept for assertion messages."""
    full_env = {**os.environ, **OFFLINE, **THREADS, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlhf", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path):
    """Runs the CLI in a fresh directory (so its mlflow.db and outputs/ are the test's own)."""

    def _run(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True):
        result = run_cli(list(args), tmp_path, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"rlhf {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
        return result

    return _run


def store_uri(directory: Path) -> str:
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture
def mlflow_client(tmp_path):
    """A client of the store the `cli` fixture's runs write to."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(tmp_path))


def runs_of(client, experiment: str, stage: str | None = None):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    query = f"tags.`rlhf.stage` = '{stage}'" if stage else ""
    return client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


TESTS_DIR = Path(__file__).resolve().parent


PIPELINE_STAGES = ("sft", "rm", "ppo", "eval")


class Pipeline:
    """The runs of one `python -m rlhf -m experiment=smoke stage=sft,rm,ppo,eval`, shared by many tests."""

    def __init__(self, directory: Path, result: subprocess.CompletedProcess):
        from mlflow.tracking import MlflowClient

        self.directory, self.result = directory, result
        self.client = MlflowClient(tracking_uri=store_uri(directory))
        self.runs = {stage: runs_of(self.client, "smoke", stage)[0] for stage in PIPELINE_STAGES}

    def model_dir(self, stage: str) -> Path:
        return Path(self.runs[stage].data.tags["rlhf.output_dir"]) / "model"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """SFT, then RM from it, then PPO from both, then their evaluation, on the tiny model, in one multirun."""
    directory = tmp_path_factory.mktemp("pipeline")
    result = run_cli(["-m", "experiment=smoke", f"stage={','.join(PIPELINE_STAGES)}"], directory, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return Pipeline(directory, result)
