"""What a user is told when a run cannot go on, and the exit code it ends with: the lowest layer, which the others
import (it imports nothing of the project's, nor torch or transformers).

A user's mistake or a damaged input is a `UserError`: its message is one sentence that names the problem and the fix,
shown as it is, and the program exits with EXIT_USER_ERROR before anything of an earlier run is touched.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # a mistake in the config, the data or the models; a damaged input; a run in use; a failed push
EXIT_NON_FINITE_LOSS = 3  # a NaN or inf loss stopped the run (its last good checkpoint is named)
EXIT_SIGNAL_BASE = 128  # stopped by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)


class UserError(ValueError):
    """A problem the user can fix; its message is one sentence naming the problem and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty), to quote in a one-sentence
    error of our own."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
