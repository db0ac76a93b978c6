"""Ctrl-C (SIGINT) in a worker: at once inside a trial's work, held back everywhere else.

A trial can run for hours, so Ctrl-C must stop it at once; the objective then records the trial as
interrupted and re-queues it (:mod:`harness.study.objective`). Outside that work (Optuna writing a trial's
result, the sweep's callbacks, asking for the next trial) a KeyboardInterrupt would leave a trial
half-written or RUNNING without a word of why, so there the interrupt is only noted: the worker starts no
new trial and raises KeyboardInterrupt once the step it is in has ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class InterruptGate:
    """Decides when a SIGINT becomes a KeyboardInterrupt.

    Only :meth:`listening` installs the handler (main thread only: Python runs signal handlers there; not
    over an ignored SIGINT); without it, SIGINT keeps its behaviour and the gate changes nothing.
    """

    def __init__(self) -> None:
        #: a Ctrl-C arrived while the gate was closed; the worker stops at the next safe point
        self.pending = False
        self._open = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._open:
            self._open = False  # a second Ctrl-C while the trial is being recorded is only noted
            self.pending = True
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Handle SIGINT through this gate for the duration of the block; the previous handler after.

        A SIGINT ignored when the block starts stays ignored: a command started in the background of a
        script (``nohup ... &``) inherits it ignored, Python keeps it so, and so does the sweep's parent.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """The block may be interrupted at once; an interrupt that arrived before it is raised on entry."""
        if self.pending:
            raise KeyboardInterrupt
        self._open = True
        try:
            yield
        finally:
            self._open = False

    def raise_if_pending(self) -> None:
        """Deliver a held-back interrupt (after the step it arrived in has ended)."""
        if self.pending:
            raise KeyboardInterrupt


class StopOnInterrupt:
    """Optuna callback: no new trial after a held-back Ctrl-C."""

    def __init__(self, gate: InterruptGate) -> None:
        self.gate = gate

    def __call__(self, study: Any, trial: Any) -> None:
        if self.gate.pending:
            study.stop()
