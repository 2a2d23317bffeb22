"""What Hydra's ConfigStore holds besides the YAML tree: the run schema, each stage's schema (which a
stage YAML names in its defaults list), and the named sweeps."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rlhf.config.schema import RunConfig
from rlhf.layout import sweep_package, sweeps_dir


def register_configs() -> None:
    """Register the schemas with Hydra: the root, and one per stage (stage/<name>.yaml extends it)."""
    cs = ConfigStore.instance()
    cs.store(name="rlhf_schema", node=RunConfig)
    from rlhf.stages import stages

    for stage in stages().values():
        cs.store(group="schema/stage", name=stage.name, node=stage.schema)
    register_sweeps(cs)


def register_sweeps(cs: ConfigStore) -> None:
    """The files of sweeps/ as the options of the `sweep` group. The folder is named for what it holds
    while the group keeps the singular name of its option (`-m sweep=ppo_kl`), which a config search
    path, naming groups after folders, cannot express."""
    for path in sorted(sweeps_dir().glob("*.yaml")):
        text = path.read_text()
        cs.store(group="sweep", name=path.stem, node=OmegaConf.create(text), package=sweep_package(text), provider="rlhf")
