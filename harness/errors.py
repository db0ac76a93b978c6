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


#: exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it)
INTERRUPTED_EXIT = 130


def interrupted_exit_status() -> int:
    """The status for a Ctrl-C the command has handled: 130, under ``python -m`` too.

    CPython marks a KeyboardInterrupt that ends a string exec/eval (dataclass and namedtuple creation,
    e.g. in a lazy import) as unhandled even when a caller catches it, and ``python -m`` then ignores the
    returned status and kills itself with SIGINT (Python/pythonrun.c run_eval_code_obj, Modules/main.c
    Py_RunMain; bpo-1054041). A worker's status would depend on where the Ctrl-C landed. The mark is
    reset at the start of every string evaluation, so one harmless evaluation clears it.
    """
    eval("None")  # clears the mark (see above); a constant string, no input involved
    return INTERRUPTED_EXIT


__all__ = [
    "ConfigError",
    "DataError",
    "HarnessError",
    "HarnessWarning",
    "INTERRUPTED_EXIT",
    "NotEnoughMemoryError",
    "WeightsNotFoundError",
    "interrupted_exit_status",
]
