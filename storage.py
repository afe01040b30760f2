"""Writing a directory so that a crash, a kill or a full disk never leaves a half-written one in place.

The directory is written under a hidden staging name beside its destination, flushed to disk, then renamed into
place: a rename within one file system is atomic, so the destination is absent, the previous version or the whole
new one, never a part of one. Caches (the tokenized data, the teacher's distributions) and checkpoints are written
this way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import ContextManager, Iterator


def atomic_directory(destination: Path, replace: bool = False) -> ContextManager[Path]:
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


def recover_interrupted_write(destination: Path) -> None:
    """Put back the previous `destination` if a crash came between the two renames of a replacing write."""
    previous = _previous(destination)
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
        if not destination.exists():  # another process may have finished the same directory first
            os.replace(staging, destination)
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
    previous = _previous(destination)
    if destination.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(destination, previous)
    os.replace(staging, destination)
    _fsync_directory(destination.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _previous(destination: Path) -> Path:
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
