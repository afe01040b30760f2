"""SIGINT and SIGTERM during a run: within the training loop a signal stops it after the current optimizer step and
its checkpoint (`StoppedBySignal`); a second one, or one at any other moment, stops at once (`Interrupted`)."""

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
    """A signal that stops the run at once (a KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
