"""Where the config tree (conf/) and the named sweeps (sweeps/) are.

Both sit at the top of the repository, beside the package, where users open and edit them. A wheel
carries them inside the package instead (rlhf/shipped/conf, rlhf/shipped/sweeps, mapped there at build
time by setup.py), so an installed rlhf finds them without a checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _tree(name: str) -> Path:
    shipped = _PACKAGE / "shipped" / name
    # The packaged copy exists only in a wheel; a checkout (editable install, or PYTHONPATH pointing at
    # it) reads the files beside the package, so edits take effect without reinstalling.
    return shipped if shipped.is_dir() else _PACKAGE.parent / name


def config_dir() -> Path:
    """The Hydra config tree: config.yaml and one folder per group."""
    return _tree("conf")


def sweeps_dir() -> Path:
    """The named sweeps, options of the `sweep` group: `python -m rlhf -m sweep=<name>`."""
    return _tree("sweeps")


def sweep_package(text: str) -> str:
    """The package a sweep file's `# @package` header names; sweeps set keys anywhere, so _global_."""
    found = re.search(r"^#\s*@package\s+(\S+)", text, re.MULTILINE)
    return found.group(1) if found else "_global_"
