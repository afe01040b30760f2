"""The Hugging Face Hub's HTTP client, with a bounded wait. huggingface_hub shares one client among its calls, and
that client waits without limit for any request that sets no timeout of its own (creating a repository, a model's
info before transformers downloads it, a data set's listing): an endpoint that accepts a connection and never
answers would hold a run, or a push, for ever. Imported lazily, so that this layer loads nothing heavy.
"""

from __future__ import annotations

# What a user sets to wait longer (or less) for each answer of the Hub; huggingface_hub reads it for its downloads.
TIMEOUT_VARIABLE = "HF_HUB_DOWNLOAD_TIMEOUT"


def bound_waits() -> float:
    """Make every request of huggingface_hub's shared client (transformers' and datasets' downloads included) give
    up once the Hub has sent nothing for HF_HUB_DOWNLOAD_TIMEOUT seconds (10 by default) while connecting, sending
    or reading; return that bound. A request that sets its own timeout keeps it. Called before the Hub is used:
    huggingface_hub builds a new client after a fork or an SSL error, which this call bounds again."""
    import huggingface_hub

    hooks = huggingface_hub.get_session().event_hooks
    if _bound_unset_timeouts not in hooks["request"]:
        # The calls pass timeout=None explicitly, which overrides a client's default: only the request itself,
        # once built, can be bounded.
        hooks["request"].append(_bound_unset_timeouts)
    return wait_seconds()


def wait_seconds() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _bound_unset_timeouts(request) -> None:
    phases = request.extensions.get("timeout") or dict.fromkeys(("connect", "read", "write", "pool"))
    request.extensions["timeout"] = {
        phase: wait_seconds() if seconds is None else seconds for phase, seconds in phases.items()
    }
