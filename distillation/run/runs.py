"""Run directories: which one a run uses, and one process at a time in it.

A new run's directory is created when its name is chosen, so two runs started at once never share one; a run's
directory is locked (an exclusive lock on its `.lock` file) for as long as a process works on it, so a second
process is refused with one sentence instead of mixing its checkpoints and records with the first one's.

A run stopped or killed before its first optimizer step leaves a directory in which nothing was trained (its lock,
perhaps the records its start writes, perhaps staging): a new run of the same name takes it over (`is_untrained`),
so that the command that started it works again. The staging a kill left in a run's directory is removed when a
process next holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from distillation.base.storage import make_folder, previous_version, recover_interrupted_write, sweep_staging
from distillation.run.checkpoints import TRAINER_STATE_FILE, CheckpointError, step_copies
from distillation.settings.schema import check_simple_name

# `--plain-baseline` trains the run's plain baseline in `<run name>-plain`, beside the run.
PLAIN_BASELINE_SUFFIX = "-plain"


@dataclass(frozen=True)
class RunLocation:
    name: str
    directory: Path
    resume: bool


def locate_run(
    checkpoints_root: str, config_name: str, run_name: str | None, resume: bool, last_name: str
) -> RunLocation:
    """Decide which run directory to use, and hold its lock (see `hold_run`) until `release_runs`.

    A new run gets `<config name>-<timestamp>` unless named; its directory is created here, so two runs started at
    once never share one. An existing directory is only continued by a resume. A resume without a name continues
    the most recent run of this config that has a last checkpoint (a run, not the plain baseline trained after it).
    """
    root = Path(checkpoints_root)
    if run_name is not None:
        check_simple_name(run_name, "--run-name")
    if resume:
        directory = root / run_name if run_name is not None else _latest_run(root, config_name, last_name)
        hold_run(directory, created=False)
        recover_interrupted_write(directory / last_name)
        sweep_staging(directory, held=True)
        if not (directory / last_name).is_dir():  # a damaged checkpoint is there, and its loading names the damage
            raise CheckpointError(_no_checkpoint_message(directory, last_name))
        return RunLocation(directory.name, directory, True)
    _check_checkpoints_root(root)
    if run_name is not None:
        if not _reserve(root / run_name) and not _take_over(root / run_name):
            raise CheckpointError(
                f"the run directory {root / run_name} already exists; pass --resume to continue it, "
                f"or choose another --run-name."
            )
        return RunLocation(run_name, root / run_name, False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, suffix = f"{config_name}-{stamp}", 2
    while not _reserve(root / name):  # another run started in the same second
        name, suffix = f"{config_name}-{stamp}-{suffix}", suffix + 1
    return RunLocation(name, root / name, False)


def _check_checkpoints_root(root: Path) -> None:
    problem, created = make_folder(root)
    if problem:
        raise CheckpointError(
            f"paths.checkpoints {root} cannot be used as a folder ({problem}); set paths.checkpoints to a folder "
            f"this user can write to."
        )
    _CREATED_FOLDERS.extend(created)  # deepest first, removed again by release_runs if still empty


def _latest_run(root: Path, config_name: str, last_name: str) -> Path:
    # Read only: the runs looked at here may be in use by another process, which alone may repair them.
    candidates = [
        path
        for path in root.glob(f"{config_name}-*")
        if _saved_state(path / last_name) is not None and not _is_plain_baseline(path)
    ]
    if not candidates:
        raise CheckpointError(
            f"there is no run of {config_name!r} with a checkpoint to resume in {root}; "
            f"start a new run without --resume, or name the run with --run-name."
        )
    return max(candidates, key=lambda path: _saved_state(path / last_name).stat().st_mtime)


def _saved_state(checkpoint: Path) -> Path | None:
    """The checkpoint's trainer state, or its previous version's during a replacing write (storage.py)."""
    for candidate in (checkpoint, previous_version(checkpoint)):
        if (candidate / TRAINER_STATE_FILE).is_file():
            return candidate / TRAINER_STATE_FILE
    return None


def _no_checkpoint_message(directory: Path, last_name: str) -> str:
    if is_untrained(directory):
        return (
            f"nothing was trained in the run {directory.name} yet (it stopped before its first step), so there is no "
            f"checkpoint to resume; start it again with the same command without --resume."
        )
    copies = [path for path in step_copies(directory, excluding=(last_name,)) if _saved_state(path) is not None]
    if copies:
        return (
            f"there is no checkpoint to resume in {directory / last_name}, but the run kept step copies (the newest "
            f"is {copies[-1].name}); copy it into place (cp -a {copies[-1]} {directory / last_name}) and resume "
            f"again."
        )
    return (
        f"there is no checkpoint to resume in {directory / last_name}; check --run-name, or start a new run "
        f"without --resume."
    )


# Run directory -> (its open lock file, whether this process created the directory).
_HELD_RUNS: dict[Path, tuple[int, bool]] = {}
LOCK_FILE = ".lock"
# The folders above the runs that this process created (paths.checkpoints and its missing parents).
_CREATED_FOLDERS: list[Path] = []


def _reserve(directory: Path) -> bool:
    """Create a new run's directory and hold it; False if it exists (another run, perhaps started this second)."""
    try:
        directory.mkdir()
    except FileExistsError:
        return False
    except OSError as error:
        raise CheckpointError(
            f"the run directory {directory} cannot be created ({error.strerror}); set paths.checkpoints to a folder "
            f"this user can write to, or choose a shorter --run-name."
        ) from None
    hold_run(directory, created=True)
    return True


# What a run's start writes in its directory before the first optimizer step (records.start_run_directory and the
# trackers' first files): a directory holding nothing else but its lock and the staging of these has nothing
# trained in it. Anything else (a checkpoint, its previous version, metrics.jsonl, a file of the user's) means that
# it has, or may have.
_START_RECORDS = frozenset({"config.yaml", "train.log", "tensorboard", LOCK_FILE})


def is_untrained(directory: Path) -> bool:
    """Whether `directory` is a run directory in which nothing was trained (a run stopped during its setup)."""
    try:
        names = [path.name for path in directory.iterdir()]
    except OSError:
        return False
    # `.<record>-<random>`: a record's staging file (storage.atomic_write_text), left by a kill.
    return all(
        name in _START_RECORDS or (name.startswith(".") and name[1:].rsplit("-", 1)[0] in _START_RECORDS)
        for name in names
    )


def _take_over(directory: Path) -> bool:
    """Hold an existing run directory in which nothing was trained, for a new run of its name (the command that
    started it, run again); False for any other directory. Checked again once held: another process may have
    started training in it meanwhile."""
    if not is_untrained(directory):
        return False
    hold_run(directory, created=True)  # "in use by another process" while its own setup is still running
    if not is_untrained(directory):
        return False
    sweep_staging(directory, held=True)
    return True


def hold_run(directory: Path, created: bool) -> None:
    """Take the run's exclusive lock, or say which process has it. The lock is held until `release_runs`, and the
    operating system releases it when the process dies, however it dies: no stale lock to remove by hand."""
    if directory in _HELD_RUNS:  # this process already holds it (a second setup of the same run, in a notebook)
        return
    try:
        descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return  # no such run: the caller says so
    except OSError as error:
        raise CheckpointError(
            f"the run's lock file {directory / LOCK_FILE} cannot be opened ({error.strerror}); the run directory "
            f"must be a folder this user can write to, and its {LOCK_FILE} a file (remove anything else there)."
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip()
        os.close(descriptor)
        raise CheckpointError(
            f"the run {directory.name} is in use by another process{f' (pid {holder})' if holder else ''}; wait for "
            f"it to end or stop it, then resume, or start a new run without --resume."
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    _HELD_RUNS[directory] = (descriptor, created)


def release_runs() -> None:
    """Release the runs this process holds. A directory created for a run that stopped before writing anything
    (a mistake found after its name was taken) is removed again: a mistake leaves no empty run behind."""
    for directory, (descriptor, created) in list(_HELD_RUNS.items()):
        with contextlib.suppress(OSError):  # a directory the user removed meanwhile
            if created and [path.name for path in directory.iterdir()] == [LOCK_FILE]:
                (directory / LOCK_FILE).unlink()
                directory.rmdir()
        os.close(descriptor)
        del _HELD_RUNS[directory]
    for folder in _CREATED_FOLDERS:
        with contextlib.suppress(OSError):  # not empty: another run is there
            folder.rmdir()
    _CREATED_FOLDERS.clear()


def _is_plain_baseline(directory: Path) -> bool:
    """`<run>-plain` beside `<run>`: the baseline that `--plain-baseline` trains after the run, and continues after
    it when resumed (distill.main), so a resume without a name picks the run, not its baseline."""
    run_name = directory.name.removesuffix(PLAIN_BASELINE_SUFFIX)
    return run_name != directory.name and directory.with_name(run_name).is_dir()
