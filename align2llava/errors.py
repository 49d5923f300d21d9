"""One exception family: anything a user can cause or fix is an Align2LlavaError.

Stages and the CLI turn these into a one-line `Error: ...` and exit 1, never a traceback.
"""


class Align2LlavaError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class ConfigError(Align2LlavaError):
    """params.yaml (or another config file) is missing, malformed or has an unknown key."""


class DataError(Align2LlavaError):
    """An input file or record cannot be used."""


class RejectBudgetExceeded(DataError):
    """More records were rejected than the stage's reject budget allows."""
