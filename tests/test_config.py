"""The configuration system: every shipped option composes and validates, the defaults, `--help`, one-line
errors (exit code 2) before anything heavy starts, and Hydra's conveniences.

Nothing here loads a model or trains. Config groups and their options are discovered from conf/, so a
new YAML file is covered without touching this file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import OFFLINE, runs_of
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf.config import describe_compose_error, validate
from rlhf.errors import ConfigError
from rlhf.layout import config_dir

CONF = config_dir()
# Groups a user picks options of; experiment_stage is selected by interpolation, not by the user.
USER_GROUPS = ("model", "data", "stage", "hardware", "tracking", "experiment")
PER_STAGE_GROUP = "experiment_stage"
# Multirun-only groups; every option of them is composed by test_sweeps.py.
MULTIRUN_GROUPS = ("sweep", "hydra")
DEFAULTS = {
    "stage": "sft",
    "model": "smollm2-135m",
    "data": "assistant",
    "hardware": "cpu",
    "tracking": "mlflow",
}

# A rejected config costs the interpreter start and the imports its checks need (Lightning's Trainer
# signature); a run that got past validation loads a model, prepares data and trains, several times more.
# Measured in CPU seconds of the process, so that running the cases side by side does not inflate it.
REJECTION_CPU_BOUND_S = 30.0
SUBPROCESS_TIMEOUT_S = 300.0


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def option_file(group: str, option: str) -> Path:
    return CONF / group / f"{option}.yaml"


def package_of(group: str, path: Path) -> str:
    """Where a group file's keys land: its `# @package` header, else the group's own name ('' = root)."""
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*@package\s+(\S+)", line.strip())
        if match:
            package = match[1].replace("_group_", group)
            return "" if package == "_global_" else package.removeprefix("_global_.")
    return group


def leaves(path: Path) -> dict[str, Any]:
    """Dotted path -> value for every leaf a YAML config file sets (its `defaults` list left out)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)

    def walk(node: dict, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not prefix and key == "defaults":
                continue
            if isinstance(value, dict) and value:
                out.update(walk(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    return walk(data, "")


def default_overrides(path: Path) -> dict[str, str]:
    """`override /group: option` entries of a file's defaults list, as {group: option}."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith("override "):
                    out[key.split()[-1].strip("/")] = value
    return out


_ABSENT = object()


def assert_applied(cfg: DictConfig, path: Path, package: str, skip: set[str] = frozenset()) -> None:
    """Every value the file sets is what the composed config holds (under `package`)."""
    for key, expected in leaves(path).items():
        full = f"{package}.{key}" if package else key
        if full in skip:
            continue
        # An interpolation is compared as written, not as resolved.
        parent, _, leaf = full.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raw = node._get_node(leaf) if isinstance(node, DictConfig) and leaf in node else None
        actual = (
            raw._value()
            if raw is not None and OmegaConf.is_interpolation(node, leaf)
            else OmegaConf.select(cfg, full, default=_ABSENT)
        )
        if isinstance(actual, (DictConfig, ListConfig)):
            actual = OmegaConf.to_container(actual, resolve=False)
        assert actual is not _ABSENT, f"{path.relative_to(CONF)} sets {full}, absent from the composed config"
        assert actual == expected, (
            f"{path.relative_to(CONF)} sets {full}={expected!r}; the composed config has {actual!r}"
        )


def per_stage_file(experiment: str, stage: str) -> Path:
    return option_file(PER_STAGE_GROUP, f"{experiment}_{stage}")


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def starts_with_key(message: str, key: str) -> bool:
    return message.startswith(key) and not re.match(r"[\w.]", message[len(key) : len(key) + 1])


def names_key(message: str, key: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


# ---------------------------------------------------------------------------------------------------------
# 1. Every option of every user-facing group composes and validates


def test_conf_holds_only_known_groups():
    """A new group directory must be added to USER_GROUPS (so its options are tested) or be accounted for."""
    found = {p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    known = {*USER_GROUPS, PER_STAGE_GROUP, *MULTIRUN_GROUPS}
    assert found <= known, f"untested config groups: {found - known}"
    for group in USER_GROUPS:
        assert options(group), f"no options found in conf/{group}"


GROUP_OPTIONS = [
    (group, option) for group in USER_GROUPS if group != "experiment" for option in options(group)
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(compose, group, option):
    cfg = compose([f"{group}={option}"])
    run = validate(cfg)
    path = option_file(group, option)
    assert_applied(cfg, path, package_of(group, path))
    if group == "stage":
        assert run.stage.name == option


EXPERIMENT_STAGES = [(e, s) for e in options("experiment") for s in options("stage")]


@pytest.mark.parametrize(
    ("experiment", "stage"),
    EXPERIMENT_STAGES,
    ids=[f"experiment={e},stage={s}" for e, s in EXPERIMENT_STAGES],
)
def test_every_experiment_composes_and_validates_with_every_stage(compose, experiment, stage):
    cfg = compose([f"experiment={experiment}", f"stage={stage}"])
    run = validate(cfg)
    assert run.stage.name == stage
    path = option_file("experiment", experiment)
    per_stage = per_stage_file(experiment, stage)
    # The per-stage file comes last in the defaults list: what it sets wins over the experiment.
    overridden = set(leaves(per_stage)) if per_stage.exists() else set()
    package = package_of("experiment", path)
    assert_applied(cfg, path, package, skip=overridden)
    own = overridden | {f"{package}.{key}" if package else key for key in leaves(path)}
    for group, option in default_overrides(path).items():
        chosen = option_file(group, option)
        assert_applied(cfg, chosen, package_of(group, chosen), skip=own)


PER_STAGE_FILES = sorted((CONF / PER_STAGE_GROUP).glob("*.yaml"))


def split_per_stage_name(name: str) -> list[tuple[str, str]]:
    return [(e, s) for e in options("experiment") for s in options("stage") if name == f"{e}_{s}"]


@pytest.mark.parametrize("path", PER_STAGE_FILES, ids=[p.stem for p in PER_STAGE_FILES])
def test_per_stage_file_is_picked_up_by_its_experiment_and_stage(compose, path):
    pairs = split_per_stage_name(path.stem)
    assert len(pairs) == 1, (
        f"{PER_STAGE_GROUP}/{path.name} must be named <experiment>_<stage> of existing options "
        f"(experiments: {options('experiment')}, stages: {options('stage')})"
    )
    experiment, stage = pairs[0]
    cfg = compose([f"experiment={experiment}", f"stage={stage}"])
    assert leaves(path), f"{path.name} sets nothing"
    assert_applied(cfg, path, "")
    validate(cfg)


# ---------------------------------------------------------------------------------------------------------
# 2. Defaults


def check_default_values(cfg: dict) -> None:
    assert cfg["stage"]["name"] == "sft"
    assert cfg["model"]["name"] == "smollm2-135m"
    assert cfg["data"]["name"] == "assistant"
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["tracking"]["enabled"] is True


def test_defaults_compose(compose):
    cfg = compose([])
    explicit = compose([f"{group}={option}" for group, option in DEFAULTS.items()])
    assert plain(cfg) == plain(explicit)
    for group, option in DEFAULTS.items():
        path = option_file(group, option)
        assert_applied(cfg, path, package_of(group, path))
    check_default_values(plain(cfg))
    validate(cfg)


def test_cfg_job_prints_the_defaults(cli, compose):
    printed = yaml.safe_load(cli("--cfg", "job").stdout)
    assert isinstance(printed, dict), "--cfg job printed no YAML mapping"
    check_default_values(printed)
    expected = plain(compose([]))
    # output_dir is Hydra's run directory: an interpolation in the CLI, a fixed path in the compose fixture.
    printed.pop("output_dir")
    expected.pop("output_dir")
    assert printed == expected


# ---------------------------------------------------------------------------------------------------------
# 3. --help


def test_help_lists_the_groups_a_user_picks_and_the_whole_pipeline(cli):
    result = cli("--help")
    assert result.returncode == 0
    assert "Config groups (group=option):" in result.stdout, result.stdout
    section = result.stdout.split("Config groups (group=option):", 1)[1].split("\n\n", 1)[0]
    listed = {}
    for line in section.splitlines():
        match = re.match(r"^([\w/.-]+): (.+)$", line.strip())
        if match:
            listed[match[1]] = sorted(option.strip() for option in match[2].split(","))
    for group in USER_GROUPS:
        assert listed.get(group) == options(group), f"--help lists {group}: {listed.get(group)}"
    # The composition's own groups are not the user's to pick.
    assert not {"experiment_stage", "schema/stage", "schema"} & set(listed), listed
    assert "stage=sft,rm,ppo,dpo,grpo,eval" in result.stdout
    assert "--help stage=ppo" in result.stdout


def test_help_for_one_option_prints_its_keys_with_their_meaning(cli):
    result = cli("--help", "stage=ppo")
    assert result.returncode == 0
    text = (config_dir() / "stage" / "ppo.yaml").read_text()
    assert text.strip() in result.stdout
    assert "# Reward: latest" in result.stdout  # the comments that say what a key means
    unknown = cli("--help", "stage=ppx", check=False)
    assert unknown.returncode == 2
    assert (
        "rlhf: error: stage=ppx: no such option; stage options: dpo, eval, grpo, ppo, rm, sft"
        in unknown.stderr
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Errors through the CLI: exit code 2, one line on stderr naming the key, nothing heavy started


@dataclass(frozen=True)
class Rejection:
    args: tuple[str, ...]
    key: str  # the key the message must name
    mentions: tuple[str, ...] = ()  # what the rest of the message must hold (suggestions, options)


UNTRACKED = ("experiment=smoke", "tracking=none")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


REJECTIONS = {
    "typo": Rejection(("stage.lrr=1",), "stage.lrr", ("stage.lr",)),
    "wrong-type": Rejection(("stage.lr=abc",), "stage.lr"),
    "negative-lr": Rejection(("stage.lr=-1",), "stage.lr"),
    "zero-batch": Rejection(("stage.batch_size=0",), "stage.batch_size"),
    "prompt-fills-length": Rejection(
        ("data.max_length=64", "data.max_prompt_length=64"), "data.max_prompt_length", ("data.max_length",)
    ),
    "zero-max-steps": Rejection(("trainer.max_steps=0",), "trainer.max_steps"),
    "dtype": Rejection(("model.dtype=float8",), "model.dtype", ("float8",)),
    "chat-template": Rejection(("data.chat_template=sometimes",), "data.chat_template", ("sometimes",)),
    "scheduler": Rejection(("stage.scheduler=exponential",), "stage.scheduler", ("exponential",)),
    "lora-rank": Rejection(("model.lora.r=0",), "model.lora.r"),
    "unknown-model": Rejection(("model=nope",), "model", ("nope", *options("model"))),
    "unknown-stage": Rejection(("stage=nope",), "stage", ("nope", *options("stage"))),
    "added-root-key": Rejection(("+foo=1",), "foo"),
    "added-stage-key": Rejection(("+stage.bar=2",), "stage.bar"),
    "other-stage-key": Rejection(
        ("stage.reward_from=x",), "stage.reward_from", ("it is a key of stage=", "eval", "ppo")
    ),
    # A multirun composes its default stage (sft) before sweeping; `++` is the way in for the swept stages' keys.
    "multirun-stage-key": Rejection(
        ("-m", "stage=ppo,eval", "stage.reward_from=x"), "stage.reward_from", ("++",)
    ),
    "multirun-forced-stage-key-reaches-the-jobs": Rejection(
        ("-m", "stage=ppo,eval", "++stage.reward_from=fn:x.y", "trainer.max_steps=0"), "trainer.max_steps"
    ),
    "multirun-forced-key-in-a-stage-without-it": Rejection(
        ("-m", "stage=sft,ppo", "++stage.reward_from=fn:x.y"), "stage.reward_from", ("SFTStageConfig",)
    ),
    "trainer-typo": Rejection(("trainer.max_stepz=3",), "trainer.max_stepz", ("trainer.max_steps",)),
    "trainer-added-typo": Rejection(("+trainer.max_stepz=3",), "trainer.max_stepz", ("Trainer",)),
    "trainer-managed": Rejection(("+trainer.logger=false",), "trainer.logger"),
    # Strategies a stage cannot run: refused with the stage, the strategy and what to use instead.
    "fsdp-variant": Rejection(
        ("hardware=fsdp", "trainer.accelerator=cpu", "trainer.strategy=fsdp_cpu_offload"),
        "trainer.strategy",
        ("fsdp_cpu_offload", "=fsdp (FSDP2", "not supported"),
    ),
    "ppo-fsdp": Rejection(
        ("stage=ppo", "hardware=fsdp"), "trainer.strategy", ("stage=ppo", "fsdp", "hardware=ddp", "lora")
    ),
    "ppo-deepspeed": Rejection(
        ("stage=ppo", "hardware=deepspeed"),
        "trainer.strategy",
        ("stage=ppo", "deepspeed_stage_2", "hardware=ddp", "lora"),
    ),
}
if importlib.util.find_spec("deepspeed") is None:
    REJECTIONS["deepspeed-missing"] = Rejection(
        ("hardware=deepspeed",), "trainer.strategy", ("pip install deepspeed",)
    )
if not _has_cuda():
    REJECTIONS["gpu-missing"] = Rejection(("hardware=gpu",), "trainer.accelerator", ("hardware=cpu",))


@dataclass
class Outcome:
    args: list[str]
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float | None  # None: not measured


def run_measured(args: list[str], cwd: Path) -> Outcome:
    """`python -m rlhf <args>` in `cwd` (the environment of conftest's run_cli), with its CPU time."""
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    out_path, err_path = cwd / "cli.stdout", cwd / "cli.stderr"
    start = time.monotonic()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", *args], cwd=cwd, env=env, stdout=out, stderr=err
        )
        watchdog = threading.Timer(SUBPROCESS_TIMEOUT_S, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Outcome(
        args=args,
        cwd=cwd,
        returncode=proc.returncode,
        stdout=out_path.read_text(),
        stderr=err_path.read_text(),
        wall_s=time.monotonic() - start,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


TRACKED_ARGS = ("experiment=smoke", "stage.lr=-1")


@pytest.fixture(scope="module")
def rejected(tmp_path_factory) -> dict[str, Future[Outcome]]:
    """All rejection cases, started at once side by side (each pays the same start-up imports)."""

    def command_line(args):  # Hydra's flags (-m) before the overrides
        return sorted(args, key=lambda arg: not arg.startswith("-"))

    cases = {name: command_line([*UNTRACKED, *case.args]) for name, case in REJECTIONS.items()}
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
    futures = {
        name: pool.submit(run_measured, args, tmp_path_factory.mktemp(f"rejected-{name}"))
        for name, args in cases.items()
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def error_line(outcome: Outcome) -> str:
    """The one `rlhf: error:` line of a rejected run, checking exit code and that nothing else is on stderr."""
    context = (
        f"rlhf {' '.join(outcome.args)}\nstdout:\n{outcome.stdout[-2000:]}\nstderr:\n{outcome.stderr[-4000:]}"
    )
    assert outcome.returncode == 2, f"exit code {outcome.returncode}, expected 2\n{context}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} non-empty lines on stderr, expected exactly one\n{context}"
    assert lines[0].startswith("rlhf: error: "), context
    return lines[0].removeprefix("rlhf: error: ")


def assert_nothing_heavy(outcome: Outcome) -> None:
    heavy = [
        p.relative_to(outcome.cwd)
        for p in outcome.cwd.rglob("*")
        if p.name in ("model", "checkpoints") or p.suffix in (".ckpt", ".safetensors")
    ]
    assert not heavy, f"a rejected config left training outputs: {heavy}"
    logs = outcome.stdout + "".join(p.read_text() for p in outcome.cwd.rglob("*.log"))
    assert "GPU available" not in logs, "a lightning.Trainer was built for a rejected config"
    assert outcome.cpu_s is None or outcome.cpu_s < REJECTION_CPU_BOUND_S, (
        f"rejecting the config took {outcome.cpu_s:.1f} CPU s ({outcome.wall_s:.1f} s wall)"
    )


@pytest.mark.parametrize("name", list(REJECTIONS))
def test_cli_rejects_with_one_line(rejected, name):
    case = REJECTIONS[name]
    outcome = rejected[name].result()
    message = error_line(outcome)
    assert names_key(message, case.key), f"the error does not name {case.key}: {message}"
    rest = message.replace(case.key, " ") if "." in case.key else message
    for word in case.mentions:
        assert word in rest, f"the error does not mention {word!r}: {message}"
    assert_nothing_heavy(outcome)


def assert_failed_run_recorded(client, key: str) -> None:
    runs = runs_of(client, "smoke")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FAILED", run.info
    assert names_key(run.data.tags.get("rlhf.error", ""), key), run.data.tags


def test_tracked_rejection_is_recorded_as_failed_run(cli, tmp_path, request):
    """With tracking on, a rejected config leaves a FAILED run; run in a directory without an MLflow
    store yet (a user's first command), which must not add lines to the one-line error either."""
    start = time.monotonic()
    result = cli(*TRACKED_ARGS, check=False, timeout=SUBPROCESS_TIMEOUT_S)
    outcome = Outcome(
        args=list(TRACKED_ARGS),
        cwd=tmp_path,
        returncode=result.returncode,
        stdout=result.stdout,
        stderr=result.stderr,
        wall_s=time.monotonic() - start,
        cpu_s=None,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "rlhf: error: stage.lr" in result.stderr
    # Requested only now: creating the client creates the store, which the command must do itself.
    client = request.getfixturevalue("mlflow_client")
    runs = runs_of(client, "smoke")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FAILED", runs[0].info
    assert names_key(runs[0].data.tags.get("rlhf.error", ""), "stage.lr"), runs[0].data.tags
    assert_nothing_heavy(outcome)
    assert names_key(error_line(outcome), "stage.lr")


# ---------------------------------------------------------------------------------------------------------
# 5. Validation through the API


API_PROBLEMS = {
    "prompt-fills-length": (["data.max_length=64", "data.max_prompt_length=64"], "data.max_prompt_length"),
    "lora-dropout": (["model.lora.dropout=1.0"], "model.lora.dropout"),
    "max-samples": (["data.sft.max_samples=0"], "data.sft.max_samples"),
    "adam-betas": (["stage.adam_betas=[0.9]"], "stage.adam_betas"),
    "resume-number": (["resume=3"], "resume"),
    "accumulate-fraction": (["trainer.accumulate_grad_batches=1.5"], "trainer.accumulate_grad_batches"),
    "negative-clip": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    "added-nested-key": (["+model.lora.rank=4"], "model.lora.rank"),
    "added-trainer-key": (["+trainer.max_stepz=3"], "trainer.max_stepz"),
    "unset-required": (["model.name=???"], "model.name"),
}


@pytest.mark.parametrize("name", list(API_PROBLEMS))
def test_validate_names_the_full_key_first(compose, name):
    overrides, key = API_PROBLEMS[name]
    with pytest.raises(ConfigError) as err:
        validate(compose(["tracking=none", *overrides]))
    message = str(err.value)
    assert starts_with_key(message, key), f"expected the message to start with {key}: {message}"
    assert "\n" not in message


def test_validate_reports_every_problem_in_one_message(compose):
    keys = ["stage.lr", "stage.batch_size", "data.chat_template"]
    cfg = compose(["tracking=none", "stage.lr=-1", "stage.batch_size=0", "data.chat_template=sometimes"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert any(starts_with_key(message, key) for key in keys), message
    for key in keys:
        assert f"{key}:" in message, message
    assert re.search(r"\band 2 more\b", message), message
    assert "\n" not in message


def test_compose_type_error_is_described_by_key(compose):
    with pytest.raises(Exception) as err:
        compose(["stage.lr=abc"])
    described = describe_compose_error(err.value)
    assert starts_with_key(described, "stage.lr"), described
    assert "\n" not in described


# ---------------------------------------------------------------------------------------------------------
# 6. Hydra conveniences


def test_cfg_job_with_experiment_and_trainer_override(cli):
    printed = yaml.safe_load(cli("--cfg", "job", "experiment=smoke", "trainer.max_steps=7").stdout)
    assert printed["model"]["name"] == "tiny"
    assert printed["trainer"]["max_steps"] == 7
    assert "max_steps" not in printed


def test_trainer_override_lands_in_trainer(compose):
    run = validate(compose(["experiment=smoke", "tracking=none", "trainer.max_steps=7"]))
    assert run.trainer["max_steps"] == 7
    assert run.model.name == "tiny"


# ---------------------------------------------------------------------------------------------------------
# One place for each stage default: the stage's YAML, or (for a key no YAML sets) its schema


def _schema_defaults(schema: type, prefix: str = "") -> dict[str, Any]:
    """The schema's own defaults by dotted key (MISSING ones left out), nested dataclasses flattened."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            continue
        if dataclasses.is_dataclass(value):
            out.update(_schema_defaults(type(value), f"{prefix}{f.name}."))
        elif value != "???":
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("stage", options("stage"))
def test_each_stage_default_lives_in_one_place(compose, stage):
    from rlhf.stages import get_stage

    cfg = compose([f"stage={stage}"])
    schema = OmegaConf.get_type(cfg.stage)
    assert schema is get_stage(stage).schema
    both = sorted(set(leaves(option_file("stage", stage))) & set(_schema_defaults(schema)))
    assert not both, (
        f"conf/stage/{stage}.yaml sets {both}, which {schema.__name__} also defaults: "
        "keep the default in the YAML and declare the field MISSING in the schema"
    )
    # Every key the schema leaves to the YAML has a value there.
    missing = sorted(OmegaConf.missing_keys(cfg.stage))
    assert not missing, f"stage={stage} leaves {missing} without a value"


def test_config_and_hardware_checks_take_the_stage_table_from_the_entry_point():
    """The wiring runs one way (entry point -> stages -> config): checking a config imports no stage."""
    code = (
        "import sys, types\n"
        "from rlhf import hardware\n"
        "from rlhf.config import register_configs, stage_schemas\n"
        "from rlhf.errors import ConfigError\n"
        "from rlhf.config.schema import BaseStageConfig\n"
        "stage = types.SimpleNamespace(name='mine', schema=BaseStageConfig, refused_strategies={'fsdp': 'not sharded'}, refused_instead=None)\n"
        "register_configs({'mine': stage})\n"
        "assert stage_schemas() == {'mine': BaseStageConfig}, stage_schemas()\n"
        "try:\n"
        "    hardware.check(stage, {'strategy': 'fsdp'})\n"
        "except ConfigError as err:\n"
        "    assert 'stage=mine' in str(err) and 'not sharded' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('fsdp was not refused')\n"
        "assert 'rlhf.stages' not in sys.modules, 'config or hardware imported the stage registry'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
