"""Signals and kills before training starts (and around it): one sentence that names what was stopped and the exact
command to run next, the documented exit code, no traceback, and nothing left in the way: a run directory in which
nothing was trained is taken over by the same command, and the staging a kill left is swept on the next start, but
never a staging folder whose writer is alive."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dataset
import distill
from distillation.base import storage
from distillation.run import model_card, records
from helpers import REPO, base_config, write_config

RUNNER = ["-m", "tests.crash_runner"]  # holds a process at a point of its setup (see its docstring)
# A run of one step on a little data, without samples or trackers: what these tests look at is around it.
SMALL = {"max_steps": 1, "sample_prompts": 0, "report_to": "none"}
SMALL_SET = [f"training_parameters.{key}={value}" for key, value in SMALL.items()] + ["data.max_samples=48"]


@pytest.fixture
def cached_teacher_config(tmp_path, teacher_dir, data_file) -> Path:
    """A run that distils against the teacher's cache (built in setup), and trains one step."""
    values = base_config(tmp_path, teacher_dir, data_file)
    values["teacher"]["cache_top_k"] = 4
    values["training_parameters"].update(SMALL)
    values["data"]["max_samples"] = 48
    values["training_parameters"]["loss"]["temperature"] = 1.0  # the cache holds the teacher at temperature 1
    return write_config(tmp_path / "config.yaml", values)


def held_in_setup(point: str, tmp_path: Path, *arguments: str) -> subprocess.Popen:
    """distill.py in a child process, once it is held at `point` (crash_runner) with its staging written."""
    held, release = tmp_path / f"held-{point}", tmp_path / "never-released"
    held.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, *RUNNER, point, "0", *arguments],
        cwd=REPO,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HELD": str(held),
            "RELEASE": str(release),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not held.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the process never reached {point}: {process.communicate()[1][-3000:]}")
        time.sleep(0.02)
    return process


def stopped(process: subprocess.Popen, number: int) -> tuple[int, str]:
    """Send the real signal `number`; the exit status and the one error line (asserted to be one)."""
    process.send_signal(number)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # no process waits for ever, not even a failing test's
        process.kill()
        raise
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 or number == signal.SIGKILL, stderr[-3000:]
    return process.returncode, "\n".join(errors)


def staging_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".")) if folder.is_dir() else []


def named_command(message: str) -> list[str]:
    """The arguments of the `python3 distill.py ...` command that a stop message names, at its end."""
    return shlex.split(message.split("python3 distill.py ", 1)[1])


def test_signals_and_a_kill_while_building_the_teacher_cache(tmp_path, cached_teacher_config):
    """SIGKILL leaves the cache's staging and a run directory holding only its lock; the next start (the same
    command) sweeps the first and takes the second over, and a SIGTERM then stops it with one sentence, exit 143,
    its own staging removed and its directory too; the command that sentence names then trains the run."""
    arguments = ["--config", str(cached_teacher_config), "--run-name", "first"]
    cache_root, run = tmp_path / "data" / "teacher_cache", tmp_path / "checkpoints" / "first"

    status, _ = stopped(held_in_setup("teacher_cache", tmp_path, *arguments), signal.SIGKILL)
    assert status == -signal.SIGKILL
    killed_staging = staging_in(cache_root)
    assert len(killed_staging) == 1
    assert staging_in(run) == [".lock"] and len(list(run.iterdir())) == 1

    status, error = stopped(held_in_setup("teacher_cache", tmp_path, *arguments), signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    assert "stopped by SIGTERM while building the teacher cache" in error
    assert (
        f"nothing was written in the run yet, run the same command again: python3 distill.py {shlex.join(arguments)}"
        in error
    )
    assert staging_in(cache_root) == []  # the killed process's (swept at the start), and its own (on the signal)
    assert not run.exists()

    assert distill.main(named_command(error)) == 0
    assert (run / "summary.json").is_file() and staging_in(run) == [".lock"]
    (entry,) = cache_root.iterdir()  # built whole this time, and checked as it was opened
    assert f"Cached the teacher's top-4 distributions in {entry}" in (run / "train.log").read_text()


def test_sigint_while_tokenizing_in_this_process(tmp_path, config_file, monkeypatch, caplog):
    """A real SIGINT as the data's first batch is tokenized: exit 130, the sentence, nothing left behind."""
    tokenize = dataset._tokenize_with_prompt_lengths

    def tokenize_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(dataset, "_tokenize_with_prompt_lengths", tokenize_then_signal)
    handler = signal.getsignal(signal.SIGINT)
    arguments = ["--config", str(config_file)]
    assert distill.main(arguments) == 128 + signal.SIGINT
    assert "stopped by SIGINT while tokenizing the data" in caplog.text
    assert f"run the same command again: python3 distill.py {shlex.join(arguments)}" in caplog.text
    assert not (tmp_path / "checkpoints").exists()  # created for the run, and removed again
    assert staging_in(tmp_path / "data" / "tokenized") == []
    assert signal.getsignal(signal.SIGINT) is handler  # main put back the handlers it found


def test_signals_when_the_run_starts_and_at_its_end(tmp_path, config_file, monkeypatch, caplog):
    """A signal as the run's directory is started (nothing trained yet) names the same command, which takes the
    directory over; one while the model card is written (the run complete) names the resume, which finishes it."""

    def signal_first(number, original):
        def send_then_call(*args, **kwargs):
            os.kill(os.getpid(), number)
            return original(*args, **kwargs)

        return send_then_call

    monkeypatch.setattr(records, "start_trackers", signal_first(signal.SIGTERM, records.start_trackers))
    arguments = ["--config", str(config_file)] + [word for value in SMALL_SET for word in ("--set", value)]
    assert distill.main(arguments) == 128 + signal.SIGTERM
    message = caplog.records[-1].getMessage()
    assert "stopped by SIGTERM while starting the run; nothing was trained yet, start it again: " in message
    (run,) = (tmp_path / "checkpoints").iterdir()
    assert (run / "config.yaml").is_file() and not (run / "last").exists()
    monkeypatch.undo()

    monkeypatch.setattr(model_card, "write_model_card", signal_first(signal.SIGINT, model_card.write_model_card))
    assert named_command(message) == [*arguments, "--run-name", run.name]
    assert distill.main(named_command(message)) == 128 + signal.SIGINT
    message = caplog.records[-1].getMessage()
    assert "stopped by SIGINT while writing the model card; every checkpoint written is kept, continue with" in message
    assert named_command(message) == [*arguments, "--resume", "--run-name", run.name]
    monkeypatch.undo()
    assert distill.main(named_command(message)) == 0
    assert (run / "best" / "README.md").is_file()


def test_a_signal_while_the_config_is_read(tmp_path, config_file, monkeypatch, caplog):
    def read_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(distill, "load_config", read_after_a_signal)
    handler = signal.getsignal(signal.SIGTERM)
    assert distill.main(["--config", str(config_file)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM while reading the config; nothing was written in the run yet" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is handler


HOLD_A_STAGING = """
import sys, time
from pathlib import Path
from distillation.base import storage
with storage.atomic_directory(Path(sys.argv[1])) as staging:
    (staging / "part").write_text("half")
    Path(sys.argv[2]).touch()
    time.sleep(120)
"""


def test_staging_is_swept_only_when_its_writer_is_gone(tmp_path):
    """A folder shared by writers: the staging of this process and of another live process stay; once that process
    is killed its staging goes, the completed entry stays, and so does an unowned staging folder until it is old."""
    folder = tmp_path / "cache"
    with storage.atomic_directory(folder / "done") as staging:
        (staging / "whole").write_text("entry")
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_A_STAGING, str(folder / "other"), str(ready)], cwd=REPO)
    try:
        while not ready.exists():
            assert writer.poll() is None
            time.sleep(0.02)
        unowned = folder / ".older-abcd1234"
        (unowned / "older").mkdir(parents=True)
        with storage.atomic_directory(folder / "mine") as staging:
            assert storage.sweep_staging(folder) == []  # this process's, the other's, and a young unowned one
            assert staging.is_dir() and len(staging_in(folder)) == 3
    finally:
        writer.kill()
        writer.wait()
    os.utime(unowned, (time.time() - 2 * 3600,) * 2)
    assert len(storage.sweep_staging(folder)) == 2
    assert staging_in(folder) == [] and sorted(path.name for path in folder.iterdir()) == ["done", "mine"]
    assert (folder / "done" / "whole").read_text() == "entry"


def test_a_held_run_directory_loses_its_staging_and_keeps_the_rest(tmp_path):
    """In a run directory (held: one writer), the staging of a checkpoint and of a record go; the previous version of
    a checkpoint (put back by recover_interrupted_write), the lock, and files of the user's stay."""
    run = tmp_path / "run"
    for folder in (".last.staging", ".last.previous", "last"):
        (run / folder).mkdir(parents=True)
    for name in (".lock", "config.yaml", ".config.yaml-ab12cd34", ".notes", "my-notes"):
        (run / name).write_text("x")
    assert storage.sweep_staging(run) == []  # not held: another writer may be at work
    removed = storage.sweep_staging(run, held=True)
    assert sorted(path.name for path in removed) == [".config.yaml-ab12cd34", ".last.staging"]
    assert sorted(path.name for path in run.iterdir()) == [
        ".last.previous",
        ".lock",
        ".notes",
        "config.yaml",
        "last",
        "my-notes",
    ]
