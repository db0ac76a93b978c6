"""Exception types that the command line turns into one clear message and a non-zero exit.

They are defined in :mod:`backbones.errors` (dependencies run one way, harness -> backbones) and
re-exported here for the rest of the harness.
"""

from backbones.errors import ConfigError, DataError, HarnessError, WeightsNotFoundError

__all__ = ["ConfigError", "DataError", "HarnessError", "WeightsNotFoundError"]
