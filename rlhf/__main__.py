"""Entry point: `python -m rlhf [group=option ...] [key=value ...]` (or the `rlhf` command).

Hydra composes the config from conf/ (rlhf.layout finds it); it is validated before anything heavy is loaded, then the
runner trains the chosen stage. Problems the user can fix end with a one-line message and exit code 2.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf.config import register_configs
from rlhf.layout import config_dir
from rlhf.stages import get_stage, stages

log = logging.getLogger("rlhf")
register_configs(stages())


def launch_info():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlhf.tracking import Launch

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return Launch(
        output_dir=hc.runtime.output_dir,
        launch_dir=hc.runtime.cwd,
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
        multirun=multirun,
        sweep_dir=hc.sweep.dir if multirun else None,
        job_num=hc.job.num if multirun else None,
        command=shlex.join(["python", "-m", "rlhf", *sys.argv[1:]]),
    )


def quiet_libraries() -> None:
    """Our log says what happens; the libraries' progress bars and notices repeat or bury it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import warnings

    import datasets
    import transformers

    # PEFT still reads transformers' deprecated alias when it wraps a model: not the user's to fix.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from rlhf.config import validate
    from rlhf.errors import ConfigError, UserError
    from rlhf.locations import apply_location_overrides

    launch = launch_info()
    try:
        # Checked before the heavy libraries are even imported: a bad value fails in a second.
        apply_location_overrides(cfg, launch.overrides)
        try:
            run = validate(cfg)
            from rlhf.hardware import check

            # What this machine and the chosen strategy can run, before any model loads.
            check(get_stage(run.stage.name), run.trainer)
        except ConfigError as err:
            from rlhf.tracking import record_rejected

            record_rejected(OmegaConf.to_container(cfg, resolve=False), launch, err)
            raise
        quiet_libraries()
        from rlhf.runner import execute

        return execute(run, launch)
    except UserError as err:
        print(f"rlhf: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from rlhf import help

    asked = help.requested(sys.argv[1:])
    if asked is not None:
        text, found = help.render(*asked)
        try:
            print(text, file=sys.stdout if found else sys.stderr, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0 if found else 2)
    # Hydra prints its composition errors over several lines and exits 1; we let them reach us and
    # print one line instead (unless the user asked for full tracebacks with HYDRA_FULL_ERROR=1).
    full_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _app()
    except (HydraException, OmegaConfBaseException) as err:
        if full_traceback:
            raise
        from rlhf.config import describe_compose_error

        multirun = any(arg in ("-m", "--multirun") for arg in sys.argv[1:])
        print(f"rlhf: error: {describe_compose_error(err, multirun)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
