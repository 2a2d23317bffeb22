"""scripts/compare_trl.py's quick CPU mode (--tiny), with or without TRL installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_trl.py"


@pytest.mark.slow
def test_the_tiny_mode_runs_every_workload_on_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--only", "sft,rm,dpo,ppo,grpo"],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE, "PYTHONPATH": str(SCRIPT.parent.parent)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["stage"] for row in rows] == ["sft", "rm", "dpo", "ppo", "grpo"]
    if importlib.util.find_spec("trl") is None:
        # The project's side of each workload still ran: its examples, in the project's order.
        for row in rows:
            assert row["skipped"].startswith("TRL is not installed") and row["examples"] > 0, row
    else:
        units = {"sft": "tokens", "rm": "pairs", "dpo": "pairs", "ppo": "episodes", "grpo": "episodes"}
        for row in rows:
            assert "skipped" in row or row[f"{units[row['stage']]}_per_s"] > 0, row
