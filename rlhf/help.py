"""`python -m rlhf --help`: what a user can choose, and `--help group=option` for one option's keys.

Hydra's own help lists every config group, internal ones included (the schema, the per-stage parts of
presets), and dumps the composed config without the comments that say what each key means. The YAML
files are the one place a key's default and meaning are written, so the help reads them as they are.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.layout import config_dir, sweeps_dir

# Groups the composition uses internally; a user never picks them on the command line.
INTERNAL_GROUPS = ("experiment_stage", "schema", "hydra")

HEADER = """\
rlhf: supervised fine-tuning, reward modelling, PPO, GRPO and DPO, and an evaluation that compares
them, configured by Hydra and recorded in MLflow.

  python -m rlhf                                  SFT on the defaults (SmolLM2-135M, shipped task)
  python -m rlhf experiment=smoke                 the same on a tiny random model, in seconds
  python -m rlhf stage=rm stage.lr=1e-5           another stage, any key overridden
  python -m rlhf -m stage=sft,rm,ppo,dpo,grpo,eval
                                                  the whole pipeline: every method, then one report
  python -m rlhf stage=ppo stage.kl_coef=0.05     PPO from the latest SFT and RM runs
  python -m rlhf stage=grpo stage.advantage=rloo  critic-free RL against the latest RM run
  python -m rlhf stage=eval                       the newest lineage's policies against SFT
  python -m rlhf -m stage=ppo stage.kl_coef=0.01,0.05,0.1
                                                  a grid sweep, one MLflow parent run
  python -m rlhf -m sweep=dpo_beta                a named sweep (sweeps/)
  python -m rlhf --cfg job stage=ppo              print the composed config without running
"""

FOOTER = """\
Keys: model.*, data.*, stage.*, hardware via trainer.* (any Lightning Trainer argument), tracking.*,
seed, resume. One option's keys, defaults and meaning:
  python -m rlhf --help stage=ppo                 (or model=tiny, hardware=ddp, sweep=ppo_kl, ...)

Runs are recorded in MLflow (sqlite:///mlflow.db in this directory unless tracking.uri is set):
  mlflow ui --backend-store-uri sqlite:///mlflow.db
"""


def _trees(extra: list[Path]) -> list[Path]:
    return [config_dir(), *extra]


def user_groups(extra: list[Path] = ()) -> dict[str, list[str]]:
    """Each group a user picks from, with its options: the shipped tree's, a --config-dir's, the sweeps."""
    groups: dict[str, set[str]] = {}
    for tree in _trees(list(extra)):
        for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
            if folder.name in INTERNAL_GROUPS:
                continue
            groups.setdefault(folder.name, set()).update(f.stem for f in folder.glob("*.yaml"))
    groups["sweep"] = {f.stem for f in sweeps_dir().glob("*.yaml")}
    return {name: sorted(options) for name, options in sorted(groups.items()) if options}


def option_file(group: str, option: str, extra: list[Path] = ()) -> Path | None:
    """The YAML file that defines group=option, a --config-dir's first (as Hydra composes it)."""
    trees = [sweeps_dir()] if group == "sweep" else [*reversed(list(extra)), config_dir()]
    for tree in trees:
        path = tree / f"{option}.yaml" if group == "sweep" else tree / group / f"{option}.yaml"
        if path.is_file():
            return path
    return None


def render(selections: list[str], extra: list[Path] = ()) -> tuple[str, bool]:
    """(the help text, whether every selection was found). Without selections, the overview; with
    `group=option` selections, each option's YAML with its comments."""
    if not selections:
        listed = "\n".join(
            f"  {group}: {', '.join(options)}" for group, options in user_groups(extra).items()
        )
        return f"{HEADER}\nConfig groups (group=option):\n{listed}\n\n{FOOTER}", True
    parts, found = [], True
    groups = user_groups(extra)
    for selection in selections:
        group, _, option = selection.partition("=")
        path = option_file(group, option, extra) if option else None
        if path is None:
            found = False
            known = ", ".join(groups.get(group, [])) or "none: the groups are " + ", ".join(groups)
            parts.append(f"rlhf: error: {selection}: no such option; {group} options: {known}")
            continue
        parts.append(f"# {group}={option}: {path}\n{path.read_text().rstrip()}\n")
    return "\n".join(parts), found


def requested(argv: list[str]) -> tuple[list[str], list[Path]] | None:
    """(the group=option selections, the --config-dir trees) when argv asks for help, else None."""
    if not any(arg in ("--help", "-h") for arg in argv):
        return None
    selections, extra = [], []
    args = iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            extra.append(Path(next(args, ".")))
        elif arg.startswith("--config-dir="):
            extra.append(Path(arg.split("=", 1)[1]))
        elif "=" in arg and not arg.startswith("-") and "." not in arg.split("=", 1)[0]:
            selections.append(arg.lstrip("+~"))
    return selections, extra
