"""What a sweep prints while it runs: one line when a trial starts and one when it ends.

The start line gives the trial's position in the budget and its settings; the end line its J&F (or why it
failed), its time, the best value so far and an ETA from the mean time of this worker's trials. Lines
are plain (no carriage returns), so they read the same in a terminal and in a log file; ``quiet`` keeps
only failures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO


def format_settings(params: Mapping[str, Any]) -> str:
    if not params:
        return "the fixed settings"
    return ", ".join(f"{name}={_short(value)}" for name, value in params.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class SweepProgress:
    """Progress lines of one worker; ``workers`` divides the ETA (all share the remaining budget)."""

    study_name: str
    total: int
    metric: str = "J&F-Mean"
    workers: int = 1
    quiet: bool = False
    label: str = ""
    stream: TextIO | None = None
    clock: Callable[[], float] = time.monotonic
    durations: list[float] = field(default_factory=list)
    _started: dict[int, tuple[float, int]] = field(default_factory=dict)

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        prefix = f"[{self.study_name}{' ' + self.label if self.label else ''}] "
        print(prefix + text, file=stream, flush=True)

    def started(self, number: int, position: int, params: Mapping[str, Any]) -> None:
        self._started[number] = (self.clock(), position)
        if not self.quiet:
            self._write(f"trial {position} of {self.total} (#{number}): {format_settings(params)}")

    def finished(
        self,
        number: int,
        *,
        value: float | None,
        outcome: str = "complete",
        best: tuple[float, int] | None = None,
        used: int | None = None,
        detail: str = "",
    ) -> None:
        """``outcome``: complete, pruned, failed (...), or a reason it will be retried; ``used``: trials of
        the budget used so far (for the ETA)."""
        now = self.clock()
        start, position = self._started.pop(number, (now, 0))
        seconds = now - start
        if outcome in ("complete", "pruned"):
            self.durations.append(seconds)
        if self.quiet and outcome in ("complete", "pruned"):
            return
        head = f"trial {position} of {self.total} (#{number})"
        if outcome == "complete" and value is not None:
            text = f"{head}: {self.metric} {value:.4f} in {format_duration(seconds)}"
        else:
            text = f"{head} {outcome} after {format_duration(seconds)}" + (f": {detail}" if detail else "")
        if best is not None:
            text += f"; best so far {best[0]:.4f} (#{best[1]})"
        eta = self.eta(used)
        if eta is not None:
            text += f"; ETA {format_duration(eta)}"
        self._write(text)

    def eta(self, used: int | None) -> float | None:
        if used is None or not self.durations:
            return None
        left = max(0, self.total - used)
        mean = sum(self.durations) / len(self.durations)
        return left * mean / max(1, self.workers)

    def note(self, text: str) -> None:
        """A line that is always printed (stops, retries)."""
        self._write(text)
