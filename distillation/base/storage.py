"""Writing a directory so that a crash, a kill or a full disk never leaves a half-written one in place.

The directory is written under a hidden staging name beside its destination, flushed to disk, then renamed into
place: a rename within one file system is atomic, so the destination is absent, the previous version or the whole
new one, never a part of one. Caches (the tokenized data, the teacher's distributions) and checkpoints are written
this way; a single file (a config, a summary, the rewritten metrics) is written beside its destination and renamed
the same way.

A full disk shows as different exceptions depending on the writer (OSError, torch's RuntimeError, safetensors'
SafetensorError): `is_disk_full` recognises them all, so the run can stop with one sentence.

A kill that no handler sees (SIGKILL, the OOM killer, a lost node) leaves its staging behind; `sweep_staging` removes
it on the next start, but never the staging of a writer that is still alive (see `_owner_gone`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_directory(destination: Path, replace: bool = False) -> AbstractContextManager[Path]:
    """A context manager that yields an empty hidden staging directory beside `destination` to write into; when
    the block ends without an exception, fsyncs it and renames it into place. On an exception the staging directory
    is removed and `destination` is left as it was.

    `replace=False`, for a cache that several processes may build at once: each stages in a directory of its own
    (`.<name>-<random>`), and one that finds `destination` already in place keeps it and discards its own.
    `replace=True`, for a checkpoint that one process rewrites: it stages in `.<name>.staging` (one left by a crash
    is removed first), and a previous `destination` stays whole until the new one has replaced it (see
    `recover_interrupted_write`).
    """
    destination = Path(destination)
    return _replacing(destination) if replace else _creating(destination)


def atomic_write_text(destination: Path, text: str) -> None:
    """Write `destination` whole or not at all: a kill or a full disk leaves the previous version in place. An
    OSError names `destination` (not its hidden staging file)."""
    atomic_write_bytes(destination, text.encode("utf-8"))


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    """As `atomic_write_text`, for bytes (a copied figure)."""
    destination = Path(destination)
    try:
        descriptor, staging = tempfile.mkstemp(prefix=f".{destination.name}-", dir=destination.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(destination)) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, 0o644)  # mkstemp's file is private to its owner
        os.replace(staging, destination)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(destination)) from error
        raise
    _fsync_directory(destination.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log whole or not at all: on a full disk the part already written is cut off again,
    so the file never ends in half a record."""
    data = line.encode("utf-8")
    with open(path, "ab", buffering=0) as handle:
        start = handle.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += handle.write(data[written:])
        except BaseException:
            os.ftruncate(handle.fileno(), start)  # freeing space never needs space
            raise


def read_json_lines(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file, and the numbers of the lines that are not a JSON object (a line cut by a
    crash or damaged by hand): those are skipped, so one bad line does not hide the rest."""
    records, damaged = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged


# The messages of writers that do not keep the OSError (safetensors, from Rust) when the disk is full.
_FULL_DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an exception that caused it, says the file system is full (or the quota spent)."""
    return any(
        (isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(message in str(link) for message in _FULL_DISK_MESSAGES)
        for link in _chain(error)
    )


def is_refused_write(error: BaseException) -> bool:
    """Whether the file system refused a file to this user: a read-only or immutable one, or another owner's."""
    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def written_path(error: BaseException) -> str | None:
    """The file named by the first OSError in `error`'s chain, if any: where a failed write went."""
    return next((str(link.filename) for link in _chain(error) if isinstance(link, OSError) and link.filename), None)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the exceptions that caused it, or were being handled when it was raised."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def make_folder(folder: Path) -> tuple[str | None, list[Path]]:
    """Create `folder` and its missing parents: (None, the folders created, deepest first), or (why it cannot be a
    folder, []) for a configured path that is a file, lies under one, or cannot be written."""
    if folder.exists() and not folder.is_dir():
        return "it is a file", []
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return error.strerror, []
    return None, missing


def recover_interrupted_write(destination: Path) -> None:
    """Put back the previous `destination` if a crash came between the two renames of a replacing write."""
    previous = previous_version(destination)
    if not destination.exists() and previous.is_dir():
        os.replace(previous, destination)


# In the staging folder of a creating write (below): the file whose lock its writer holds while it writes.
OWNER_FILE = ".owner"
# What tempfile.mkdtemp and mkstemp add to the prefix `.<name>-`: 8 characters of this alphabet.
_STAGING_NAME = re.compile(r"\.(?P<name>.+)-[a-z0-9_]{8}")
# A staging folder without an owner file was written by a version before it, or its writer died in the instant
# between creating it and locking the file: an hour later, no live writer is behind it.
_UNOWNED_AGE_S = 3600


def sweep_staging(folder: Path, held: bool = False) -> list[Path]:
    """Remove the staging that stopped writers left in `folder`, and return what was removed: each creating write's
    folder whose writer is gone (`_owner_gone`), never one still written, nor a completed entry (those are not
    hidden). With `held`, the caller is the only writer in `folder` (a run holds its directory's lock), so the
    staging of replacing writes (`.<name>.staging`) and of single files (`.<name>-<random>` beside `<name>`) go
    too; the previous version of a replacing write is not staging (`recover_interrupted_write` puts it back)."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:  # no such folder yet: nothing to sweep
        return []
    removed = []
    for path in entries:
        match = _STAGING_NAME.fullmatch(path.name)
        if path.is_dir() and not path.is_symlink() and match and _remove_if_abandoned(path, match["name"]):
            removed.append(path)
        elif held and path.name.startswith(".") and path.name.endswith(".staging") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif held and match and path.is_file() and not path.is_symlink() and (path.parent / match["name"]).exists():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    if removed:
        logger.info("Removed %d staging folder(s) left by a stopped process in %s", len(removed), folder)
    return removed


def _remove_if_abandoned(holder: Path, name: str) -> bool:
    """Remove a creating write's staging folder if its writer is gone; whether it was removed."""
    try:
        descriptor = os.open(holder / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        return _remove_if_old_and_unowned(holder, name)
    except OSError:
        return False
    try:
        if not _owner_gone(descriptor):
            return False
        shutil.rmtree(holder, ignore_errors=True)  # while holding the lock: no writer can take it meanwhile
        return True
    finally:
        os.close(descriptor)


def _remove_if_old_and_unowned(holder: Path, name: str) -> bool:
    try:
        unowned = {path.name for path in holder.iterdir()} <= {name}  # what a creating write puts there
        old = time.time() - holder.stat().st_mtime > _UNOWNED_AGE_S
    except OSError:
        return False
    if unowned and old:
        shutil.rmtree(holder, ignore_errors=True)
    return unowned and old


def _owner_gone(descriptor: int) -> bool:
    """Whether the writer of a staging folder is gone, from its owner file: the writer locks it (`flock`) and then
    writes its pid, and holds the lock until it has removed the folder, and the operating system releases the lock
    however the writer ends. So a lock that can be taken over a written pid means that the writer has ended. A lock,
    not the pid alone: a pid says nothing of a process on another machine sharing the folder (NFS) or in another
    container, and a dead writer's pid may be reused; an empty file is a writer between creating and locking it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live writer (or locks unsupported here: then nothing is known, and nothing removed)
        return False
    return bool(os.read(descriptor, 32).strip())


def _own(holder: Path) -> int:
    """Lock `holder`'s owner file for this writer (see `_owner_gone`); the open file, to close once it is removed."""
    descriptor = os.open(holder / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):  # a file system without locks: sweep_staging then leaves the folder alone
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


@contextlib.contextmanager
def _creating(destination: Path) -> Iterator[Path]:
    destination.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    owner = None
    try:
        owner = _own(holder)
        # mkdtemp's directory is private to its owner; the one put in place gets the usual permissions.
        staging = holder / destination.name
        staging.mkdir()
        yield staging
        _fsync_tree(staging)
        try:
            os.replace(staging, destination)
        except OSError:
            if not destination.is_dir():
                raise
            # Another process finished the same directory first (a rename cannot replace a non-empty one): keep it.
        else:
            _fsync_directory(destination.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        if owner is not None:
            os.close(owner)


@contextlib.contextmanager
def _replacing(destination: Path) -> Iterator[Path]:
    recover_interrupted_write(destination)
    staging = destination.with_name(f".{destination.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_into_place(staging, destination)


def _swap_into_place(staging: Path, destination: Path) -> None:
    # A directory cannot be renamed over a non-empty one, so the swap takes two renames; a crash between them
    # leaves the old directory under its hidden name, which recover_interrupted_write puts back.
    previous = previous_version(destination)
    if destination.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(destination, previous)
    os.replace(staging, destination)
    _fsync_directory(destination.parent)
    shutil.rmtree(previous, ignore_errors=True)


def previous_version(destination: Path) -> Path:
    """Where a replacing write keeps the previous `destination` between its two renames."""
    return destination.with_name(f".{destination.name}.previous")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_directory(path)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
