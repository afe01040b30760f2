"""Chat data: `messages`, ShareGPT `conversations` and `prompt`/`completion` files read, rendered with a chat template
(the tokenizer's own, else the Alpaca one) and masked to the assistant turns; each format trains end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import dataset
import distill
from distillation.data import batching
from helpers import SHORT, read_metrics, write_config
from loss import IGNORE_INDEX

TOKEN_DATASET = "tokenized"
# A tokenizer's own template without generation tags: the assistant turns are found by rendering prefixes.
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token if m['role'] == 'assistant' else '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def exchanges(rows: list[dict]) -> list[tuple[str, str]]:
    """(user, assistant) texts of the fixture's Alpaca rows, the input folded into the instruction."""
    return [(row["instruction"] + (f"\n{row['input']}" if row["input"] else ""), row["output"]) for row in rows]


def shapes(pairs: list[tuple[str, str]]) -> dict[str, list[dict]]:
    """The same exchanges in each chat format, and as Alpaca rows without input."""
    return {
        "alpaca": [{"instruction": user, "input": "", "output": answer} for user, answer in pairs],
        "messages": [
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
            for user, answer in pairs
        ],
        "sharegpt": [
            {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
            for user, answer in pairs
        ],
        "prompt_completion": [{"prompt": user, "completion": answer} for user, answer in pairs],
        "conversational": [
            {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": answer}]}
            for user, answer in pairs
        ],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def spec(path, **overrides) -> dataset.DataSpec:
    values = dict(
        dataset=str(path),
        text_column=None,
        max_length=48,
        split=(0.6, 0.2, 0.2),
        mask_instruction=True,
        max_samples=None,
        seed=0,
        template=SHORT,
    )
    values.update(overrides)
    return dataset.DataSpec(**values)


def prepare(data_spec, tokenizer, data_folder: Path):
    return dataset.prepare_splits(data_spec, tokenizer, str(data_folder), TOKEN_DATASET)


def labels_of(sample: dict, mask_instruction: bool, packed: bool = False) -> list[int]:
    """The labels the collator gives one sample (padding: one a row; packing: its first position unscored)."""
    if packed:
        collate = batching.PackingCollator(0, row_length=len(sample["input_ids"]), mask_instruction=mask_instruction)
    else:
        collate = batching.PaddingCollator(0, mask_instruction)
    batch = collate([sample])
    assert batch["target_tokens"] == int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())  # the step normaliser
    return batch["labels"][0].tolist()


def target_runs(labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of consecutive targets."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("shape", ["messages", "sharegpt", "prompt_completion", "conversational"])
@pytest.mark.parametrize("mask_instruction", [True, False])
def test_one_exchange_is_the_alpaca_sample_without_input(tmp_path, tokenizer, rows, shape, mask_instruction):
    """Each format's exchange gives the ids (cut at max_length) and labels of the Alpaca sample without input, whose
    ids are computed here from the text: prompt, answer, EOS."""
    pairs = exchanges(rows[:30])
    files = shapes(pairs)
    alpaca = prepare(
        spec(write_jsonl(tmp_path / "alpaca.jsonl", files["alpaca"]), mask_instruction=mask_instruction),
        tokenizer,
        tmp_path / "data",
    )
    chat = prepare(
        spec(write_jsonl(tmp_path / f"{shape}.jsonl", files[shape]), mask_instruction=mask_instruction),
        tokenizer,
        tmp_path / "data",
    )
    by_text = {}
    for user, answer in pairs:
        prompt = dataset.alpaca_prompt(user, "", SHORT)
        ids = (tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:48]
        by_text[tuple(ids)] = prompt
    for name in dataset.SPLIT_NAMES:
        assert len(chat[name]) == len(alpaca[name]) > 0
        for expected, sample in zip(alpaca[name], chat[name]):
            assert tuple(sample["input_ids"]) in by_text
            assert sample["input_ids"] == expected["input_ids"]
            assert labels_of(sample, mask_instruction) == labels_of(expected, mask_instruction)
            assert labels_of(sample, mask_instruction, packed=True) == labels_of(expected, mask_instruction, True)
            if mask_instruction:
                prompt_ids = tokenizer(by_text[tuple(sample["input_ids"])], add_special_tokens=False)["input_ids"]
                assert labels_of(sample, True)[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert any(len(sample["input_ids"]) == 48 for sample in chat["train"])  # some were cut


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is 190 less than 251?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "And 300?"},
    {"role": "assistant", "content": "No, 300 is more."},
]


def multi_turn_file(tmp_path: Path, shape: str) -> Path:
    turns = [dict(turn) for turn in MULTI_TURN]
    if shape == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        # Other keys of a turn (ShareGPT's weight) are not part of the text.
        rows = [{"conversations": [{"from": names[t["role"]], "value": t["content"], "weight": 1} for t in turns]}] * 10
    elif shape == "conversational":
        rows = [{"prompt": turns[:4], "completion": turns[4:]}] * 10
    else:
        rows = [{"messages": turns}] * 10
    return write_jsonl(tmp_path / f"multi-{shape}.jsonl", rows)


@pytest.mark.parametrize("shape", ["messages", "sharegpt", "conversational"])
def test_multi_turn_targets_are_the_assistant_turns(tmp_path, tokenizer, shape):
    """Alpaca chat template (generation tags): the targets are each answer and its EOS, nothing of the system
    message or the prompts; the ids are those of the text written out here."""
    splits = prepare(spec(multi_turn_file(tmp_path, shape), max_length=128), tokenizer, tmp_path / "data")
    eos = tokenizer.eos_token
    text = (
        "Be brief.\n\n"
        + dataset.alpaca_prompt("Is 190 less than 251?", "", SHORT)
        + "Yes."
        + eos
        + dataset.alpaca_prompt("And 300?", "", SHORT)
        + "No, 300 is more."
        + eos
    )
    sample = splits["train"][0]
    assert sample["input_ids"] == tokenizer(text)["input_ids"]
    assert target_runs(labels_of(sample, True), tokenizer) == ["Yes." + eos, "No, 300 is more." + eos]
    assert target_runs(labels_of(sample, True, packed=True), tokenizer) == ["Yes." + eos, "No, 300 is more." + eos]
    assert labels_of(sample, False)[1:] == sample["input_ids"][1:]

    cut = prepare(
        spec(multi_turn_file(tmp_path, shape), max_length=len(sample["input_ids"]) - 3), tokenizer, tmp_path / "data"
    )["train"][0]
    assert cut["input_ids"] == sample["input_ids"][:-3]
    assert labels_of(cut, True) == labels_of(sample, True)[:-3]


def own_template_tokenizer(tokenizer, template: str):
    own = copy.deepcopy(tokenizer)
    own.chat_template = template
    return own


def test_a_tokenizer_template_without_generation_tags_masks_by_prefixes(tmp_path, tokenizer):
    """The tokenizer's own template renders the data (and is part of the cache key); without generation tags the
    assistant turns are found by rendering prefixes: the same targets, each answer and its EOS."""
    own = own_template_tokenizer(tokenizer, PLAIN_TEMPLATE)
    path = multi_turn_file(tmp_path, "messages")
    splits = prepare(spec(path, max_length=128), own, tmp_path / "data")
    eos = tokenizer.eos_token
    text = (
        "<|system|>\nBe brief.\n<|user|>\nIs 190 less than 251?\n<|assistant|>\nYes."
        + eos
        + "<|user|>\nAnd 300?\n<|assistant|>\nNo, 300 is more."
        + eos
    )
    sample = splits["train"][0]
    assert sample["input_ids"] == tokenizer(text)["input_ids"]
    assert target_runs(labels_of(sample, True), tokenizer) == ["Yes." + eos, "No, 300 is more." + eos]

    alpaca_rendered = prepare(spec(path, max_length=128), tokenizer, tmp_path / "data")
    assert alpaca_rendered["train"][0]["input_ids"] != sample["input_ids"]
    other = own_template_tokenizer(tokenizer, PLAIN_TEMPLATE.replace("|>\n", "|> "))
    assert prepare(spec(path, max_length=128), other, tmp_path / "data")["train"][0]["input_ids"] != sample["input_ids"]
    assert len(list((tmp_path / "data" / TOKEN_DATASET).iterdir())) == 3  # one cache per template


def test_a_template_that_rewrites_earlier_turns_is_refused_when_masking(tmp_path, tokenizer):
    """A template that renders the last turn differently (here: no EOS on the last assistant turn) cannot be cut
    into turns by prefixes: refused with masking, read as it renders without."""
    rewriting = own_template_tokenizer(
        tokenizer,
        PLAIN_TEMPLATE.replace(
            "eos_token if m['role'] == 'assistant'", "eos_token if m['role'] == 'assistant' and not loop.last"
        ),
    )
    path = multi_turn_file(tmp_path, "messages")
    with pytest.raises(dataset.DataError, match=r"first turns of row \d+ of .*generation %\} tags"):
        prepare(spec(path, max_length=128), rewriting, tmp_path / "data")
    assert len(prepare(spec(path, max_length=128, mask_instruction=False), rewriting, tmp_path / "data")["train"]) > 0


def test_a_conversation_the_template_refuses_is_named(tmp_path, tokenizer):
    """A template's own refusal (`raise_exception`) is a DataError naming the row, with or without masking."""
    refusing = own_template_tokenizer(
        tokenizer,
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('no system messages here') }}{% endif %}" + PLAIN_TEMPLATE,
    )
    rows = [{"messages": MULTI_TURN[1:]}] * 9
    rows.insert(2, {"messages": MULTI_TURN})
    path = write_jsonl(tmp_path / "system.jsonl", rows)
    for mask_instruction in (True, False):
        with pytest.raises(dataset.DataError, match=r"cannot render row 3 of .*system\.jsonl \(no system messages"):
            prepare(spec(path, max_length=128, mask_instruction=mask_instruction), refusing, tmp_path / "data")


def test_format_precedence_and_empty_answers(tmp_path, tokenizer):
    """Alpaca fields win over a messages column; a conversation whose answers are blank is dropped as an empty
    Alpaca sample is."""
    rows = [
        {
            "instruction": f"Say {i}.",
            "input": "",
            "output": f"{i}",
            "messages": [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "ignored"}],
        }
        for i in range(10)
    ]
    splits = prepare(spec(write_jsonl(tmp_path / "both.jsonl", rows)), tokenizer, tmp_path / "data")
    assert "target_mask" not in splits["train"].column_names
    blank = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " " if i % 2 else "Hi"}]}
        for i in range(20)
    ]
    splits = prepare(spec(write_jsonl(tmp_path / "blank.jsonl", blank)), tokenizer, tmp_path / "data")
    assert sum(len(splits[name]) for name in dataset.SPLIT_NAMES) == 10


@pytest.mark.parametrize(
    "shape, mask_instruction",
    [
        ("messages", True),
        ("sharegpt", False),
        ("prompt_completion", True),
        ("conversational", False),
    ],
)
def test_each_format_trains_end_to_end(tmp_path, config_values, rows, shape, mask_instruction):
    """A few steps, validations and the test on the best checkpoint, from a chat file (Parquet for one of them)."""
    records = shapes(exchanges(rows))[shape]
    if shape == "prompt_completion":
        import pandas as pd

        path = tmp_path / "chat.parquet"
        pd.DataFrame(records).to_parquet(path)
    else:
        path = write_jsonl(tmp_path / "chat.jsonl", records)
    values = copy.deepcopy(config_values)
    values["data"].update({"dataset": str(path), "mask_instruction": mask_instruction})
    values["training_parameters"].update({"nb_epochs": 1, "max_steps": 4, "eval_every_steps": 2})
    config = write_config(tmp_path / "chat.yaml", values)
    assert distill.main(["--config", str(config), "--run-name", "chat"]) == 0
    run = tmp_path / "checkpoints" / "chat"
    assert (run / "best" / "model.safetensors").is_file()
    metrics = read_metrics(run)
    assert [record["step"] for record in metrics if record["split"] == "validation"][:2] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    assert torch.isfinite(torch.tensor(test["loss"])) and test["perplexity"] > 1.0
    # The model card says what the student read: conversations, not Alpaca fields (as it said before).
    data_section = (run / "best" / "README.md").read_text().split("## Data\n\n")[1].split("\n\n")[0]
    assert summary["data_format"] == "chat" and "conversations (role/content turns)" in data_section
    assert "Alpaca fields" not in data_section and "cut at 64 tokens" in data_section
    assert ("only the assistant turns scored" in data_section) == mask_instruction
    # The checkpoint's chat template renders a conversation as training did (the fixtures' tokenizer has none of
    # its own, so the Alpaca one of data.template).
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(run / "best")
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    assert saved.apply_chat_template(conversation, tokenize=False) == (
        dataset.alpaca_prompt("Name a colour.", "", SHORT) + "Red." + saved.eos_token
    )


# ---------------------------------------------------------------- one data set, one format

FORMAT_WORDS = {"alpaca": "Alpaca", "messages": "messages", "sharegpt": "ShareGPT", "prompt_completion": "prompt/"}


@pytest.mark.parametrize(
    "first, second",
    [("alpaca", "messages"), ("messages", "sharegpt"), ("messages", "alpaca"), ("prompt_completion", "sharegpt")],
)
def test_a_file_mixing_two_formats_is_refused_at_the_first_row_of_the_second(tmp_path, rows, first, second):
    """Before, Alpaca rows then messages rows trained on the Alpaca half (the rest dropped as empty, at INFO), and
    messages rows then conversations rows were refused as "an empty conversation"."""
    formatted = shapes(exchanges(rows[:20]))
    path = write_jsonl(tmp_path / "mixed.jsonl", formatted[first][:10] + formatted[second][10:])
    with pytest.raises(dataset.DataError) as refused:
        dataset.load_text_splits(spec(path), str(tmp_path / "data"))
    message = str(refused.value)
    assert message.startswith(f"row 11 of {path} is in the {FORMAT_WORDS[second]}")
    assert FORMAT_WORDS[first] in message.split("but the data set is read in the")[1] and "; " in message


def test_rows_of_another_format_in_a_text_column_data_set_are_refused(tmp_path, rows):
    texts = [{"text": f"{row['instruction']} {row['output']}"} for row in rows[:10]]
    path = write_jsonl(tmp_path / "texts.jsonl", texts + shapes(exchanges(rows[10:12]))["alpaca"])
    with pytest.raises(dataset.DataError, match=r"^row 11 of .*texts\.jsonl is in the Alpaca .*'text'"):
        dataset.load_text_splits(spec(path, text_column="text"), str(tmp_path / "data"))


@pytest.mark.parametrize(
    "shape, bad_row, expected",
    [
        ("alpaca", {"instruction": "Add.", "input": "", "output": 7}, r"row 4 of .* has a number as its output \(7\)"),
        ("alpaca", {"instruction": ["a", "b"], "input": "", "output": "c"}, r"row 4 of .* a list as its instruction"),
        ("messages", {"messages": "Hello."}, r"messages of row 4 of .* is not a list of turns"),
    ],
)
def test_a_row_holding_another_type_than_text_is_named(tmp_path, rows, shape, bad_row, expected):
    """One row's field of another JSON type makes `datasets` read the whole column as JSON values: before, the
    column was refused without naming the row."""
    good = shapes(exchanges(rows[:10]))[shape]
    path = write_jsonl(tmp_path / "typed.jsonl", good[:3] + [bad_row] + good[3:])
    with pytest.raises(dataset.DataError, match=expected):
        dataset.load_text_splits(spec(path), str(tmp_path / "data"))


def test_conversations_longer_than_max_length_ask_for_a_larger_max_length(tmp_path, tokenizer, caplog):
    """With the user turns masked, a conversation cut at max_length within its user turn has nothing to learn: a
    split of only those was refused as "use more data"; some of them are a warning with the fix."""
    short_pairs = [(f"Say {i}.", f"{i}") for i in range(20)]
    long_pairs = [(user + " apple river garden window" * 12, answer) for user, answer in short_pairs]
    assert all(len(tokenizer(user)["input_ids"]) > 48 for user, _ in long_pairs)  # spec's max_length
    path = write_jsonl(tmp_path / "long.jsonl", shapes(long_pairs)["messages"])
    with pytest.raises(
        dataset.DataError, match=r"every sample of the train split .* data.max_length 48 tokens .*; raise"
    ):
        prepare(spec(path), tokenizer, tmp_path / "data")

    path = write_jsonl(tmp_path / "some_long.jsonl", shapes(short_pairs + long_pairs[:2])["messages"])
    with caplog.at_level("INFO"):
        splits = prepare(spec(path), tokenizer, tmp_path / "data")
    assert sum(len(splits[name]) for name in dataset.SPLIT_NAMES) == 20
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warning.startswith("Dropped 2 of 22 samples") and "raise data.max_length (now 48)" in warning
