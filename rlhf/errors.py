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
