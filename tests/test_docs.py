"""The README is a guide a newcomer can act on: short, its links lead somewhere, its commands compose."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 350


def test_readme_is_a_guide_not_a_lab_notebook():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; measurements and method notes go in docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        if not (page.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def readme_commands() -> list[list[str]]:
    """The overrides of every `python -m rlhf ...` line in README's shell blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if "python -m rlhf" not in line or "python -m rlhf." in line:
                continue
            args = shlex.split(line.split("python -m rlhf", 1)[1])
            commands.append(args)
    return commands


def composable(args: list[str]) -> list[str] | None:
    """The overrides Hydra's compose API takes for one job of the command (the first value of a sweep),
    or None for a command that is not a run (--help, a user's --config-dir)."""
    if any(a in ("--help", "-h", "--config-dir") for a in args):
        return None
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c"):
            skip = True
            continue
        if arg in ("-m", "--multirun") or arg.startswith("hydra"):
            continue
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith("["):
            value = value.split(",", 1)[0]
        overrides.append(f"{key}{sep}{value}")
    return overrides


def test_readme_shows_the_commands_it_promises():
    commands = [" ".join(c) for c in readme_commands()]
    assert any("stage=sft,rm,ppo,dpo,grpo,eval" in c for c in commands)
    assert any("--help" in c for c in commands)
    assert "torchrun --nproc_per_node 2 -m rlhf" in README.read_text()


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_composes(compose, args):
    overrides = composable(args)
    if overrides is None:
        pytest.skip("not a run")
    compose(overrides)
