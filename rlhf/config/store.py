"""What Hydra's ConfigStore holds besides the YAML tree: the run schema, each stage's schema (which a
stage YAML names in its defaults list), and the named sweeps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rlhf.config.schema import RunConfig
from rlhf.layout import sweep_package, sweeps_dir

if TYPE_CHECKING:
    from rlhf.stages import Stage

STAGE_SCHEMA_GROUP = "schema/stage"


def register_configs(stages: Mapping[str, Stage]) -> None:
    """Register the schemas with Hydra: the root, and one per stage (stage/<name>.yaml extends it).
    The entry point hands the stage table down (rlhf.stages.stages()): config never imports the stages."""
    cs = ConfigStore.instance()
    cs.store(name="rlhf_schema", node=RunConfig)
    for stage in stages.values():
        cs.store(group=STAGE_SCHEMA_GROUP, name=stage.name, node=stage.schema)
    register_sweeps(cs)


def stage_schemas() -> dict[str, type]:
    """Each registered stage's schema, by stage name: what validation knows of the stages."""
    group = ConfigStore.instance().repo
    for part in STAGE_SCHEMA_GROUP.split("/"):
        group = group.get(part, {})
    return {name.removesuffix(".yaml"): OmegaConf.get_type(entry.node) for name, entry in group.items()}


def register_sweeps(cs: ConfigStore) -> None:
    """The files of sweeps/ as the options of the `sweep` group. The folder is named for what it holds
    while the group keeps the singular name of its option (`-m sweep=ppo_kl`), which a config search
    path, naming groups after folders, cannot express."""
    for path in sorted(sweeps_dir().glob("*.yaml")):
        text = path.read_text()
        cs.store(
            group="sweep",
            name=path.stem,
            node=OmegaConf.create(text),
            package=sweep_package(text),
            provider="rlhf",
        )
