"""Exception types that the command line turns into one clear message and a non-zero exit."""


class HarnessError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class DataError(HarnessError):
    """A dataset file or folder is missing, unreadable or malformed."""


class ConfigError(HarnessError):
    """A configuration or study file has an unknown key or a bad value."""


class WeightsNotFoundError(HarnessError):
    """Model weights are not on disk and cannot be downloaded."""
