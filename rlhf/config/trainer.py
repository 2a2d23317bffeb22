"""The trainer node: any argument of Lightning's Trainer, checked against its signature without
importing Lightning (seconds), since a config is checked before anything heavy loads."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Any

from rlhf.config.precision import PRECISIONS


@functools.cache
def trainer_signature() -> dict[str, frozenset[type] | None]:
    """The keyword arguments of lightning's Trainer and the plain types each accepts (None: a type
    this check cannot tell, e.g. an Accelerator object), read from its source: importing Lightning
    takes seconds, and a config is checked before anything heavy is imported."""
    package = importlib.util.find_spec("pytorch_lightning")  # a submodule's spec would import the package
    tree = ast.parse((Path(package.origin).parent / "trainer" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {
        a.arg: _annotation_types(a.annotation)
        for a in init.args.args + init.args.kwonlyargs
        if a.arg != "self"
    }


def trainer_arguments() -> set[str]:
    return set(trainer_signature())


_PLAIN_TYPES = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "None": type(None),
    "list": list,
    "dict": dict,
}


def _annotation_types(node: ast.expr | None) -> frozenset[type] | None:
    """The plain types an annotation such as Optional[Union[int, float]] admits; None if any part of
    it is not a plain type (then every value passes)."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and node.value is None:
        return frozenset({type(None)})
    if isinstance(node, ast.Name):
        found = _PLAIN_TYPES.get(node.id)
        return frozenset({found}) if found else None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id in ("list", "dict"):
            return frozenset({_PLAIN_TYPES[node.value.id]})
        if node.value.id in ("Optional", "Union"):
            parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            types: set[type] = {type(None)} if node.value.id == "Optional" else set()
            for part in parts:
                inner = _annotation_types(part)
                if inner is None:
                    return None
                types |= inner
            return frozenset(types)
    return None


def _type_problem(key: str, value: Any, accepted: frozenset[type] | None) -> str | None:
    """Why `value` does not fit the Trainer argument `key`, or None."""
    if accepted is None:
        return None
    # YAML and the command line give ints where a float is meant, never the reverse; a bool is not a number.
    fits = any(
        isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        for kind in accepted
    ) or (float in accepted and isinstance(value, int) and not isinstance(value, bool))
    if fits:
        return None
    names = sorted("null" if kind is type(None) else kind.__name__ for kind in accepted)
    return (
        f"must be {' or '.join(names)}, got {value!r} ({'null' if value is None else type(value).__name__})"
    )


def trainer_problems(trainer: dict[str, Any]) -> list[tuple[str, str]]:
    signature = trainer_signature()
    accepted = set(signature)
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
        else:
            wrong = _type_problem(key, trainer[key], signature[key])
            if wrong:
                out.append((f"trainer.{key}", wrong))
    if out:  # the range checks below assume the types are right
        return out
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
    precision = trainer.get("precision")
    if precision is not None and precision not in PRECISIONS:
        choices = ", ".join(str(p) for p in PRECISIONS)
        out.append(("trainer.precision", f"must be one of {choices}; got {precision!r}"))
    return out


def closest(word: str, candidates: set[str]) -> str | None:
    found = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.75)
    return found[0] if found else None
