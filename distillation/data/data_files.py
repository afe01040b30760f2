"""Reading the raw data: local files (JSON lines, JSON, CSV, Parquet, text) or a Hugging Face Hub data set, each
problem with a file named in one sentence (DataError). dataset.py formats, splits and tokenizes what this reads."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, load_dataset

from distillation.base import file_identity, storage, verified_cache
from distillation.base.errors import UserError, first_line

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(UserError):
    """Data that cannot be used as configured; the message is shown to the user as it is."""


def check_data_folder(data_folder: str) -> None:
    """paths.data_folder holds the caches (tokenized data, `datasets`' copies): it must be, or become, a folder."""
    problem, _created = storage.make_folder(Path(data_folder))
    if problem is not None:
        raise DataError(
            f"paths.data_folder {data_folder} cannot hold the data caches ({problem}); set "
            f"paths.data_folder to a folder this user can write to."
        )


def resolve_local_files(dataset: str, data_folder: str) -> list[Path] | None:
    """The local data files that `dataset` names (as given, or inside `data_folder`), or None for a Hub name."""
    for candidate in (Path(dataset), Path(data_folder) / dataset):
        if candidate.is_file():
            _local_format([candidate])
            return [candidate]
        if candidate.is_dir():
            files = sorted(path for path in candidate.iterdir() if path.suffix in LOCAL_FORMATS)
            if not files:
                raise DataError(
                    f"the folder {candidate} holds no data file; put .json, .jsonl, .csv, .parquet or .txt files there."
                )
            _local_format(files)
            return files
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_FORMATS:
        raise DataError(f"the data file {dataset} does not exist; fix data.dataset or paths.data_folder.")
    return None


def _local_format(files: list[Path]) -> str:
    kinds = {LOCAL_FORMATS.get(path.suffix) for path in files}
    if None in kinds:
        raise DataError(
            f"{files[0]} is not a supported data file; use .json, .jsonl, .csv, .parquet or .txt (one sample a line)."
        )
    if len(kinds) > 1:
        raise DataError(f"the data files {', '.join(map(str, files))} mix formats; keep one format per data set.")
    return kinds.pop()


def load_local_dataset(files: list[Path], data_folder: str, content_hash: str) -> Dataset:
    kind = _local_format(files)
    for path in files:
        if path.stat().st_size == 0:
            raise _empty_file(path)
    if kind != "parquet":
        _check_utf8(files)
    # `datasets` knows a local file by path and modification time only: a cache folder per content hash keeps it
    # from serving old rows for a file rewritten within the same clock tick or copied with `cp -p`.
    arrow_copy = Path(data_folder) / "hf_cache" / content_hash[:16]
    read_before = any(arrow_copy.rglob("*.arrow"))  # a failed read leaves the folder, but no Arrow file
    try:
        return _read_local_files(kind, files, arrow_copy)
    except Exception as error:  # datasets wraps parser errors in several exception types
        if not read_before:
            raise _unreadable(files, kind, error) from None
        # These very bytes were read before, so what fails is the Arrow copy that `datasets` kept of them.
        verified_cache.remove_damaged(arrow_copy, "Arrow copy of the data files", first_line(error.__cause__ or error))
    try:
        return _read_local_files(kind, files, arrow_copy)
    except Exception as error:
        raise _unreadable(files, kind, error) from None


def _read_local_files(kind: str, files: list[Path], cache_dir: Path) -> Dataset:
    with _quiet_readers():
        return load_dataset(kind, data_files=[str(path) for path in files], split="train", cache_dir=str(cache_dir))


def _unreadable(files: list[Path], kind: str, error: Exception) -> DataError:
    cause = error.__cause__ or error
    if isinstance(cause, UnicodeDecodeError) or "utf-8" in str(cause).lower():
        return DataError(f"{files[0]} is not UTF-8 text; convert it to UTF-8.")
    if len(files) > 1 and "column names don't match" in str(cause):  # `datasets` reads a folder's files as one table
        return DataError(
            f"the data files {', '.join(map(str, files))} do not all have the same columns, so they mix formats; "
            f"keep one format per data set: move the files of another format to a folder of their own."
        )
    return DataError(f"could not read {', '.join(map(str, files))} as {kind} ({first_line(cause)}); fix the file.")


def _check_utf8(files: list[Path]) -> None:
    # The JSON reader under `datasets` does not validate UTF-8; bad bytes would only fail later, deep in a map.
    # Blank files are refused here too: the readers would report them as StopIteration or "no data".
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        blank = True
        with path.open("rb") as handle:
            try:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    blank = blank and not block.strip()
                    decoder.decode(block)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8.") from None
        if blank:
            raise _empty_file(path)


def _empty_file(path: Path) -> DataError:
    return DataError(
        f"the data file {path} is empty (no sample in it); put the samples back in it, or set "
        f"data.dataset to another file."
    )


@contextlib.contextmanager
def _quiet_readers() -> Iterator[None]:
    """`datasets`' file readers log a parse error before raising it; the error is reported once, in our words."""
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        readers.setLevel(level)


def load_hub_dataset(name: str, data_folder: str) -> Dataset:
    try:
        return load_dataset(name, split="train", cache_dir=str(Path(data_folder) / "hf_cache"))
    except Exception as error:  # network, missing data set and offline mode surface as different types
        raise DataError(
            f"could not load the data set {name!r} from the Hugging Face Hub ({first_line(error)}); "
            f"set data.dataset to a local .json/.jsonl/.csv/.parquet/.txt file, "
            f"or run the embedded demo with --config configs/tiny.yaml."
        ) from None


def hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        file_identity.hash_contents(digest, path)
    return digest.hexdigest()
