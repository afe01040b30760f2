"""SIGINT and SIGTERM, from the first line of distill.main to its last: within the training loop a signal stops it
after the current optimizer step and its checkpoint (`StoppedBySignal`); a second one, or one at any other moment
(`interrupting`), stops at once (`Interrupted`), labelled with what it interrupted (`during`)."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("distill")


class StoppedBySignal(Exception):
    def __init__(self, signal_number: int, step: int, checkpoint: Path) -> None:
        self.signal_number = signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} after step {step}; the checkpoint {checkpoint} holds it, "
            f"continue with --resume --run-name {shlex.quote(checkpoint.parent.name)}"
        )


class StopSignals:
    """SIGINT and SIGTERM while a run writes to its directory. During the training loop (`deferred`), a signal asks
    the loop to stop after the current optimizer step and its checkpoint; a second one, or one at any other moment
    (a resume rewriting metrics.jsonl, an evaluation, the test), stops at once with `Interrupted`: every file is
    written whole or not at all, so what was written before stays valid.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, number: int, _frame) -> None:
        if not self._deferring or self.received is not None:
            raise Interrupted(number)
        self.received = number
        logger.warning("Received %s: finishing this step, then writing a checkpoint", signal.Signals(number).name)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the run at once (a KeyboardInterrupt, so that no `except Exception` swallows it); `during`
    says what it interrupted (the innermost `during` block it left), None outside any."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
        self.during: str | None = None


def _interrupt(number: int, _frame) -> None:
    raise Interrupted(number)


@contextlib.contextmanager
def interrupting() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` wherever the program is, so that the error's `finally` blocks remove
    what was half written and `distill.ending` says in one sentence what to run next; the handlers that were there
    before (Python's own, or a caller's) are put back at the end. Without this, SIGTERM would end the process on
    the spot (the operating system's default) and leave its staging folders behind."""
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_further() -> None:
    """Ignore SIGINT and SIGTERM from now until `interrupting` ends: the program is already stopping, and a second
    signal must not cut short the release of the run and the removal of staging folders, or print a traceback."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are delivered when it ends: a cleanup (the release of a run, its
    log files) is never cut in the middle."""
    numbers = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def during(what: str) -> Iterator[None]:
    """Label an `Interrupted` raised in the block with `what` the program was doing ("building the teacher
    cache"), unless a block inside already did."""
    try:
        yield
    except Interrupted as stop:
        stop.during = stop.during or what
        raise
