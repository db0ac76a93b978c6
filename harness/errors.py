"""Exception types that the command line turns into one clear message and a non-zero exit.

They are defined in :mod:`backbones.errors` (dependencies run one way, harness -> backbones) and
re-exported here for the rest of the harness.
"""

from backbones.errors import ConfigError, DataError, HarnessError, WeightsNotFoundError


class NotEnoughMemoryError(ConfigError):
    """A run refused before any work because its estimate exceeds the memory free now.

    A ConfigError for the command line (one line, exit 2), but in a sweep a failure of the machine's
    state, not of the trial's settings: the trial keeps its grid point and is retried, as after an OOM.
    """


class HarnessWarning(UserWarning):
    """Something a run or evaluation carried on past but the user should know (the CLI prints one line)."""


__all__ = [
    "ConfigError",
    "DataError",
    "HarnessError",
    "HarnessWarning",
    "NotEnoughMemoryError",
    "WeightsNotFoundError",
]
