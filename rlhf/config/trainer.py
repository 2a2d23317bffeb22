"""The trainer node: any argument of Lightning's Trainer, checked against its signature without
importing Lightning (seconds), since a config is checked before anything heavy loads."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Any


@functools.cache
def trainer_arguments() -> set[str]:
    """The keyword arguments of lightning's Trainer, read from its source: importing Lightning takes
    seconds, and a config is checked before anything heavy is imported."""
    package = importlib.util.find_spec("pytorch_lightning")  # a submodule's spec would import the package
    tree = ast.parse((Path(package.origin).parent / "trainer" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


def trainer_problems(trainer: dict[str, Any]) -> list[tuple[str, str]]:
    accepted = trainer_arguments()
    # These are built by the runner from other config groups.
    managed = {"logger", "callbacks", "default_root_dir", "enable_checkpointing", "use_distributed_sampler"}
    out = []
    for key in trainer:
        if key in managed:
            out.append((f"trainer.{key}", "is set by rlhf itself; use the tracking and checkpoint groups"))
        elif key not in accepted:
            close = closest(key, accepted)
            hint = f"; did you mean trainer.{close}?" if close else ""
            out.append((f"trainer.{key}", f"is not an argument of lightning.Trainer{hint}"))
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if steps is not None and steps != -1 and steps < 1:
        out.append(("trainer.max_steps", f"must be >= 1 or -1, got {steps}"))
    if epochs is not None and epochs != -1 and epochs < 1:
        out.append(("trainer.max_epochs", f"must be >= 1 or -1, got {epochs}"))
    acc = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(acc, int) or acc < 1:
        out.append(("trainer.accumulate_grad_batches", f"must be an integer >= 1, got {acc}"))
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        out.append(("trainer.gradient_clip_val", f"must be >= 0 or null, got {clip}"))
    return out


def closest(word: str, candidates: set[str]) -> str | None:
    found = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.75)
    return found[0] if found else None
