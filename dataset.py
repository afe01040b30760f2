"""Data: load (Hub or local files) -> format (a prompt template) -> split (seed) -> tokenize (cached Arrow) -> batches.

The tokenized splits are saved with `datasets` (Arrow, memory-mapped) under `paths.token_dataset`, in a folder
keyed by everything that produced them: the data itself, the tokenizer, the max length, the template and the
split. Change any of these and the cache is rebuilt; change none and it is reused without touching the raw data.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Bump when the formatting or tokenization below changes, so that old caches are not reused.
CACHE_FORMAT_VERSION = 3
SPLIT_NAMES = ("train", "validation", "test")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
ALPACA_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Data that cannot be used as configured; the message is shown to the user as it is."""


class PromptTemplate(NamedTuple):
    """The prompt of an instruction sample, as two `str.format` templates: `with_input` (fields `{instruction}` and
    `{input}`) for a sample whose input is not empty, `without_input` (`{instruction}` only) otherwise. The response
    follows the prompt directly, then EOS."""

    with_input: str
    without_input: str


PROMPT_TEMPLATES = {
    # Stanford Alpaca's prompt, byte for byte the `text` column of vicgalle/alpaca-gpt4 (prompt, then the output),
    # on which the seed's teacher vicgalle/gpt2-alpaca-gpt4 was fine-tuned.
    "alpaca": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    # The same sections without the preamble: shorter samples (the embedded demo's teacher was trained on these).
    "alpaca_short": PromptTemplate(
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
DEFAULT_TEMPLATE = PROMPT_TEMPLATES["alpaca"]


def prompt_template(value: Any) -> PromptTemplate:
    """`data.template` as a PromptTemplate: the name of one of PROMPT_TEMPLATES, or a mapping with the two
    templates `with_input` and `without_input`. Anything else raises DataError naming the fix."""
    if isinstance(value, str):
        if value not in PROMPT_TEMPLATES:
            raise DataError(
                f"data.template is {value!r}; use one of {', '.join(PROMPT_TEMPLATES)}, or a section with "
                f"with_input and without_input templates."
            )
        return PROMPT_TEMPLATES[value]
    if not isinstance(value, dict) or set(value) != set(PromptTemplate._fields):
        raise DataError(
            f"data.template is {value!r}; use one of {', '.join(PROMPT_TEMPLATES)}, or a section with exactly the "
            f"keys with_input (fields {{instruction}} and {{input}}) and without_input (field {{instruction}})."
        )
    for key, fields in (("with_input", {"instruction", "input"}), ("without_input", {"instruction"})):
        text = value[key]
        try:
            found = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None} \
                if isinstance(text, str) else None
        except ValueError:
            found = None
        if found != fields:
            raise DataError(
                f"data.template.{key} is {text!r}; it must be a text whose fields are exactly "
                f"{' and '.join('{' + name + '}' for name in sorted(fields))} (write a literal brace as {{{{ or }}}})."
            )
    return PromptTemplate(value["with_input"], value["without_input"])


def alpaca_prompt(instruction: str, context: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The prompt of an Alpaca sample; the response follows it directly. As in Stanford Alpaca, the input variant
    is chosen when the input is not empty, and the fields are used as they are."""
    if context != "":
        return template.with_input.format(instruction=instruction, input=context)
    return template.without_input.format(instruction=instruction)


@dataclass(frozen=True)
class DataSpec:
    """What defines the tokenized data; every field is part of the cache key."""

    dataset: str
    text_column: Optional[str]
    max_length: int
    split: tuple[float, float, float]
    mask_instruction: bool
    max_samples: Optional[int]
    seed: int
    template: PromptTemplate = DEFAULT_TEMPLATE


def spec_from_config(config) -> DataSpec:
    data = config.data
    return DataSpec(
        dataset=data.dataset,
        text_column=data.text_column,
        max_length=data.max_length,
        split=(data.split.train, data.split.validation, data.split.test),
        mask_instruction=data.mask_instruction,
        max_samples=data.max_samples,
        seed=config.seed,
        template=prompt_template(data.template),
    )


def prepare_splits(spec: DataSpec, tokenizer, data_folder: str, token_dataset: str, num_proc: int = 1) -> DatasetDict:
    """The tokenized train/validation/test splits, from the cache when it holds exactly this data and tokenizer."""
    local_files = resolve_local_files(spec.dataset, data_folder)
    raw = None
    if local_files is not None:
        data_fingerprint = _hash_files(local_files)
    else:
        raw = _load_hub_dataset(spec.dataset, data_folder)
        data_fingerprint = f"hub:{spec.dataset}:{raw._fingerprint}"
    key = _cache_key(spec, data_fingerprint, tokenizer)
    cache_dir = _cache_root(data_folder, token_dataset) / key
    if (cache_dir / "dataset_dict.json").is_file():
        logger.info("Using the tokenized data cached in %s", cache_dir)
        return load_from_disk(str(cache_dir))

    if raw is None:
        raw = _load_local_dataset(local_files, data_folder, data_fingerprint)
    texts = format_rows(raw, spec, num_proc)
    splits = split_rows(texts, spec.split, spec.seed)
    tokenized = DatasetDict(
        {name: tokenize(rows, tokenizer, spec, num_proc) for name, rows in splits.items()}
    )
    for name in SPLIT_NAMES:
        if len(tokenized[name]) == 0:
            raise DataError(
                f"the {name} split of {spec.dataset!r} is empty after tokenization; "
                f"use more data or a larger data.split.{name} fraction."
            )
    _save_atomically(tokenized, cache_dir, spec, data_fingerprint)
    logger.info(
        "Tokenized %s: %s samples, cached in %s",
        spec.dataset,
        ", ".join(f"{name} {len(tokenized[name])}" for name in SPLIT_NAMES),
        cache_dir,
    )
    return load_from_disk(str(cache_dir))


def load_text_splits(spec: DataSpec, data_folder: str, num_proc: int = 1) -> dict[str, Dataset]:
    """The formatted `prompt` and `response` texts of each split, before tokenization: the same rows and the same
    split as training uses (for exploring the data; nothing is cached)."""
    local_files = resolve_local_files(spec.dataset, data_folder)
    if local_files is not None:
        raw = _load_local_dataset(local_files, data_folder, _hash_files(local_files))
    else:
        raw = _load_hub_dataset(spec.dataset, data_folder)
    return split_rows(format_rows(raw, spec, num_proc), spec.split, spec.seed)


def resolve_local_files(dataset: str, data_folder: str) -> Optional[list[Path]]:
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


def format_rows(raw: Dataset, spec: DataSpec, num_proc: int = 1) -> Dataset:
    """Rows -> `prompt` and `response` texts; empty or all-whitespace samples are dropped and counted."""
    if spec.max_samples is not None:
        raw = raw.select(range(min(spec.max_samples, len(raw))))
    columns = set(raw.column_names)
    if spec.text_column is not None:
        if spec.text_column not in columns:
            raise DataError(
                f"the data set has no column {spec.text_column!r} (it has {', '.join(sorted(columns))}); "
                f"fix data.text_column."
            )
    elif not {"instruction", "output"} <= columns:
        hint = "set data.text_column: text" if "text" in columns else "set data.text_column to the column with the text"
        raise DataError(
            f"the data set has no Alpaca columns instruction/output (it has {', '.join(sorted(columns))}); {hint}."
        )

    def to_texts(batch: dict) -> dict:
        if spec.text_column is not None:
            return {"prompt": [""] * len(batch[spec.text_column]), "response": [_text(t) for t in batch[spec.text_column]]}
        contexts = batch["input"] if "input" in batch else [""] * len(batch["instruction"])
        return {
            "prompt": [alpaca_prompt(_text(i), _text(c), spec.template) for i, c in zip(batch["instruction"], contexts)],
            "response": [_text(o) for o in batch["output"]],
        }

    texts = raw.map(to_texts, batched=True, remove_columns=raw.column_names, num_proc=_procs(num_proc, raw))
    kept = texts.filter(lambda batch: [bool(r.strip()) for r in batch["response"]], batched=True)
    dropped = len(texts) - len(kept)
    if dropped:
        logger.info("Dropped %d empty or all-whitespace samples out of %d", dropped, len(texts))
    if len(kept) == 0:
        raise DataError(f"the data set {spec.dataset!r} has no non-empty sample; check data.dataset and its columns.")
    return kept


def split_rows(rows: Dataset, fractions: tuple[float, float, float], seed: int) -> dict[str, Dataset]:
    """A deterministic shuffle from `seed`, then consecutive train/validation/test slices of the given fractions."""
    total = len(rows)
    order = np.random.default_rng(seed).permutation(total)
    train_count = int(round(fractions[0] * total))
    validation_count = int(round(fractions[1] * total))
    bounds = (0, train_count, train_count + validation_count, total)
    splits = {name: rows.select(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(
                f"the data set has {total} samples, too few for a non-empty {name} split; "
                f"use more data or change data.split."
            )
    return splits


def tokenize(rows: Dataset, tokenizer, spec: DataSpec, num_proc: int = 1) -> Dataset:
    """Texts -> `input_ids` (prompt, response, EOS; cut at max_length), `prompt_length` and `length`.

    The whole text (prompt then response) is tokenized at once, so the ids are exactly those of the joined text,
    as a data set's pre-rendered `text` column gives them: a merge across the boundary stays (before a response that
    starts with a blank line, GPT-2 writes the prompt's final newline and the response's first one as one token). `prompt_length` counts the tokens that lie
    wholly in the prompt; a token that reaches into the response is a target. Samples left with no target (a single
    token, or only prompt tokens when the prompt is masked) are dropped.
    """
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        texts = [prompt + response for prompt, response in zip(batch["prompt"], batch["response"])]
        ids, prompt_lengths = _tokenize_with_prompt_lengths(tokenizer, texts, batch["prompt"])
        input_ids = [(sample + [eos])[: spec.max_length] for sample in ids]
        return {
            "input_ids": input_ids,
            "prompt_length": [min(length, spec.max_length) for length in prompt_lengths],
            "length": [len(sample) for sample in input_ids],  # read by the length-grouped sampler without the ids
        }

    encoded = rows.map(encode, batched=True, remove_columns=rows.column_names, num_proc=_procs(num_proc, rows))

    def has_target(batch: dict) -> list[bool]:
        first_target = [max(1, p) if spec.mask_instruction else 1 for p in batch["prompt_length"]]
        return [len(ids) > first for ids, first in zip(batch["input_ids"], first_target)]

    kept = encoded.filter(has_target, batched=True)
    if len(kept) < len(encoded):
        logger.info("Dropped %d samples left with no target token after truncation", len(encoded) - len(kept))
    return kept


def _tokenize_with_prompt_lengths(tokenizer, texts: list[str], prompts: list[str]) -> tuple[list, list[int]]:
    """Token ids of each text, and how many of its first tokens end within its prompt (from the tokens' character
    offsets, which a `tokenizers`-backed tokenizer gives)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) gives no character offsets, which find where a prompt ends; "
            f"use a teacher whose tokenizer has a tokenizer.json (a `tokenizers` one)."
        )
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    prompt_lengths = [
        bisect.bisect_right([end for _, end in offsets], len(prompt))
        for offsets, prompt in zip(encoded["offset_mapping"], prompts)
    ]
    return encoded["input_ids"], prompt_lengths


class LengthGroupedBatchSampler:
    """Batches of samples of similar length, so that padding to the longest of a batch wastes little.

    Training stays random: each epoch shuffles the samples (from the seed and the epoch), cuts them into groups of
    `group_batches` batches, sorts each group by length, cuts it into batches and shuffles the order of all batches.
    Without `shuffle` (evaluation) the samples are simply taken longest first.
    """

    def __init__(self, lengths, batch_size: int, seed: int, shuffle: bool = True, group_batches: int = 8) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_size = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        generator = np.random.default_rng([self.seed, self.epoch])
        order = generator.permutation(len(self.lengths))
        batches = []
        for start in range(0, len(order), self.group_size):
            group = order[start : start + self.group_size]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + self.batch_size].tolist() for i in range(0, len(group), self.batch_size)]
        for position in generator.permutation(len(batches)):
            yield batches[position]


class EpochBatches:
    """The batches of one epoch in a global order that depends only on the seed and the epoch, dealt out to the
    processes of a distributed run: counted from `start`, global batch k goes to process `k % num_processes`.

    The order is the same whatever the number of processes, so a run sees the same batches on one process or many,
    and a resumed epoch (`start` global batches already done) continues with the same remaining batches even with
    another number of processes; over an epoch the processes see disjoint shards that together hold every sample
    once. Training batches are length-grouped (`LengthGroupedBatchSampler`) or plainly shuffled; evaluation
    batches (`shuffle=False`) are taken longest first.
    """

    def __init__(self, lengths, batch_size: int, seed: int, shuffle: bool = True, group_by_length: bool = True,
                 num_processes: int = 1, process_index: int = 0) -> None:
        self.grouped = LengthGroupedBatchSampler(lengths, batch_size, seed, shuffle)
        self.count, self.batch_size, self.seed = len(self.grouped.lengths), batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def total(self) -> int:
        """Global batches in an epoch, over all processes."""
        return -(-self.count // self.batch_size)

    def global_batches(self) -> list[list[int]]:
        if self.group_by_length or not self.shuffle:
            self.grouped.set_epoch(self.epoch)
            return list(self.grouped)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        return [order[i : i + self.batch_size].tolist() for i in range(0, self.count, self.batch_size)]

    def __len__(self) -> int:
        return max(0, -(-(self.total - self.start - self.process_index) // self.num_processes))

    def __iter__(self):
        yield from self.global_batches()[self.start + self.process_index :: self.num_processes]


class PaddingCollator:
    """Pads a list of samples to the longest one of the batch (never to a fixed length).

    Returns `input_ids (B, T)`, `attention_mask (B, T)` and `labels (B, T)`: the input ids with IGNORE_INDEX on
    padding and, with `mask_instruction`, on the prompt. Padding is found from the attention mask, never from the
    token id, because GPT-2 pads with its EOS and the EOS that ends a sample must stay a target. Also, as Python
    ints counted here on the CPU so that the training loop needs no device sync for them: `real_tokens`
    (non-padding tokens) and `target_tokens` (scored tokens, the normaliser of a gradient-accumulation step).
    """

    def __init__(self, pad_token_id: int, mask_instruction: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.mask_instruction = mask_instruction

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            first_target = sample["prompt_length"] if self.mask_instruction else 0
            labels[row, first_target : len(ids)] = ids[first_target:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **self.token_counts(samples)}

    def token_counts(self, samples: list[dict]) -> dict[str, int]:
        lengths = np.array([len(sample["input_ids"]) for sample in samples])
        targets = target_counts(lengths, np.array([sample["prompt_length"] for sample in samples]), self.mask_instruction)
        return {"real_tokens": int(lengths.sum()), "target_tokens": int(targets.sum())}


def target_counts(lengths: np.ndarray, prompt_lengths: np.ndarray, mask_instruction: bool) -> np.ndarray:
    """Scored tokens per sample. Position 0 is predicted by nothing, so a sample has (length - first target
    position) targets; with `mask_instruction` the first target is the first response token."""
    first_target = np.maximum(1, prompt_lengths if mask_instruction else 0)
    return np.maximum(0, lengths - first_target)


class PackingCollator(PaddingCollator):
    """Packs a batch's samples into as few rows as fit `row_length` tokens (first fit, longest first).

    GPT-2 has absolute positions and full attention, so each packed sample gets positions restarting at 0 and a
    block-diagonal causal attention mask: no token sees another sample. Returns `input_ids (R, L)`, `position_ids
    (R, L)`, `attention_mask (R, 1, L, L)` (boolean, True where attending is allowed), `labels (R, L)` with
    IGNORE_INDEX on each sample's first token (nothing in its own sample predicts it), on padding and, with
    `mask_instruction`, on prompts; plus `real_tokens` and `target_tokens` as in PaddingCollator. The loss over
    real targets is the same as with one sample a row.
    """

    def __init__(self, pad_token_id: int, row_length: int, mask_instruction: bool = False) -> None:
        super().__init__(pad_token_id, mask_instruction)
        self.row_length = row_length

    def __call__(self, samples: list[dict]) -> dict:
        rows: list[list[dict]] = []
        room: list[int] = []
        for sample in sorted(samples, key=lambda item: -len(item["input_ids"])):
            size = len(sample["input_ids"])
            fitting = next((index for index, free in enumerate(room) if free >= size), None)
            if fitting is None:
                rows.append([])
                room.append(self.row_length)
                fitting = len(rows) - 1
            rows[fitting].append(sample)
            room[fitting] -= size
        longest = max(self.row_length - free for free in room)
        shape = (len(rows), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segments = torch.full(shape, -1, dtype=torch.long)  # padding is its own segment: no row is all masked
        for row, packed in enumerate(rows):
            start = 0
            for segment, sample in enumerate(packed):
                ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
                end = start + len(ids)
                input_ids[row, start:end] = ids
                position_ids[row, start:end] = torch.arange(len(ids))
                segments[row, start:end] = segment
                first_target = max(1, sample["prompt_length"] if self.mask_instruction else 0)
                labels[row, start + first_target : end] = ids[first_target:]
                start = end
            position_ids[row, start:] = torch.arange(longest - start)
        causal = torch.tril(torch.ones(longest, longest, dtype=torch.bool))
        attention_mask = (segments[:, :, None] == segments[:, None, :]) & causal
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask[:, None],
            "labels": labels,
            **self.token_counts(samples),
        }


def _text(value) -> str:
    return "" if value is None else str(value)


def _procs(num_proc: int, rows: Dataset) -> Optional[int]:
    # Worker processes only pay off on large data; below that they cost more to start than they save.
    return num_proc if num_proc > 1 and len(rows) >= 10_000 else None


def _local_format(files: list[Path]) -> str:
    kinds = {LOCAL_FORMATS.get(path.suffix) for path in files}
    if None in kinds:
        raise DataError(
            f"{files[0]} is not a supported data file; use .json, .jsonl, .csv, .parquet or .txt (one sample a line)."
        )
    if len(kinds) > 1:
        raise DataError(f"the data files {', '.join(map(str, files))} mix formats; keep one format per data set.")
    return kinds.pop()


def _load_local_dataset(files: list[Path], data_folder: str, content_hash: str) -> Dataset:
    kind = _local_format(files)
    if kind != "parquet":
        _check_utf8(files)
    try:
        return load_dataset(
            kind,
            data_files=[str(path) for path in files],
            split="train",
            # `datasets` knows a local file by path and modification time only: a cache folder per content hash
            # keeps it from serving old rows for a file rewritten within the same clock tick or copied with `cp -p`.
            cache_dir=str(Path(data_folder) / "hf_cache" / content_hash[:16]),
        )
    except UnicodeDecodeError:
        raise DataError(f"{files[0]} is not UTF-8 text; convert it to UTF-8.") from None
    except Exception as error:  # datasets wraps parser errors in several exception types
        cause = error.__cause__ or error
        if isinstance(cause, UnicodeDecodeError) or "utf-8" in str(cause).lower():
            raise DataError(f"{files[0]} is not UTF-8 text; convert it to UTF-8.") from None
        raise DataError(f"could not read {', '.join(map(str, files))} as {kind} ({_first_line(cause)}); fix the file.") from None


def _check_utf8(files: list[Path]) -> None:
    # The JSON reader under `datasets` does not validate UTF-8; bad bytes would only fail later, deep in a map.
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        with path.open("rb") as handle:
            try:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8.") from None


def _load_hub_dataset(name: str, data_folder: str) -> Dataset:
    try:
        return load_dataset(name, split="train", cache_dir=str(Path(data_folder) / "hf_cache"))
    except Exception as error:  # network, missing data set and offline mode surface as different types
        raise DataError(
            f"could not load the data set {name!r} from the Hugging Face Hub ({_first_line(error)}); "
            f"set data.dataset to a local .json/.jsonl/.csv/.parquet/.txt file, "
            f"or run the embedded demo with --config configs/tiny.yaml."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{description}|{tokenizer.eos_token_id}".encode()).hexdigest()


def _cache_key(spec: DataSpec, data_fingerprint: str, tokenizer) -> str:
    description = {
        "version": CACHE_FORMAT_VERSION,
        "spec": spec.__dict__,
        "data": data_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_root(data_folder: str, token_dataset: str) -> Path:
    root = Path(token_dataset)
    return root if root.is_absolute() else Path(data_folder) / root


def _save_atomically(tokenized: DatasetDict, cache_dir: Path, spec: DataSpec, data_fingerprint: str) -> None:
    """Write to a temporary folder and rename it, so that an interrupted write never looks like a valid cache."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        tokenized.save_to_disk(str(staging / "data"))
        (staging / "data" / "produced_by.json").write_text(
            json.dumps({"spec": spec.__dict__, "data": data_fingerprint}, indent=2, default=str)
        )
        if cache_dir.exists():  # another process finished the same cache first
            return
        os.replace(staging / "data", cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
