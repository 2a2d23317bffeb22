"""What overriding a model's or a data source's location on the command line means for its group.

`model.name_or_path=/path/to/my-model` on top of a model group asks for another model: the group's
way of reaching its own weights (a GGUF file, a random initialisation, a separate tokenizer, a hub
revision) no longer applies, and runs are named after the directory that was loaded, not the group.
One exception: a local directory holding a config.json but no weights can only be initialised at
random, so the group's random initialisation still applies to it (model=tiny on another
architecture's config and tokenizer).
The same holds for `data.<kind>.path`. Keys given on the command line as well are kept as given.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePath
from typing import Any

log = logging.getLogger(__name__)

# Keys of the model group that describe where its own weights come from.
MODEL_SOURCE_KEYS = ("gguf_file", "random_init", "tokenizer", "revision")
# The files a Hugging Face directory keeps its weights in (save_pretrained, sharded or not).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DATA_KINDS = ("sft", "preference", "prompts")
# The data a stage trains on or samples prompts from: the one its run is named after.
STAGE_DATA = {
    "sft": "sft",
    "rm": "preference",
    "dpo": "preference",
    "ppo": "prompts",
    "grpo": "prompts",
    "eval": "prompts",
}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gguf")


def overridden(overrides: list[str]) -> dict[str, str]:
    """{key: value} of command-line overrides (`+key=v`, `++key=v` alike; deletions left out)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            out[key.lstrip("+")] = value
    return out


def label(location: str) -> str:
    """A short name for a path or hub id: a directory's name, a file's stem, a hub id's last part."""
    text = str(location).rstrip("/\\")
    for scheme in ("package://", "task:"):
        if text.startswith(scheme):
            text = text[len(scheme) :].split("/")[0]
    name = PurePath(text).name or text
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def config_without_weights(location: str) -> bool:
    """Whether `location` is a local directory with a config.json but neither weights nor a GGUF file."""
    path = Path(str(location)).expanduser()
    return (
        (path / "config.json").is_file()
        and not any((path / name).is_file() for name in WEIGHT_FILES)
        and not any(path.glob("*.gguf"))
    )


def apply_location_overrides(cfg: Any, overrides: list[str]) -> None:
    """Adjust the composed config (in place) for overridden model and data locations (module doc)."""
    given = overridden(overrides)
    model = cfg.get("model")
    if "model.name_or_path" in given and model is not None and model.get("name_or_path"):
        random = model.get("random_init") is not None and config_without_weights(model.name_or_path)
        if random and "model.random_init" not in given:
            log.info(
                "model.name_or_path=%s holds a config but no weights: model.random_init applies",
                model.name_or_path,
            )
        kept = ("random_init",) if random else ()
        dropped = [
            k
            for k in MODEL_SOURCE_KEYS
            if f"model.{k}" not in given and model.get(k) is not None and k not in kept
        ]
        for key in dropped:
            model[key] = None
        if dropped:
            log.info(
                "model.name_or_path=%s replaces the model group's weights: %s no longer apply",
                model.name_or_path,
                ", ".join(f"model.{k}" for k in dropped),
            )
        if "model.name" not in given:
            model.name = label(model.name_or_path)
    data = cfg.get("data")
    if data is None or "data.name" in given:
        return
    paths = [kind for kind in DATA_KINDS if f"data.{kind}.path" in given and data.get(kind, {}).get("path")]
    if not paths:
        return
    stage = str((cfg.get("stage") or {}).get("name", ""))
    if stage in STAGE_DATA:
        # The run is named after what it trains or samples from; the group's data if that was kept.
        if STAGE_DATA[stage] not in paths:
            return
        paths = [STAGE_DATA[stage]]
    names = list(dict.fromkeys(label(data[kind].path) for kind in paths))
    data.name = "+".join(names)
