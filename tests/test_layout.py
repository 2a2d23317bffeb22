"""The config tree (conf/) and the named sweeps (sweeps/) at the top of the repository: shipped inside
the wheel and found by an installed rlhf from any directory, without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import OFFLINE

ROOT = Path(__file__).parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "rlhf", "conf", "sweeps")


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def test_wheel_ships_the_config_tree_and_sweeps_and_composes_outside_the_checkout(tmp_path):
    # Built from a copy: building writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "rlhf" else {}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE
    wheels = tmp_path / "wheels"
    # No build isolation: the build backend is already installed, and tests never use the network.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("rlhf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(ROOT.glob("conf/**/*.yaml")):
        assert f"rlhf/shipped/{path.relative_to(ROOT).as_posix()}" in names, path
    for path in sorted(ROOT.glob("sweeps/*.yaml")):
        assert f"rlhf/shipped/{path.relative_to(ROOT).as_posix()}" in names, path

    # A fresh environment that sees the installed dependencies but holds rlhf only from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _run([python, "-c", "import rlhf.layout as l; print(l.config_dir()); print(l.sweeps_dir())"], elsewhere, env)
    conf, sweeps = found.stdout.split()
    assert conf.startswith(str(venv)) and sweeps.startswith(str(venv)), found.stdout

    job = _run([python, "-m", "rlhf", "--cfg", "job", "experiment=smoke"], elsewhere, env).stdout
    assert "name: tiny" in job and "name: sft" in job
    swept = _run([python, "-m", "rlhf", "sweep=ppo_kl", "--cfg", "hydra"], elsewhere, env).stdout
    assert "stage.kl_coef: 0.01,0.05,0.2" in swept
    swept_job = _run([python, "-m", "rlhf", "sweep=ppo_kl", "--cfg", "job"], elsewhere, env).stdout
    assert "name: ppo" in swept_job
