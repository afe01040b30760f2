"""Pushing a run's best checkpoint to the Hugging Face Hub: the model, tokenizer, generation config, model card and
loss curves (not the optimizer state, which only resuming needs). At the end of a run when `hub.model_id` is set
(once the run is released: a push never holds it), or later with `python3 distill.py --push RUN_DIR`. The run
directory is only read: a push that fails (no answer within HF_HUB_DOWNLOAD_TIMEOUT seconds, a refusal, an answer of
another shape) or is stopped by a signal changes nothing, and its one sentence names the command that retries it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from distillation.base import hub_client
from distillation.base.errors import UserError, first_line
from distillation.run.checkpoints import TRAINER_STATE_FILE, TRAINING_STATE_FILE

logger = logging.getLogger("distill")

# Resuming needs these; a user of the model does not (the optimizer state is twice the model's size).
NOT_PUSHED = [TRAINING_STATE_FILE, TRAINER_STATE_FILE, ".*"]
# huggingface_hub's offline switches, in the order it reads them (the first one set decides).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class PushError(UserError):
    """A push that could not be done; the message is shown to the user as it is."""


class PushStopped(Exception):
    """SIGINT or SIGTERM during a push: nothing of the run was changed, and the same command retries it."""

    def __init__(self, signal_number: int, checkpoint: Path, model_id: str, retry: str) -> None:
        self.signal_number = signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} while pushing {checkpoint} to {model_id}; the run is "
            f"kept as it is, retry with {retry}"
        )


def push_checkpoint(checkpoint: Path, model_id: str, retry: str) -> str:
    """Upload `checkpoint` to the Hub model repository `model_id` (created if missing) and return its URL.
    `retry` is the command that retries the push, named by the one sentence a failure raises as PushError (or, for
    a KeyboardInterrupt, such as the caller's SIGTERM handler raises, PushStopped)."""
    try:
        return _push(checkpoint, model_id, retry)
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        raise PushStopped(number, checkpoint, model_id, retry) from None


def _push(checkpoint: Path, model_id: str, retry: str) -> str:
    import huggingface_hub
    from huggingface_hub.utils import httpx

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        variable = next((name for name in OFFLINE_VARIABLES if os.environ.get(name)), OFFLINE_VARIABLES[0])
        raise PushError(
            f"the Hub is in offline mode ({variable} is set), so {checkpoint} was not pushed to "
            f"{model_id}; unset {variable} and retry with {retry}."
        )
    if huggingface_hub.get_token() is None:
        raise PushError(
            f"no Hugging Face token is set, so {checkpoint} was not pushed to {model_id}; log in with "
            f"`hf auth login` (or set HF_TOKEN) and retry with {retry}."
        )
    seconds = hub_client.bound_waits()
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(model_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=model_id,
            folder_path=checkpoint,
            repo_type="model",
            ignore_patterns=NOT_PUSHED,
            commit_message=f"Upload {checkpoint.parent.name}/{checkpoint.name}",
        )
    except httpx.TimeoutException:
        raise PushError(
            f"the Hub at {api.endpoint} did not answer within {seconds:g} seconds, so {checkpoint} was not pushed "
            f"to {model_id}, and the run is kept as it is; check the network (or wait longer: set "
            f"{hub_client.TIMEOUT_VARIABLE}), then retry with {retry}."
        ) from None
    except (OSError, ValueError, LookupError, TypeError, AttributeError, httpx.HTTPError) as error:
        # Unreachable, refused (401, 403, 500), a closed connection, or an answer of another shape than the
        # client reads (HTML, JSON without the fields it expects), which its parsing reports as these types.
        reason = first_line(error)
        if not isinstance(error, (OSError, httpx.HTTPError)):
            reason = f"an answer the client does not understand: {type(error).__name__} {reason}"
        raise PushError(
            f"pushing {checkpoint} to the Hub repository {model_id} at {api.endpoint} failed ({reason}), and the "
            f"run is kept as it is; check the network, the token and the name, then retry with {retry}."
        ) from None
    logger.info("Pushed %s to %s", checkpoint, url)
    return str(url)
