"""Exception types that the command line turns into one clear message and a non-zero exit.

They are defined in :mod:`backbones.errors` (dependencies run one way, harness -> backbones) and
re-exported here for the rest of the harness.
"""

from backbones.errors import ConfigError, DataError, HarnessError, WeightsNotFoundError


class HarnessWarning(UserWarning):
    """Something a run or evaluation carried on past but the user should know (the CLI prints one line)."""


__all__ = ["ConfigError", "DataError", "HarnessError", "HarnessWarning", "WeightsNotFoundError"]
