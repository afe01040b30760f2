"""A cache entry that is found by what produced it, written whole, and checked before it is used.

An entry is a directory named by a key, a hash of a description of everything that produced it (`location`). It is
written through storage.atomic_directory, so an interrupted build never looks like an entry, with a manifest that
records what its builder says of it and every file's size (`write`). When it is read (`read`), the manifest is
checked against the files, then the entry's own reader opens it and checks what it holds; an entry found damaged is
removed, with a warning, so that the caller builds it again. The staging that a killed build left beside the entries
is removed when an entry is next looked up (storage.sweep_staging), unless its builder is still alive. The tokenized
data (dataset.py) and the teacher's distributions (teacher_cache.py) are cached this way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from distillation.base.errors import UserError, first_line
from distillation.base.storage import atomic_directory, sweep_staging

# The name these warnings have always been shown under: the caches were the data's first.
logger = logging.getLogger("dataset")

Entry = TypeVar("Entry")
# What reading a missing, truncated or garbled file raises.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError)


class CacheError(UserError):
    """A damaged cache that could not be removed; the message asks the user to delete it."""


class Damaged(Exception):
    """Raised by an entry's reader when the entry does not hold what its manifest says; the message says what."""


def location(root: Path, description: Any) -> Path:
    """The entry of `root` for `description` (plain JSON values; others are written as text): a change of any part
    gives another entry."""
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / key


def write(directory: Path, manifest_name: str, fill: Callable[[Path], dict]) -> None:
    """Build the entry `directory`: `fill(staging)` writes its files into a staging directory and returns what the
    manifest `manifest_name` records of them; the manifest adds every file's size (`files`). When another process
    finished the same entry first, theirs is kept."""
    with atomic_directory(directory) as staging:
        manifest = fill(staging)
        manifest["files"] = {
            path.relative_to(staging).as_posix(): path.stat().st_size
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        (staging / manifest_name).write_text(json.dumps(manifest, indent=2, default=str))


def read(
    directory: Path,
    manifest_name: str,
    what: str,
    open_entry: Callable[[Path, dict], Entry],
    errors: tuple[type[BaseException], ...] = (),
) -> Entry | None:
    """The entry `directory` as `open_entry(directory, manifest)` opens it; None when there is none, or when it is
    damaged: its manifest unreadable, a file it lists missing or of another size, or `open_entry` raising Damaged,
    one of READ_ERRORS or of `errors`. A damaged entry is removed (see `remove_damaged`), and so is the staging of
    builds whose process is gone, beside it (a folder shared by concurrent builders: see storage.sweep_staging)."""
    sweep_staging(directory.parent)
    if not directory.exists():
        return None
    try:
        manifest = json.loads((directory / manifest_name).read_text(encoding="utf-8"))
        _check_files(directory, manifest_name, manifest)
        return open_entry(directory, manifest)
    except (Damaged, *READ_ERRORS, *errors) as error:
        problem = first_line(error)
    remove_damaged(directory, what, problem)
    return None


def _check_files(directory: Path, manifest_name: str, manifest: Any) -> None:
    # Entries written before the sizes were recorded have no "files": their readers alone check them.
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise Damaged(f"{manifest_name} is not the record that was written")
    for name, size in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise Damaged(f"{name} is missing")
        if path.stat().st_size != size:
            raise Damaged(f"{name} has {path.stat().st_size} bytes, {size} when written")


def remove_damaged(directory: Path, what: str, problem: str) -> None:
    """Remove a cache found damaged, with a warning, so that it is built again; one that cannot be removed is a
    CacheError that asks the user to delete it."""
    logger.warning("The %s %s is damaged (%s); building it again", what, directory, problem)
    try:
        if directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory)
        else:
            directory.unlink()
    except OSError as error:
        raise CacheError(
            f"the {what} {directory} is damaged ({problem}) and could not be removed ({first_line(error)}); delete it."
        ) from None
