"""Checking a composed config: unknown keys, the schema's problems, and one line for every composition
error (the key, what is wrong, a suggestion). Runs before any model loads."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from rlhf.config.precision import resolve_precision
from rlhf.config.schema import BaseStageConfig, RunConfig
from rlhf.config.store import stage_schemas
from rlhf.config.trainer import closest, trainer_arguments
from rlhf.errors import ConfigError


def _collect_problems(obj: Any, prefix: str) -> list[str]:
    out = []
    if hasattr(obj, "problems"):
        for key, message in obj.problems():
            full = key if key.startswith("trainer.") else f"{prefix}{key}"
            out.append(f"{full}: {message}")
    if is_dataclass(obj):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                out += _collect_problems(value, f"{prefix}{f.name}.")
    return out


def _unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys added with `+key=value` that the schema does not know (OmegaConf would keep them silently)."""
    out = []
    if not isinstance(node, DictConfig):
        return out
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        for key in node:
            if key not in known:
                close = closest(str(key), known)
                hint = f"; did you mean {prefix}{close}?" if close else ""
                out.append(f"{prefix}{key}: not a config key of {schema.__name__}{hint}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            out += _unknown_keys(child, f"{prefix}{key}.")
    return out


def _other_stages_key(key: str, full_key: str, object_type: type, multirun: bool) -> str:
    """For a stage key the composed stage lacks: which stages have it, and how to set it in a sweep."""
    schemas = stage_schemas()
    if full_key != f"stage.{key}" or object_type not in schemas.values():
        return ""
    owners = [name for name, schema in schemas.items() if key in {f.name for f in fields(schema)}]
    if not owners:
        return ""
    hint = f"; it is a key of stage={'|'.join(owners)}"
    if multirun:
        # Hydra checks a multirun's plain overrides against the config it composes before the sweep,
        # with the default stage; `++` adds the key there and sets it in each swept stage.
        hint += (
            f", and a multirun checks it against the default stage before sweeping: write ++{full_key}=..."
        )
    return hint


def describe_compose_error(err: BaseException, multirun: bool = False) -> str:
    """One line for Hydra's and OmegaConf's composition errors: the key, what is wrong, a suggestion."""
    # Hydra re-raises a config file's merge error without `from`: the key is on the implicit context.
    context = err.__context__ if isinstance(err.__context__, OmegaConfBaseException) else None
    cause = err.__cause__ or context or err
    full_key = getattr(cause, "full_key", None)
    source = re.match(r"In '([^']+)'", str(err)) if context is not None else None
    where = f" (set in {source.group(1)}.yaml)" if source else ""
    if full_key:
        message = str(getattr(cause, "msg", cause)).strip().splitlines()[0]
        if isinstance(cause, MissingMandatoryValue):
            message = "has no value (???); set it on the command line or in its config group"
        object_type = getattr(cause, "object_type", None)
        if "not in" in message and is_dataclass(object_type):
            key = str(getattr(cause, "key", ""))
            close = closest(key, {f.name for f in fields(object_type)})
            parent = full_key.rpartition(".")[0]
            if close:
                message += f"; did you mean {parent + '.' if parent else ''}{close}?"
            message += _other_stages_key(key, full_key, object_type, multirun)
        elif "not in struct" in message and ".columns." in full_key:
            message = f"a column mapping is added with a plus: +{full_key}=<your column>"
        elif "not in struct" in message and full_key.startswith("data.prompt_mix."):
            message = f"a category's share is added with a plus: +{full_key}=<share>"
        elif "not in struct" in message and full_key.startswith("trainer."):
            close = closest(str(getattr(cause, "key", "")), trainer_arguments())
            message = (
                f"not set by the trainer config; did you mean trainer.{close}?"
                if close
                else f"not set by the trainer config; add a lightning.Trainer argument with +{full_key}=..."
            )
        return f"{full_key}: {message}{where}"
    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if missing and options:
        group, _, name = str(missing).rpartition("/")
        return f"{group}={name}: no such option; choose one of {', '.join(options)}"
    return " ".join(str(err).replace("\n", " ").split())


def validate(cfg: DictConfig) -> RunConfig:
    """Check a composed config and return it as typed objects; ConfigError names the first bad key."""
    unknown = _unknown_keys(cfg)
    if unknown:
        raise ConfigError(unknown[0])
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(describe_compose_error(err)) from None
    if not isinstance(run.stage, BaseStageConfig):
        raise ConfigError(
            "stage: choose a stage with stage=<name>, one of " + ", ".join(sorted(stage_schemas()))
        )
    problems = _collect_problems(run, "")
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    # Resolved here, so the run's recorded trainer.precision param is the precision it trains in.
    run.trainer = resolve_precision(run.trainer)
    return run


def to_container(run: RunConfig) -> dict[str, Any]:
    """The validated config as plain dicts and lists (for logging and saving)."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)  # type: ignore[return-value]
