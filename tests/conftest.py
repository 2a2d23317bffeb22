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


@pytest.fixture(scope="session")
def compose():
    """compose(["stage=sft", ...]) -> the DictConfig Hydra would hand the entry point."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import register_configs
    from rlhf.layout import config_dir
    from rlhf.stages import stages

    register_configs(stages())

    def _compose(overrides: list[str] | None = None):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=["output_dir=/tmp/rlhf-test-unused", *(overrides or [])])

    return _compose


def stage_config(name: str, **overrides):
    """The `stage` node as conf/stage/<name>.yaml sets it (the schema leaves its defaults to the
    YAML), with some fields replaced."""
    import dataclasses

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.config import register_configs
    from rlhf.layout import config_dir
    from rlhf.stages import stages

    register_configs(stages())
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["output_dir=/tmp/rlhf-test-unused", f"stage={name}"])
    return dataclasses.replace(OmegaConf.to_object(cfg.stage), **overrides)


@pytest.fixture(scope="session")
def tiny_model_config(compose):
    from rlhf.config import validate

    return validate(compose(["model=tiny", "tracking=none"])).model


@pytest.fixture(scope="session")
def tokenizer(tiny_model_config):
    """The SmolLM2 tokenizer (real vocabulary and chat template)."""
    from rlhf.models import load_tokenizer

    return load_tokenizer(tiny_model_config)


def run_cli(
    args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
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
            raise AssertionError(
                f"rlhf {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
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
    return client.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
    )


TESTS_DIR = Path(__file__).resolve().parent


PIPELINE_STAGES = ("sft", "rm", "ppo", "dpo", "grpo", "eval")


class Pipeline:
    """The runs of one `python -m rlhf -m experiment=smoke stage=sft,rm,ppo,dpo,grpo,eval`, shared by many tests."""

    def __init__(self, directory: Path, stderr: str):
        from mlflow.tracking import MlflowClient

        self.directory, self.stderr = directory, stderr
        self.client = MlflowClient(tracking_uri=store_uri(directory))
        self.runs = {stage: runs_of(self.client, "smoke", stage)[0] for stage in PIPELINE_STAGES}

    def model_dir(self, stage: str) -> Path:
        return Path(self.runs[stage].data.tags["rlhf.output_dir"]) / "model"


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory that `build(directory)` fills once per test session, also across xdist workers:
    the first worker to ask builds it under a file lock, the others wait for it and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    directory = root / name
    with FileLock(str(directory) + ".lock"):
        done = directory / ".built"
        if not done.exists():
            directory.mkdir(exist_ok=True)
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """SFT, then RM from it, then PPO and GRPO from both and DPO from SFT, then their evaluation, on the
    tiny model, in one multirun."""

    def build(directory: Path) -> None:
        result = run_cli(
            ["-m", "experiment=smoke", f"stage={','.join(PIPELINE_STAGES)}"], directory, timeout=1800
        )
        (directory / "cli.stderr").write_text(result.stderr)
        assert result.returncode == 0, result.stderr[-4000:]

    directory = built_once(tmp_path_factory, "pipeline", build)
    return Pipeline(directory, (directory / "cli.stderr").read_text())


def count_host_reads(monkeypatch, module) -> list[str]:
    """Wraps module._update so that every read of a tensor's value to the host inside it (item,
    float, tolist) is recorded in the returned list: the update's synchronisations with the device."""
    import torch

    reads: list[str] = []
    update = module._update

    def counted(*args, **kwargs):
        item, to_float, tolist = torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
            patch.setattr(torch.Tensor, "__float__", lambda t: reads.append("float") or to_float(t))
            patch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
            return update(*args, **kwargs)

    module._update = counted
    return reads
