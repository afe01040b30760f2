"""Data pipeline: padding collator, tokenization, splits, cache, local formats and user-facing errors."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset

import dataset
from distillation.base import verified_cache
from distillation.data import batching, chat_data, data_files
from distillation.settings import templates
from loss import IGNORE_INDEX

TOKEN_DATASET = "tokenized"


def make_spec(path, **overrides) -> dataset.DataSpec:
    values = dict(
        dataset=str(path),
        text_column=None,
        max_length=512,
        split=(0.6, 0.2, 0.2),
        mask_instruction=False,
        max_samples=None,
        seed=0,
    )
    values.update(overrides)
    return dataset.DataSpec(**values)


def prepare(spec, tokenizer, data_folder: Path):
    return dataset.prepare_splits(spec, tokenizer, str(data_folder), TOKEN_DATASET)


def cache_folders(data_folder: Path) -> set[str]:
    """The finished cache folders (staging folders start with a dot)."""
    root = data_folder / TOKEN_DATASET
    return {path.name for path in root.iterdir() if not path.name.startswith(".")} if root.exists() else set()


def sequences(split) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in split["input_ids"]]


def split_sizes(splits) -> tuple[int, int, int]:
    return tuple(len(splits[name]) for name in dataset.SPLIT_NAMES)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tagged(rows: list[dict], count: int | None = None) -> list[dict]:
    """Rows made unique by an index at the start of the instruction, so that no two tokenize alike."""
    chosen = rows if count is None else rows[:count]
    return [{**row, "instruction": f"[{index}] {row['instruction']}"} for index, row in enumerate(chosen)]


def expected_ids(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """The tokens of the whole text (as a pre-rendered text column gives them), then EOS, cut at max_length."""
    return (tokenizer(prompt + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]


# ---------------------------------------------------------------- PaddingCollator


@pytest.fixture
def eos(tokenizer) -> int:
    return tokenizer.eos_token_id


@pytest.fixture
def two_samples(eos) -> list[dict]:
    """A 5-token sample and a 3-token sample, each ending with the EOS (which is also the pad id)."""
    return [
        {"input_ids": [11, 12, 13, 14, eos], "prompt_length": 2},
        {"input_ids": [21, 22, eos], "prompt_length": 1},
    ]


def test_collator_pads_to_longest_sample_of_the_batch(eos, two_samples):
    collate = batching.PaddingCollator(pad_token_id=eos)
    assert collate(two_samples)["input_ids"].shape == (2, 5)
    assert collate(two_samples[1:])["input_ids"].shape == (1, 3)


def test_collator_ids_mask_and_labels(eos, two_samples):
    batch = batching.PaddingCollator(pad_token_id=eos)(two_samples)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, eos], [21, 22, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, 13, 14, eos], [21, 22, eos, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collator_keeps_final_eos_as_target_although_pad_equals_eos(eos, two_samples):
    batch = batching.PaddingCollator(pad_token_id=eos)(two_samples)
    labels, mask = batch["labels"], batch["attention_mask"]
    # Labels are ignored exactly where the attention mask marks padding, not wherever the id is the EOS.
    assert torch.equal(labels == IGNORE_INDEX, mask == 0)
    assert labels[0, 4].item() == eos and labels[1, 2].item() == eos


def test_collator_counts_real_tokens(eos, two_samples):
    batch = batching.PaddingCollator(pad_token_id=eos)(two_samples)
    assert batch["real_tokens"] == 8
    assert batch["real_tokens"] == int(batch["attention_mask"].sum())


def test_collator_masks_prompt_with_mask_instruction(eos, two_samples):
    batch = batching.PaddingCollator(pad_token_id=eos, mask_instruction=True)(two_samples)
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 13, 14, eos],
        [IGNORE_INDEX, 22, eos, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["real_tokens"] == 8  # masking the prompt does not change the token count


# ---------------------------------------------------------------- tokenize()


def test_tokenize_joins_prompt_response_eos_and_truncates(tokenizer):
    prompts = ["### Instruction:\nName a fruit.\n\n### Response:\n", ""]
    responses = ["An apple is a fruit.", "A river flows to the sea."]
    rows = Dataset.from_dict({"prompt": prompts, "response": responses})
    for max_length in (512, 12):
        spec = make_spec("unused", max_length=max_length)
        tokenized = dataset.tokenize(rows, tokenizer, spec)
        assert len(tokenized) == 2
        for sample, prompt, response in zip(tokenized, prompts, responses):
            assert sample["input_ids"] == expected_ids(tokenizer, prompt, response, max_length)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert sample["prompt_length"] == min(len(prompt_ids), max_length)
            assert len(sample["input_ids"]) <= max_length
    full = dataset.tokenize(rows, tokenizer, make_spec("unused", max_length=512))
    assert all(sample["input_ids"][-1] == tokenizer.eos_token_id for sample in full)


def test_tokenize_drops_samples_without_target(tokenizer):
    long_prompt = "### Instruction:\n" + "apple river garden window " * 10 + "\n\n### Response:\n"
    rows = Dataset.from_dict({"prompt": [long_prompt, "Q: ", ""], "response": ["short answer", "yes", ""]})
    assert len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) > 16

    masked = dataset.tokenize(rows, tokenizer, make_spec("unused", max_length=16, mask_instruction=True))
    # The long prompt fills max_length (no response token left) and the empty sample is a lone EOS.
    assert [sample["input_ids"] for sample in masked] == [expected_ids(tokenizer, "Q: ", "yes", 16)]

    unmasked = dataset.tokenize(rows, tokenizer, make_spec("unused", max_length=16, mask_instruction=False))
    # Without masking, the truncated prompt is itself the target; only the lone EOS is dropped.
    assert len(unmasked) == 2
    assert unmasked[0]["input_ids"] == expected_ids(tokenizer, long_prompt, "short answer", 16)


# ---------------------------------------------------------------- prepare_splits(): splits


def test_split_sizes_follow_fractions(tmp_path, tokenizer, data_file, rows):
    splits = prepare(make_spec(data_file), tokenizer, tmp_path)
    total = len(rows)
    train, validation = round(0.6 * total), round(0.2 * total)
    assert split_sizes(splits) == (train, validation, total - train - validation)
    assert set(splits["train"].column_names) == {"input_ids", "prompt_length", "length"}
    assert splits["train"]["length"] == [len(ids) for ids in splits["train"]["input_ids"]]


def test_splits_are_disjoint_and_cover_all_rows(tmp_path, tokenizer, rows):
    unique_rows = tagged(rows)
    path = write_jsonl(tmp_path / "unique.jsonl", unique_rows)
    splits = prepare(make_spec(path), tokenizer, tmp_path / "data")
    produced = Counter(seq for name in dataset.SPLIT_NAMES for seq in sequences(splits[name]))
    expected = Counter(
        tuple(expected_ids(tokenizer, dataset.alpaca_prompt(row["instruction"], row["input"]), row["output"], 512))
        for row in unique_rows
    )
    assert len(expected) == len(unique_rows)  # the rows really are distinct after tokenization
    assert produced == expected


def test_split_depends_on_seed_only(tmp_path, tokenizer, data_file):
    first = prepare(make_spec(data_file, seed=7), tokenizer, tmp_path / "a")
    again = prepare(make_spec(data_file, seed=7), tokenizer, tmp_path / "b")
    other = prepare(make_spec(data_file, seed=8), tokenizer, tmp_path / "a")
    for name in dataset.SPLIT_NAMES:
        assert sequences(first[name]) == sequences(again[name])
    assert set(sequences(first["train"])) != set(sequences(other["train"]))
    assert split_sizes(first) == split_sizes(other)


def test_empty_and_whitespace_outputs_are_dropped(tmp_path, tokenizer, rows):
    kept = rows[:20]
    blanks = [{"instruction": "Say nothing.", "input": "", "output": output} for output in ("", "   ", "\n\t ", None)]
    path = write_jsonl(tmp_path / "blanks.jsonl", blanks[:2] + kept[:10] + blanks[2:] + kept[10:])
    splits = prepare(make_spec(path), tokenizer, tmp_path / "data")
    assert sum(split_sizes(splits)) == len(kept)
    assert split_sizes(splits) == (12, 4, 4)


def test_max_samples_limits_rows(tmp_path, tokenizer, data_file):
    splits = prepare(make_spec(data_file, max_samples=30), tokenizer, tmp_path)
    assert split_sizes(splits) == (18, 6, 6)


# ---------------------------------------------------------------- prepare_splits(): cache


def test_cache_is_reused_without_reading_the_data(tmp_path, tokenizer, data_file, monkeypatch):
    spec = make_spec(data_file)
    first = prepare(spec, tokenizer, tmp_path)
    assert len(cache_folders(tmp_path)) == 1

    def must_not_load(*args, **kwargs):
        raise AssertionError("the raw data was read although the cache holds it")

    monkeypatch.setattr(data_files, "load_local_dataset", must_not_load)
    second = prepare(spec, tokenizer, tmp_path)
    for name in dataset.SPLIT_NAMES:
        assert sequences(second[name]) == sequences(first[name])
    assert len(cache_folders(tmp_path)) == 1


def test_cache_rebuilt_when_max_length_changes(tmp_path, tokenizer, data_file):
    long = prepare(make_spec(data_file, max_length=512), tokenizer, tmp_path)
    folders_before = cache_folders(tmp_path)
    short = prepare(make_spec(data_file, max_length=16), tokenizer, tmp_path)
    folders_after = cache_folders(tmp_path)
    assert len(folders_after) == 2 and folders_before < folders_after
    assert max(len(ids) for ids in short["train"]["input_ids"]) == 16
    assert max(len(ids) for ids in long["train"]["input_ids"]) > 16


def test_cache_rebuilt_when_data_content_changes(tmp_path, tokenizer, rows, monkeypatch):
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows[:40])
    data_folder = tmp_path / "data"
    assert split_sizes(prepare(make_spec(path), tokenizer, data_folder)) == (24, 8, 8)
    folders_before = cache_folders(data_folder)

    write_jsonl(path, rows[:60])  # same name and path, new content
    loads = []
    real_load = data_files.load_local_dataset
    monkeypatch.setattr(data_files, "load_local_dataset", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert split_sizes(prepare(make_spec(path), tokenizer, data_folder)) == (36, 12, 12)
    assert len(loads) == 1
    folders_after = cache_folders(data_folder)
    assert len(folders_after) == 2 and folders_before < folders_after


def test_new_content_with_unchanged_mtime_is_not_read_stale(tmp_path, tokenizer, rows):
    path = write_jsonl(tmp_path / "alpaca.jsonl", tagged(rows, 40))
    data_folder = tmp_path / "data"
    prepare(make_spec(path), tokenizer, data_folder)
    stat = path.stat()

    write_jsonl(path, tagged(rows, 60))  # e.g. a copy that preserves timestamps, or a rewrite within one clock tick
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert split_sizes(prepare(make_spec(path), tokenizer, data_folder)) == (36, 12, 12)


def test_a_cache_entry_is_keyed_written_with_its_sizes_and_removed_when_damaged(tmp_path, caplog):
    """The helper under both caches (tokenized data, teacher), on an entry of its own."""
    description = {"version": 1, "data": "abc", "rows": [3, 1]}
    entry = verified_cache.location(tmp_path, description)
    # The key that earlier caches were found by, so that their directories are found still.
    assert entry == tmp_path / hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    assert verified_cache.location(tmp_path, {**description, "data": "abd"}) != entry

    def fill(staging: Path) -> dict:
        (staging / "part").mkdir()
        (staging / "part" / "values.bin").write_bytes(b"0123456789")
        return {"rows": 10}

    def open_entry(directory: Path, manifest: dict) -> bytes:
        values = (directory / "part" / "values.bin").read_bytes()
        if len(values) != manifest["rows"]:
            raise verified_cache.Damaged(f"{len(values)} rows, not {manifest['rows']}")
        return values

    verified_cache.write(entry, "manifest.json", fill)
    assert json.loads((entry / "manifest.json").read_text()) == {"rows": 10, "files": {"part/values.bin": 10}}
    assert verified_cache.read(entry, "manifest.json", "test cache", open_entry) == b"0123456789"
    for damage, problem in (
        (lambda: (entry / "part" / "values.bin").write_bytes(b"01234"), "part/values.bin has 5 bytes, 10 when written"),
        (lambda: (entry / "manifest.json").write_text('{"rows": 9}'), "10 rows, not 9"),
    ):
        verified_cache.write(entry, "manifest.json", fill)
        damage()
        caplog.clear()
        assert verified_cache.read(entry, "manifest.json", "test cache", open_entry) is None
        assert f"The test cache {entry} is damaged ({problem}); building it again" in caplog.text
        assert not entry.exists()
    assert verified_cache.read(entry, "manifest.json", "test cache", open_entry) is None  # none: nothing to say
    assert caplog.text.count("is damaged") == 1


# ---------------------------------------------------------------- local formats


def write_in_format(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_alpaca_formats_load(tmp_path, tokenizer, rows, suffix):
    sample_rows = tagged(rows, 20)
    sample_rows[3]["input"] = ""  # csv reads an empty input back as a missing value
    path = write_in_format(tmp_path / f"alpaca{suffix}", sample_rows)
    splits = prepare(make_spec(path), tokenizer, tmp_path / "data")
    assert split_sizes(splits) == (12, 4, 4)
    produced = {seq for name in dataset.SPLIT_NAMES for seq in sequences(splits[name])}
    expected = {
        tuple(expected_ids(tokenizer, dataset.alpaca_prompt(row["instruction"], row["input"]), row["output"], 512))
        for row in sample_rows
    }
    assert produced == expected


def test_text_file_loads_one_sample_a_line(tmp_path, tokenizer, rows):
    lines = [f"{index} {' '.join(row['output'].split())}" for index, row in enumerate(rows[:20])]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines[:10]) + "\n\n   \n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")
    splits = prepare(make_spec(path, text_column="text"), tokenizer, tmp_path / "data")
    assert split_sizes(splits) == (12, 4, 4)
    produced = {seq for name in dataset.SPLIT_NAMES for seq in sequences(splits[name])}
    assert produced == {tuple(expected_ids(tokenizer, "", line, 512)) for line in lines}
    assert all(length == 0 for name in dataset.SPLIT_NAMES for length in splits[name]["prompt_length"])


def test_folder_of_data_files_loads(tmp_path, tokenizer, rows):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:10])
    write_jsonl(folder / "part-1.jsonl", rows[10:20])
    splits = prepare(make_spec(folder), tokenizer, tmp_path / "data")
    assert sum(split_sizes(splits)) == 20


def test_a_folder_of_files_in_two_formats_is_refused_naming_them(tmp_path, rows):
    """Before: "could not read ... as json (Couldn't cast); fix the file", about files each of which is sound."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:10])
    conversations = [
        {"messages": [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]}
        for row in rows[10:20]
    ]
    write_jsonl(folder / "part-1.jsonl", conversations)
    with pytest.raises(dataset.DataError, match=r"part-0\.jsonl, .*part-1\.jsonl do not all have the same columns"):
        dataset.load_text_splits(make_spec(folder), str(tmp_path / "data"))


def test_csv_lines_with_missing_fields_are_counted_and_warned_about(tmp_path, rows, caplog):
    """A CSV line cut short reads as a row without its output: before, its drop was an INFO line."""
    lines = (
        ["instruction,input,output"] + [f"Say {i}.,,It is {i}." for i in range(20)] + [f"Say {i}." for i in range(5)]
    )
    path = tmp_path / "short_lines.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level("INFO"):
        texts = dataset.load_text_splits(make_spec(path), str(tmp_path / "data"))
    assert sum(len(split) for split in texts.values()) == 20
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warning.startswith("Dropped 5 of 25 samples (20.0%)")


# ---------------------------------------------------------------- errors


def test_missing_file_is_a_data_error(tmp_path, tokenizer):
    with pytest.raises(dataset.DataError, match=r"missing\.jsonl.*does not exist"):
        prepare(make_spec(tmp_path / "missing.jsonl"), tokenizer, tmp_path)
    with pytest.raises(dataset.DataError, match=r"missing\.jsonl"):
        prepare(make_spec("missing.jsonl"), tokenizer, tmp_path)


def test_missing_alpaca_columns_is_a_data_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    with pytest.raises(dataset.DataError, match=r"instruction/output.*answer, question"):
        prepare(make_spec(path), tokenizer, tmp_path / "data")


def test_text_only_data_without_text_column_suggests_it(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"sample {i}"} for i in range(10)])
    with pytest.raises(dataset.DataError, match=r"text_column: text"):
        prepare(make_spec(path), tokenizer, tmp_path / "data")


def test_unknown_text_column_is_a_data_error(tmp_path, tokenizer, data_file):
    with pytest.raises(dataset.DataError, match=r"no column 'body'.*instruction"):
        prepare(make_spec(data_file, text_column="body"), tokenizer, tmp_path)


def test_too_small_data_set_is_a_data_error(tmp_path, tokenizer, rows):
    path = write_jsonl(tmp_path / "two.jsonl", rows[:2])
    with pytest.raises(dataset.DataError, match=r"has 2 samples, too few.*validation"):
        prepare(make_spec(path), tokenizer, tmp_path / "data")


def test_unsupported_extension_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "alpaca.xml"
    path.write_text("<rows/>", encoding="utf-8")
    with pytest.raises(dataset.DataError, match=r"alpaca\.xml is not a supported data file"):
        prepare(make_spec(path), tokenizer, tmp_path / "data")


def test_non_utf8_text_file_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes("".join(f"café numéro {i}\n" for i in range(10)).encode("latin-1"))
    with pytest.raises(dataset.DataError, match=r"latin1\.txt is not UTF-8"):
        prepare(make_spec(path, text_column="text"), tokenizer, tmp_path / "data")


def test_non_utf8_jsonl_file_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    text = "".join(
        json.dumps({"instruction": f"Café {i}", "input": "", "output": "Très bien"}, ensure_ascii=False) + "\n"
        for i in range(10)
    )
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(dataset.DataError, match=r"latin1\.jsonl is not UTF-8"):
        prepare(make_spec(path), tokenizer, tmp_path / "data")


CUSTOM_TEMPLATE = {
    "with_input": "Q {{braces}}: {instruction} / {input}\nA: ",
    "without_input": "Q {{braces}}: {instruction}\nA: ",
}


@pytest.mark.parametrize("template", [*templates.PROMPT_TEMPLATES, "custom"])
def test_the_alpaca_chat_template_renders_the_training_text(tokenizer, template):
    """One exchange through the chat template is the training text of an Alpaca sample without input, byte for byte;
    the generation prompt is the prompt; the assistant mask covers the response and EOS."""
    prompt_template = dataset.prompt_template(CUSTOM_TEMPLATE if template == "custom" else template)
    chat_template = chat_data.alpaca_chat_template(prompt_template)
    messages = [{"role": "user", "content": 'Say "{hi}"\n twice.'}, {"role": "assistant", "content": "hi hi"}]
    prompt = dataset.alpaca_prompt('Say "{hi}"\n twice.', "", prompt_template)
    rendered = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    assert rendered == prompt + "hi hi" + tokenizer.eos_token
    assert (
        tokenizer.apply_chat_template(
            messages[:1], chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        == prompt
    )
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, return_dict=True, return_assistant_tokens_mask=True
    )
    response = [token for token, marked in zip(encoded["input_ids"], encoded["assistant_masks"]) if marked]
    # A token that merges the prompt's last space with the response's first word belongs to the response.
    assert tokenizer.decode(response).lstrip(" ") == "hi hi" + tokenizer.eos_token


def test_dropped_samples_above_one_percent_are_a_warning_with_the_cause(tmp_path, rows, caplog):
    """Before, any count of dropped samples was an INFO line; 3 in 100 is a warning, 1 in 151 stays information."""
    blank = {"instruction": "Say nothing.", "input": "", "output": "  "}
    path = write_jsonl(tmp_path / "some_blank.jsonl", rows[:97] + [blank] * 3)
    with caplog.at_level("INFO"):
        dataset.load_text_splits(make_spec(path), str(tmp_path / "data"))
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warning.startswith("Dropped 3 of 100 samples (3.0%)") and "empty or all-whitespace output" in warning
    caplog.clear()
    path = write_jsonl(tmp_path / "one_blank.jsonl", rows[:150] + [blank])
    with caplog.at_level("INFO"):
        dataset.load_text_splits(make_spec(path), str(tmp_path / "data"))
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
    assert any(record.getMessage().startswith("Dropped 1 of 151 samples") for record in caplog.records)
