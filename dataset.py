"""Data: load (Hub or local files) -> format (a prompt template) -> split (seed) -> tokenize (cached Arrow); the
batches are batching.py's.

The tokenized splits are saved with `datasets` (Arrow, memory-mapped) under `paths.token_dataset`, in a folder
keyed by everything that produced them: the data itself, the tokenizer, the max length, the template and the
split. Change any of these and the cache is rebuilt; change none and it is reused without touching the raw data.
A damaged cache (a file missing, truncated or not the size it was written with) is rebuilt too, with a warning
(base/verified_cache.py).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow
from datasets import Dataset, DatasetDict, load_from_disk

from distillation.base import verified_cache
from distillation.data import chat_data, data_files, formats
from distillation.data.data_files import DataError
from distillation.settings.templates import DEFAULT_TEMPLATE, PromptTemplate, prompt_template

logger = logging.getLogger(__name__)

# Bump when the formatting or tokenization below changes, so that old caches are not reused.
CACHE_FORMAT_VERSION = 3
# Dropped samples above this share of the data are a warning: a stray empty row or two is common in public data
# sets, 1 in 100 is not (a max_length too small for the data, answers in a column the format does not read).
DROPPED_WARNING_SHARE = 0.01
SPLIT_NAMES = ("train", "validation", "test")
MANIFEST = "produced_by.json"
ALPACA_FIELDS = formats.ALPACA_FIELDS


def alpaca_prompt(instruction: str, context: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The prompt of an Alpaca sample; the response follows it directly. As in Stanford Alpaca, the input variant
    is chosen when the input is not empty, and the fields are used as they are."""
    if context != "":
        return template.with_input.format(instruction=instruction, input=context)
    return template.without_input.format(instruction=instruction)


def training_chat_template(spec: DataSpec, tokenizer, splits: DatasetDict) -> str | None:
    """The chat template that renders messages as the student was trained: for chat data, the one that rendered it
    (chat_data.rendering_template; its samples carry a target_mask); for Alpaca samples, the prompt template's, even
    where the tokenizer has a chat template of its own (the student never saw that one); None for a text_column run,
    whose prompt format is unknown."""
    if "target_mask" in splits["train"].column_names:
        return chat_data.rendering_template(tokenizer, spec.template)
    return chat_data.alpaca_chat_template(spec.template) if spec.text_column is None else None


@dataclass(frozen=True)
class DataSpec:
    """What defines the tokenized data; every field is part of the cache key."""

    dataset: str
    text_column: str | None
    max_length: int
    split: tuple[float, float, float]
    mask_instruction: bool
    max_samples: int | None
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
    data_files.check_data_folder(data_folder)
    local_files = data_files.resolve_local_files(spec.dataset, data_folder)
    raw = None
    if local_files is not None:
        data_fingerprint = data_files.hash_files(local_files)
    else:
        raw = data_files.load_hub_dataset(spec.dataset, data_folder)
        data_fingerprint = f"hub:{spec.dataset}:{raw._fingerprint}"
    cache_dir = verified_cache.location(
        _cache_root(data_folder, token_dataset), _cache_description(spec, data_fingerprint, tokenizer)
    )
    cached = _open_cache(cache_dir)
    if cached is not None:
        logger.info("Using the tokenized data cached in %s", cache_dir)
        return cached

    if raw is None:
        raw = data_files.load_local_dataset(local_files, data_folder, data_fingerprint)
    texts = format_rows(raw, spec, num_proc)
    splits = split_rows(texts, spec.split, spec.seed)
    tokenized = DatasetDict({name: tokenize(rows, tokenizer, spec, num_proc) for name, rows in splits.items()})
    _check_targets_left(splits, tokenized, spec)
    _save_atomically(tokenized, cache_dir, spec, data_fingerprint)
    logger.info(
        "Tokenized %s: %s samples, cached in %s",
        spec.dataset,
        ", ".join(f"{name} {len(tokenized[name])}" for name in SPLIT_NAMES),
        cache_dir,
    )
    return load_from_disk(str(cache_dir))


def _check_targets_left(splits: dict[str, Dataset], tokenized: DatasetDict, spec: DataSpec) -> None:
    """Samples with no target token left are dropped (tokenize): with data.mask_instruction, a prompt as long as
    max_length leaves none of the response; and prompts that leave no room for an answer. Many of them, or a whole split, say that max_length is too small for
    this data, not that the data is too small."""
    fix = f"raise data.max_length (now {spec.max_length})"
    prompts_only = all(_prompt_only_rows(rows) == len(rows) for rows in splits.values())
    if spec.mask_instruction and not prompts_only:  # a prompt-only sample has no target to unmask
        fix += ", or set data.mask_instruction: false to score the prompts too"
    for name in SPLIT_NAMES:
        if len(tokenized[name]) == 0:
            cause = (
                f"leaves no room for an answer in data.max_length {spec.max_length} tokens"
                if prompts_only
                else f"is cut at data.max_length {spec.max_length} tokens before its first target (response) token"
            )
            raise DataError(
                f"every sample of the {name} split of {spec.dataset} ({len(splits[name])}) {cause}, so the "
                f"split is empty; {fix}."
            )
    total = sum(len(rows) for rows in splits.values())
    dropped = total - sum(len(split) for split in tokenized.values())
    what = (
        f"prompts that do not fit in data.max_length {spec.max_length} with room for an answer"
        if prompts_only
        else f"samples cut at data.max_length {spec.max_length} before any response token"
    )
    _report_dropped(dropped, total, what, fix)


def _prompt_only_rows(rows: Dataset) -> int:
    return sum(rows["prompt_only"]) if "prompt_only" in rows.column_names else 0


def load_text_splits(spec: DataSpec, data_folder: str, num_proc: int = 1) -> dict[str, Dataset]:
    """The formatted `prompt` and `response` texts of each split (for chat data its `messages`), before
    tokenization: the same rows and the same split as training uses (for exploring the data; nothing is cached)."""
    data_files.check_data_folder(data_folder)
    local_files = data_files.resolve_local_files(spec.dataset, data_folder)
    if local_files is not None:
        raw = data_files.load_local_dataset(local_files, data_folder, data_files.hash_files(local_files))
    else:
        raw = data_files.load_hub_dataset(spec.dataset, data_folder)
    return split_rows(format_rows(raw, spec, num_proc), spec.split, spec.seed)


def format_rows(raw: Dataset, spec: DataSpec, num_proc: int = 1) -> Dataset:
    """Rows -> `prompt` and `response` texts, or for chat data (chat_data.py) `messages`, lists of role/content
    turns; empty or all-whitespace samples are dropped and counted."""
    if spec.max_samples is not None:
        raw = raw.select(range(min(spec.max_samples, len(raw))))
    kind = formats.decide_format(raw, spec.dataset, spec.text_column)
    if kind not in (None, chat_data.ALPACA):
        messages = raw.map(
            chat_data.to_messages,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            fn_kwargs={"kind": kind, "dataset": spec.dataset},
            num_proc=_procs(num_proc, raw),
            load_from_cache_file=False,
        )
        return _drop_empty(messages, chat_data.has_response, spec, kind)

    def to_texts(batch: dict) -> dict:
        if spec.text_column is not None:
            return {
                "prompt": [""] * len(batch[spec.text_column]),
                "response": [_text(t) for t in batch[spec.text_column]],
            }
        contexts = batch["input"] if "input" in batch else [""] * len(batch["instruction"])
        return {
            "prompt": [
                alpaca_prompt(_text(i), _text(c), spec.template) for i, c in zip(batch["instruction"], contexts)
            ],
            "response": [_text(o) for o in batch["output"]],
        }

    # Never from `datasets`' own cache of a step (load_from_cache_file), here or in tokenize: prepare_splits caches
    # the tokenized splits whole, and checks them; a damaged file of theirs would fail, or serve wrong rows, unseen.
    texts = raw.map(
        to_texts,
        batched=True,
        remove_columns=raw.column_names,
        num_proc=_procs(num_proc, raw),
        load_from_cache_file=False,
    )
    return _drop_empty(texts, lambda batch: [bool(r.strip()) for r in batch["response"]], spec, kind)


def _drop_empty(texts: Dataset, non_empty, spec: DataSpec, kind: str | None) -> Dataset:
    kept = texts.filter(non_empty, batched=True, load_from_cache_file=False)
    if len(kept) == 0:
        raise DataError(f"the data set {spec.dataset!r} has no non-empty sample; check data.dataset and its columns.")
    empty = (
        f"an empty or all-whitespace {spec.text_column}"
        if kind is None
        else "an empty or all-whitespace output (or none)"
        if kind == chat_data.ALPACA
        else "an empty or all-whitespace prompt"
        if kind == chat_data.PROMPT_ONLY
        else "no assistant turn with text"
    )
    _report_dropped(
        len(texts) - len(kept),
        len(texts),
        f"rows of {spec.dataset} with {empty}",
        "fill them in or remove them, and check that data.dataset's rows hold their answers where this format "
        "reads them",
        warn=kind is not None,  # blank lines separate the paragraphs of a text file: no sign of a problem
    )
    return kept


def _report_dropped(dropped: int, total: int, what: str, fix: str, warn: bool = True) -> None:
    """Say how many samples were dropped and why: a warning, with the fix, when they are more than
    DROPPED_WARNING_SHARE of the data (a cause that concerns the whole data set, not a stray row)."""
    if not dropped:
        return
    if warn and dropped > DROPPED_WARNING_SHARE * total:
        logger.warning("Dropped %d of %d samples (%.1f%%): %s; %s.", dropped, total, 100 * dropped / total, what, fix)
    else:
        logger.info("Dropped %d of %d samples: %s", dropped, total, what)


def split_rows(rows: Dataset, fractions: tuple[float, float, float], seed: int) -> dict[str, Dataset]:
    """A deterministic shuffle from `seed`, then consecutive train/validation/test slices of the given fractions."""
    total = len(rows)
    order = np.random.default_rng(seed).permutation(total)
    train_count = int(round(fractions[0] * total))
    validation_count = int(round(fractions[1] * total))
    bounds = (0, train_count, train_count + validation_count, total)
    splits = {name: rows.select(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(
                f"the data set has {total} samples, too few for a non-empty {name} split; "
                f"use more data or change data.split."
            )
    return splits


def tokenize(rows: Dataset, tokenizer, spec: DataSpec, num_proc: int = 1) -> Dataset:
    """Texts -> `input_ids` (prompt, response, EOS; cut at max_length), `prompt_length` and `length`; conversations
    (a `messages` column) as chat_data.tokenize_conversations writes them, with a `target_mask` too.

    The whole text (prompt then response) is tokenized at once, so the ids are exactly those of the joined text,
    as a data set's pre-rendered `text` column gives them: a merge across the boundary stays (before a response that
    starts with a blank line, GPT-2 writes the prompt's final newline and the response's first one as one token). `prompt_length` counts the tokens that lie
    wholly in the prompt; a token that reaches into the response is a target. Samples left with no target (a single
    token, or only prompt tokens when the prompt is masked) are dropped.
    """
    step = _tokenize_step_fingerprint(rows, tokenizer, spec)
    if "messages" in rows.column_names:
        _check_offsets(tokenizer)
        template = chat_data.rendering_template(tokenizer, spec.template)
        encoded = chat_data.tokenize_conversations(rows, tokenizer, template, spec, _procs(num_proc, rows), step)
        return _keep_samples_with_targets(encoded, spec)
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

    encoded = rows.map(
        encode,
        batched=True,
        remove_columns=rows.column_names,
        num_proc=_procs(num_proc, rows),
        load_from_cache_file=False,
        new_fingerprint=step,
    )
    return _keep_samples_with_targets(encoded, spec)


def _tokenize_step_fingerprint(rows: Dataset, tokenizer, spec: DataSpec) -> str:
    """The name of the tokenizing step's output for `datasets`, from what decides it. Left to `datasets`, it would
    hash the step's function with everything it captures, the tokenizer included: about 3 seconds per split for
    GPT-2's 50257 tokens, for a file that prepare_splits never reads back."""
    description = [
        rows._fingerprint,
        tokenizer_fingerprint(tokenizer),
        spec.__dict__,
        chat_data.tokenizer_template(tokenizer),
    ]
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _keep_samples_with_targets(encoded: Dataset, spec: DataSpec) -> Dataset:
    """The samples with a target left after the cut at max_length; and the prompt-only ones (a target mask without
    a target, see chat_data.tokenize_conversations) that fit with room for a response, whole: a cut prompt is not
    the prompt. (An answered conversation cut before its answer has no target either, but max_length tokens.)"""

    def has_target(batch: dict) -> list[bool]:
        first_target = [max(1, p) if spec.mask_instruction else 1 for p in batch["prompt_length"]]
        keep = [len(ids) > first for ids, first in zip(batch["input_ids"], first_target)]
        if "target_mask" not in batch:
            return keep
        return [
            0 < len(mask) < spec.max_length if not any(mask) else kept for mask, kept in zip(batch["target_mask"], keep)
        ]

    return encoded.filter(has_target, batched=True, load_from_cache_file=False)


def prompt_only_samples(split: Dataset) -> int:
    """How many samples of a tokenized split are prompts only (no response: `batching.response_start` is their
    length). Only a prompt-only row gives a chat sample without a target (an answered one has one, or was
    dropped); an Alpaca sample always has its response."""
    if "target_mask" not in split.column_names or len(split) == 0:
        return 0
    columns = split.select_columns(["prompt_length", "length"]).with_format("numpy")[:]
    return int((columns["prompt_length"] == columns["length"]).sum())


def _tokenize_with_prompt_lengths(tokenizer, texts: list[str], prompts: list[str]) -> tuple[list, list[int]]:
    """Token ids of each text, and how many of its first tokens end within its prompt (from the tokens' character
    offsets, which a `tokenizers`-backed tokenizer gives)."""
    _check_offsets(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    prompt_lengths = [
        bisect.bisect_right([end for _, end in offsets], len(prompt))
        for offsets, prompt in zip(encoded["offset_mapping"], prompts)
    ]
    return encoded["input_ids"], prompt_lengths


def _check_offsets(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) gives no character offsets, which find where a prompt ends; "
            f"use a teacher whose tokenizer has a tokenizer.json (a `tokenizers` one)."
        )


def _text(value) -> str:
    return "" if value is None else str(value)


def _procs(num_proc: int, rows: Dataset) -> int | None:
    # Worker processes only pay off on large data; below that they cost more to start than they save.
    return num_proc if num_proc > 1 and len(rows) >= 10_000 else None


def tokenized_data_identity(split) -> str:
    """The tokenized split's own cache key (it covers the data, the tokenizer and max_length)."""
    files = getattr(split, "cache_files", None)
    if files:
        return Path(files[0]["filename"]).parent.parent.name
    return split._fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{description}|{tokenizer.eos_token_id}".encode()).hexdigest()


def _cache_description(spec: DataSpec, data_fingerprint: str, tokenizer) -> dict:
    """What the tokenized data's cache entry is keyed by (verified_cache.location)."""
    description = {
        "version": CACHE_FORMAT_VERSION,
        "spec": spec.__dict__,
        "data": data_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    # What renders chat data: the tokenizer's own chat template, else the Alpaca one, which spec.template and this
    # code decide. Only a tokenizer template is added, so that the keys of earlier runs' data (and their resumes)
    # stay as they were.
    own_template = chat_data.tokenizer_template(tokenizer)
    if own_template is not None:
        description["chat_template"] = own_template
    return description


def _cache_root(data_folder: str, token_dataset: str) -> Path:
    root = Path(token_dataset)
    return root if root.is_absolute() else Path(data_folder) / root


def _save_atomically(tokenized: DatasetDict, cache_dir: Path, spec: DataSpec, data_fingerprint: str) -> None:
    """Write the cache whole (verified_cache.write); when another process finished the same cache first, theirs is
    kept. produced_by.json records every split's rows besides every file's size, which `_open_cache` checks."""

    def fill(staging: Path) -> dict:
        tokenized.save_to_disk(str(staging))
        rows = {name: len(split) for name, split in tokenized.items()}
        return {"spec": spec.__dict__, "data": data_fingerprint, "rows": rows}

    verified_cache.write(cache_dir, MANIFEST, fill)


def _open_cache(cache_dir: Path) -> DatasetDict | None:
    """The cached splits; None when there are none, or when they are damaged (a file truncated, missing or not
    what was written): a damaged cache is removed, to be rebuilt from the data, with a warning."""
    return verified_cache.read(
        cache_dir, MANIFEST, "tokenized-data cache", _open_splits, errors=(pyarrow.ArrowException,)
    )


def _open_splits(cache_dir: Path, produced_by: dict) -> DatasetDict:
    rows = produced_by.get("rows", {})
    if not isinstance(rows, dict):
        raise verified_cache.Damaged(f"{MANIFEST} is not the record that was written")
    splits = load_from_disk(str(cache_dir))
    if not isinstance(splits, DatasetDict) or set(splits) != set(SPLIT_NAMES):
        raise verified_cache.Damaged(f"it does not hold the splits {', '.join(SPLIT_NAMES)}")
    for name, count in rows.items():
        if len(splits[name]) != count:
            raise verified_cache.Damaged(f"its {name} split has {len(splits[name])} rows, {count} when written")
    return splits
