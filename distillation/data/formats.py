"""The format of a data set, decided once: from its columns, and where they allow several formats (rows of Alpaca and
`messages` in one file make both sets of columns), from its first row. Every row is then checked to be in that
format: a row of another one is refused, naming it, rather than read as an empty sample of the first. The columns
that hold texts are checked to hold texts in every row (a number or a list in one row is refused, naming the row).
dataset.py formats the rows this accepts; chat_data.py reads the conversations."""

from __future__ import annotations

import numpy as np
import pyarrow
import pyarrow.compute
from datasets import Dataset
from datasets.features import Json, List, Value

from distillation.data import chat_data
from distillation.data.data_files import DataError

ALPACA_FIELDS = ("instruction", "input", "output")
LABELS = {
    chat_data.ALPACA: "Alpaca (instruction/input/output)",
    chat_data.MESSAGES: "messages",
    chat_data.SHAREGPT: "ShareGPT conversations",
    chat_data.PROMPT_COMPLETION: "prompt/completion",
    chat_data.PROMPT_ONLY: "prompt-only",
}


def decide_format(raw: Dataset, dataset: str, text_column: str | None) -> str | None:
    """The data set's format (a key of chat_data.FORMAT_COLUMNS; None for data.text_column), once every row is found
    to be in it and its columns to hold what it reads."""
    table = raw.with_format("arrow")[:]  # the rows max_samples kept, without copying them
    columns = set(raw.column_names)
    if text_column is not None:
        _check_text_column(raw, dataset, text_column)
        _check_one_format(table, dataset, (text_column,), f"whole texts of the column {text_column!r}", None)
        _check_texts(raw, dataset, [text_column])
        return None
    kind = _first_row_format(table, columns)
    if kind is None and "prompt" in columns:
        return _prompt_only(raw, dataset)
    if kind is None:
        raise _no_format(raw, dataset, columns)
    _check_one_format(table, dataset, chat_data.FORMAT_COLUMNS[kind], LABELS[kind], kind)
    if kind == chat_data.ALPACA:
        _check_texts(raw, dataset, [name for name in ALPACA_FIELDS if name in columns])
    else:
        chat_data.check_columns(raw, kind, dataset)
    return kind


def _prompt_only(raw: Dataset, dataset: str) -> str:
    """Prompt-only data (a `prompt` column, and none of a format with answers): texts, or lists of turns."""
    if not isinstance(raw.features["prompt"], List):
        _check_texts(raw, dataset, ["prompt"])
    return chat_data.PROMPT_ONLY


def _candidates(columns: set[str]) -> list[str]:
    """The formats whose columns the data set has, in chat_data.FORMAT_COLUMNS' order of precedence."""
    return [kind for kind, needed in chat_data.FORMAT_COLUMNS.items() if set(needed) <= columns]


def _filled(table: pyarrow.Table, names) -> np.ndarray:
    """Per row: whether every one of the columns `names` holds a value (not null)."""
    filled = np.ones(table.num_rows, dtype=bool)
    for name in names:
        column = table.column(name)
        if column.null_count:
            filled &= pyarrow.compute.is_valid(_storage(column)).to_numpy(zero_copy_only=False)
    return filled


def _storage(column: pyarrow.ChunkedArray) -> pyarrow.ChunkedArray:
    # An extension column (datasets' Json, for values of mixed types) keeps its nulls in its storage.
    chunks = [chunk.storage if isinstance(chunk, pyarrow.ExtensionArray) else chunk for chunk in column.chunks]
    return pyarrow.chunked_array(chunks, type=chunks[0].type) if chunks else column


def _first_row_format(table: pyarrow.Table, columns: set[str]) -> str | None:
    """The one format the columns allow; where they allow several, that of the first row in one of them (the first
    in order of precedence, for a row that fills the columns of several)."""
    candidates = _candidates(columns)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    filled = np.stack([_filled(table, chat_data.FORMAT_COLUMNS[kind]) for kind in candidates])
    rows = np.flatnonzero(filled.any(axis=0))
    if len(rows) == 0:
        return candidates[0]
    return candidates[int(np.argmax(filled[:, rows[0]]))]


def _check_one_format(table: pyarrow.Table, dataset: str, own: tuple, label: str, kind: str | None) -> None:
    """Refuse the first row that holds none of the format's columns but all of another format's: a file of one
    format with rows of another, which would otherwise be read as empty samples of the first and dropped."""
    empty = ~_any_filled(table, own)
    others = [other for other in _candidates(set(table.column_names)) if other != kind]
    offending = {}
    for other in others:
        rows = np.flatnonzero(empty & _filled(table, chat_data.FORMAT_COLUMNS[other]))
        if len(rows):
            offending[int(rows[0])] = other
    if not offending:
        return
    row = min(offending)
    other = LABELS[offending[row]]
    reason = "as its first row is" if kind is not None else "data.text_column"
    raise DataError(
        f"row {row + 1} of {dataset} is in the {other} format, but the data set is read in the {label} format "
        f"({reason}); keep one format per data set: write that row in the {label} format, or move the "
        f"{other} rows to a data set of their own."
    )


def _any_filled(table: pyarrow.Table, names) -> np.ndarray:
    filled = np.zeros(table.num_rows, dtype=bool)
    for name in names:
        filled |= _filled(table, [name])
    return filled


def _check_text_column(raw: Dataset, dataset: str, text_column: str) -> None:
    listed = ", ".join(sorted(raw.column_names))
    if text_column not in raw.column_names:
        raise DataError(
            f"the data set {dataset} has no column {text_column!r} (it has {listed}); fix data.text_column."
        )
    if isinstance(raw.features[text_column], List):
        raise DataError(
            f"the column {text_column!r} of {dataset} holds lists, not text; set data.text_column: null so that "
            f"it is read as a conversation."
        )


def _check_texts(raw: Dataset, dataset: str, names: list[str]) -> None:
    """Each column of `names` holds texts (or nothing, in a row): a number or a record would be quoted into the
    samples as its Python form."""
    for name in names:
        feature = raw.features[name]
        empty = raw.data.column(name).null_count == raw.data.num_rows
        if _holds_text(raw, name) or (empty and name == "input"):  # csv reads empty inputs as missing values
            continue
        if isinstance(feature, Json):  # texts in most rows, something else in some: name the first such row
            row, value = next(
                (row, value) for row, value in enumerate(raw[name]) if value is not None and not isinstance(value, str)
            )
            raise DataError(
                f"row {row + 1} of {dataset} has {_kind_of(value)} as its {name} ({_shortened(value)}), "
                f'where text is expected; write it as a text (a JSON string "..."), or remove the row.'
            )
        found = (
            "null in every row"
            if empty
            else f"{feature.dtype} values"
            if isinstance(feature, Value)
            else "records or lists"
        )
        raise DataError(
            f"the column {name!r} of {dataset} holds {found}, not text; write each {name} as a "
            f'text (a JSON string "..."), or fix data.dataset.'
        )


def _kind_of(value) -> str:
    kinds = {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "a record"}
    return kinds.get(type(value), type(value).__name__)


def _shortened(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_format(raw: Dataset, dataset: str, columns: set[str]) -> DataError:
    texts = [name for name in sorted(columns) if _holds_text(raw, name)]
    hint = "write the rows in one of these formats"
    if texts:
        hint += (
            ", or set data.text_column: text"
            if "text" in texts
            else f", or set data.text_column to the column with the whole text ({', '.join(texts)})"
        )
    return DataError(
        f"the data set {dataset} is in none of the formats read here ({chat_data.ACCEPTED}): "
        f"its columns are {', '.join(sorted(columns))}; {hint}."
    )


def _holds_text(raw: Dataset, name: str) -> bool:
    return getattr(raw.features[name], "dtype", None) in ("string", "large_string")
