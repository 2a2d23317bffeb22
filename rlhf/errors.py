"""Errors a user can act on: bad configs, bad data, missing earlier runs.

They are printed as one line (no traceback) by the entry point; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem in what the user asked for, explained in one line that names where it is."""


class ConfigError(UserError):
    """An invalid or impossible config value; raised before any model loads."""


class DataError(UserError):
    """A data file or dataset that cannot be used as configured."""


class LineageError(UserError):
    """An earlier run (or model) that a stage starts from cannot be found."""


class DivergedError(UserError):
    """Training produced a non-finite loss or gradient: its weights mean nothing and are not saved."""


# Trainer arguments whose names Lightning's messages mention, most specific first.
_TRAINER_KEYS = ("precision", "strategy", "devices", "num_nodes", "accelerator", "plugins")


def trainer_error(err: Exception, trainer_args: dict) -> ConfigError:
    """Lightning's refusal of the trainer arguments (an accelerator this machine lacks, a precision
    it does not know) as one line naming the key it is about."""
    message = " ".join(str(err).split()) or type(err).__name__
    lowered = message.lower()
    key = next((k for k in _TRAINER_KEYS if k in lowered and k in trainer_args), None)
    if key is None:
        missing_support = isinstance(err, ImportError) or "backend" in lowered or "gpu" in lowered
        key = "accelerator" if "accelerator" in trainer_args and missing_support else None
    if key is None:
        return ConfigError(f"trainer: {message}")
    return ConfigError(
        f"trainer.{key}={trainer_args[key]!r}: {message} (set by the hardware group or on the command line)"
    )
