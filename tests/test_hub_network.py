"""The Hub's network faults, against a real local HTTP server (tests/fake_hub.py): an endpoint that never answers, one
that closes the connection, one that answers what the client does not expect. Every push ends within its bounded wait
with one sentence naming the command that retries it, leaves the run as it was, and never holds the run's lock while
it waits; a push stopped by a real signal says so, with the same command. (A Hub whose port is closed, and a push
that fails at the end of a run, are cases here.)"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import distill
from distillation.base.errors import EXIT_SIGNAL_BASE, EXIT_USER_ERROR
from distillation.run.runs import LOCK_FILE
from fake_hub import FakeHub, json_answer
from helpers import REPO, base_config, write_config

MODEL_ID = "someone/tiny-student"
WAIT = 1  # seconds: HF_HUB_DOWNLOAD_TIMEOUT in these tests


def errors_logged(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def retry_command(run: Path) -> list[str]:
    return ["python3", "distill.py", "--push", str(run), "--model-id", MODEL_ID]


def tree_digest(directory: Path) -> dict:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != LOCK_FILE
    }


def lock_is_free(run: Path) -> bool:
    """Whether another process could take the run's lock now (a separate open file: flock sees two holders)."""
    with open(run / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def use_hub(patch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The real client, online, pointed at `endpoint` (the module constant HfApi reads), with a token and a short
    wait; the process's own environment stays offline."""
    from huggingface_hub import constants

    patch.setattr(constants, "ENDPOINT", endpoint)
    patch.setattr(constants, "HF_HUB_OFFLINE", False)
    patch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", WAIT)
    patch.setenv("HF_TOKEN", "hf_fake")


class ErrorLines(logging.Handler):
    """The ERROR records of a module-scoped fixture's run (caplog is a test's)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def pushed_at_the_end(tmp_path_factory, teacher_dir, data_file):
    """A run with hub.model_id set, trained in a folder whose name has a space, whose push meets a Hub that never
    answers: (run directory, exit status, errors logged, seconds from the first request to the end, whether the
    run's lock was free at each request)."""
    root = tmp_path_factory.mktemp("network")
    values = base_config(root, teacher_dir, data_file)
    values["paths"]["checkpoints"] = str(root / "my runs")
    values["training_parameters"]["max_steps"] = 2
    values["hub"] = {"model_id": MODEL_ID}
    config_file = write_config(root / "config.yaml", values)
    run = root / "my runs" / "net"
    lock_free, first_request = [], []

    def note(_path: str) -> None:
        first_request.append(first_request[0] if first_request else time.monotonic())
        lock_free.append(lock_is_free(run))

    errors = ErrorLines()
    with pytest.MonkeyPatch.context() as patch, FakeHub("silent", on_request=note) as hub:
        use_hub(patch, hub.endpoint)
        logging.getLogger().addHandler(errors)
        try:
            status = distill.main(["--config", str(config_file), "--run-name", "net"])
        finally:
            logging.getLogger().removeHandler(errors)
    waited = time.monotonic() - first_request[0] if first_request else None
    return run, status, errors.messages, waited, lock_free


def test_a_push_at_the_end_of_a_run_that_the_hub_never_answers_ends_and_never_holds_the_run(pushed_at_the_end):
    run, status, errors, waited, lock_free = pushed_at_the_end
    assert status == EXIT_USER_ERROR
    assert waited is not None and waited < 10 * WAIT + 5  # the push gave up, once its wait was over
    assert lock_free and all(lock_free)  # the run was released before its push began
    (error,) = errors
    assert f"did not answer within {WAIT:g} seconds" in error and "HF_HUB_DOWNLOAD_TIMEOUT" in error
    assert "\n" not in error
    # The retry command pastes as it is, the space in the run's path included.
    assert shlex.split(error.rsplit("retry with ", 1)[1].rstrip(".")) == retry_command(run)
    # The run is trained and complete, and it resumes (it is not "in use").
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "best" / "README.md").is_file() and (run / "best" / "model.safetensors").is_file()
    assert lock_is_free(run)


def wrong_shapes(endpoint: str) -> dict:
    """Answers of another shape than the client reads, at the first request or after a good repository answer."""
    created = json_answer({"url": f"{endpoint}/{MODEL_ID}"})

    def after_creation(answer):
        return lambda path: created if path.endswith("/repos/create") else answer

    return {
        "object-of-other-fields": lambda _: json_answer({"hello": 1}),
        "list": lambda _: json_answer([1, 2]),
        "html": lambda _: (200, "text/html", b"<html><body>Welcome</body></html>"),
        "server-error": lambda _: (500, "text/html", b"<html>Internal Server Error</html>"),
        "preupload-object-of-other-fields": after_creation(json_answer({"hello": 1})),
        "preupload-list": after_creation(json_answer([1, 2])),
        "preupload-html": after_creation((200, "text/html", b"<html></html>")),
    }


@pytest.mark.parametrize(
    "fault",
    [
        "silent",
        "close",
        "refused",
        "object-of-other-fields",
        "list",
        "html",
        "server-error",
        "preupload-object-of-other-fields",
        "preupload-list",
        "preupload-html",
    ],
)
def test_push_against_a_faulty_hub_is_one_sentence_and_exit_2(pushed_at_the_end, fault, monkeypatch, caplog):
    run = pushed_at_the_end[0]
    before = tree_digest(run)
    mode = fault if fault in {"silent", "close"} else "answer"
    with FakeHub(mode) as hub:
        hub.answer = wrong_shapes(hub.endpoint).get(fault)
        endpoint = hub.endpoint
        if fault == "refused":
            hub.__exit__()  # nothing listens on the port any more
        use_hub(monkeypatch, endpoint)
        started = time.monotonic()
        status = distill.main(["--push", str(run)])
    assert status == EXIT_USER_ERROR and time.monotonic() - started < 10 * WAIT + 5
    (error,) = errors_logged(caplog)
    assert "\n" not in error and str(run / "best") in error and "the run is kept as it is" in error
    assert ("did not answer within" in error) == (fault == "silent")
    assert shlex.split(error.rsplit("retry with ", 1)[1].rstrip(".")) == retry_command(run)
    assert tree_digest(run) == before and lock_is_free(run)


def test_a_push_stopped_by_sigint_says_so_and_names_the_retry(pushed_at_the_end, monkeypatch, caplog):
    """A real SIGINT to this process while its push waits on a Hub that never answers (its wait made long)."""
    run = pushed_at_the_end[0]
    with FakeHub("silent") as hub:
        use_hub(monkeypatch, hub.endpoint)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT", 60)
        threading.Thread(target=lambda: hub.requested.wait(60) and os.kill(os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        status = distill.main(["--push", str(run)])
    assert status == EXIT_SIGNAL_BASE + signal.SIGINT and time.monotonic() - started < 30
    (error,) = errors_logged(caplog)
    assert error.startswith(f"stopped by SIGINT while pushing {run / 'best'} to {MODEL_ID}; the run is kept")
    assert shlex.split(error.rsplit("retry with ", 1)[1]) == retry_command(run)
    assert lock_is_free(run)


def test_a_push_stopped_by_sigterm_says_so_and_names_the_retry(pushed_at_the_end):
    """A real `distill.py --push` process, pointed at a Hub that never answers by HF_ENDPOINT, and a real SIGTERM."""
    run = pushed_at_the_end[0]
    before = tree_digest(run)
    with FakeHub("silent") as hub:
        environment = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake"}
        environment.pop("HF_HUB_OFFLINE")
        process = subprocess.Popen(
            [sys.executable, str(REPO / "distill.py"), "--push", str(run)],
            cwd=REPO,
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert hub.requested.wait(240), "the push never reached the Hub"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == EXIT_SIGNAL_BASE + signal.SIGTERM and "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if " ERROR " in line]
    assert f"stopped by SIGTERM while pushing {run / 'best'}" in error
    assert shlex.split(error.rsplit("retry with ", 1)[1]) == retry_command(run)
    assert tree_digest(run) == before


@pytest.mark.parametrize(
    "summary, named",
    [
        ({}, "lacks run, best_validation_loss, steps, samples_seen, tokens_seen, best_step, test.perplexity, "),
        ([1, 2], "holds a JSON list, not an object of the run's figures"),
        ({"run": "net", "steps": "two", "test": {"perplexity": 3.0}}, "lacks best_validation_loss, steps, sample"),
    ],
)
def test_push_of_a_run_whose_summary_lacks_its_figures_names_them(
    pushed_at_the_end, tmp_path, monkeypatch, caplog, summary, named
):
    """summary.json rewritten by hand: the card cannot be written, and the one sentence says what is missing; nothing
    reaches the Hub."""
    run = Path(shutil.copytree(pushed_at_the_end[0], tmp_path / "net"))
    (run / "best" / "README.md").unlink()
    (run / "summary.json").write_text(json.dumps(summary))
    with FakeHub("answer", lambda _: json_answer({})) as hub:
        use_hub(monkeypatch, hub.endpoint)
        assert distill.main(["--push", str(run), "--model-id", MODEL_ID]) == EXIT_USER_ERROR
    assert hub.paths == []
    (error,) = errors_logged(caplog)
    assert error.startswith(f"error: the run {run} cannot be pushed (summary.json {named}")
    assert "\n" not in error


def test_push_messages_name_what_is_set_and_quote_the_commands(pushed_at_the_end, tmp_path, monkeypatch, caplog):
    """TRANSFORMERS_OFFLINE alone puts the Hub offline: the sentence names it. A run not finished, in a folder with a
    space: the command that finishes it pastes as it is."""
    from huggingface_hub import constants

    run = pushed_at_the_end[0]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert distill.main(["--push", str(run)]) == EXIT_USER_ERROR
    unfinished = tmp_path / "half done"
    unfinished.mkdir()
    shutil.copy(run / "config.yaml", unfinished)
    assert distill.main(["--push", str(unfinished)]) == EXIT_USER_ERROR
    offline, not_finished = errors_logged(caplog)
    assert "(TRANSFORMERS_OFFLINE is set)" in offline and "HF_HUB_OFFLINE" not in offline
    assert "unset TRANSFORMERS_OFFLINE" in offline
    assert shlex.split(offline.rsplit("retry with ", 1)[1].rstrip(".")) == retry_command(run)
    assert "finish it with --resume --run-name 'half done', then push it." in not_finished


def test_a_hub_request_that_sets_no_timeout_of_its_own_is_bounded(monkeypatch):
    """A model's info, the first request transformers makes for a Hub name, passes timeout=None: against a Hub that
    never answers it would wait for ever. Once distill.py has bounded the client, it gives up after the wait."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import httpx

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", WAIT)
    assert distill.main(["--push", "no such run"]) == EXIT_USER_ERROR  # bounds the client, then refuses the run
    with FakeHub("silent") as hub:
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            huggingface_hub.HfApi(endpoint=hub.endpoint).model_info("someone/model")
    assert time.monotonic() - started < WAIT + 5
