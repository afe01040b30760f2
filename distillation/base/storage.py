"""Writing a directory so that a crash, a kill or a full disk never leaves a half-written one in place.

The directory is written under a hidden staging name beside its destination, flushed to disk, then renamed into
place: a rename within one file system is atomic, so the destination is absent, the previous version or the whole
new one, never a part of one. Caches (the tokenized data, the teacher's distributions) and checkpoints are written
this way; a single file (a config, a summary, the rewritten metrics) is written beside its destination and renamed
the same way.

A full disk shows as different exceptions depending on the writer (OSError, torch's RuntimeError, safetensors'
SafetensorError): `is_disk_full` recognises them all, so the run can stop with one sentence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path


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


@contextlib.contextmanager
def _creating(destination: Path) -> Iterator[Path]:
    destination.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
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
