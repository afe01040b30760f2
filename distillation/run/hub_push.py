"""Pushing a run's best checkpoint to the Hugging Face Hub: the model, tokenizer, generation config, model card and
loss curves (not the optimizer state, which only resuming needs). At the end of a run when `hub.model_id` is set, or
later with `python3 distill.py --push RUN_DIR`. The run directory is only read: a push that fails changes nothing,
and the same command retries it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distillation.base.errors import UserError, first_line
from distillation.run.checkpoints import TRAINER_STATE_FILE, TRAINING_STATE_FILE

logger = logging.getLogger("distill")

# Resuming needs these; a user of the model does not (the optimizer state is twice the model's size).
NOT_PUSHED = [TRAINING_STATE_FILE, TRAINER_STATE_FILE, ".*"]


class PushError(UserError):
    """A push that could not be done; the message is shown to the user as it is."""


def push_checkpoint(checkpoint: Path, model_id: str, retry: str) -> str:
    """Upload `checkpoint` to the Hub model repository `model_id` (created if missing) and return its URL.
    `retry` is the command that retries the push, named by the one sentence a failure raises as PushError."""
    import huggingface_hub
    from huggingface_hub.utils import httpx

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PushError(
            f"the Hub is in offline mode (HF_HUB_OFFLINE is set), so {checkpoint} was not pushed to "
            f"{model_id}; unset HF_HUB_OFFLINE and retry with {retry}."
        )
    if huggingface_hub.get_token() is None:
        raise PushError(
            f"no Hugging Face token is set, so {checkpoint} was not pushed to {model_id}; log in with "
            f"`hf auth login` (or set HF_TOKEN) and retry with {retry}."
        )
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
    except (OSError, ValueError, httpx.HTTPError) as error:  # unreachable, refused (401, 403), or a bad request
        raise PushError(
            f"pushing {checkpoint} to the Hub repository {model_id} failed ({first_line(error)}), and "
            f"the run is kept as it is; check the network, the token and the name, then retry with "
            f"{retry}."
        ) from None
    logger.info("Pushed %s to %s", checkpoint, url)
    return str(url)
